//! `steer generate`: text to image with DDIM and classifier-free guidance.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use steer::pipelines::{GenerateRequest, StableDiffusion};
use steer::safetensors_io::{self, SafetensorsFile};
use steer::shapes::eval::EvalSettings;
use steer::shapes::model::{shipped_file, shipped_model_dir};
use steer::steering::classifier::RelationClassifier;
use steer::steering::prompt::{parse_relations, triplet_token_indices};
use steer::steering::refine::{Steerer, SteeringConfig, SteeringTarget};
use steer::weights::Placement;
use steer::{image, DType, Error, Result, Tensor};

#[derive(Args)]
pub struct GenerateArgs {
    /// A diffusers Stable Diffusion 2.1 folder (model_index.json, unet/, vae/, ...), or a
    /// pixel-space one without vae/. Default: the shipped ShapesWorld model (32x32 images of
    /// coloured shapes), embedded in the binary.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt, e.g. "a dog to the right of a teddy bear".
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 disables guidance) [default: 7.5, or 3 for the shipped
    /// ShapesWorld model].
    #[arg(long)]
    pub guidance: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height and width in pixels (default: the model's native size).
    #[arg(long)]
    pub size: Option<usize>,
    /// Initial noise from a safetensors file (its tensor `latents`, shape (1, C, h, w), C the
    /// UNet's input channels: 4 for SD2.1, 3 in pixel space), to match
    /// a run of diffusers' pipeline exactly; overrides --seed and --size.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Output PNG.
    #[arg(long, short, default_value = "out.png")]
    pub out: PathBuf,
    /// Also write the final latents (tensor `latents`) to this safetensors file.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// A relation classifier (safetensors from scripts/convert_classifier.py or `steer train`):
    /// steer the relations found in the prompt. Without it, or when the prompt names no
    /// relation, generation is unsteered. The shipped ShapesWorld model comes with its own
    /// classifier, used by default.
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// Do not steer, even with the shipped model's classifier.
    #[arg(long, conflicts_with = "classifier")]
    pub no_steer: bool,
    /// Where to write the steering report (JSON); default: the PNG's path with .json.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Optimise denoising steps 0..N.
    #[arg(long, default_value_t = 25)]
    pub steer_steps: usize,
    /// Gradient step on the latent.
    #[arg(long, default_value_t = 5.0)]
    pub step_size: f64,
    /// Refinement passes after the first, per optimised step.
    #[arg(long, default_value_t = 15)]
    pub max_refinements: usize,
    /// cpu (f32), or cuda / cuda:N: the UNet in bf16 on that GPU (text encoder and VAE stay on
    /// the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::Device,
}

fn progress_bar(steps: usize) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = shipped_model_dir()?;
            eprintln!(
                "no --model: using the shipped ShapesWorld model ({})",
                dir.display()
            );
            dir
        }
    };
    let shipped = args.model.is_none();
    let placement = args.device.placement()?;
    let pipe = StableDiffusion::from_dir_placed(&model, placement.clone())?;
    let guidance = args.guidance.unwrap_or(if shipped {
        EvalSettings::default().guidance
    } else {
        7.5
    });
    let init_latents = match &args.noise {
        Some(path) => SafetensorsFile::open(path)?
            .tensor("latents")?
            .to_dtype(DType::F32)?,
        None => {
            let size = args.size.unwrap_or_else(|| pipe.default_size());
            let f = pipe.vae_scale_factor();
            // The UNet halves the latent once per down block but the last.
            let multiple = f << (pipe.unet.config.block_out_channels.len().max(1) - 1);
            if !size.is_multiple_of(multiple) {
                return Err(Error::Invalid(format!(
                    "--size {size} must be a multiple of {multiple}"
                )));
            }
            let c = pipe.unet.config.in_channels;
            Tensor::randn(&[1, c, size / f, size / f], DType::F32, args.seed)
        }
    };
    let cond = pipe.encode_prompt(&args.prompt)?;
    let uncond = pipe.encode_prompt(&args.negative_prompt)?;
    let classifier = match &args.classifier {
        Some(path) => Some(path.clone()),
        None if shipped && !args.no_steer => shipped_file("classifier.safetensors"),
        None => None,
    };
    let steering = match &classifier {
        Some(path) => load_steering(&pipe, &placement, path, &args.prompt)?,
        None => None,
    };
    let config = SteeringConfig {
        step_size: args.step_size,
        max_refinements: args.max_refinements,
        steps: 0..args.steer_steps,
        ..SteeringConfig::default()
    };
    let bar = progress_bar(args.steps);
    bar.set_message(if steering.is_some() {
        "steering"
    } else {
        "denoising"
    });
    let started = std::time::Instant::now();
    let req = GenerateRequest {
        cond: &cond,
        uncond: Some(&uncond),
        guidance,
        steps: args.steps,
        init_latents,
        record_maps: None,
    };
    let mut reports = Vec::new();
    let out = match &steering {
        Some((classifier, targets)) => {
            let steerer = Steerer {
                unet: &pipe.unet,
                loss: classifier,
                cond: &cond,
                targets,
                config: &config,
            };
            let mut hook = |i: usize, t: usize, z: &mut Tensor| {
                if steerer.applies(i) {
                    let r = steerer.refine(z, i, t)?;
                    bar.set_message(format!("steering (loss {:.2e})", r.final_loss));
                    reports.push(r);
                } else {
                    bar.set_message("denoising");
                }
                Ok(())
            };
            pipe.generate(&req, Some(&mut hook), |_| bar.inc(1))?
        }
        None => pipe.generate(&req, None, |_| bar.inc(1))?,
    };
    bar.finish_and_clear();
    if let Some((classifier, targets)) = &steering {
        let path = args
            .report
            .clone()
            .unwrap_or_else(|| args.out.with_extension("json"));
        let report = serde_json::json!({
            "prompt": args.prompt,
            "seed": args.seed,
            "steps": args.steps,
            "guidance": guidance,
            "classifier": args.classifier,
            "classes": classifier.classes(),
            "targets": targets,
            "config": config,
            "seconds": started.elapsed().as_secs_f64(),
            "optimised_steps": reports,
        });
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Invalid(format!("report: {e}")))?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.save_latents {
        safetensors_io::save(path, &[("latents", &out.latents)], None)?;
    }
    image::save_png(&pipe.decode(&out.latents)?, &args.out)?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The classifier and the prompt's relations as steering targets; `None` (with a message) when
