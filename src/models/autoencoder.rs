//! diffusers' `AutoencoderKL` (SD2.1's VAE), read from a diffusers `vae/` folder: the encoder to
//! the latent distribution's mean, and the decoder. Forward only: steering differentiates the
//! UNet, never the VAE.
//!
//! The latent scaling is the pipeline's business, as in diffusers: `encode` returns the unscaled
//! mean, and `decode` expects a latent already divided by `scaling_factor()`.

use std::path::Path;

use serde::Deserialize;

use super::attention::Attention;
use super::resnet::ResnetBlock2D;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::ops::{self, Activation, Conv2dParams, Pad2d};
use crate::weights::{read_config, Placement, Weights, WeightsView};
use crate::{DType, Error, Result, Tensor};

/// diffusers hard-codes this epsilon for every GroupNorm of the VAE (resnets, the mid-block
/// attention's norm, conv_norm_out); it is not in the config.
const EPS: f64 = 1e-6;

const SAME: Conv2dParams = Conv2dParams {
    stride: 1,
    padding: 1,
};

fn default_3() -> usize {
    3
}
fn default_true() -> bool {
    true
}
fn default_scaling() -> f64 {
    0.18215
}
fn default_act() -> String {
    "silu".into()
}

/// `vae/config.json` as diffusers writes it for `AutoencoderKL`. The sizes that shape the network
/// are required (a config written by `save_pretrained` always has them); features SD2.1 does not
/// use are read only to be refused by name.
#[derive(Clone, Debug, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "default_act")]
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    /// An int or a pair; only diffusers' tiling reads it, which this implementation does not do.
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// Whether diffusers would run the VAE in f32 under an f16 pipeline; this implementation
    /// always computes in f32, so it changes nothing.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    // Latent normalisations of later models (SD3, SDXL variants) that SD2.1's pipeline does not
    // apply; refused when set, so they are not silently ignored.
    #[serde(default)]
    pub shift_factor: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
}

impl VaeConfig {
    /// Refuse configurations this implementation does not compute, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, what: String| {
            Err(Error::Invalid(format!(
                "vae config: unsupported {key}: {what}"
            )))
        };
        if let Some(c) = &self.class_name {
            if c != "AutoencoderKL" {
                return bad("_class_name", c.clone());
            }
        }
        // diffusers' get_activation maps both names to SiLU.
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return bad("act_fn", self.act_fn.clone());
        }
        for (key, v) in [
            ("shift_factor", &self.shift_factor),
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(v) = v.as_ref().filter(|v| !v.is_null()) {
                return bad(key, format!("{v} (must be null)"));
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(Error::Invalid(
                "vae config: `block_out_channels` is empty".into(),
            ));
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Invalid(format!(
                "vae config: {n} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return bad("down block type", t.clone());
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return bad("up block type", t.clone());
        }
        let g = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| g == 0 || c % g != 0)
        {
            return Err(Error::Invalid(format!(
                "vae config: block_out_channels {c} is not divisible by norm_num_groups {g}"
            )));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.latent_channels == 0 {
            return Err(Error::Invalid(
                "vae config: in_channels, out_channels and latent_channels must be >= 1".into(),
            ));
        }
        Ok(())
    }
}

/// The mid-block's attention: diffusers' `Attention` with a GroupNorm in front, one head as wide
/// as the channels, over the (B, H*W, C) pixel tokens, with a residual connection.
#[derive(Clone, Debug)]
struct SpatialSelfAttention {
    group_norm: GroupNorm,
    attention: Attention,
}

impl SpatialSelfAttention {
    fn load(w: &WeightsView, channels: usize, groups: usize) -> Result<Self> {
        let group_norm = GroupNorm::load(&w.pp("group_norm"), channels, groups, EPS)?;
        // Checkpoints saved before diffusers 0.14 (many hub VAEs) use the old AttentionBlock
        // names, which diffusers renames on load; do the same.
        let attention = if !w.contains("to_q.weight") && w.contains("query.weight") {
            let lin = |name: &str| Linear::load(&w.pp(name), channels, channels, true);
            Attention {
                to_q: lin("query")?,
                to_k: lin("key")?,
                to_v: lin("value")?,
                to_out: lin("proj_attn")?,
                heads: 1,
                head_dim: channels,
            }
        } else {
            Attention::load(w, channels, channels, 1, channels, true)?
        };
        Ok(SpatialSelfAttention {
            group_norm,
            attention,
        })
    }

    /// `x`: (B, C, H, W) -> x + attention(group_norm(x)).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let normed = self.group_norm.forward(x)?.reshape(&[b, c, h * w])?;
        let tokens = ops::permute(&normed, &[0, 2, 1])?;
        let (y, _, _) = self.attention.forward(&tokens, None, None)?;
        let y = ops::permute(&y, &[0, 2, 1])?.reshape(&[b, c, h, w])?;
        ops::add(x, &y)
    }
}

