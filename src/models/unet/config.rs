//! `unet/config.json` as diffusers writes it for `UNet2DConditionModel`, restricted to what SD2.1
//! uses; anything else is refused by name rather than silently ignored.

use serde::Deserialize;

use crate::{Error, Result};

/// A config value that diffusers accepts either once for all blocks or per block.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn expand(&self, blocks: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Invalid(format!(
                "unet config: `{key}` has {} entries for {blocks} blocks",
                v.len()
            ))),
        }
    }
}

fn default_4() -> usize {
    4
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_layers() -> PerBlock {
    PerBlock::One(1)
}
fn default_padding() -> usize {
    1
}

#[derive(Clone, Debug, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_4")]
    pub in_channels: usize,
    #[serde(default = "default_4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    /// Legacy naming: in diffusers' UNet2DConditionModel this is the number of heads when
    /// `num_attention_heads` is absent (SD2.1's configs rely on that).
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub sample_size: Option<usize>,
    // Features SD2.1 does not use; present only to be refused when set.
    #[serde(default)]
    pub class_embed_type: Option<serde_json::Value>,
    #[serde(default)]
    pub addition_embed_type: Option<serde_json::Value>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub act_fn: Option<String>,
    #[serde(default)]
    pub only_cross_attention: Option<serde_json::Value>,
    #[serde(default)]
    pub dual_cross_attention: Option<bool>,
}

impl UNetConfig {
    /// Refuse configurations this implementation does not compute, naming the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, what: String| {
            Err(Error::Invalid(format!(
                "unet config: unsupported {key}: {what}"
            )))
        };
        let set = |v: &Option<serde_json::Value>| {
            v.as_ref()
                .is_some_and(|v| !v.is_null() && v != &serde_json::Value::Bool(false))
        };
        if set(&self.class_embed_type) {
            return bad("class_embed_type", format!("{:?}", self.class_embed_type));
        }
        if set(&self.addition_embed_type) {
            return bad(
                "addition_embed_type",
                format!("{:?}", self.addition_embed_type),
            );
        }
        if set(&self.time_cond_proj_dim)
            || set(&self.encoder_hid_dim)
            || set(&self.only_cross_attention)
        {
            return bad(
                "time_cond_proj_dim/encoder_hid_dim/only_cross_attention",
                "must be unset".into(),
            );
        }
        if self.dual_cross_attention == Some(true) {
            return bad("dual_cross_attention", "true".into());
        }
        for (key, v, ok) in [
            (
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ),
            (
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ),
            ("act_fn", &self.act_fn, "silu"),
        ] {
            if let Some(v) = v {
                if v != ok {
                    return bad(key, v.clone());
                }
            }
        }
        if !self.use_linear_projection {
            return bad(
                "use_linear_projection",
                "false (SD1.x's conv projection is not implemented)".into(),
            );
        }
        let n = self.block_out_channels.len();
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Invalid(format!(
                "unet config: {n} block_out_channels but {} down and {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return bad("block type", t.clone());
            }
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return bad("mid_block_type", m.clone());
            }
        }
        Ok(())
    }

    /// Attention heads per down block (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }
}