/// the prompt names no relation.
/// The classifier goes where the UNet is (`placement`).
fn load_steering(
    pipe: &StableDiffusion,
    placement: &Placement,
    path: &std::path::Path,
    prompt: &str,
) -> Result<Option<(RelationClassifier, Vec<SteeringTarget>)>> {
    let classifier = RelationClassifier::load(path)?.placed(placement)?;
    let n: usize = pipe
        .unet
        .cross_attention_layers()
        .iter()
        .map(|(heads, _)| heads)
        .sum();
    if classifier.maps_per_word() != n {
        return Err(Error::Invalid(format!(
            "classifier {} reads {} maps per word but this model captures {n}: it was trained for another model",
            path.display(),
            classifier.maps_per_word()
        )));
    }
    let triplets = parse_relations(prompt);
    if triplets.is_empty() {
        eprintln!("no spatial relation found in the prompt: generating unsteered");
        return Ok(None);
    }
    let mut targets = Vec::new();
    for t in &triplets {
        let Some(class) = classifier.class_index(t.relation.name()) else {
            return Err(Error::Invalid(format!(
                "the classifier has no class `{}` (it knows {:?})",
                t.relation.name(),
                classifier.classes()
            )));
        };
        let (subject_tokens, object_tokens) = triplet_token_indices(&pipe.tokenizer, prompt, t)?;
        targets.push(SteeringTarget {
            description: format!("{} {} {}", t.subject, t.relation.name(), t.object),
            subject_tokens,
            object_tokens,
            class,
        });
        eprintln!(
            "steering: {}",
            targets.last().expect("just pushed").description
        );
    }
    Ok(Some((classifier, targets)))
}
