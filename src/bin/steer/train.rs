//! `steer train`: train the relation classifier on `steer collect`'s shards (see
//! `steer::train::trainer` for exactly what is computed, checkpointed and reported).

use std::path::{Path, PathBuf};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use steer::steering::classifier::ClassifierConfig;
use steer::train::trainer::{
    self, ClassifierSizes, EpochRecord, EvalMetrics, TrainEvents, TrainOptions, TrainReport,
};
use steer::train::PlateauConfig;
use steer::{Error, Result};

/// `--model-config`: the reference's SD2.1 or FLUX sizes, or a JSON file.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    Sd,
    Flux,
    File(PathBuf),
}

fn parse_model_config(s: &str) -> std::result::Result<ModelConfig, String> {
    match s {
        "sd" => Ok(ModelConfig::Sd),
        "flux" => Ok(ModelConfig::Flux),
        _ if s.ends_with(".json") => Ok(ModelConfig::File(PathBuf::from(s))),
        _ => Err(format!(
            "{s:?}: expected sd, flux, or a .json file with the reference's `model` config"
        )),
    }
}

/// The sizes in a JSON file: the reference's `model` section (extractor, classifier, map_size,
/// d_model, num_timesteps), alone or under a `model` key (a whole config converted from yaml).
fn sizes_from_file(path: &Path) -> Result<ClassifierSizes> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not JSON: {e}")))?;
    let model = v.get("model").unwrap_or(&v);
    // N and the classes come from the data; placeholders to check the rest.
    let config = ClassifierConfig::from_reference(model, 1, vec!["-".into()], None)
        .map_err(|e| Error::format(path, e.to_string()))?;
    Ok(ClassifierSizes::Custom(config))
}

#[derive(Args)]
#[command(after_help = "\
The classes and N (maps per word) come from the shards, which must agree on them; the step \
embeddings are trained at the steps the shards were recorded at. Every sample of one image (both \
prompts, every step) goes to the same side of the seeded train/validation split, stratified by \
relation.

Each epoch: shuffled minibatches with dropout, cross-entropy, AdamW; then the validation loss \
(eval mode), on which ReduceLROnPlateau (factor 0.5, patience 5, threshold 0, min lr 1e-6) and \
early stopping (--patience) act, as in the reference trainer. A batch whose gradient holds NaN or \
Inf is skipped with a warning.

Written to --out after every epoch, each file atomically:
  best.safetensors         the classifier with the lowest validation loss (for --classifier)
  last.safetensors         the classifier after the last epoch
  train-state.safetensors  optimizer, scheduler, early stopping, epoch: for --resume
  report.json              history, per-class validation accuracy, confusion matrix
A crash loses at most the epoch in progress: rerun with --resume (and the same data and \
settings; --epochs may be raised) to continue exactly where it stopped.

Example:
  steer train --data shards/ --out runs/sd21 --model-config sd")]
