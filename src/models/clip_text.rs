//! transformers' `CLIPTextModel`: the text encoder of Stable Diffusion (SD2.1's is OpenCLIP ViT-H's
//! 23-layer text tower, SD1.x's CLIP ViT-L's). Token and position embeddings, pre-norm
//! transformer layers with causal self-attention, a final LayerNorm; the pooled output is the
//! hidden state at the end token. Forward only: the text encoder is frozen and steering never
//! differentiates through it.

use std::path::Path;

use serde::Deserialize;

use super::attention::{merge_heads, split_heads};
use crate::nn::{LayerNorm, Linear};
use crate::ops::{self, Activation};
use crate::weights::{read_config, Placement, Weights, WeightsView};
use crate::{DType, Error, Result, Tensor};

/// `text_encoder/config.json` (transformers' `CLIPTextConfig`). The sizes are required; the rest
/// default as in transformers. `projection_dim` and the other keys are not used by the text model.
#[derive(Clone, Debug, Deserialize)]
pub struct CLIPTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    49407
}

impl CLIPTextConfig {
    /// The activation `hidden_act` names; anything else is refused by name.
    pub fn activation(&self) -> Result<Activation> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            other => Err(Error::Invalid(format!(
                "text encoder config: unsupported hidden_act {other:?} (expected gelu or quick_gelu)"
            ))),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = self
            .model_type
            .as_deref()
            .filter(|t| *t != "clip_text_model")
        {
            return Err(Error::Invalid(format!(
                "text encoder config: model_type {t:?}: expected a CLIPTextModel's (clip_text_model)"
            )));
        }
        self.activation()?;
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(Error::Invalid(format!(
                "text encoder config: hidden_size {} is not divisible by num_attention_heads {heads}",
                self.hidden_size
            )));
        }
        Ok(())
    }
}

/// One `encoder.layers.N`: pre-norm causal self-attention, then a pre-norm MLP, each residual.
#[derive(Clone, Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl EncoderLayer {
    fn load(w: &WeightsView, c: &CLIPTextConfig) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let attn = w.pp("self_attn");
        Ok(EncoderLayer {
            layer_norm1: LayerNorm::load(&w.pp("layer_norm1"), d, eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&w.pp("layer_norm2"), d, eps)?,
            fc1: Linear::load(&w.pp("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::load(&w.pp("mlp.fc2"), c.intermediate_size, d, true)?,
        })
    }

    /// `x`: (B, L, D) -> (B, L, D).
    fn forward(&self, x: &Tensor, heads: usize, act: Activation) -> Result<Tensor> {
        let h = self.layer_norm1.forward(x)?;
        let q = split_heads(&self.q_proj.forward(&h)?, heads)?;
        let k = split_heads(&self.k_proj.forward(&h)?, heads)?;
        let v = split_heads(&self.v_proj.forward(&h)?, heads)?;
        let head_dim = q.shape()[3];
        let o = ops::attention_causal(&q, &k, &v, 1.0 / (head_dim as f64).sqrt())?;
        let x = ops::add(x, &self.out_proj.forward(&merge_heads(&o)?)?)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self
            .fc2
            .forward(&ops::activation(&self.fc1.forward(&h)?, act)?)?;
        ops::add(&x, &h)
    }
}

/// The outputs transformers names `last_hidden_state` (B, L, D) and `pooler_output` (B, D).
#[derive(Clone, Debug)]
pub struct CLIPTextOutput {
    pub last_hidden_state: Tensor,
    pub pooler_output: Tensor,
}

#[derive(Clone, Debug)]
pub struct CLIPTextModel {
    pub config: CLIPTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    act: Activation,
}

