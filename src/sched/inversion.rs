//! DDIM inversion: from a clean latent z0 to the noise that DDIM sampling maps back onto it.
//!
//! As the reference's `StableDiffusionPipelineWithDDIMInversion` (learn-to-steer,
//! pipelines/sd/FixedPointInversion): the timesteps are the sampler's in ascending order; the
//! step from the previous level `s = t - N / steps` (alpha-bar of `s`, or the final alpha-bar
//! before the first step) to `t` is
//!     z_t = sqrt(a_t) (z_s - sqrt(1 - a_s) eps) / sqrt(a_s) + sqrt(1 - a_t) eps,
//! with the noise predicted at the *target* timestep `t`. Plain inversion evaluates eps on z_s;
//! fixed-point inversion repeats `w <- step(eps(w, t), z_s)` from `w = z_s`, so that eps is
//! (nearly) evaluated on the latent it produces, which makes the inversion close to exact.
//!
//! Deliberate deviation: the reference reads the model output as epsilon whatever the model
//! predicts; we convert v-predictions to epsilon through the scheduler (identical for epsilon
//! models such as SD2.1-base, correct for v models such as SD2.1-768).

use super::ddim::DdimScheduler;
use crate::{ops, Result, Tensor};

/// The latents after each inversion step, with their timesteps (ascending).
pub struct Inversion {
    pub timesteps: Vec<usize>,
    pub latents: Vec<Tensor>,
}

impl Inversion {
    /// The fully inverted latent (the last step's).
    pub fn noise(&self) -> &Tensor {
        self.latents.last().expect("at least one step")
    }
}

/// Invert `z0` over `steps` DDIM steps. `model(z, t)` returns the denoiser's output at `t`
/// (for SD2.1: the conditional UNet prediction, guidance 1). `fixed_point_iters` 0 or 1 gives
/// plain inversion; the reference uses 5.
pub fn ddim_invert(
    sched: &DdimScheduler,
    z0: &Tensor,
    steps: usize,
    fixed_point_iters: usize,
    mut model: impl FnMut(&Tensor, usize) -> Result<Tensor>,
) -> Result<Inversion> {
    let mut timesteps = sched.timesteps(steps)?;
    timesteps.reverse();
    let mut z = z0.clone();
    let mut latents = Vec::with_capacity(steps);
    for &t in &timesteps {
        let a_s = sched.alpha_bar(sched.prev_timestep(t, steps));
        let a_t = sched.alpha_bar(t as i64);
        let mut w = z.clone();
        for _ in 0..fixed_point_iters.max(1) {
            let (_, eps) = sched.predict(&model(&w, t)?, t, &w)?;
            let x0 = ops::scale(
                &ops::sub(&z, &ops::scale(&eps, (1.0 - a_s).sqrt())?)?,
                1.0 / a_s.sqrt(),
            )?;
            w = DdimScheduler::renoise(&x0, &eps, a_t)?;
        }
        z = w;
        latents.push(z.clone());
    }
    Ok(Inversion { timesteps, latents })
}
