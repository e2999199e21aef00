//! `UNet2DConditionModel` with SD2.1's block types, read from a diffusers `unet/` folder.
//!
//! The forward can keep a tape (each block's saved tensors) for `backward_to_sample`, the
//! input-gradient-only backward that steering needs: the weights and the text are frozen, so only
//! the path from the latent to the outputs and to the captured maps is differentiated.

mod config;
mod transformer;

pub use config::{PerBlock, UNetConfig};
pub use transformer::{BasicTransformerBlock, Transformer2DModel};

use std::path::Path;

use transformer::TransformerSaved;

use super::resnet::{ResnetBlock2D, ResnetSaved};
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::ops::{self, Activation, Capture, Conv2dParams};
use crate::weights::{read_config, Placement, Weights, WeightsView};
use crate::{Error, Result, Tensor};

const SAME: Conv2dParams = Conv2dParams {
    stride: 1,
    padding: 1,
};

/// A resnet followed, in cross-attention blocks, by a transformer.
#[derive(Clone, Debug)]
struct Layer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2DModel>,
}

#[derive(Clone, Debug)]
struct DownBlock {
    layers: Vec<Layer>,
    downsampler: Option<Conv2d>,
}

#[derive(Clone, Debug)]
struct UpBlock {
    layers: Vec<Layer>,
    upsampler: Option<Conv2d>,
}

pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    /// resnets.0 + attentions.0, then resnets.1: diffusers' mid-block call order.
    mid_block: [Layer; 2],
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// Maps captured in one cross-attention layer, at its native resolution.
pub struct LayerMaps {
    /// (B, words, heads, h * w): each word's attention probabilities, averaged over its tokens;
    /// f32, on the model's device.
    pub maps: Tensor,
    pub height: usize,
    pub width: usize,
}

pub struct UNetOutput {
    /// The noise (or v) prediction, (B, out_channels, H, W).
    pub out: Tensor,
    /// One entry per cross-attention layer, in call order (down, mid, up), when capturing.
    pub maps: Vec<LayerMaps>,
    /// Present when the forward was asked to keep it.
    pub tape: Option<Tape>,
}

/// What `backward_to_sample` needs from the forward.
pub struct Tape {
    /// The sample as the caller passed it (where the gradient goes back to).
    input: Tensor,
    /// The sample where the model runs.
    sample: Tensor,
    layers: Vec<LayerSaved>,
    samplers: Vec<SamplerSaved>,
    out_norm_in: Tensor,
    out_conv_in: Tensor,
}

/// One resnet (+ transformer) application.
struct LayerSaved {
    resnet: ResnetSaved,
    attention: Option<TransformerSaved>,
    /// Channels of the skip connection concatenated to the input (up blocks).
    skip_channels: Option<usize>,
}

/// A down- or upsampler's convolution input.
struct SamplerSaved {
    conv_in: Tensor,
}

fn add_opt(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some(ops::add(&a, &b)?),
        (a, None) => a,
        (None, b) => b,
    })
}

/// Layer `j` of a block: a resnet (cin -> cout) and, when `attention` gives (heads, transformer
/// layers), the transformer after it.
fn load_layer(
    w: &WeightsView,
    j: usize,
    cin: usize,
    cout: usize,
    attention: Option<(usize, usize)>,
    cfg: &UNetConfig,
    temb: usize,
) -> Result<Layer> {
    let g = cfg.norm_num_groups;
    let resnet = ResnetBlock2D::load(
        &w.pp("resnets").pp(j),
        cin,
        cout,
        Some(temb),
        g,
        cfg.norm_eps,
        1.0,
    )?;
    let attention = attention
        .map(|(heads, layers)| {
            let aw = w.pp("attentions").pp(j);
            Transformer2DModel::load(
                &aw,
                cout,
                heads,
                cout / heads,
                cfg.cross_attention_dim,
                layers,
                g,
            )
        })
        .transpose()?;
    Ok(Layer { resnet, attention })
}