pub struct TrainArgs {
    /// Shard files or folders of shards (*.safetensors) written by `steer collect`.
    #[arg(long, num_args = 1.., required = true)]
    pub data: Vec<PathBuf>,
    /// A separate validation set (shards); without it --data is split by image.
    #[arg(long, num_args = 1..)]
    pub val_data: Vec<PathBuf>,
    /// Output folder: checkpoints, training state and report.
    #[arg(long)]
    pub out: PathBuf,
    /// The classifier's sizes: `sd` (the reference's SD2.1 config: extractor 2 layers, 2 heads,
    /// FF 128; head 2 layers, 4 heads, FF 128; default lr 1e-4, 100 epochs), `flux` (FLUX.1-dev:
    /// 4 layers, 4 heads, FF 512; head 4 layers, 8 heads, FF 512; lr 5e-5, 200 epochs), or a
    /// .json file holding the reference's `model` section (sd's defaults for lr and epochs).
    #[arg(long, default_value = "sd", value_parser = parse_model_config)]
    pub model_config: ModelConfig,
    /// Epoch limit [default: 100 sd, 200 flux].
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Training minibatch size (the last batch of an epoch may be smaller).
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// AdamW learning rate [default: 1e-4 sd, 5e-5 flux].
    #[arg(long)]
    pub lr: Option<f64>,
    /// AdamW (decoupled) weight decay.
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Fraction of each relation's images held out for validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Early stopping: epochs without a lower validation loss before training stops.
    #[arg(long, default_value_t = 10)]
    pub patience: u32,
    /// Early stopping: the decrease that counts as an improvement.
    #[arg(long, default_value_t = 0.0)]
    pub min_delta: f64,
    /// ReduceLROnPlateau: the factor the learning rate is multiplied by on a plateau.
    #[arg(long, default_value_t = 0.5)]
    pub lr_factor: f64,
    /// ReduceLROnPlateau: epochs without improvement tolerated before the rate drops.
    #[arg(long, default_value_t = 5)]
    pub lr_patience: u32,
    /// ReduceLROnPlateau: the lowest learning rate.
    #[arg(long, default_value_t = 1e-6)]
    pub min_lr: f64,
    /// The validation loss is the mean of the mean losses of blocks of this many samples (the
    /// reference's validation batch size); it changes nothing else.
    #[arg(long, default_value_t = 256)]
    pub val_block: usize,
    /// Seed of the initialisation, the split, the shuffles and the dropout masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in --out from its train-state.safetensors (a new run if there is none).
    #[arg(long)]
    pub resume: bool,
    /// Use only the true prompts' samples (single inversion): the linguistic-shortcut ablation.
    #[arg(long)]
    pub true_prompts_only: bool,
}

struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A line above the bar; printed even when the bar is hidden (stderr not a terminal, as in
    /// batch-job logs), where `ProgressBar::println` would drop it.
    fn line(&self, msg: String) {
        self.bar.suspend(|| eprintln!("{msg}"));
    }
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.2}%", 100.0 * x)
    } else {
        "-".into()
    }
}

impl TrainEvents for Bar {
    fn start(&mut self, r: &TrainReport, first_epoch: usize) {
        let s = &r.split;
        self.line(format!(
            "data: {} classes {:?}, N = {} maps per word, steps {:?}",
            r.classes.len(),
            r.classes,
            r.maps_per_word,
            r.step_buckets
        ));
        self.line(format!(
            "split ({}): train {} samples from {} images, validation {} samples from {} images",
            s.method, s.train_samples, s.train_images, s.val_samples, s.val_images
        ));
        self.line(format!(
            "classifier: {} parameters; epochs {}..{}",
            r.parameters,
            first_epoch + 1,
            r.epochs_limit
        ));
    }
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize) {
        self.bar.reset();
        self.bar.set_length(batches as u64);
        self.bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
        self.bar.set_message("");
    }
    fn batch_done(&mut self, loss: f64, accuracy: f64) {
        self.bar.inc(1);
        self.bar
            .set_message(format!("loss {loss:.4}, accuracy {}", pct(accuracy)));
    }
    fn validating(&mut self) {
        self.bar.set_message("validating");
    }
    fn epoch_done(&mut self, r: &EpochRecord) {
        self.line(format!(
            "epoch {:>3}: train loss {:.4} acc {} | val loss {:.4} acc {} | lr {:.3e}{}{}{}",
            r.epoch,
            r.train_loss,
            pct(r.train_accuracy),
            r.val_loss,
            pct(r.val_accuracy),
            r.lr,
            if r.next_lr != r.lr {
                format!(" -> {:.3e}", r.next_lr)
            } else {
                String::new()
            },
            if r.best { " (best)" } else { "" },
            if r.skipped_updates > 0 {
                format!(" [{} updates skipped: NaN/Inf]", r.skipped_updates)
            } else {
                String::new()
            },
        ));
    }
    fn report(&mut self, msg: &str) {
        self.bar.suspend(|| eprintln!("{msg}"));
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let sizes = match &args.model_config {
        ModelConfig::Sd => ClassifierSizes::Sd,
        ModelConfig::Flux => ClassifierSizes::Flux,
        ModelConfig::File(p) => sizes_from_file(p)?,
    };
    let mut opts = TrainOptions::new(args.data.clone(), &args.out, sizes);
    opts.val_data = args.val_data.clone();
    if let Some(e) = args.epochs {
        opts.epochs = e;
    }
    if let Some(lr) = args.lr {
        opts.lr = lr;
    }
    opts.batch_size = args.batch_size;
    opts.val_block = args.val_block;
    opts.weight_decay = args.weight_decay;
    opts.val_fraction = args.val_fraction;
    opts.patience = args.patience;
    opts.min_delta = args.min_delta;
    opts.plateau = PlateauConfig {
        factor: args.lr_factor,
        patience: args.lr_patience,
        min_lr: args.min_lr,
        ..PlateauConfig::reference()
    };
    opts.seed = args.seed;
    opts.resume = args.resume;
    opts.true_prompts_only = args.true_prompts_only;

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} batches, {elapsed} elapsed, eta {eta}: {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut events = Bar { bar };
    let report = trainer::train(&opts, &mut events)?;
    events.bar.finish_and_clear();
    print_report(&report, &args.out);
    Ok(())
}

