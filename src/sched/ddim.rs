//! diffusers' `DDIMScheduler` with eta 0 (deterministic), read from `scheduler_config.json`:
//! scaled-linear or linear betas, "leading", "trailing" or "linspace" timestep spacing,
//! `steps_offset`, `set_alpha_to_one`, epsilon or v prediction.

use std::path::Path;

use serde::Deserialize;

use crate::ops;
use crate::weights::read_config;
use crate::{Error, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> Prediction {
    Prediction::Epsilon
}
fn default_true() -> bool {
    true
}
fn default_spacing() -> String {
    "leading".into()
}

#[derive(Clone, Debug, Deserialize)]
pub struct DdimConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction")]
    pub prediction_type: Prediction,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub clip_sample: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl DdimConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let cfg: DdimConfig = read_config(path, "scheduler")?;
        for (key, set) in [
            ("clip_sample", cfg.clip_sample),
            ("thresholding", cfg.thresholding),
            ("rescale_betas_zero_snr", cfg.rescale_betas_zero_snr),
        ] {
            if set {
                return Err(Error::format(
                    path,
                    format!("unsupported scheduler option `{key}: true`"),
                ));
            }
        }
        Ok(cfg)
    }
}

#[derive(Clone, Debug)]
pub struct DdimScheduler {
    pub config: DdimConfig,
    /// alpha-bar per training timestep, cumulated in f32 as diffusers does (torch.cumprod).
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
}

impl DdimScheduler {
    pub fn new(config: DdimConfig) -> Result<Self> {
        let n = config.num_train_timesteps;
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "scaled_linear" => linspace(config.beta_start.sqrt(), config.beta_end.sqrt(), n)
                .map(|b| (b * b) as f32)
                .collect(),
            "linear" => linspace(config.beta_start, config.beta_end, n)
                .map(|b| b as f32)
                .collect(),
            other => {
                return Err(Error::Invalid(format!(
                    "scheduler: unsupported beta_schedule `{other}`"
                )))
            }
        };
        let mut acc = 1.0f32;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc as f64
            })
            .collect();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(DdimScheduler {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::new(DdimConfig::from_file(
            dir.as_ref().join("scheduler_config.json"),
        )?)
    }

    /// The `steps` inference timesteps, descending, as `set_timesteps` computes them.
    pub fn timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let n = self.config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::Invalid(format!(
                "scheduler: {steps} steps for {n} training timesteps"
            )));
        }
        let mut t: Vec<usize> = match self.config.timestep_spacing.as_str() {
            "leading" => (0..steps)
                .map(|i| i * (n / steps) + self.config.steps_offset)
                .collect(),
            "trailing" => {
                let ratio = n as f64 / steps as f64;
                (1..=steps)
                    .map(|i| (i as f64 * ratio).round() as usize - 1)
                    .collect()
            }
            "linspace" => linspace(0.0, (n - 1) as f64, steps)
                .map(|v| v.round() as usize)
                .collect(),
            other => {
                return Err(Error::Invalid(format!(
                    "scheduler: unsupported timestep_spacing `{other}`"
                )))
            }
        };
        t.reverse();
        Ok(t)
    }

    /// The previous timestep DDIM steps to from `t` (negative: the final step).
    pub fn prev_timestep(&self, t: usize, steps: usize) -> i64 {
        t as i64 - (self.config.num_train_timesteps / steps) as i64
    }

    /// alpha-bar at `t`, or the final value for negative `t`.
    pub fn alpha_bar(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// (predicted x0, predicted noise) from the model output at `t`.
    pub fn predict(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let a = self.alpha_bar(t as i64);
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        Ok(match self.config.prediction_type {
            Prediction::Epsilon => {
                let x0 = ops::scale(&ops::sub(sample, &ops::scale(model_output, sb)?)?, 1.0 / sa)?;
                (x0, model_output.clone())
            }
            Prediction::VPrediction => (
                ops::sub(&ops::scale(sample, sa)?, &ops::scale(model_output, sb)?)?,
                ops::add(&ops::scale(model_output, sa)?, &ops::scale(sample, sb)?)?,
            ),
        })
    }

    /// The sample at noise level `alpha_bar` given x0 and the noise (DDIM's deterministic move).
    pub fn renoise(x0: &Tensor, eps: &Tensor, alpha_bar: f64) -> Result<Tensor> {
        ops::add(
            &ops::scale(x0, alpha_bar.sqrt())?,
            &ops::scale(eps, (1.0 - alpha_bar).sqrt())?,
        )
    }

    /// One DDIM step (eta 0) from `t` to its previous timestep.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        steps: usize,
    ) -> Result<Tensor> {
        let (x0, eps) = self.predict(model_output, t, sample)?;
        Self::renoise(&x0, &eps, self.alpha_bar(self.prev_timestep(t, steps)))
    }
}

/// `n` evenly spaced values from `a` to `b` inclusive (numpy/torch linspace).
fn linspace(a: f64, b: f64, n: usize) -> impl Iterator<Item = f64> {
    let step = if n > 1 { (b - a) / (n - 1) as f64 } else { 0.0 };
    (0..n).map(move |i| a + step * i as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd21() -> DdimScheduler {
        DdimScheduler::new(DdimConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            prediction_type: Prediction::Epsilon,
            set_alpha_to_one: false,
            steps_offset: 1,
            timestep_spacing: "leading".into(),
            clip_sample: false,
            thresholding: false,
            rescale_betas_zero_snr: false,
        })
        .unwrap()
    }

    /// diffusers' leading spacing with steps_offset 1: 981, 961, ..., 1 for 50 steps.
    #[test]
    fn leading_timesteps() {
        let t = sd21().timesteps(50).unwrap();
        assert_eq!(t.len(), 50);
        assert_eq!((t[0], t[1], t[49]), (981, 961, 1));
    }

    /// Analytic: with the true noise, one DDIM step from x_t lands exactly on x_prev built from
    /// the same x0 and noise.
    #[test]
    fn step_is_exact_for_true_noise() {
        let s = sd21();
        let x0 = Tensor::randn(&[1, 4, 3, 3], crate::DType::F64, 1);
        let eps = Tensor::randn(&[1, 4, 3, 3], crate::DType::F64, 2);
        let xt = DdimScheduler::renoise(&x0, &eps, s.alpha_bar(981)).unwrap();
        let prev = s.step(&eps, 981, &xt, 50).unwrap();
        let expect = DdimScheduler::renoise(&x0, &eps, s.alpha_bar(961)).unwrap();
        assert!(prev.rel_error(&expect).unwrap() < 1e-12);
    }
}