impl UNet2DConditionModel {
    /// Load from a diffusers `unet/` folder (config.json + diffusion_pytorch_model*.safetensors).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_dir_placed(dir, Placement::default())
    }

    /// The GPU holding the weights, or `None` on the host.
    pub fn device(&self) -> Option<&std::sync::Arc<crate::cuda::CudaDevice>> {
        self.conv_in.weight.cuda_device()
    }

    /// The model with its weights in `placement` (e.g. bf16 on a GPU: `Placement::cuda`).
    pub fn from_dir_placed(dir: impl AsRef<Path>, placement: Placement) -> Result<Self> {
        let dir = dir.as_ref();
        let config: UNetConfig = read_config(&dir.join("config.json"), "UNet")?;
        let weights = Weights::from_dir(dir, "diffusion_pytorch_model")?.placed(placement);
        Self::load(config, &weights)
    }

    pub fn load(config: UNetConfig, weights: &Weights) -> Result<Self> {
        config.validate()?;
        let cfg = &config;
        let w = weights.root();
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let heads = cfg.heads()?;
        let tlayers = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        for (i, (&c, &h)) in boc.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(Error::Invalid(format!(
                    "unet config: block {i} has {c} channels, not divisible by {h} heads"
                )));
            }
        }
        let temb = boc[0] * 4;
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let bw = w.pp("down_blocks").pp(i);
            let (cin, cout) = (if i == 0 { boc[0] } else { boc[i - 1] }, boc[i]);
            let attn = (cfg.down_block_types[i] == "CrossAttnDownBlock2D")
                .then_some((heads[i], tlayers[i]));
            let layers = (0..cfg.layers_per_block)
                .map(|j| {
                    load_layer(
                        &bw,
                        j,
                        if j == 0 { cin } else { cout },
                        cout,
                        attn,
                        cfg,
                        temb,
                    )
                })
                .collect::<Result<_>>()?;
            let downsampler = if i + 1 < n {
                let p = Conv2dParams {
                    stride: 2,
                    padding: cfg.downsample_padding,
                };
                Some(Conv2d::load(
                    &bw.pp("downsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                    p,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                layers,
                downsampler,
            });
        }
        let mw = w.pp("mid_block");
        let top = boc[n - 1];
        let mid_resnet = |j: usize| {
            ResnetBlock2D::load(
                &mw.pp("resnets").pp(j),
                top,
                top,
                Some(temb),
                g,
                cfg.norm_eps,
                cfg.mid_block_scale_factor,
            )
        };
        let mid_attention = Transformer2DModel::load(
            &mw.pp("attentions.0"),
            top,
            heads[n - 1],
            top / heads[n - 1],
            cfg.cross_attention_dim,
            tlayers[n - 1],
            g,
        )?;
        let mid_block = [
            Layer {
                resnet: mid_resnet(0)?,
                attention: Some(mid_attention),
            },
            Layer {
                resnet: mid_resnet(1)?,
                attention: None,
            },
        ];
        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let (rheads, rlayers): (Vec<usize>, Vec<usize>) = (
            heads.iter().rev().copied().collect(),
            tlayers.iter().rev().copied().collect(),
        );
        let mut up_blocks = Vec::new();
        for i in 0..n {
            let bw = w.pp("up_blocks").pp(i);
            let prev = if i == 0 { rev[0] } else { rev[i - 1] };
            let (cout, cin) = (rev[i], rev[(i + 1).min(n - 1)]);
            let attn =
                (cfg.up_block_types[i] == "CrossAttnUpBlock2D").then_some((rheads[i], rlayers[i]));
            let nl = cfg.layers_per_block + 1;
            let layers = (0..nl)
                .map(|j| {
                    let skip = if j == nl - 1 { cin } else { cout };
                    let res_in = if j == 0 { prev } else { cout };
                    load_layer(&bw, j, res_in + skip, cout, attn, cfg, temb)
                })
                .collect::<Result<_>>()?;
            let upsampler = if i + 1 < n {
                Some(Conv2d::load(
                    &bw.pp("upsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                    SAME,
                )?)
            } else {
                None
            };
            up_blocks.push(UpBlock { layers, upsampler });
        }
        Ok(UNet2DConditionModel {
            conv_in: Conv2d::load(&w.pp("conv_in"), cfg.in_channels, boc[0], 3, SAME)?,
            time_linear_1: Linear::load(&w.pp("time_embedding.linear_1"), boc[0], temb, true)?,
            time_linear_2: Linear::load(&w.pp("time_embedding.linear_2"), temb, temb, true)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(&w.pp("conv_norm_out"), boc[0], g, cfg.norm_eps)?,
            conv_out: Conv2d::load(&w.pp("conv_out"), boc[0], cfg.out_channels, 3, SAME)?,
            config,
        })
    }

    /// Heads of each cross-attention layer in call order, with its resolution divisor
    /// (1 for the first down block, 2 for the next, ...): what the captured maps will be.
    pub fn cross_attention_layers(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let n = self.down_blocks.len();
        for (i, b) in self.down_blocks.iter().enumerate() {
            for l in &b.layers {
                if let Some(a) = &l.attention {
                    out.extend(a.transformer_blocks.iter().map(|t| (t.attn2.heads, 1 << i)));
                }
            }
        }
        for l in &self.mid_block {
            if let Some(a) = &l.attention {
                out.extend(
                    a.transformer_blocks
                        .iter()
                        .map(|t| (t.attn2.heads, 1 << (n - 1))),
                );
            }
        }
        for (i, b) in self.up_blocks.iter().enumerate() {
            for l in &b.layers {
                if let Some(a) = &l.attention {
                    out.extend(
                        a.transformer_blocks
                            .iter()
                            .map(|t| (t.attn2.heads, 1 << (n - 1 - i))),
                    );
                }
            }
        }
        out
    }

    /// The time embedding (B, 4 * C0) for timesteps `t` (B).
    fn time_embedding(&self, t: &Tensor) -> Result<Tensor> {
        let e = ops::timestep_embedding(
            t,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        // The sinusoid is computed on the host in f32; the layers take it where their weights are.
        let e = e.to_like(&self.time_linear_1.weight)?;
        let h = ops::activation(&self.time_linear_1.forward(&e)?, Activation::Silu)?;
        self.time_linear_2.forward(&h)
    }

    /// `sample`: (B, C, H, W) f32; `timestep`: the same step for every batch entry;
    /// `context`: (B, 77, cross_attention_dim). With `capture`, every cross-attention layer's
    /// maps for the capture's words; with `keep_tape`, what `backward_to_sample` needs.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        capture: Option<&Capture>,
        keep_tape: bool,
    ) -> Result<UNetOutput> {
        let s = sample.shape();
        if s.len() != 4 || s[1] != self.config.in_channels {
            return Err(Error::shape(
                "unet",
                format!(
                    "sample {s:?} must be (B, {}, H, W)",
                    self.config.in_channels
                ),
            ));
        }
        let factor = 1 << (self.down_blocks.len() - 1);
        if !s[2].is_multiple_of(factor) || !s[3].is_multiple_of(factor) {
            return Err(Error::shape(
                "unet",
                format!("sample {s:?}: H and W must be multiples of {factor}"),
            ));
        }
        let c = context.shape();
        if c.len() != 3 || c[0] != s[0] || c[2] != self.config.cross_attention_dim {
            return Err(Error::shape(
                "unet",
                format!(
                    "encoder_hidden_states {c:?} must be ({}, L, {})",
                    s[0], self.config.cross_attention_dim
                ),
            ));
        }
        // The model runs where its weights are; the outputs go back where the sample came from.
        let input = sample;
        let (sample, context) = (
            &sample.to_like(&self.conv_in.weight)?,
            &context.to_like(&self.conv_in.weight)?,
        );
        let t = Tensor::from_vec(vec![timestep as f32; s[0]], &[s[0]])?;
        let temb = self.time_embedding(&t)?;
        let mut maps = Vec::new();
        let mut layers = Vec::new();
        let mut samplers = Vec::new();
        // `skip`: the skip connection an up layer concatenates to its input.
        let mut run_layer = |l: &Layer,
                             h: &Tensor,
                             skip: Option<&Tensor>,
                             maps: &mut Vec<LayerMaps>|
         -> Result<Tensor> {
            let cat;
            let h = match skip {
                Some(s) => {
                    cat = ops::concat(&[h, s], 1)?;
                    &cat
                }
                None => h,
            };
            let (mut y, rs) = l.resnet.forward(h, Some(&temb))?;
            let mut attention = None;
            if let Some(a) = &l.attention {
                let (y2, m, ts) = a.forward(&y, context, capture)?;
                let (hh, ww) = (y.shape()[2], y.shape()[3]);
                for m in m {
                    // f32, on the model's device: resized and classified there.
                    maps.push(LayerMaps {
                        maps: m,
                        height: hh,
                        width: ww,
                    });
                }
                y = y2;
                attention = Some(ts);
            }
            if keep_tape {
                layers.push(LayerSaved {
                    resnet: rs,
                    attention,
                    skip_channels: skip.map(|s| s.shape()[1]),
                });
            }
            Ok(y)
        };
        let mut h = self.conv_in.forward(sample)?;
        let mut skips = vec![h.clone()];
        let mut conv_saved = Vec::new();
        for b in &self.down_blocks {
            for l in &b.layers {
                h = run_layer(l, &h, None, &mut maps)?;
                skips.push(h.clone());
            }
            if let Some(d) = &b.downsampler {
                conv_saved.push(h.clone());
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        for l in &self.mid_block {
            h = run_layer(l, &h, None, &mut maps)?;
        }
        for b in &self.up_blocks {
            for l in &b.layers {
                let skip = skips.pop().expect("one skip per up layer");
                h = run_layer(l, &h, Some(&skip), &mut maps)?;
            }
            if let Some(u) = &b.upsampler {
                let up = ops::upsample_nearest2x(&h)?;
                conv_saved.push(up.clone());
                h = u.forward(&up)?;
            }
        }
        let out_norm_in = h;
        let out_conv_in =
            ops::activation(&self.conv_norm_out.forward(&out_norm_in)?, Activation::Silu)?;
        let out = self.conv_out.forward(&out_conv_in)?.to_like(input)?;
        if keep_tape {
            samplers.extend(
                conv_saved
                    .into_iter()
                    .map(|conv_in| SamplerSaved { conv_in }),
            );
        }
        let tape = keep_tape.then(|| Tape {
            input: input.clone(),
            sample: sample.clone(),
            layers,
            samplers,
            out_norm_in,
            out_conv_in,
        });
        Ok(UNetOutput { out, maps, tape })
    }
}

impl UNet2DConditionModel {
    /// The gradient with respect to `sample` of `sum(out * dout) + sum over layers of
    /// sum(maps_l * dmaps_l)`. `dout` `None` means the loss does not read the output (steering):
    /// then the layers after the last captured one are skipped. `dmaps` has one entry per captured
    /// layer in call order (as `UNetOutput::maps`), each (B, words, heads, h * w) or `None`.
    pub fn backward_to_sample(
        &self,
        tape: &Tape,
        dout: Option<&Tensor>,
        dmaps: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let captured: usize = self.cross_attention_layers().len();
        if !dmaps.is_empty() && dmaps.len() != captured {
            return Err(Error::Invalid(format!(
                "unet backward: {} map gradients for {captured} cross-attention layers",
                dmaps.len()
            )));
        }
        let mut dh = match dout {
            Some(d) => {
                let dn = self.conv_out.backward(&tape.out_conv_in, d)?;
                let normed = self.conv_norm_out.forward(&tape.out_norm_in)?;
                let dn = ops::activation_backward(&normed, &dn, Activation::Silu)?;
                Some(self.conv_norm_out.backward(&tape.out_norm_in, &dn)?)
            }
            None => None,
        };
        let (mut li, mut si, mut mi) = (tape.layers.len(), tape.samplers.len(), dmaps.len());
        // One layer's backward, consuming its tape entry and its maps' gradients.
        let mut layer_backward =
            |l: &Layer, dh: Option<Tensor>| -> Result<(Option<Tensor>, &LayerSaved)> {
                li -= 1;
                let saved = &tape.layers[li];
                let mut dh = dh;
                if let (Some(a), Some(ts)) = (&l.attention, &saved.attention) {
                    let count = a.transformer_blocks.len();
                    let lm: &[Option<Tensor>] = if dmaps.is_empty() {
                        &[]
                    } else {
                        mi -= count;
                        &dmaps[mi..mi + count]
                    };
                    dh = a.backward(ts, dh.as_ref(), lm)?;
                }
                Ok((
                    dh.map(|d| l.resnet.backward(&saved.resnet, &d))
                        .transpose()?,
                    saved,
                ))
            };
        let n_skips = 1 + self
            .down_blocks
            .iter()
            .map(|b| b.layers.len() + b.downsampler.is_some() as usize)
            .sum::<usize>();
        let mut dskips: Vec<Option<Tensor>> = (0..n_skips).map(|_| None).collect();
        let mut k = 0;
        for b in self.up_blocks.iter().rev() {
            if let Some(u) = &b.upsampler {
                si -= 1;
                dh = dh
                    .map(|d| {
                        ops::upsample_nearest2x_backward(
                            &u.backward(&tape.samplers[si].conv_in, &d)?,
                        )
                    })
                    .transpose()?;
            }
            for l in b.layers.iter().rev() {
                let (dcat, saved) = layer_backward(l, dh)?;
                let skip_ch = saved.skip_channels.expect("up layers concatenate a skip");
                dh = match dcat {
                    Some(d) => {
                        let c = d.shape()[1];
                        let mut parts = ops::split(&d, 1, &[c - skip_ch, skip_ch])?;
                        dskips[k] = parts.pop();
                        parts.pop()
                    }
                    None => None,
                };
                k += 1;
            }
        }
        for l in self.mid_block.iter().rev() {
            dh = layer_backward(l, dh)?.0;
        }
        let mut p = n_skips;
        for b in self.down_blocks.iter().rev() {
            if let Some(d) = &b.downsampler {
                p -= 1;
                si -= 1;
                dh = add_opt(dh, dskips[p].take())?;
                dh = dh
                    .map(|g| d.backward(&tape.samplers[si].conv_in, &g))
                    .transpose()?;
            }
            for l in b.layers.iter().rev() {
                p -= 1;
                dh = add_opt(dh, dskips[p].take())?;
                dh = layer_backward(l, dh)?.0;
            }
        }
        dh = add_opt(dh, dskips[0].take())?;
        match dh {
            Some(d) => self
                .conv_in
                .backward(&tape.sample, &d)?
                .to_like(&tape.input),
            None => Ok(Tensor::zeros(tape.input.shape(), tape.input.dtype()).to_like(&tape.input)?),
        }
    }
}