fn print_report(r: &TrainReport, out: &Path) {
    let how = if r.stopped_early {
        format!(
            "stopped early after epoch {} (no lower validation loss for {} epochs)",
            r.epochs_done,
            r.history.last().map_or(0, |h| h.epochs_without_improvement)
        )
    } else {
        format!("{} of {} epochs", r.epochs_done, r.epochs_limit)
    };
    println!("training: {how}");
    if r.skipped_updates > 0 {
        println!("skipped updates (NaN/Inf gradients): {}", r.skipped_updates);
    }
    match &r.best {
        Some(best) => {
            println!(
                "best: epoch {}, validation loss {:.4}, accuracy {} ({} samples, {} images)",
                r.best_epoch,
                best.loss,
                pct(best.accuracy),
                best.samples,
                r.split.val_images
            );
            print_metrics(best);
        }
        None => println!("no epoch finished with a finite validation loss: no best checkpoint"),
    }
    println!("checkpoints:");
    if r.best.is_some() {
        println!("  {}", r.best_checkpoint.display());
    }
    if r.epochs_done > 0 {
        println!("  {}", r.last_checkpoint.display());
    }
    println!("report: {}", out.join(trainer::REPORT_FILE).display());
}

fn print_metrics(m: &EvalMetrics) {
    let w = m
        .per_class
        .iter()
        .map(|c| c.class.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!();
    println!(
        "{:<w$}  {:>7}  {:>7}  {:>8}  {:>9}",
        "class", "support", "correct", "accuracy", "precision"
    );
    for c in &m.per_class {
        println!(
            "{:<w$}  {:>7}  {:>7}  {:>8}  {:>9}",
            c.class,
            c.support,
            c.correct,
            pct(c.accuracy),
            pct(c.precision)
        );
    }
    println!();
    println!("confusion matrix (rows: true class, columns: predicted, same order):");
    let cw = m
        .confusion
        .iter()
        .flatten()
        .map(|v| v.to_string().len())
        .max()
        .unwrap_or(1)
        .max(3);
    for (c, row) in m.per_class.iter().zip(&m.confusion) {
        let cells: Vec<String> = row.iter().map(|v| format!("{v:>cw$}")).collect();
        println!("{:<w$}  {}", c.class, cells.join(" "));
    }
    println!();
    let steps: Vec<String> = m
        .per_step
        .iter()
        .map(|(s, a)| format!("{s}: {}", pct(a.accuracy)))
        .collect();
    println!("accuracy by step:   {}", steps.join(", "));
    let prompts: Vec<String> = m
        .per_prompt
        .iter()
        .map(|(k, a)| format!("{k} prompt: {} ({} samples)", pct(a.accuracy), a.samples))
        .collect();
    println!("accuracy by prompt: {}", prompts.join(", "));
    println!();
}
