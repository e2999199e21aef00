//! Stable Diffusion 2.1 from a diffusers folder (`model_index.json`, `tokenizer/`,
//! `text_encoder/`, `unet/`, `vae/`, `scheduler/`): prompt encoding, DDIM sampling with
//! classifier-free guidance, VAE decoding, and DDIM inversion of an image.
//!
//! A folder without a VAE (`model_index.json` names none and there is no `vae/`) is a
//! pixel-space pipeline, as the shipped ShapesWorld model is: the UNet denoises the image itself
//! (3 channels, in [-1, 1]), so encoding and decoding are the identity.
//!
//! The sampling loop exposes two points that steering and data collection use: a hook that may
//! change the latent before each denoising step, and map recording during the denoising forward.

use std::path::{Path, PathBuf};

use crate::models::autoencoder::AutoencoderKL;
use crate::models::clip_text::CLIPTextModel;
use crate::models::unet::UNet2DConditionModel;
use crate::sched::{ddim_invert, DdimScheduler, Inversion};
use crate::steering::unet_maps::unet_with_maps;
use crate::tokenizer::Tokenizer;
use crate::weights::Placement;
use crate::{ops, Error, Result, Tensor};

pub struct StableDiffusion {
    pub dir: PathBuf,
    pub tokenizer: Tokenizer,
    pub text_encoder: CLIPTextModel,
    pub unet: UNet2DConditionModel,
    /// `None` for a pixel-space pipeline (module docs).
    pub vae: Option<AutoencoderKL>,
    pub scheduler: DdimScheduler,
}

/// One sampling run.
pub struct GenerateRequest<'a> {
    /// The prompt's text embedding (1, 77, C).
    pub cond: &'a Tensor,
    /// The negative prompt's embedding; required when `guidance` is not 1.
    pub uncond: Option<&'a Tensor>,
    pub guidance: f64,
    pub steps: usize,
    /// The initial noise (1, C, h, w), C the UNet's `in_channels` (scaled by the scheduler's init sigma, 1 for DDIM).
    pub init_latents: Tensor,
    /// Record the maps of these words (token indices) during the denoising forward at these
    /// step indices (0-based). Conditional branch only.
    pub record_maps: Option<(&'a [Vec<usize>], &'a [usize])>,
}

pub struct GenerateOutput {
    pub latents: Tensor,
    /// (step index, maps (1, words, N, 16, 16)) for each recorded step.
    pub maps: Vec<(usize, Tensor)>,
}

/// Called before each denoising step with (step index, timestep, latent); may replace the latent.
pub type StepHook<'a> = dyn FnMut(usize, usize, &mut Tensor) -> Result<()> + 'a;

