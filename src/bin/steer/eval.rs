//! `steer eval`: ShapesWorld's position benchmark (unsteered vs steered, scored by the detector).

use std::path::PathBuf;
use std::sync::Mutex;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use steer::pipelines::StableDiffusion;
use steer::shapes::detect::Detector;
use steer::shapes::eval::{self, EvalSettings};
use steer::steering::centroid::CentroidLoss;
use steer::steering::classifier::RelationClassifier;
use steer::steering::prompt::Relation;
use steer::{image, Error, Result};

#[derive(Args)]
pub struct EvalArgs {
    /// A diffusers folder whose images the ShapesWorld detector reads. Default: the shipped
    /// ShapesWorld model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The learned relation classifier. Default: the shipped one (with the shipped model).
    #[arg(long)]
    pub classifier: Option<PathBuf>,
    /// A classifier trained on single inversion (the shortcut ablation); adds a method.
    /// Default: the shipped one (with the shipped model).
    #[arg(long)]
    pub single_classifier: Option<PathBuf>,
    /// Seeds per prompt (24 prompts: 6 ordered object pairs x 4 relations).
    #[arg(long, default_value_t = 10)]
    pub seeds: u64,
    /// Only the first N cases (prompt x seed), for a quick look.
    #[arg(long)]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub settings: SettingsArgs,
    /// Output folder: eval.json (summary and every sample) and contact.png.
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// Rows (cases) of the contact sheet.
    #[arg(long, default_value_t = 24)]
    pub sheet_rows: usize,
    /// cpu (f32), or cuda / cuda:N: the UNet in bf16 on that GPU (text encoder and VAE stay on
    /// the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: crate::device::Device,
}

/// [`EvalSettings`] as flags, defaulting to its values.
#[derive(Args)]
pub struct SettingsArgs {
    /// DDIM steps [default: 50].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance [default: 3].
    #[arg(long)]
    guidance: Option<f64>,
    /// Steer denoising steps 0..N [default: 15].
    #[arg(long)]
    steer_steps: Option<usize>,
    /// Refinement passes after the first, per steered step [default: 5].
    #[arg(long)]
    max_refinements: Option<usize>,
    /// The learned classifiers' gradient step on the latent [default: 10].
    #[arg(long)]
    step_size: Option<f64>,
    /// The centroid loss's gradient step on the latent [default: 20].
    #[arg(long)]
    centroid_step_size: Option<f64>,
}

impl SettingsArgs {
    fn resolve(&self) -> EvalSettings {
        let d = EvalSettings::default();
        EvalSettings {
            steps: self.steps.unwrap_or(d.steps),
            guidance: self.guidance.unwrap_or(d.guidance),
            steer_steps: self.steer_steps.unwrap_or(d.steer_steps),
            max_refinements: self.max_refinements.unwrap_or(d.max_refinements),
            step_size: self.step_size.unwrap_or(d.step_size),
            centroid_step_size: self.centroid_step_size.unwrap_or(d.centroid_step_size),
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let shipped = args.model.is_none();
    let model = match &args.model {
        Some(dir) => dir.clone(),
        None => steer::shapes::model::shipped_model_dir()?,
    };
    let placement = args.device.placement()?;
    let pipe = StableDiffusion::from_dir_placed(&model, placement.clone())?;
    // The classifiers go where the UNet is.
    let load = |given: &Option<PathBuf>, name: &str| -> Result<Option<RelationClassifier>> {
        let path = match given {
            Some(path) => path.clone(),
            None if shipped => match steer::shapes::model::shipped_file(name) {
                Some(path) => path,
                None => return Ok(None),
            },
            None => return Ok(None),
        };
        Ok(Some(RelationClassifier::load(path)?.placed(&placement)?))
    };
    let learned = load(&args.classifier, "classifier.safetensors")?;
    let single = load(&args.single_classifier, "classifier-single.safetensors")?;
    let settings = args.settings.resolve();
    let centroid = CentroidLoss::new(Relation::ALL.to_vec());
    let methods = eval::methods(&settings, learned.as_ref(), &centroid, single.as_ref());
    let mut cases = eval::cases(args.seeds);
    if let Some(n) = args.limit {
        cases.truncate(n);
    }
    if cases.is_empty() {
        return Err(Error::Invalid(
            "no cases: --seeds and --limit must be > 0".into(),
        ));
    }
    eprintln!(
        "eval: {} cases x {} methods on {}",
        cases.len(),
        methods.len(),
        model.display()
    );
    let bar = ProgressBar::new((cases.len() * methods.len()) as u64).with_style(
        ProgressStyle::with_template(
            "eval [{bar:30}] {pos}/{len} images, {elapsed} elapsed, eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let started = std::time::Instant::now();
    let bar_lock = Mutex::new(&bar);
    let samples = eval::run(
        &pipe,
        &methods,
        &cases,
        &settings,
        &Detector::default(),
        |_| bar_lock.lock().expect("progress lock").inc(1),
    )?;
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let summary = eval::summarize(&methods, &cases, &samples);
    println!("{}", eval::table(&summary));
    println!(
        "{} images in {wall:.0} s ({:.2} s per image, wall clock)",
        samples.len(),
        wall / samples.len() as f64
    );
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let sheet = eval::contact_sheet(&samples, methods.len(), args.sheet_rows, 2)?;
    image::save_png(&sheet, args.out.join("contact.png"))?;
    let records: Vec<serde_json::Value> = samples
        .iter()
        .map(|s| {
            let c = &cases[s.case];
            serde_json::json!({
                "prompt": c.prompt(),
                "seed": c.seed,
                "relation": c.relation.name(),
                "method": methods[s.method].name,
                "sample": s,
            })
        })
        .collect();
    let json = serde_json::json!({
        "model": model,
        "settings": settings,
        "wall_seconds": wall,
        "summary": summary,
        "samples": records,
    });
    let path = args.out.join("eval.json");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json).expect("serialisable"),
    )
    .map_err(|e| Error::io(&path, e))?;
    println!(
        "wrote {} and {}",
        path.display(),
        args.out.join("contact.png").display()
    );
    Ok(())
}