impl CLIPTextModel {
    /// Load from a diffusers `text_encoder/` folder (config.json + model*.safetensors).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_dir_placed(dir, Placement::default())
    }

    /// The model with its weights in `placement` (e.g. bf16 on a GPU: `Placement::cuda`); its
    /// outputs still come back as host f32.
    pub fn from_dir_placed(dir: impl AsRef<Path>, placement: Placement) -> Result<Self> {
        let dir = dir.as_ref();
        let config: CLIPTextConfig = read_config(&dir.join("config.json"), "CLIPTextModel")?;
        let weights = Weights::from_dir(dir, "model")?.placed(placement);
        Self::load(config, &weights)
    }

    /// Real checkpoints name the tensors `text_model.embeddings...`; transformers 5 saves them
    /// without the `text_model.` prefix. Both load.
    pub fn load(config: CLIPTextConfig, weights: &Weights) -> Result<Self> {
        config.validate()?;
        let w = if weights.contains("text_model.embeddings.token_embedding.weight") {
            weights.pp("text_model")
        } else {
            weights.root()
        };
        let (d, c) = (config.hidden_size, &config);
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&w.pp("encoder.layers").pp(i), c))
            .collect::<Result<_>>()?;
        Ok(CLIPTextModel {
            token_embedding: w.get("embeddings.token_embedding.weight", &[c.vocab_size, d])?,
            position_embedding: w.get(
                "embeddings.position_embedding.weight",
                &[c.max_position_embeddings, d],
            )?,
            layers,
            final_layer_norm: LayerNorm::load(&w.pp("final_layer_norm"), d, c.layer_norm_eps)?,
            act: c.activation()?,
            config,
        })
    }

    /// `input_ids`: (B, L) or (L), int64 as transformers takes them.
    pub fn forward_tensor(&self, input_ids: &Tensor) -> Result<CLIPTextOutput> {
        let (b, l) = match *input_ids.shape() {
            [l] => (1, l),
            [b, l] => (b, l),
            ref s => {
                return Err(Error::shape(
                    "CLIPTextModel",
                    format!("input_ids must be (B, L), got {s:?}"),
                ))
            }
        };
        if input_ids.dtype() != DType::I64 {
            return Err(Error::DType {
                op: "CLIPTextModel input_ids",
                got: input_ids.dtype(),
                expected: "int64",
            });
        }
        let ids: Vec<i64> = input_ids.to_vec()?;
        let ids = ids
            .into_iter()
            .map(|i| {
                u32::try_from(i).map_err(|_| {
                    Error::Invalid(format!(
                        "CLIPTextModel: token id {i} is negative or too large"
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = self.forward_batch(&ids, b)?;
        if input_ids.rank() == 1 {
            out.pooler_output = out.pooler_output.reshape(&[self.config.hidden_size])?;
            out.last_hidden_state = out
                .last_hidden_state
                .reshape(&[l, self.config.hidden_size])?;
        }
        Ok(out)
    }

    /// One sequence (a tokenizer's padded encoding): outputs (1, L, D) and (1, D), in f32.
    pub fn forward(&self, ids: &[u32]) -> Result<CLIPTextOutput> {
        self.forward_batch(ids, 1)
    }

    /// `batch` sequences of equal length, one after another: outputs (B, L, D) and (B, D).
    pub fn forward_batch(&self, ids: &[u32], batch: usize) -> Result<CLIPTextOutput> {
        const OP: &str = "CLIPTextModel";
        let c = &self.config;
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::shape(
                OP,
                format!("{} ids do not split into {batch} sequences", ids.len()),
            ));
        }
        let (l, d) = (ids.len() / batch, c.hidden_size);
        if l > c.max_position_embeddings {
            return Err(Error::shape(
                OP,
                format!(
                    "sequence length {l} exceeds max_position_embeddings {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let tok: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
        let pos: Vec<usize> = (0..batch).flat_map(|_| 0..l).collect();
        let x = ops::add(
            &ops::embedding(&self.token_embedding, &tok)?,
            &ops::embedding(&self.position_embedding, &pos)?,
        )?;
        let mut x = x.reshape(&[batch, l, d])?;
        for layer in &self.layers {
            x = layer.forward(&x, c.num_attention_heads, self.act)?;
        }
        let mut last_hidden_state = self.final_layer_norm.forward(&x)?;
        if last_hidden_state.dtype() != DType::F64 {
            // Host f32 whatever the model computed in (bf16 on a GPU).
            last_hidden_state = last_hidden_state.to_place(DType::F32, None)?;
        }
        let pooler_output = self.pool(&last_hidden_state, ids, l)?;
        Ok(CLIPTextOutput {
            last_hidden_state,
            pooler_output,
        })
    }

    /// The hidden state at each sequence's end token. Like transformers: configs that say
    /// `eos_token_id` 2 (written before transformers fixed the id) take the position of the
    /// largest id (the end token has the largest id in CLIP's vocabulary); others take the first
    /// position of `eos_token_id` (pad may equal end), or position 0 when it is absent (torch's
    /// argmax of all zeros).
    fn pool(&self, hidden: &Tensor, ids: &[u32], l: usize) -> Result<Tensor> {
        let d = self.config.hidden_size;
        let h = hidden.to_vec::<f32>()?;
        let mut out = Vec::with_capacity(ids.len() / l * d);
        for (b, seq) in ids.chunks(l).enumerate() {
            let pos = if self.config.eos_token_id == 2 {
                // First position of the maximum, as torch.argmax breaks ties.
                seq.iter()
                    .enumerate()
                    .fold(0, |best, (i, &t)| if t > seq[best] { i } else { best })
            } else {
                seq.iter()
                    .position(|&t| i64::from(t) == self.config.eos_token_id)
                    .unwrap_or(0)
            };
            let row = (b * l + pos) * d;
            out.extend_from_slice(&h[row..row + d]);
        }
        Tensor::from_vec(out, &[ids.len() / l, d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> Result<CLIPTextConfig> {
        serde_json::from_value(json).map_err(|e| Error::Invalid(e.to_string()))
    }

    #[test]
    fn config_defaults_and_refusals() {
        let base = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 5, "projection_dim": 4
        });
        let c = config(base.clone()).unwrap();
        assert_eq!(
            (c.activation().unwrap(), c.eos_token_id),
            (Activation::QuickGelu, 49407)
        );
        let mut bad = base.clone();
        bad["hidden_act"] = "relu".into();
        let e = config(bad).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("hidden_act") && e.contains("relu"), "{e}");
        let mut bad = base.clone();
        bad["num_attention_heads"] = 3.into();
        assert!(config(bad).unwrap().validate().is_err());
        let mut missing = base;
        missing.as_object_mut().unwrap().remove("hidden_size");
        assert!(config(missing)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
    }
}
