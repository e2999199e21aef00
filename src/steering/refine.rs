//! The steering loop (SPEC section 6), as the reference's `TestTimeOptimization.refine_latents`:
//! at each optimised denoising step, up to 1 + `max_refinements` passes; each pass runs the
//! denoiser on z_t (conditional prompt only) capturing the maps of one triplet's words
//! (round robin over the prompt's triplets), scores them with the relation classifier at the
//! step's training bucket (or any other [`MapLoss`]), and, while the cross-entropy against the requested relation is above
//! the step's target, moves z_t by plain gradient descent: `z_t <- z_t - step_size * dL/dz_t`.

use serde::Serialize;

use super::classifier::RelationClassifier;
use super::unet_maps::unet_with_maps;
use crate::models::unet::UNet2DConditionModel;
use crate::{ops, DType, Result, Tensor};

/// Every number of the loop, with the reference's SD2.1 values as defaults.
#[derive(Clone, Debug, Serialize)]
pub struct SteeringConfig {
    /// Gradient step on the latent (5 for SD2.1 and FLUX, 7.5 for SD1.4).
    pub step_size: f64,
    /// Refinement passes after the first (15: at most 16 passes a step).
    pub max_refinements: usize,
    /// Denoising steps `start..end` are optimised (0..25 of 50).
    pub steps: std::ops::Range<usize>,
    /// Loss target per denoising step; the last entry holds for later steps.
    pub loss_targets: Vec<f64>,
    /// A first pass whose loss is already below this skips the step (the reference's
    /// `min_loss`, 0: never).
    pub min_loss: f64,
}

impl Default for SteeringConfig {
    fn default() -> Self {
        SteeringConfig {
            step_size: 5.0,
            max_refinements: 15,
            steps: 0..25,
            loss_targets: vec![1e-5, 3e-5, 5e-5, 7e-5],
            min_loss: 0.0,
        }
    }
}

impl SteeringConfig {
    pub fn loss_target(&self, step: usize) -> f64 {
        self.loss_targets
            .get(step)
            .or(self.loss_targets.last())
            .copied()
            .unwrap_or(0.0)
    }
}

/// One relation to enforce: the two words' token indices and the requested class.
#[derive(Clone, Debug, Serialize)]
pub struct SteeringTarget {
    /// Human-readable "subject relation object".
    pub description: String,
    pub subject_tokens: Vec<usize>,
    pub object_tokens: Vec<usize>,
    pub class: usize,
}

/// One pass of the loop.
#[derive(Clone, Debug, Serialize)]
pub struct PassReport {
    /// Which target (round robin index).
    pub target: usize,
    pub loss: f64,
    /// The classifier's class probabilities.
    pub probs: Vec<f64>,
    /// Whether the latent was moved after this pass.
    pub updated: bool,
    /// The gradient had a NaN or infinity, so the update was skipped (and the step ended).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nonfinite_gradient: bool,
}

/// What happened at one denoising step.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub step: usize,
    pub timestep: usize,
    pub loss_target: f64,
    pub passes: Vec<PassReport>,
    /// The loss of the last pass that was evaluated (before its update, if any).
    pub final_loss: f64,
}

/// What the loop minimises: a loss of one triplet's maps.
pub trait MapLoss {
    /// The loss of `maps` (1, 2, N, S, S) [subject, object] at denoising step `step` against the
    /// requested class `class`, with its gradient with respect to `maps`.
    fn loss_and_grad(&self, maps: &Tensor, step: usize, class: usize) -> Result<MapLossEval>;
}

pub struct MapLossEval {
    pub loss: f64,
    /// Class probabilities where the loss has them (the classifier's), else empty.
    pub probs: Vec<f64>,
    /// d loss / d maps, the shape of the maps.
    pub grad: Tensor,
}

/// The learned loss: cross-entropy of the classifier's logits, read at the step's bucket.
impl MapLoss for RelationClassifier {
    fn loss_and_grad(&self, maps: &Tensor, step: usize, class: usize) -> Result<MapLossEval> {
        let (logits, saved) = self.forward(maps, &[self.bucket_step(step)], None)?;
        // The loss reads 5 numbers: on the host, in f32 for a bf16 (GPU) classifier.
        let logits = match logits.dtype() {
            DType::F32 | DType::F64 => logits.to_host()?,
            _ => logits.to_place(DType::F32, None)?,
        };
        let loss = ops::cross_entropy(&logits, &[class])?.to_vec::<f64>()?[0];
        let probs = ops::softmax(&logits)?.to_vec::<f64>()?;
        let dlogits = ops::cross_entropy_backward(&logits, &[class], 1.0)?;
        let grad = self.input_grad(&saved, &dlogits)?;
        Ok(MapLossEval { loss, probs, grad })
    }
}

/// Everything the loop needs besides the latent: the frozen models and the conditional text.
pub struct Steerer<'a> {
    pub unet: &'a UNet2DConditionModel,
    /// The loss: a [`RelationClassifier`] (Learn-to-Steer), or a hand-crafted one.
    pub loss: &'a dyn MapLoss,
    /// The prompt's embedding (1, 77, C): the conditional branch only.
    pub cond: &'a Tensor,
    pub targets: &'a [SteeringTarget],
    pub config: &'a SteeringConfig,
}

impl Steerer<'_> {
    /// Whether denoising step `step` is optimised.
    pub fn applies(&self, step: usize) -> bool {
        !self.targets.is_empty() && self.config.steps.contains(&step)
    }

    /// Optimise `z` at denoising step `step` (timestep `t`); returns the report.
    pub fn refine(&self, z: &mut Tensor, step: usize, t: usize) -> Result<StepReport> {
        let cfg = self.config;
        let target = cfg.loss_target(step);
        let input = z.clone();
        let mut passes = Vec::new();
        let mut final_loss = f64::NAN;
        for i in 0..=cfg.max_refinements {
            let ti = i % self.targets.len();
            let tg = &self.targets[ti];
            let words = [tg.subject_tokens.clone(), tg.object_tokens.clone()];
            let o = unet_with_maps(self.unet, z, t as f64, self.cond, &words, true)?;
            let MapLossEval { loss, probs, grad } =
                self.loss.loss_and_grad(&o.maps, step, tg.class)?;
            final_loss = loss;
            let mut pass = PassReport {
                target: ti,
                loss,
                probs,
                updated: false,
                nonfinite_gradient: false,
            };
            if i == 0 && loss < cfg.min_loss {
                *z = input;
                passes.push(pass);
                break;
            }
            if loss == 0.0 || loss <= target {
                passes.push(pass);
                break;
            }
            let grad = o.sample_grad(self.unet, &grad)?;
            if ops::latent_update(z, &grad, cfg.step_size)? {
                pass.updated = true;
                passes.push(pass);
            } else {
                eprintln!("warning: step {step}: the latent gradient has a NaN or infinity; update skipped");
                pass.nonfinite_gradient = true;
                passes.push(pass);
                break;
            }
        }
        Ok(StepReport {
            step,
            timestep: t,
            loss_target: target,
            passes,
            final_loss,
        })
    }
}