impl StableDiffusion {
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_dir_placed(dir, Placement::default())
    }

    /// The pipeline with its models (text encoder, UNet, VAE) in `placement` (e.g. bf16 on a GPU:
    /// `Placement::cuda`). Each takes and returns host f32 tensors either way.
    pub fn from_dir_placed(dir: impl AsRef<Path>, placement: Placement) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index = dir.join("model_index.json");
        if !index.is_file() {
            return Err(Error::format(
                &dir,
                "not a diffusers pipeline folder: no model_index.json",
            ));
        }
        let vae_dir = dir.join("vae");
        let vae = if vae_dir.exists() || index_names_vae(&index)? {
            Some(AutoencoderKL::from_dir_placed(vae_dir, placement.clone())?)
        } else {
            None
        };
        let text_encoder =
            CLIPTextModel::from_dir_placed(dir.join("text_encoder"), placement.clone())?;
        let unet = UNet2DConditionModel::from_dir_placed(dir.join("unet"), placement)?;
        if vae.is_none() {
            let c = &unet.config;
            if c.in_channels != 3 || c.out_channels != 3 {
                return Err(Error::format(
                    &dir,
                    format!(
                        "no VAE (model_index.json names none and there is no vae/), so this is a \
                         pixel-space pipeline, but its UNet has {} input and {} output channels \
                         where an RGB image has 3",
                        c.in_channels, c.out_channels
                    ),
                ));
            }
        }
        Ok(StableDiffusion {
            tokenizer: Tokenizer::from_dir(dir.join("tokenizer"))?,
            text_encoder,
            unet,
            vae,
            // SD2.1-base ships a PNDM config; as the reference does, we read it as DDIM's.
            scheduler: DdimScheduler::from_dir(dir.join("scheduler"))?,
            dir,
        })
    }

    /// Whether the UNet denoises pixels (no VAE).
    pub fn is_pixel_space(&self) -> bool {
        self.vae.is_none()
    }

    /// Pixels per latent pixel (8 for SD2.1, 1 in pixel space).
    pub fn vae_scale_factor(&self) -> usize {
        match &self.vae {
            Some(vae) => 1 << (vae.config.block_out_channels.len() - 1),
            None => 1,
        }
    }

    /// The image size the UNet was trained for (512 for SD2.1-base, the UNet's `sample_size` in
    /// pixel space).
    pub fn default_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    /// The text encoder's last hidden state for `prompt` (1, 77, C); over-long prompts are
    /// truncated with a warning by the tokenizer.
    pub fn encode_prompt(&self, prompt: &str) -> Result<Tensor> {
        let enc = self.tokenizer.encode(prompt)?;
        Ok(self.text_encoder.forward(&enc.ids)?.last_hidden_state)
    }

    /// DDIM sampling with classifier-free guidance, as StableDiffusionPipeline with eta 0.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        hook: Option<&mut StepHook>,
        mut progress: impl FnMut(usize),
    ) -> Result<GenerateOutput> {
        let guided = req.guidance != 1.0;
        let context = match (guided, req.uncond) {
            (false, _) => req.cond.clone(),
            (true, Some(u)) => ops::concat(&[u, req.cond], 0)?,
            (true, None) => {
                return Err(Error::Invalid(
                    "guidance != 1 needs a negative prompt embedding".into(),
                ))
            }
        };
        let mut hook = hook;
        let timesteps = self.scheduler.timesteps(req.steps)?;
        // The latent lives where the UNet does: on a GPU the scheduler's steps, the guidance and
        // steering's updates run there (f32 kernels) without round trips through the host.
        let device = self.unet.device();
        let mut z = req
            .init_latents
            .to_place(req.init_latents.dtype(), device)?;
        let mut maps = Vec::new();
        for (i, &t) in timesteps.iter().enumerate() {
            if let Some(h) = hook.as_deref_mut() {
                h(i, t, &mut z)?;
            }
            let input = if guided {
                ops::concat(&[&z, &z], 0)?
            } else {
                z.clone()
            };
            let record = req.record_maps.filter(|(_, at)| at.contains(&i));
            let out = match record {
                Some((words, _)) => {
                    let o = unet_with_maps(&self.unet, &input, t as f64, &context, words, false)?;
                    // The conditional branch is the last batch entry.
                    let b = o.maps.shape()[0];
                    let cond_maps = ops::split(&o.maps, 0, &[b - 1, 1])?
                        .pop()
                        .expect("two parts");
                    maps.push((i, cond_maps.to_host()?));
                    o.out
                }
                None => {
                    self.unet
                        .forward(&input, t as f64, &context, None, false)?
                        .out
                }
            };
            let pred = if guided {
                let h = ops::split(&out, 0, &[1, 1])?;
                ops::add(&h[0], &ops::scale(&ops::sub(&h[1], &h[0])?, req.guidance)?)?
            } else {
                out
            };
            z = self.scheduler.step(&pred, t, &z, req.steps)?;
            progress(i);
        }
        Ok(GenerateOutput {
            latents: z.to_host()?,
            maps,
        })
    }

    /// Latents to an image in [-1, 1] (1, 3, H, W). In pixel space the latent is the image.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(vae) => vae.decode(&ops::scale(latents, 1.0 / vae.scaling_factor())?),
            None => {
                self.check_pixels("decode", latents)?;
                Ok(latents.clone())
            }
        }
    }

    /// An image in [-1, 1] to its (scaled) latent: the VAE posterior's mean; in pixel space the
    /// image itself.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(vae) => ops::scale(&vae.encode(image)?, vae.scaling_factor()),
            None => {
                self.check_pixels("encode_image", image)?;
                Ok(image.clone())
            }
        }
    }

    /// A pixel-space image or latent: (B, in_channels, H, W).
    fn check_pixels(&self, op: &'static str, x: &Tensor) -> Result<()> {
        let c = self.unet.config.in_channels;
        match x.shape() {
            [_, xc, _, _] if *xc == c => Ok(()),
            s => Err(Error::shape(
                op,
                format!("pixel-space pipeline: expected (B, {c}, H, W), got {s:?}"),
            )),
        }
    }

    /// Fixed-point DDIM inversion of a latent with the prompt's conditional prediction
    /// (guidance 1), as the reference's data collection does (`fixed_point_iters` 5).
    pub fn invert(
        &self,
        z0: &Tensor,
        cond: &Tensor,
        steps: usize,
        fixed_point_iters: usize,
    ) -> Result<Inversion> {
        let z0 = z0.to_place(z0.dtype(), self.unet.device())?;
        let mut inv = ddim_invert(&self.scheduler, &z0, steps, fixed_point_iters, |z, t| {
            Ok(self.unet.forward(z, t as f64, cond, None, false)?.out)
        })?;
        for z in &mut inv.latents {
            *z = z.to_host()?;
        }
        Ok(inv)
    }
}

/// Whether `model_index.json` names a VAE: its `vae` entry is present and not `null` or
/// `[null, null]` (diffusers' way of saving a pipeline without one).
fn index_names_vae(index: &Path) -> Result<bool> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
    Ok(match json.get("vae") {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(parts)) => parts.iter().any(|p| !p.is_null()),
        Some(_) => true,
    })
}
