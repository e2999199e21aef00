//! `steer collect`: the relation classifier's training data by dual inversion (see
//! `steer::data::collect` for exactly what is computed and the shard format).

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use steer::data::collect::{self, CollectOptions, Counts, Events, Summary};
use steer::pipelines::StableDiffusion;
use steer::steering::prompt::Relation;
use steer::{Error, Result};

#[derive(Args)]
#[command(after_help = "\
Each manifest line is one image: {\"image\": PATH (a PNG, relative to the manifest's folder; \
convert JPEGs such as GQA's first), \"subject\": \"dog\", \"relation\": \"to the left of\", \
\"object\": \"teddy bear\"}. The image is \
centre-cropped and resized to the model's size, inverted with the prompt \"A dog to the left of a \
teddy bear\" and (unless --single-inversion) with the same objects and another, randomly drawn \
relation, and reconstructed; the two words' attention maps at the record steps are kept when the \
reconstruction's PSNR reaches --min-psnr. Both prompts' samples carry the TRUE relation's label.

Lines with a missing or unreadable image, an unknown relation or words not found in the prompt \
are reported and skipped. Shards (safetensors: maps, step, label, prompt_kind, psnr, line) are written \
atomically to --out as shard-I-of-N-K.safetensors; rerunning the same command skips finished \
shards, so a crash loses at most the shard in progress. --shard I/N splits the manifest among N \
machines without coordination (job arrays: one I per task, the same --out).")]
pub struct CollectArgs {
    /// A diffusers Stable Diffusion 2.1 folder (model_index.json, unet/, vae/, ...).
    #[arg(long)]
    pub model: PathBuf,
    /// JSON lines: {"image", "subject", "relation", "object"} per line.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Output folder for shards and the summary.
    #[arg(long)]
    pub out: PathBuf,
    /// Worker I of N: take the manifest lines whose 0-based index is I modulo N.
    #[arg(long, default_value = "0/1", value_parser = parse_shard)]
    pub shard: (usize, usize),
    /// Manifest lines (of this worker) per shard file: the work a crash can lose.
    #[arg(long, default_value_t = 8)]
    pub lines_per_shard: usize,
    /// Invert with the true prompt only (the ablation without the swapped-relation prompt).
    #[arg(long)]
    pub single_inversion: bool,
    /// DDIM steps of the inversion and the reconstruction.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Reconstruction step indices (0-based) at which the maps are recorded.
    #[arg(long, value_delimiter = ',', default_value = "5,10,15,20,25,49")]
    pub record_steps: Vec<usize>,
    /// Fixed-point iterations per inversion step.
    #[arg(long, default_value_t = 5)]
    pub fixed_point_iters: usize,
    /// Keep reconstructions whose PSNR (dB, 8-bit) is at least this ("-inf" keeps all).
    #[arg(long, default_value_t = 19.5, allow_hyphen_values = true)]
    pub min_psnr: f64,
    /// Seed of the swapped-relation draw (each line's draw depends on the seed and its index).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The class list, comma-separated; labels are indices into it.
    #[arg(long, default_value = "above,below,to the left of,to the right of")]
    pub classes: String,
    /// Store the maps as f16 (half the size) instead of f32.
    #[arg(long)]
    pub f16: bool,
    /// cpu (f32), or cuda / cuda:N: the UNet in bf16 on that GPU (text encoder and VAE stay on
    /// the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::Device,
}

fn parse_shard(s: &str) -> std::result::Result<(usize, usize), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("expected I/N such as 0/4, got {s:?}"))?;
    let i: usize = i.trim().parse().map_err(|_| format!("bad I in {s:?}"))?;
    let n: usize = n.trim().parse().map_err(|_| format!("bad N in {s:?}"))?;
    if n == 0 || i >= n {
        return Err(format!("{s:?}: need 0 <= I < N"));
    }
    Ok((i, n))
}

fn parse_classes(s: &str) -> Result<Vec<Relation>> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            Relation::from_name(c).ok_or_else(|| {
                Error::Invalid(format!(
                    "--classes: unknown class {c:?} (the spatial classes are above, below, to the left of, to the right of)"
                ))
            })
        })
        .collect()
}

struct Bar(ProgressBar);

impl Events for Bar {
    fn start(&mut self, lines: usize, already_done: usize) {
        self.0.set_length(lines as u64);
        self.0.set_position(already_done as u64);
        if already_done > 0 {
            self.0.println(format!(
                "resuming: {already_done} of {lines} lines already done"
            ));
        }
    }
    fn phase(&mut self, msg: &str) {
        self.0.set_message(msg.to_string());
    }
    fn line_done(&mut self, totals: &Counts) {
        self.0.inc(1);
        self.0.set_prefix(format!(
            "kept {} / dropped {} / skipped {}",
            totals.kept_lines,
            totals.dropped_psnr,
            totals.skipped_total()
        ));
    }
    fn report(&mut self, msg: &str) {
        self.0.suspend(|| eprintln!("{msg}"));
    }
}

pub fn run(args: &CollectArgs) -> Result<()> {
    let mut opts = CollectOptions::new(&args.manifest, &args.out);
    (opts.worker, opts.workers) = args.shard;
    opts.lines_per_shard = args.lines_per_shard;
    opts.single_inversion = args.single_inversion;
    opts.steps = args.steps;
    opts.record_steps = args.record_steps.clone();
    opts.fixed_point_iters = args.fixed_point_iters;
    opts.min_psnr = args.min_psnr;
    opts.seed = args.seed;
    opts.classes = parse_classes(&args.classes)?;
    opts.maps_f16 = args.f16;
    opts.validate()?;
    let pipe = StableDiffusion::from_dir_placed(&args.model, args.device.placement()?)?;

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "[{bar:30}] {pos}/{len} lines, {elapsed} elapsed, eta {eta} ({prefix})\n{msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut events = Bar(bar);
    let summary = collect::collect(&pipe, &opts, &mut events)?;
    events.0.finish_and_clear();
    print_summary(&summary, &opts);
    Ok(())
}

fn print_summary(s: &Summary, opts: &CollectOptions) {
    let c = &s.counts;
    println!(
        "worker {}/{}: {} shards ({} written now, {} from earlier runs) in {}",
        s.worker,
        s.workers,
        s.shards,
        s.shards_written,
        s.shards_resumed,
        opts.out.display()
    );
    println!("lines done:        {}", c.lines);
    println!(
        "kept lines:        {} ({} samples)",
        c.kept_lines, c.samples
    );
    println!(
        "dropped for PSNR:  {} (true prompt below {} dB); swapped prompt dropped on {} kept lines",
        c.dropped_psnr, opts.min_psnr, c.dropped_psnr_swapped
    );
    let reasons: Vec<String> = c.skipped.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    if reasons.is_empty() {
        println!("skipped:           0");
    } else {
        println!(
            "skipped:           {} ({})",
            c.skipped_total(),
            reasons.join(", ")
        );
    }
    println!(
        "summary:           {}",
        opts.out
            .join(collect::summary_file_name(s.worker, s.workers))
            .display()
    );
}