/// diffusers' `UNetMidBlock2D` as the VAE configures it: resnet, attention (optional), resnet.
#[derive(Clone, Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn load(w: &WeightsView, channels: usize, cfg: &VaeConfig) -> Result<Self> {
        let g = cfg.norm_num_groups;
        let resnet = |j: usize| {
            ResnetBlock2D::load(
                &w.pp("resnets").pp(j),
                channels,
                channels,
                None,
                g,
                EPS,
                1.0,
            )
        };
        Ok(MidBlock {
            resnet_0: resnet(0)?,
            attention: if cfg.mid_block_add_attention {
                Some(SpatialSelfAttention::load(
                    &w.pp("attentions.0"),
                    channels,
                    g,
                )?)
            } else {
                None
            },
            resnet_1: resnet(1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_0.forward(x, None)?.0;
        if let Some(a) = &self.attention {
            h = a.forward(&h)?;
        }
        Ok(self.resnet_1.forward(&h, None)?.0)
    }
}

/// One `DownEncoderBlock2D` or `UpDecoderBlock2D`: resnets, then the optional resampling conv.
#[derive(Clone, Debug)]
struct Block {
    resnets: Vec<ResnetBlock2D>,
    sampler: Option<Conv2d>,
}

/// Load `count` resnets under `w.resnets`, the first taking `cin` channels.
fn load_resnets(
    w: &WeightsView,
    count: usize,
    cin: usize,
    cout: usize,
    groups: usize,
) -> Result<Vec<ResnetBlock2D>> {
    (0..count)
        .map(|j| {
            ResnetBlock2D::load(
                &w.pp("resnets").pp(j),
                if j == 0 { cin } else { cout },
                cout,
                None,
                groups,
                EPS,
                1.0,
            )
        })
        .collect()
}

fn run_resnets(resnets: &[ResnetBlock2D], x: Tensor) -> Result<Tensor> {
    resnets
        .iter()
        .try_fold(x, |h, r| Ok(r.forward(&h, None)?.0))
}

/// conv_norm_out, SiLU, conv_out: the tail of both the encoder and the decoder.
fn head(norm: &GroupNorm, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
    conv.forward(&ops::activation(&norm.forward(x)?, Activation::Silu)?)
}

/// diffusers' `Encoder` with double_z: the image to the latent distribution's parameters.
#[derive(Clone, Debug)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<Block>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// The encoder's downsampler (`Downsample2D` with padding 0) pads right and bottom by one, then
/// runs an unpadded 3x3 stride-2 conv.
const DOWN_PAD: Pad2d = Pad2d {
    left: 0,
    right: 1,
    top: 0,
    bottom: 1,
};
const DOWN_CONV: Conv2dParams = Conv2dParams {
    stride: 2,
    padding: 0,
};

impl Encoder {
    fn load(w: &WeightsView, cfg: &VaeConfig) -> Result<Self> {
        let boc = &cfg.block_out_channels;
        let (n, g) = (boc.len(), cfg.norm_num_groups);
        let down_blocks = (0..n)
            .map(|i| {
                let bw = w.pp("down_blocks").pp(i);
                let cin = if i == 0 { boc[0] } else { boc[i - 1] };
                Ok(Block {
                    resnets: load_resnets(&bw, cfg.layers_per_block, cin, boc[i], g)?,
                    sampler: if i + 1 < n {
                        Some(Conv2d::load(
                            &bw.pp("downsamplers.0.conv"),
                            boc[i],
                            boc[i],
                            3,
                            DOWN_CONV,
                        )?)
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<_>>()?;
        let top = boc[n - 1];
        Ok(Encoder {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.in_channels, boc[0], 3, SAME)?,
            down_blocks,
            mid_block: MidBlock::load(&w.pp("mid_block"), top, cfg)?,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), top, g, EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), top, 2 * cfg.latent_channels, 3, SAME)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            h = run_resnets(&b.resnets, h)?;
            if let Some(conv) = &b.sampler {
                h = conv.forward(&ops::pad2d(&h, DOWN_PAD)?)?;
            }
        }
        h = self.mid_block.forward(&h)?;
        head(&self.conv_norm_out, &self.conv_out, &h)
    }
}

/// diffusers' `Decoder` (group norms, no spatial norm): a latent to an image.
#[derive(Clone, Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<Block>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(w: &WeightsView, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let (n, g) = (rev.len(), cfg.norm_num_groups);
        let up_blocks = (0..n)
            .map(|i| {
                let bw = w.pp("up_blocks").pp(i);
                let cin = if i == 0 { rev[0] } else { rev[i - 1] };
                Ok(Block {
                    resnets: load_resnets(&bw, cfg.layers_per_block + 1, cin, rev[i], g)?,
                    sampler: if i + 1 < n {
                        Some(Conv2d::load(
                            &bw.pp("upsamplers.0.conv"),
                            rev[i],
                            rev[i],
                            3,
                            SAME,
                        )?)
                    } else {
                        None
                    },
                })
            })
            .collect::<Result<_>>()?;
        Ok(Decoder {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.latent_channels, rev[0], 3, SAME)?,
            mid_block: MidBlock::load(&w.pp("mid_block"), rev[0], cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), rev[n - 1], g, EPS)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), rev[n - 1], cfg.out_channels, 3, SAME)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for b in &self.up_blocks {
            h = run_resnets(&b.resnets, h)?;
            if let Some(conv) = &b.sampler {
                h = conv.forward(&ops::upsample_nearest2x(&h)?)?;
            }
        }
        head(&self.conv_norm_out, &self.conv_out, &h)
    }
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

