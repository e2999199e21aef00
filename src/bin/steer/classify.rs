//! `steer classify`: run the relation classifier on maps from a safetensors file, and optionally
//! its backward to the maps, so a user can check a converted checkpoint against PyTorch or score
//! captured maps.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;

use crate::device::{cpu_only, Device};
use steer::safetensors_io::{self, SafetensorsFile};
use steer::steering::classifier::RelationClassifier;
use steer::{DType, Error, Result, Tensor};

#[derive(Args)]
#[command(after_help = "\
Inputs (safetensors):
  maps              (B, 2, N, 16, 16) float: word 1 (subject) and word 2 (object), N maps each
                    ((2, N, 16, 16) is taken as B = 1)
  step              (B) int64: the step index the classifier's step embeddings read, passed
                    through as is (0..num_timesteps, 0..50 for the published classifiers). It is
                    NOT bucketed here: give the training step a denoising step buckets to
                    (5, 10, 15, 20, 25 or 49 for steps 0-5, 6-10, ..., 26-49), as `steer generate`
                    does. A single value applies to the whole batch
  logits_cotangent  (B, C) float, optional: also write maps_grad

Outputs:
  logits            (B, C) float32 (float64 with --f64), in the order of the metadata `classes`
  maps_grad         gradient of sum(logits * logits_cotangent) with respect to maps

Example:
  steer classify --classifier sd21-classifier.safetensors --inputs maps.safetensors \\
      --out logits.safetensors")]
pub struct ClassifyArgs {
    /// The classifier: a safetensors file written by scripts/convert_classifier.py.
    #[arg(long)]
    pub classifier: PathBuf,
    /// Inputs: `maps`, `step` and optionally `logits_cotangent` (see below).
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write `logits` (and `maps_grad`).
    #[arg(long)]
    pub out: PathBuf,
    /// Compute in float64 and write float64 outputs (a reference check against PyTorch).
    #[arg(long)]
    pub f64: bool,
    /// Where the classifier runs: cpu (f32), cuda or cuda:N (bf16 on that GPU).
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

fn tensor(file: &SafetensorsFile, name: &str) -> Result<Tensor> {
    if !file.contains(name) {
        return Err(Error::format(
            file.path(),
            format!("missing input tensor `{name}`"),
        ));
    }
    file.tensor(name)
}

pub fn run(args: &ClassifyArgs) -> Result<()> {
    if args.f64 && args.device != Device::Cpu {
        return Err(cpu_only("--f64"));
    }
    let dtype = if args.f64 { DType::F64 } else { DType::F32 };
    let model = RelationClassifier::load(&args.classifier)?;
    let model = if args.f64 {
        model.to_dtype(DType::F64)?
    } else {
        model.placed(&args.device.placement()?)?
    };
    let inputs = SafetensorsFile::open(&args.inputs)?;
    let mut maps = tensor(&inputs, "maps")?;
    if maps.dtype() == DType::I64 {
        return Err(Error::format(inputs.path(), "`maps` must be float"));
    }
    if maps.rank() == 4 {
        let s = maps.shape().to_vec();
        maps = maps.reshape(&[1, s[0], s[1], s[2], s[3]])?;
    }
    let b = maps.shape().first().copied().unwrap_or(0);
    let step_t = tensor(&inputs, "step")?;
    if step_t.dtype() != DType::I64 {
        return Err(Error::format(
            inputs.path(),
            format!(
                "`step` must be int64 step indices, got {:?}",
                step_t.dtype()
            ),
        ));
    }
    let raw = step_t.to_vec::<i64>()?;
    if let Some(&bad) = raw.iter().find(|&&s| s < 0) {
        return Err(Error::format(
            inputs.path(),
            format!("`step` holds {bad}: step indices are non-negative"),
        ));
    }
    let steps: Vec<usize> = match raw.len() {
        1 => vec![raw[0] as usize; b],
        n if n == b => raw.iter().map(|&s| s as usize).collect(),
        n => {
            return Err(Error::format(
                inputs.path(),
                format!("`step` has {n} values for a batch of {b} maps"),
            ))
        }
    };
    let (logits, saved) = model.forward(&maps, &steps, None)?;
    // Written as float32 (float64 with --f64) whatever the device computed in.
    let output = |t: Tensor| t.to_host()?.to_dtype(dtype);
    let logits = output(logits)?;
    let mut outs = vec![("logits".to_string(), logits.clone())];
    if inputs.contains("logits_cotangent") {
        let cot = tensor(&inputs, "logits_cotangent")?;
        if cot.shape() != logits.shape() {
            return Err(Error::format(
                inputs.path(),
                format!(
                    "`logits_cotangent` {:?} does not match the logits {:?}",
                    cot.shape(),
                    logits.shape()
                ),
            ));
        }
        let g = model.input_grad(&saved, &cot)?;
        outs.push(("maps_grad".into(), output(g)?.reshape(maps.shape())?));
    }
    let named: Vec<(&str, &Tensor)> = outs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([(
        "classes".to_string(),
        serde_json::to_string(model.classes()).expect("strings serialise"),
    )]);
    safetensors_io::save(&args.out, &named, Some(meta))?;
    let probs: Vec<f64> = logits.to_vec()?;
    let c = model.num_classes();
    for (i, row) in probs.chunks(c).enumerate() {
        let best = row
            .iter()
            .enumerate()
            .fold(0, |bi, (j, &v)| if v > row[bi] { j } else { bi });
        eprintln!(
            "sample {i}: step {}: {} (logit {:.4})",
            steps[i],
            model.classes()[best],
            row[best]
        );
    }
    for (n, t) in &outs {
        eprintln!("wrote {n} {:?}", t.shape());
    }
    Ok(())
}