/// Error unless `x` is an f32 (B, channels, H, W) tensor; `what` names the argument.
fn check_input(op: &'static str, what: &str, x: &Tensor, channels: usize) -> Result<()> {
    let s = x.shape();
    if s.len() != 4 || s[1] != channels {
        return Err(Error::shape(
            op,
            format!("{what} {s:?} must be (B, {channels}, H, W)"),
        ));
    }
    if x.dtype() != DType::F32 {
        return Err(Error::DType {
            op,
            got: x.dtype(),
            expected: "f32",
        });
    }
    Ok(())
}

impl AutoencoderKL {
    /// Load from a diffusers `vae/` folder (config.json + diffusion_pytorch_model*.safetensors).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_dir_placed(dir, Placement::default())
    }

    /// The model with its weights in `placement` (e.g. bf16 on a GPU: `Placement::cuda`); it
    /// still takes and returns host f32 tensors.
    pub fn from_dir_placed(dir: impl AsRef<Path>, placement: Placement) -> Result<Self> {
        let dir = dir.as_ref();
        let config: VaeConfig = read_config(&dir.join("config.json"), "AutoencoderKL")?;
        let weights = Weights::from_dir(dir, "diffusion_pytorch_model")?.placed(placement);
        Self::load(config, &weights)
    }

    pub fn load(config: VaeConfig, weights: &Weights) -> Result<Self> {
        config.validate()?;
        let w = weights.root();
        let lat = config.latent_channels;
        let pointwise = Conv2dParams::default();
        Ok(AutoencoderKL {
            encoder: Encoder::load(&w.pp("encoder"), &config)?,
            decoder: Decoder::load(&w.pp("decoder"), &config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(
                    &w.pp("quant_conv"),
                    2 * lat,
                    2 * lat,
                    1,
                    pointwise,
                )?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(
                    &w.pp("post_quant_conv"),
                    lat,
                    lat,
                    1,
                    pointwise,
                )?)
            } else {
                None
            },
            config,
        })
    }

    /// The factor the pipeline multiplies encoded latents by (and divides by before decoding).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `image`: (B, in_channels, H, W) f32 in [-1, 1] -> the mean of the latent distribution,
    /// (B, latent_channels, H / f, W / f) with f = 2^(blocks - 1), unscaled.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        check_input("vae encode", "image", image, self.config.in_channels)?;
        let mut moments = self
            .encoder
            .forward(&image.to_like(&self.encoder.conv_in.weight)?)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        // The moments are [mean, log-variance] along the channels; only the mean is needed.
        let lat = self.config.latent_channels;
        let mut parts = ops::split(&moments, 1, &[lat, lat])?;
        parts.swap_remove(0).to_like(image)
    }

    /// `latent`: (B, latent_channels, h, w) f32, already divided by `scaling_factor()` ->
    /// the image (B, out_channels, h * f, w * f), roughly in [-1, 1].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        check_input("vae decode", "latent", latent, self.config.latent_channels)?;
        let placed = latent.to_like(&self.decoder.conv_in.weight)?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&placed)?,
            None => placed,
        };
        self.decoder.forward(&z)?.to_like(latent)
    }
}
