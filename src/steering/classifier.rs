//! The relation classifier (SPEC section 4): the reference implementation's
//! `EnhancedRelationClassifier` (sapir1779/learn-to-steer, train_relation_classifier/model.py),
//! forward, and backward to its input maps (steering) and to every parameter (training).
//!
//! `maps` (B, 2, N, S, S) — word 1 (subject) and word 2 (object), N maps each, S = 16 — and a step
//! index per sample go in; logits (B, C) come out:
//!
//! - Object extractor, shared by both words (run on all 2B words at once): flatten each map to
//!   S*S, `input_projection` to d, + sinusoidal positional encoding over the N axis (max_len = N),
//!   then for each norm-first encoder layer `x = layer(x + E_ext[s])` (step-embedding mode "mid";
//!   "pre" adds it once before the first layer, and the embedding may be disabled), then attention
//!   pooling: `nn.MultiheadAttention` with the learned `query_vector` (1, 1, d) as the one query
//!   over the N tokens, then `output_projection` to S*S: one aggregated map per word.
//! - Relation head: the two aggregated maps concatenated (2 S*S) -> `projection` to d -> +
//!   positional encoding position 0 -> encoder layers over that single token -> concat
//!   `E_cls[s]` -> `fc`: Linear(d + t, 256), LayerNorm, LeakyReLU(0.1), Dropout, Linear(256, 128),
//!   LayerNorm, LeakyReLU(0.1), Dropout, Linear(128, C).
//! - Encoder layers are PyTorch's `TransformerEncoderLayer(norm_first=True, activation=relu)`:
//!   `x = x + SA(LN1(x)); x = x + FF(LN2(x))`, LayerNorm eps 1e-5, self-attention with the packed
//!   `in_proj_weight` (q, k, v rows stacked) and `out_proj`.
//!
//! Parameters live in a [`Params`] map under the reference's own `state_dict` names, in PyTorch's
//! `named_parameters()` order. The file format is the one `scripts/convert_classifier.py` writes:
//! every `state_dict` tensor under its own name (float32) plus metadata (`classes`,
//! `input_channels`, `config`, `training_config`, `format_version`).
//!
//! Training mode (`forward(.., Some(rng))`) applies dropout where PyTorch's train mode does: in
//! every encoder layer on the attention probabilities, after self-attention, inside the
//! feed-forward (after the ReLU) and after it (the extractor's layers with the extractor's
//! `dropout`, the head's with the head's), and after each of the two hidden fc layers. The
//! pooling attention has none (PyTorch's default `dropout=0`). Masks are not stored: each dropout
//! site draws a 64-bit seed from the caller's generator and the mask is a counter-based hash of
//! (seed, element index), recomputed in the backward.
//!
//! Host tensors only, in f32 (models) or f64 (gradient checks; see [`RelationClassifier::to_dtype`]).

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use serde_json::{json, Value};

use super::params::Params;
use crate::models::attention::{merge_heads, split_heads};
use crate::ops::{
    self, float_dispatch, gemm, softmax_row, softmax_row_backward, Activation, Layout,
};
use crate::rng::Rng;
use crate::safetensors_io::{self, SafetensorsFile};
use crate::weights::Placement;
use crate::{DType, Error, Float, Result, Tensor};

/// The `format` metadata value of a converted classifier file.
pub const FORMAT: &str = "steer-relation-classifier";
/// The newest `format_version` this code reads and the one it writes.
pub const FORMAT_VERSION: u32 = 1;
/// The training steps the reference records maps at (SD2.1, FLUX.1-dev): a denoising step is
/// bucketed to the next of these ([`bucket_step`]).
pub const DEFAULT_STEP_BUCKETS: [usize; 6] = [5, 10, 15, 20, 25, 49];
/// Width of the two hidden fc layers of the relation head (fixed in the reference: fc_ver "v1").
pub const FC_HIDDEN: [usize; 2] = [256, 128];
/// The relation head's positional-encoding buffer length (the reference's default max_len).
pub const HEAD_PE_LEN: usize = 256;
const LN_EPS: f64 = 1e-5;
const LEAKY_SLOPE: f64 = 0.1;
const EXT: &str = "object_extractor";
const HEAD: &str = "relation_classifier";
const PE_EXT: &str = "object_extractor.positional_encoding.pe";
const PE_HEAD: &str = "relation_classifier.positional_encoding.pe";

/// Where the extractor adds its step embedding `E_ext[s]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepEmbedding {
    /// No step embedding in the extractor (`timestep_embedding.enable: false`).
    Off,
    /// Added once, before the first encoder layer (`mode: "pre"`).
    Pre,
    /// Added before every encoder layer (`mode: "mid"`, what the published configs use).
    Mid,
}

/// The object extractor's sizes (the yaml's `model.extractor`).
#[derive(Clone, Debug, PartialEq)]
pub struct ExtractorConfig {
    pub heads: usize,
    pub layers: usize,
    pub ff: usize,
    /// Heads of the attention pooling (`layer_attn_nheads`).
    pub pool_heads: usize,
    /// Dropout of its encoder layers in training (the reference's default is 0.1 when absent).
    pub dropout: f64,
    pub step_embedding: StepEmbedding,
}

/// The relation head's sizes (the yaml's `model.classifier`).
#[derive(Clone, Debug, PartialEq)]
pub struct HeadConfig {
    pub heads: usize,
    pub layers: usize,
    pub ff: usize,
    /// Dropout of its encoder layers and of its fc layers in training.
    pub dropout: f64,
    /// Width of `E_cls` (`timestep_embedding_dim`; 0: no step embedding in the head).
    pub step_embedding_dim: usize,
}

/// Everything that fixes the classifier's shapes and behaviour.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierConfig {
    /// N: maps per word (the checkpoint's `input_channels`).
    pub maps_per_word: usize,
    /// S: each map is S x S (`map_size`).
    pub map_size: usize,
    pub d_model: usize,
    /// Rows of the step embeddings: valid step indices are 0..num_timesteps.
    pub num_timesteps: usize,
    pub extractor: ExtractorConfig,
    pub head: HeadConfig,
    /// Class names in index order.
    pub classes: Vec<String>,
    /// The training steps a denoising step is bucketed to ([`bucket_step`]).
    pub step_buckets: Vec<usize>,
    /// The maps are multiplied by this before `input_projection` (`input_scale` in the config;
    /// 1, absent, for the reference's checkpoints). Our addition: renormalised 16x16 maps are
    /// about 1/256 each, so the projection's weights must grow ~100x before the maps outweigh
    /// the positional and step embeddings; on ShapesWorld's few thousand samples the reference
    /// settings stayed at chance, and a scale of 256 (maps of mean 1) trains in a few epochs.
    pub input_scale: f64,
}

impl ClassifierConfig {
    /// The reference's SD2.1 sizes (sd2_config.yaml): d 256; extractor 2 layers, 2 heads, FF 128,
    /// pooling 2 heads; head 2 layers, 4 heads, FF 128; step embeddings 50 x 256 and 50 x 16.
    pub fn sd2(maps_per_word: usize, classes: Vec<String>) -> Self {
        ClassifierConfig {
            maps_per_word,
            map_size: 16,
            d_model: 256,
            num_timesteps: 50,
            extractor: ExtractorConfig {
                heads: 2,
                layers: 2,
                ff: 128,
                pool_heads: 2,
                dropout: 0.3,
                step_embedding: StepEmbedding::Mid,
            },
            head: HeadConfig {
                heads: 4,
                layers: 2,
                ff: 128,
                dropout: 0.3,
                step_embedding_dim: 16,
            },
            classes,
            step_buckets: DEFAULT_STEP_BUCKETS.to_vec(),
            input_scale: 1.0,
        }
    }

    /// The reference's FLUX.1-dev sizes (flux_dev_config.yaml): d 256; extractor 4 layers,
    /// 4 heads, FF 512, pooling 4 heads; head 4 layers, 8 heads, FF 512.
    pub fn flux(maps_per_word: usize, classes: Vec<String>) -> Self {
        let mut c = Self::sd2(maps_per_word, classes);
        c.extractor.heads = 4;
        c.extractor.layers = 4;
        c.extractor.ff = 512;
        c.extractor.pool_heads = 4;
        c.head.heads = 8;
        c.head.layers = 4;
        c.head.ff = 512;
        c
    }

    /// From a checkpoint's `config` (the yaml's `model` section), `input_channels`, class list
    /// and `training_config` (whose `timesteps` are the step buckets when present).
    pub fn from_reference(
        config: &Value,
        input_channels: usize,
        classes: Vec<String>,
        training_config: Option<&Value>,
    ) -> Result<Self> {
        let ext = field(config, "extractor")?;
        let head = field(config, "classifier")?;
        if ext.get("use_mean").and_then(Value::as_bool) == Some(true) {
            return Err(Error::Invalid(
                "classifier config: extractor.use_mean (mean over maps instead of the attention \
                 extractor) is not supported"
                    .into(),
            ));
        }
        if let Some(mode) = head.get("mode").and_then(Value::as_str) {
            if mode != "multiclass" {
                return Err(Error::Invalid(format!(
                    "classifier config: classifier.mode {mode:?} is not supported (multiclass only)"
                )));
            }
        }
        let te = field(ext, "timestep_embedding")?;
        let step_embedding = if !te.get("enable").and_then(Value::as_bool).unwrap_or(false) {
            StepEmbedding::Off
        } else {
            match te.get("mode").and_then(Value::as_str) {
                Some("mid") => StepEmbedding::Mid,
                Some("pre") => StepEmbedding::Pre,
                other => {
                    return Err(Error::Invalid(format!(
                        "classifier config: extractor.timestep_embedding.mode {other:?} is not \
                         supported (\"mid\" or \"pre\")"
                    )))
                }
            }
        };
        let step_buckets = match training_config.and_then(|t| t.get("timesteps")) {
            Some(v) => serde_json::from_value::<Vec<usize>>(v.clone())
                .map_err(|e| Error::Invalid(format!("training_config.timesteps: {e} (got {v})")))?,
            None => DEFAULT_STEP_BUCKETS.to_vec(),
        };
        let c = ClassifierConfig {
            maps_per_word: input_channels,
            map_size: uint(config, "map_size")?,
            d_model: uint(config, "d_model")?,
            num_timesteps: uint(config, "num_timesteps")?,
            input_scale: config
                .get("input_scale")
                .and_then(Value::as_f64)
                .unwrap_or(1.0),
            extractor: ExtractorConfig {
                heads: uint(ext, "nhead")?,
                layers: uint(ext, "num_layers")?,
                ff: uint(ext, "dim_feedforward")?,
                pool_heads: uint(ext, "layer_attn_nheads")?,
                dropout: ext.get("dropout").and_then(Value::as_f64).unwrap_or(0.1),
                step_embedding,
            },
            head: HeadConfig {
                heads: uint(head, "nhead")?,
                layers: uint(head, "num_layers")?,
                ff: uint(head, "dim_feedforward")?,
                dropout: float(head, "dropout")?,
                step_embedding_dim: uint(head, "timestep_embedding_dim")?,
            },
            classes,
            step_buckets,
        };
        c.validate()?;
        Ok(c)
    }

    /// The reference's `config` dictionary for these sizes (what `save` writes when the model
    /// was not loaded from a file).
    pub fn to_reference_json(&self) -> Value {
        let mut v = json!({
            "extractor": {
                "nhead": self.extractor.heads,
                "num_layers": self.extractor.layers,
                "dim_feedforward": self.extractor.ff,
                "layer_attn_nheads": self.extractor.pool_heads,
                "dropout": self.extractor.dropout,
                "timestep_embedding": {
                    "enable": self.extractor.step_embedding != StepEmbedding::Off,
                    "mode": if self.extractor.step_embedding == StepEmbedding::Pre { "pre" } else { "mid" },
                },
            },
            "classifier": {
                "mode": "multiclass",
                "timestep_embedding_dim": self.head.step_embedding_dim,
                "nhead": self.head.heads,
                "num_layers": self.head.layers,
                "dim_feedforward": self.head.ff,
                "fc_ver": "v1",
                "dropout": self.head.dropout,
            },
            "map_size": self.map_size,
            "d_model": self.d_model,
            "num_timesteps": self.num_timesteps,
            "architecture": "attention",
        });
        if self.input_scale != 1.0 {
            v["input_scale"] = json!(self.input_scale);
        }
        v
    }

    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// Errors for sizes the model cannot have.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("classifier config: {m}")));
        let d = self.d_model;
        if self.maps_per_word == 0 || self.map_size == 0 || d == 0 || self.num_timesteps == 0 {
            return bad(format!(
                "N = {}, map_size = {}, d_model = {d}, num_timesteps = {} must all be positive",
                self.maps_per_word, self.map_size, self.num_timesteps
            ));
        }
        if !d.is_multiple_of(2) {
            return bad(format!(
                "d_model = {d} must be even (sinusoidal positional encoding)"
            ));
        }
        for (what, h) in [
            ("extractor.nhead", self.extractor.heads),
            ("extractor.layer_attn_nheads", self.extractor.pool_heads),
            ("classifier.nhead", self.head.heads),
        ] {
            if h == 0 || !d.is_multiple_of(h) {
                return bad(format!("{what} = {h} does not divide d_model = {d}"));
            }
        }
        if self.classes.is_empty() {
            return bad("no classes".into());
        }
        for (what, p) in [
            ("extractor.dropout", self.extractor.dropout),
            ("classifier.dropout", self.head.dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{what} = {p} must be in [0, 1)"));
            }
        }
        check_buckets(&self.step_buckets, self.num_timesteps)
    }

    /// Every parameter's name and shape, in PyTorch's `named_parameters()` order (a module's
    /// own parameters before its children's, children in registration order).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, m, t) = (
            self.d_model,
            self.map_size * self.map_size,
            self.num_timesteps,
        );
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let mut push = |name: String, shape: &[usize]| v.push((name, shape.to_vec()));
        push(format!("{EXT}.query_vector"), &[1, 1, d]);
        push(format!("{EXT}.input_projection.weight"), &[d, m]);
        push(format!("{EXT}.input_projection.bias"), &[d]);
        if self.extractor.step_embedding != StepEmbedding::Off {
            push(format!("{EXT}.timestep_embedding.weight"), &[t, d]);
        }
        for i in 0..self.extractor.layers {
            layer_shapes(
                &format!("{EXT}.transformer.layers.{i}"),
                d,
                self.extractor.ff,
                &mut push,
            );
        }
        push(format!("{EXT}.layer_attention.in_proj_weight"), &[3 * d, d]);
        push(format!("{EXT}.layer_attention.in_proj_bias"), &[3 * d]);
        push(format!("{EXT}.layer_attention.out_proj.weight"), &[d, d]);
        push(format!("{EXT}.layer_attention.out_proj.bias"), &[d]);
        push(format!("{EXT}.output_projection.weight"), &[m, d]);
        push(format!("{EXT}.output_projection.bias"), &[m]);
        let te = self.head.step_embedding_dim;
        if te > 0 {
            push(format!("{HEAD}.timestep_embedding.weight"), &[t, te]);
        }
        push(format!("{HEAD}.projection.weight"), &[d, 2 * m]);
        push(format!("{HEAD}.projection.bias"), &[d]);
        for i in 0..self.head.layers {
            layer_shapes(
                &format!("{HEAD}.transformer.layers.{i}"),
                d,
                self.head.ff,
                &mut push,
            );
        }
        let [h1, h2] = FC_HIDDEN;
        let c = self.num_classes();
        for (i, shape) in [
            (0, vec![h1, d + te]),
            (1, vec![h1]),
            (4, vec![h2, h1]),
            (5, vec![h2]),
            (8, vec![c, h2]),
        ] {
            let out = shape[0];
            push(format!("{HEAD}.fc.{i}.weight"), &shape);
            push(format!("{HEAD}.fc.{i}.bias"), &[out]);
        }
        v
    }
}

fn layer_shapes(p: &str, d: usize, ff: usize, push: &mut impl FnMut(String, &[usize])) {
    push(format!("{p}.self_attn.in_proj_weight"), &[3 * d, d]);
    push(format!("{p}.self_attn.in_proj_bias"), &[3 * d]);
    push(format!("{p}.self_attn.out_proj.weight"), &[d, d]);
    push(format!("{p}.self_attn.out_proj.bias"), &[d]);
    push(format!("{p}.linear1.weight"), &[ff, d]);
    push(format!("{p}.linear1.bias"), &[ff]);
    push(format!("{p}.linear2.weight"), &[d, ff]);
    push(format!("{p}.linear2.bias"), &[d]);
    for n in ["norm1", "norm2"] {
        push(format!("{p}.{n}.weight"), &[d]);
        push(format!("{p}.{n}.bias"), &[d]);
    }
}

fn field<'a>(v: &'a Value, key: &str) -> Result<&'a Value> {
    v.get(key)
        .ok_or_else(|| Error::Invalid(format!("classifier config: missing `{key}` in {v}")))
}

fn uint(v: &Value, key: &str) -> Result<usize> {
    field(v, key)?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| Error::Invalid(format!("classifier config: `{key}` must be an integer")))
}

fn float(v: &Value, key: &str) -> Result<f64> {
    field(v, key)?
        .as_f64()
        .ok_or_else(|| Error::Invalid(format!("classifier config: `{key}` must be a number")))
}

fn check_buckets(b: &[usize], num_timesteps: usize) -> Result<()> {
    if b.is_empty() || b.windows(2).any(|w| w[0] >= w[1]) || b[b.len() - 1] >= num_timesteps {
        return Err(Error::Invalid(format!(
            "step buckets {b:?} must be strictly increasing step indices below {num_timesteps}"
        )));
    }
    Ok(())
}

/// The step index the classifier reads for denoising step `i`: the first bucket `>= i`
/// (buckets [5, 10, 15, 20, 25, 49]: 0-5 -> 5, 6-10 -> 10, ..., 21-25 -> 25, 26-49 -> 49), as
/// the reference's `assign_by_intervals` does. A step past the last bucket maps to the last one
/// (the reference leaves those at 0, which only matters for more steps than it trained on).
pub fn bucket_step(buckets: &[usize], i: usize) -> usize {
    buckets
        .iter()
        .copied()
        .find(|&b| b >= i)
        .or(buckets.last().copied())
        .unwrap_or(i)
}

/// The sinusoidal positional encoding (max_len, d), computed as the reference's
/// `PositionalEncoding` does in float32 (position * exp(2i * -ln(10000) / d), sin on even, cos on
/// odd channels).
pub fn positional_encoding(max_len: usize, d: usize) -> Vec<f32> {
    let k = -(10000.0f32.ln()) / d as f32;
    let div: Vec<f32> = (0..d / 2).map(|i| ((2 * i) as f32 * k).exp()).collect();
    let mut pe = vec![0.0f32; max_len * d];
    for (pos, row) in pe.chunks_mut(d.max(1)).enumerate() {
        for (i, &f) in div.iter().enumerate() {
            let a = pos as f32 * f;
            row[2 * i] = a.sin();
            row[2 * i + 1] = a.cos();
        }
    }
    pe
}

/// The relation classifier: configuration, parameters and the positional encodings.
#[derive(Clone, Debug)]
pub struct RelationClassifier {
    config: ClassifierConfig,
    params: Params,
    /// (N, d): the extractor's positional encoding.
    pe_ext: Tensor,
    /// (HEAD_PE_LEN, d): the head's; only position 0 is read.
    pe_head: Tensor,
    /// The checkpoint's `config` and `training_config` as loaded (written back by `save`).
    reference_config: Value,
    training_config: Value,
}

/// What `backward` needs from a `forward`.
pub struct ClassifierSaved {
    batch: usize,
    steps: Vec<usize>,
    /// (2B, N, S*S): the maps, one row per word.
    x0: Tensor,
    ext_layers: Vec<LayerSaved>,
    /// (2B, N, d): the extractor's encoder output (the pooling's keys and values).
    ext_out: Tensor,
    pool: PoolSaved,
    /// (2B, d): the pooling's output (output_projection's input).
    pooled: Tensor,
    /// (B, 2 S*S): the two aggregated maps (projection's input).
    agg: Tensor,
    head_layers: Vec<LayerSaved>,
    fc: FcSaved,
}

struct LayerSaved {
    /// The layer's input (after the step embedding is added).
    u: Tensor,
    /// (A, L, 3d): the packed q, k, v projections.
    qkv: Tensor,
    /// (A, L, d): the attention output, heads merged (out_proj's input).
    merged: Tensor,
    /// u + SA(LN1(u)).
    v1: Tensor,
    /// (A, L, FF): linear1's output, before the ReLU.
    f1: Tensor,
    drop: Option<LayerDropout>,
}

#[derive(Clone, Copy)]
struct LayerDropout {
    p: f64,
    attn: u64,
    sa: u64,
    ff: u64,
    out: u64,
}

struct PoolSaved {
    /// (1, d): the query vector as a row.
    qv: Tensor,
    /// (2B, H, 1, hd), (2B, H, N, hd), (2B, H, N, hd)
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// (2B, 1, d)
    merged: Tensor,
}

struct FcSaved {
    /// (B, d + t): fc.0's input.
    feat: Tensor,
    /// (B, 256), (B, 128): the pre-LayerNorm activations.
    z0: Tensor,
    z4: Tensor,
    /// (B, 256), (B, 128): the inputs of fc.4 and fc.8 (after LeakyReLU and dropout).
    h1: Tensor,
    h2: Tensor,
    drop: Option<(f64, u64, u64)>,
}

/// Collects parameter gradients (or ignores them, for input-only backwards).
struct Grads(Option<Params>);

impl Grads {
    fn add(&mut self, name: &str, g: Option<Tensor>) -> Result<()> {
        match (&mut self.0, g) {
            (Some(p), Some(g)) => p.accumulate(name, &g),
            _ => Ok(()),
        }
    }
    fn wants(&self) -> bool {
        self.0.is_some()
    }
}

impl RelationClassifier {
    /// Load a classifier file written by `scripts/convert_classifier.py` (or by [`Self::save`]).
    /// Every parameter must be there with its shape; an unknown tensor is an error (as
    /// PyTorch's strict `load_state_dict`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = SafetensorsFile::open(path)?;
        let meta = file.metadata()?;
        let get = |key: &str| {
            meta.get(key).ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "no `{key}` metadata: not a relation classifier converted by \
                         scripts/convert_classifier.py"
                    ),
                )
            })
        };
        if let Some(f) = meta.get("format") {
            if f != FORMAT {
                return Err(Error::format(
                    path,
                    format!("format is {f:?}, expected {FORMAT:?}"),
                ));
            }
        }
        if let Some(v) = meta.get("format_version") {
            match v.parse::<u32>() {
                Ok(v) if (1..=FORMAT_VERSION).contains(&v) => {}
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                            "format_version {v:?}: this build reads versions 1..={FORMAT_VERSION}"
                        ),
                    ))
                }
            }
        }
        let parse = |key: &str| -> Result<Value> {
            serde_json::from_str(get(key)?)
                .map_err(|e| Error::format(path, format!("metadata `{key}` is not JSON: {e}")))
        };
        let reference_config = parse("config")?;
        let training_config = match meta.get("training_config") {
            Some(_) => parse("training_config")?,
            None => Value::Null,
        };
        let classes: Vec<String> = serde_json::from_value(parse("classes")?).map_err(|e| {
            Error::format(
                path,
                format!("metadata `classes` is not a list of names: {e}"),
            )
        })?;
        let n: usize = get("input_channels")?.parse().map_err(|_| {
            Error::format(
                path,
                "metadata `input_channels` is not a non-negative integer",
            )
        })?;
        let training = (!training_config.is_null()).then_some(&training_config);
        let mut config = ClassifierConfig::from_reference(&reference_config, n, classes, training)
            .map_err(|e| Error::format(path, e.to_string()))?;
        if let Some(b) = meta.get("step_buckets") {
            config.step_buckets = serde_json::from_str(b)
                .map_err(|e| Error::format(path, format!("metadata `step_buckets`: {e}")))?;
            config
                .validate()
                .map_err(|e| Error::format(path, e.to_string()))?;
        }

        let mut params = Params::new();
        for (name, shape) in config.parameter_shapes() {
            params.insert(name.clone(), file.tensor_as(&name, &shape, DType::F32)?);
        }
        let d = config.d_model;
        let pe_ext = pe_buffer(&file, PE_EXT, n, d, Some(n))?;
        let pe_head = pe_buffer(&file, PE_HEAD, HEAD_PE_LEN, d, None)?;
        let unknown: Vec<String> = file
            .names()
            .into_iter()
            .filter(|k| !params.contains(k) && k != PE_EXT && k != PE_HEAD)
            .collect();
        if !unknown.is_empty() {
            return Err(Error::format(
                path,
                format!("unexpected tensors for this config: {unknown:?}"),
            ));
        }
        Ok(RelationClassifier {
            config,
            params,
            pe_ext,
            pe_head,
            reference_config,
            training_config,
        })
    }

    /// A freshly initialised classifier (for training), initialised as PyTorch does: Linear
    /// weights and biases U(-1/sqrt(in), 1/sqrt(in)), the attention `in_proj_weight`
    /// Xavier-uniform with zero `in_proj_bias` and `out_proj.bias`, LayerNorm 1 and 0, the
    /// embeddings and the query vector N(0, 1). As in PyTorch (`TransformerEncoder` deep-copies
    /// one layer), every layer of an encoder starts from the same weights.
    pub fn init(config: ClassifierConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = Rng::new(seed);
        let mut params = Params::new();
        for (name, shape) in config.parameter_shapes() {
            // Layers 1.. of each encoder copy layer 0.
            if let Some(src) = first_layer_name(&name).and_then(|n| params.get(&n).cloned()) {
                params.insert(name, src);
                continue;
            }
            let n: usize = shape.iter().product();
            let fan_in = *shape.last().unwrap_or(&1) as f64;
            let uniform = |rng: &mut Rng, bound: f64| -> Vec<f64> {
                (0..n)
                    .map(|_| bound * (2.0 * rng.uniform() - 1.0))
                    .collect()
            };
            let v: Vec<f64> = if name.ends_with("query_vector") || name.contains("embedding") {
                (0..n).map(|_| rng.normal()).collect()
            } else if name.ends_with("in_proj_weight") {
                uniform(&mut rng, (6.0 / (shape[0] + shape[1]) as f64).sqrt())
            } else if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") {
                vec![0.0; n]
            } else if is_norm(&name) {
                vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
            } else if name.ends_with("weight") {
                uniform(&mut rng, 1.0 / fan_in.sqrt())
            } else {
                // A Linear's bias: bound 1/sqrt(fan_in of its weight).
                let w = params
                    .get(&name.replace(".bias", ".weight"))
                    .map_or(1.0, |w| w.shape()[1] as f64);
                uniform(&mut rng, 1.0 / w.sqrt())
            };
            params.insert(name, Tensor::from_vec(v, &shape)?.to_dtype(DType::F32)?);
        }
        let d = config.d_model;
        let pe_ext = Tensor::from_vec(
            positional_encoding(config.maps_per_word, d),
            &[config.maps_per_word, d],
        )?;
        let pe_head = Tensor::from_vec(positional_encoding(HEAD_PE_LEN, d), &[HEAD_PE_LEN, d])?;
        let training_config =
            json!({ "timesteps": config.step_buckets, "num_timesteps": config.num_timesteps });
        Ok(RelationClassifier {
            reference_config: config.to_reference_json(),
            training_config,
            config,
            params,
            pe_ext,
            pe_head,
        })
    }

    /// Write the classifier in the format `load` reads (and `scripts/convert_classifier.py`
    /// writes): every parameter and the two positional-encoding buffers as float32, and the
    /// metadata. Atomic (a temporary file, then a rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let d = self.config.d_model;
        let mut named: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| Ok((n.to_string(), t.to_dtype(DType::F32)?)))
            .collect::<Result<_>>()?;
        let n = self.config.maps_per_word;
        let plen = self.pe_head.shape()[0];
        named.push((
            PE_EXT.into(),
            self.pe_ext.to_dtype(DType::F32)?.reshape(&[1, n, d])?,
        ));
        named.push((
            PE_HEAD.into(),
            self.pe_head.to_dtype(DType::F32)?.reshape(&[1, plen, d])?,
        ));
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
        let json_str = |v: &Value| serde_json::to_string(v).expect("JSON values serialise");
        let meta = HashMap::from([
            ("format".to_string(), FORMAT.to_string()),
            ("format_version".to_string(), FORMAT_VERSION.to_string()),
            ("classes".to_string(), json_str(&json!(self.config.classes))),
            ("input_channels".to_string(), n.to_string()),
            ("config".to_string(), json_str(&self.reference_config)),
            (
                "training_config".to_string(),
                json_str(&self.training_config),
            ),
            (
                "step_buckets".to_string(),
                json_str(&json!(self.config.step_buckets)),
            ),
        ]);
        safetensors_io::save(path, &refs, Some(meta))
    }

    /// The same classifier with its parameters in `dtype` (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.placed(&Placement {
            dtype,
            device: None,
        })
    }

    /// The same classifier with its parameters in `placement` (bf16 on a GPU: `Placement::cuda`).
    /// Its forward and input gradient then run on that device's kernels; parameter gradients
    /// (training) need host parameters.
    pub fn placed(&self, placement: &Placement) -> Result<Self> {
        Ok(RelationClassifier {
            params: self.params.placed(placement)?,
            pe_ext: placement.place(&self.pe_ext)?,
            pe_head: placement.place(&self.pe_head)?,
            ..self.clone()
        })
    }

    pub fn dtype(&self) -> DType {
        self.pe_ext.dtype()
    }
    pub fn config(&self) -> &ClassifierConfig {
        &self.config
    }
    pub fn params(&self) -> &Params {
        &self.params
    }
    /// The parameters, for an optimizer's update (names and shapes must stay as they are).
    pub fn params_mut(&mut self) -> &mut Params {
        &mut self.params
    }
    /// Class names, in index order.
    pub fn classes(&self) -> &[String] {
        &self.config.classes
    }
    pub fn num_classes(&self) -> usize {
        self.config.classes.len()
    }
    /// N: the maps per word this classifier reads.
    pub fn maps_per_word(&self) -> usize {
        self.config.maps_per_word
    }
    /// The index of class `name`, if it is one.
    pub fn class_index(&self, name: &str) -> Option<usize> {
        self.config.classes.iter().position(|c| c == name)
    }
    pub fn step_buckets(&self) -> &[usize] {
        &self.config.step_buckets
    }
    /// Replace the step buckets (strictly increasing, each below `num_timesteps`).
    pub fn set_step_buckets(&mut self, buckets: Vec<usize>) -> Result<()> {
        check_buckets(&buckets, self.config.num_timesteps)?;
        self.config.step_buckets = buckets;
        Ok(())
    }
    /// The step index the embeddings read for denoising step `i` ([`bucket_step`] with this
    /// classifier's buckets: the checkpoint's `training_config.timesteps`, else
    /// [`DEFAULT_STEP_BUCKETS`]).
    pub fn bucket_step(&self, i: usize) -> usize {
        bucket_step(&self.config.step_buckets, i)
    }

    fn p(&self, name: &str) -> Result<&Tensor> {
        self.params.require(name)
    }

    /// Logits (B, C) for `maps` (B, 2, N, S, S) and `steps` (B step indices the embeddings read,
    /// each below `num_timesteps`: already bucketed, see [`Self::bucket_step`]). `train`: `Some`
    /// applies dropout with masks drawn from that generator; `None` is eval mode. Maps of
    /// another float dtype are converted to the classifier's.
    pub fn forward(
        &self,
        maps: &Tensor,
        steps: &[usize],
        mut train: Option<&mut Rng>,
    ) -> Result<(Tensor, ClassifierSaved)> {
        let c = &self.config;
        let (n, s, d) = (c.maps_per_word, c.map_size, c.d_model);
        let sh = maps.shape();
        if sh.len() != 5 || sh[1] != 2 || sh[3] != s || sh[4] != s {
            return Err(Error::shape(
                "RelationClassifier::forward",
                format!("maps {sh:?}, expected (B, 2, {n}, {s}, {s})"),
            ));
        }
        if sh[2] != n {
            return Err(Error::Invalid(format!(
                "the classifier reads N = {n} maps per word, but the maps have {} per word \
                 (shape {sh:?}): the classifier was trained on another model's attention layers",
                sh[2]
            )));
        }
        let b = sh[0];
        if steps.len() != b {
            return Err(Error::Invalid(format!(
                "{} step indices for a batch of {b}",
                steps.len()
            )));
        }
        if let Some(&bad) = steps.iter().find(|&&t| t >= c.num_timesteps) {
            return Err(Error::Invalid(format!(
                "step index {bad} out of range: the classifier's step embeddings have {} rows \
                 (bucket denoising steps with bucket_step)",
                c.num_timesteps
            )));
        }
        let maps = maps.to_like(&self.pe_ext)?;
        let e = 2 * b;
        let m = s * s;

        // Object extractor, both words at once: rows (b, word).
        let x0 = maps.reshape(&[e, n, m])?;
        let x0 = if c.input_scale != 1.0 {
            ops::scale(&x0, c.input_scale)?
        } else {
            x0
        };
        let mut h = ops::linear(
            &x0,
            self.p(&format!("{EXT}.input_projection.weight"))?,
            Some(self.p(&format!("{EXT}.input_projection.bias"))?),
        )?;
        h = ops::add_broadcast(&h, &self.pe_ext, 0)?;
        let ext_ids: Vec<usize> = steps.iter().flat_map(|&t| [t, t]).collect();
        let temb = match c.extractor.step_embedding {
            StepEmbedding::Off => None,
            _ => Some(ops::embedding(
                self.p(&format!("{EXT}.timestep_embedding.weight"))?,
                &ext_ids,
            )?),
        };
        if let (StepEmbedding::Pre, Some(t)) = (c.extractor.step_embedding, &temb) {
            h = ops::add_broadcast(&h, t, 1)?;
        }
        let mut ext_layers = Vec::with_capacity(c.extractor.layers);
        for i in 0..c.extractor.layers {
            if let (StepEmbedding::Mid, Some(t)) = (c.extractor.step_embedding, &temb) {
                h = ops::add_broadcast(&h, t, 1)?;
            }
            let drop = layer_dropout(c.extractor.dropout, train.as_deref_mut());
            let (y, saved) = self.layer_forward(
                &format!("{EXT}.transformer.layers.{i}"),
                c.extractor.heads,
                &h,
                drop,
            )?;
            ext_layers.push(saved);
            h = y;
        }
        let ext_out = h;

        // Attention pooling with the learned query.
        let (pooled, pool) = self.pool_forward(&ext_out)?;
        let agg_rows = ops::linear(
            &pooled,
            self.p(&format!("{EXT}.output_projection.weight"))?,
            Some(self.p(&format!("{EXT}.output_projection.bias"))?),
        )?;
        let agg = agg_rows.reshape(&[b, 2 * m])?;

        // Relation head.
        let mut r = ops::linear(
            &agg,
            self.p(&format!("{HEAD}.projection.weight"))?,
            Some(self.p(&format!("{HEAD}.projection.bias"))?),
        )?;
        let pe0 = first_row(&self.pe_head)?;
        r = ops::add_broadcast(&r, &pe0, 0)?.reshape(&[b, 1, d])?;
        let mut head_layers = Vec::with_capacity(c.head.layers);
        for i in 0..c.head.layers {
            let drop = layer_dropout(c.head.dropout, train.as_deref_mut());
            let (y, saved) = self.layer_forward(
                &format!("{HEAD}.transformer.layers.{i}"),
                c.head.heads,
                &r,
                drop,
            )?;
            head_layers.push(saved);
            r = y;
        }
        let r = r.reshape(&[b, d])?;
        let feat = if c.head.step_embedding_dim > 0 {
            let t = ops::embedding(self.p(&format!("{HEAD}.timestep_embedding.weight"))?, steps)?;
            ops::concat(&[&r, &t], 1)?
        } else {
            r
        };
        let fc_drop = match (train, c.head.dropout > 0.0) {
            (Some(rng), true) => Some((c.head.dropout, rng.next_u64(), rng.next_u64())),
            _ => None,
        };
        let z0 = self.fc_linear(0, &feat)?;
        let h1 = dropout(
            &ops::activation(&self.fc_norm(1, &z0)?, Activation::LeakyRelu(LEAKY_SLOPE))?,
            fc_drop.map(|(p, s, _)| (p, s)),
        )?;
        let z4 = self.fc_linear(4, &h1)?;
        let h2 = dropout(
            &ops::activation(&self.fc_norm(5, &z4)?, Activation::LeakyRelu(LEAKY_SLOPE))?,
            fc_drop.map(|(p, _, s)| (p, s)),
        )?;
        let logits = self.fc_linear(8, &h2)?;
        let saved = ClassifierSaved {
            batch: b,
            steps: steps.to_vec(),
            x0,
            ext_layers,
            ext_out,
            pool,
            pooled,
            agg,
            head_layers,
            fc: FcSaved {
                feat,
                z0,
                z4,
                h1,
                h2,
                drop: fc_drop,
            },
        };
        Ok((logits, saved))
    }

    /// Gradients of `sum(logits * dlogits)`: to the maps (B, 2, N, S, S), and to every
    /// parameter (a [`Params`] with the parameters' names, order and shapes).
    pub fn backward(&self, saved: &ClassifierSaved, dlogits: &Tensor) -> Result<(Tensor, Params)> {
        let (dmaps, grads) = self.backward_impl(saved, dlogits, true)?;
        Ok((dmaps, grads.expect("asked for")))
    }

    /// The gradient to the maps alone (steering: the classifier is frozen). Skips the weight
    /// gradients' extra products.
    pub fn input_grad(&self, saved: &ClassifierSaved, dlogits: &Tensor) -> Result<Tensor> {
        Ok(self.backward_impl(saved, dlogits, false)?.0)
    }

    fn backward_impl(
        &self,
        sv: &ClassifierSaved,
        dlogits: &Tensor,
        want_params: bool,
    ) -> Result<(Tensor, Option<Params>)> {
        let c = &self.config;
        let (b, n, d, s) = (sv.batch, c.maps_per_word, c.d_model, c.map_size);
        let (e, m) = (2 * b, s * s);
        let want = [b, c.num_classes()];
        if dlogits.shape() != want {
            return Err(Error::shape(
                "RelationClassifier::backward",
                format!("dlogits {:?}, expected {want:?}", dlogits.shape()),
            ));
        }
        let dl = dlogits.to_like(&self.pe_ext)?;
        let mut g = Grads(want_params.then(|| self.params.zeros_like()));

        // fc head, backwards.
        let fc = &sv.fc;
        let dh2 = self.fc_linear_backward(8, &fc.h2, &dl, &mut g)?;
        let dz4 =
            self.fc_act_norm_backward(5, &fc.z4, &dh2, fc.drop.map(|(p, _, s)| (p, s)), &mut g)?;
        let dh1 = self.fc_linear_backward(4, &fc.h1, &dz4, &mut g)?;
        let dz0 =
            self.fc_act_norm_backward(1, &fc.z0, &dh1, fc.drop.map(|(p, s, _)| (p, s)), &mut g)?;
        let dfeat = self.fc_linear_backward(0, &fc.feat, &dz0, &mut g)?;
        let te = c.head.step_embedding_dim;
        let dr = if te > 0 {
            let mut parts = ops::split(&dfeat, 1, &[d, te])?;
            let dt = parts.pop().expect("two parts");
            if g.wants() {
                let name = format!("{HEAD}.timestep_embedding.weight");
                let shape = self.p(&name)?.shape().to_vec();
                g.add(
                    &name,
                    Some(ops::embedding_backward(&shape, &sv.steps, &dt)?),
                )?;
            }
            parts.pop().expect("two parts")
        } else {
            dfeat
        };
        let mut dr = dr.reshape(&[b, 1, d])?;
        for i in (0..c.head.layers).rev() {
            dr = self.layer_backward(
                &format!("{HEAD}.transformer.layers.{i}"),
                c.head.heads,
                &sv.head_layers[i],
                &dr,
                &mut g,
            )?;
        }
        // The positional encoding is a constant: its add passes the gradient through.
        let dr = dr.reshape(&[b, d])?;
        let dagg = self.linear_backward(&format!("{HEAD}.projection"), &sv.agg, &dr, &mut g)?;

        // Extractor, backwards.
        let dagg_rows = dagg.reshape(&[e, m])?;
        let dpooled = self.linear_backward(
            &format!("{EXT}.output_projection"),
            &sv.pooled,
            &dagg_rows,
            &mut g,
        )?;
        let mut dh = self.pool_backward(&sv.pool, &sv.ext_out, &dpooled, &mut g)?;
        let mode = c.extractor.step_embedding;
        let mut dtemb: Option<Tensor> = None;
        let mut add_dtemb = |du: &Tensor| -> Result<()> {
            if !want_params {
                return Ok(());
            }
            let t = ops::add_broadcast_backward(du, 1)?;
            dtemb = Some(match dtemb.take() {
                Some(a) => ops::add(&a, &t)?,
                None => t,
            });
            Ok(())
        };
        for i in (0..c.extractor.layers).rev() {
            dh = self.layer_backward(
                &format!("{EXT}.transformer.layers.{i}"),
                c.extractor.heads,
                &sv.ext_layers[i],
                &dh,
                &mut g,
            )?;
            if mode == StepEmbedding::Mid {
                add_dtemb(&dh)?;
            }
        }
        if mode == StepEmbedding::Pre {
            add_dtemb(&dh)?;
        }
        if let Some(dt) = dtemb {
            let name = format!("{EXT}.timestep_embedding.weight");
            let shape = self.p(&name)?.shape().to_vec();
            let ids: Vec<usize> = sv.steps.iter().flat_map(|&t| [t, t]).collect();
            g.add(&name, Some(ops::embedding_backward(&shape, &ids, &dt)?))?;
        }
        let dx0 = self.linear_backward(&format!("{EXT}.input_projection"), &sv.x0, &dh, &mut g)?;
        let dx0 = if c.input_scale != 1.0 {
            ops::scale(&dx0, c.input_scale)?
        } else {
            dx0
        };
        Ok((dx0.reshape(&[b, 2, n, s, s])?, g.0))
    }

    /// `linear` with `{prefix}.weight` and `{prefix}.bias`.
    fn linear(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        ops::linear(
            x,
            self.p(&format!("{prefix}.weight"))?,
            Some(self.p(&format!("{prefix}.bias"))?),
        )
    }

    fn linear_backward(
        &self,
        prefix: &str,
        x: &Tensor,
        dy: &Tensor,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let w = self.p(&format!("{prefix}.weight"))?;
        let r = ops::linear_backward(x, w, dy, g.wants())?;
        g.add(&format!("{prefix}.weight"), r.dw)?;
        g.add(&format!("{prefix}.bias"), r.db)?;
        Ok(r.dx)
    }

    fn layer_norm(&self, prefix: &str, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(
            x,
            Some(self.p(&format!("{prefix}.weight"))?),
            Some(self.p(&format!("{prefix}.bias"))?),
            LN_EPS,
        )
    }

    fn layer_norm_backward(
        &self,
        prefix: &str,
        x: &Tensor,
        dy: &Tensor,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let r = ops::layer_norm_backward(
            x,
            Some(self.p(&format!("{prefix}.weight"))?),
            true,
            LN_EPS,
            dy,
        )?;
        g.add(&format!("{prefix}.weight"), r.dgamma)?;
        g.add(&format!("{prefix}.bias"), r.dbeta)?;
        Ok(r.dx)
    }

    fn fc_linear(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        self.linear(&format!("{HEAD}.fc.{i}"), x)
    }
    fn fc_norm(&self, i: usize, x: &Tensor) -> Result<Tensor> {
        self.layer_norm(&format!("{HEAD}.fc.{i}"), x)
    }
    fn fc_linear_backward(
        &self,
        i: usize,
        x: &Tensor,
        dy: &Tensor,
        g: &mut Grads,
    ) -> Result<Tensor> {
        self.linear_backward(&format!("{HEAD}.fc.{i}"), x, dy, g)
    }
    /// Backward of dropout(leaky_relu(layer_norm_i(z))) to z.
    fn fc_act_norm_backward(
        &self,
        i: usize,
        z: &Tensor,
        dy: &Tensor,
        drop: Option<(f64, u64)>,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let da = dropout(dy, drop)?;
        let nrm = self.fc_norm(i, z)?;
        let dn = ops::activation_backward(&nrm, &da, Activation::LeakyRelu(LEAKY_SLOPE))?;
        self.layer_norm_backward(&format!("{HEAD}.fc.{i}"), z, &dn, g)
    }

    /// One norm-first `TransformerEncoderLayer` on `u` (A, L, d).
    fn layer_forward(
        &self,
        prefix: &str,
        heads: usize,
        u: &Tensor,
        drop: Option<LayerDropout>,
    ) -> Result<(Tensor, LayerSaved)> {
        let d = self.config.d_model;
        let a = self.layer_norm(&format!("{prefix}.norm1"), u)?;
        let qkv = ops::linear(
            &a,
            self.p(&format!("{prefix}.self_attn.in_proj_weight"))?,
            Some(self.p(&format!("{prefix}.self_attn.in_proj_bias"))?),
        )?;
        let [q, k, v] = split3(&qkv, d, heads)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let o = match drop {
            Some(dr) => attention_dropout(&q, &k, &v, scale, dr.p, dr.attn)?,
            None => ops::attention(&q, &k, &v, scale, None)?.out,
        };
        let merged = merge_heads(&o)?;
        let sa = self.linear(&format!("{prefix}.self_attn.out_proj"), &merged)?;
        let sa = dropout(&sa, drop.map(|dr| (dr.p, dr.sa)))?;
        let v1 = ops::add(u, &sa)?;
        let bn = self.layer_norm(&format!("{prefix}.norm2"), &v1)?;
        let f1 = self.linear(&format!("{prefix}.linear1"), &bn)?;
        let gact = dropout(
            &ops::activation(&f1, Activation::Relu)?,
            drop.map(|dr| (dr.p, dr.ff)),
        )?;
        let f2 = self.linear(&format!("{prefix}.linear2"), &gact)?;
        let f2 = dropout(&f2, drop.map(|dr| (dr.p, dr.out)))?;
        let y = ops::add(&v1, &f2)?;
        let saved = LayerSaved {
            u: u.clone(),
            qkv,
            merged,
            v1,
            f1,
            drop,
        };
        Ok((y, saved))
    }

    /// Gradient to the layer's input; parameter gradients into `g`.
    fn layer_backward(
        &self,
        prefix: &str,
        heads: usize,
        sv: &LayerSaved,
        dy: &Tensor,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let d = self.config.d_model;
        let drop = sv.drop;
        // y = v1 + dropout(linear2(dropout(relu(f1))))
        let df2 = dropout(dy, drop.map(|dr| (dr.p, dr.out)))?;
        let gact = dropout(
            &ops::activation(&sv.f1, Activation::Relu)?,
            drop.map(|dr| (dr.p, dr.ff)),
        )?;
        let dgact = self.linear_backward(&format!("{prefix}.linear2"), &gact, &df2, g)?;
        let dr = dropout(&dgact, drop.map(|dr| (dr.p, dr.ff)))?;
        let df1 = ops::activation_backward(&sv.f1, &dr, Activation::Relu)?;
        let bn = self.layer_norm(&format!("{prefix}.norm2"), &sv.v1)?;
        let dbn = self.linear_backward(&format!("{prefix}.linear1"), &bn, &df1, g)?;
        let dv1 = ops::add(
            dy,
            &self.layer_norm_backward(&format!("{prefix}.norm2"), &sv.v1, &dbn, g)?,
        )?;
        // v1 = u + dropout(out_proj(attention(split(in_proj(LN1(u))))))
        let dsa = dropout(&dv1, drop.map(|dr| (dr.p, dr.sa)))?;
        let dmerged =
            self.linear_backward(&format!("{prefix}.self_attn.out_proj"), &sv.merged, &dsa, g)?;
        let dout = split_heads(&dmerged, heads)?;
        let [q, k, v] = split3(&sv.qkv, d, heads)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let (dq, dk, dv) = match drop {
            Some(dr) => attention_dropout_backward(&q, &k, &v, scale, dr.p, dr.attn, &dout)?,
            None => {
                let r = ops::attention_backward(&q, &k, &v, scale, &dout, None, true)?;
                (r.dq, r.dk.expect("asked for"), r.dv.expect("asked for"))
            }
        };
        let dqkv = ops::concat(
            &[&merge_heads(&dq)?, &merge_heads(&dk)?, &merge_heads(&dv)?],
            2,
        )?;
        let a = self.layer_norm(&format!("{prefix}.norm1"), &sv.u)?;
        let w = self.p(&format!("{prefix}.self_attn.in_proj_weight"))?;
        let r = ops::linear_backward(&a, w, &dqkv, g.wants())?;
        g.add(&format!("{prefix}.self_attn.in_proj_weight"), r.dw)?;
        g.add(&format!("{prefix}.self_attn.in_proj_bias"), r.db)?;
        let du = self.layer_norm_backward(&format!("{prefix}.norm1"), &sv.u, &r.dx, g)?;
        ops::add(&dv1, &du)
    }

    /// `nn.MultiheadAttention(query_vector, x, x)`: (A, L, d) -> (A, d).
    fn pool_forward(&self, x: &Tensor) -> Result<(Tensor, PoolSaved)> {
        let d = self.config.d_model;
        let heads = self.config.extractor.pool_heads;
        let a = x.shape()[0];
        let pre = format!("{EXT}.layer_attention");
        let w = ops::split(self.p(&format!("{pre}.in_proj_weight"))?, 0, &[d, 2 * d])?;
        let bias = ops::split(self.p(&format!("{pre}.in_proj_bias"))?, 0, &[d, 2 * d])?;
        let qv = self.p(&format!("{EXT}.query_vector"))?.reshape(&[1, d])?;
        let qp = ops::linear(&qv, &w[0], Some(&bias[0]))?;
        let q = split_heads(&repeat_rows(&qp, a)?.reshape(&[a, 1, d])?, heads)?;
        let kv = ops::linear(x, &w[1], Some(&bias[1]))?;
        let mut kvs = ops::split(&kv, 2, &[d, d])?;
        let v = split_heads(&kvs.pop().expect("two"), heads)?;
        let k = split_heads(&kvs.pop().expect("two"), heads)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let o = ops::attention(&q, &k, &v, scale, None)?.out;
        let merged = merge_heads(&o)?;
        let y = self
            .linear(&format!("{pre}.out_proj"), &merged)?
            .reshape(&[a, d])?;
        Ok((
            y,
            PoolSaved {
                qv,
                q,
                k,
                v,
                merged,
            },
        ))
    }

    fn pool_backward(
        &self,
        sv: &PoolSaved,
        x: &Tensor,
        dy: &Tensor,
        g: &mut Grads,
    ) -> Result<Tensor> {
        let d = self.config.d_model;
        let heads = self.config.extractor.pool_heads;
        let a = x.shape()[0];
        let pre = format!("{EXT}.layer_attention");
        let dy = dy.reshape(&[a, 1, d])?;
        let dmerged = self.linear_backward(&format!("{pre}.out_proj"), &sv.merged, &dy, g)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let dout = split_heads(&dmerged, heads)?;
        let r = ops::attention_backward(&sv.q, &sv.k, &sv.v, scale, &dout, None, true)?;
        let dkv = ops::concat(
            &[
                &merge_heads(&r.dk.expect("asked for"))?,
                &merge_heads(&r.dv.expect("asked for"))?,
            ],
            2,
        )?;
        let w = ops::split(self.p(&format!("{pre}.in_proj_weight"))?, 0, &[d, 2 * d])?;
        let gkv = ops::linear_backward(x, &w[1], &dkv, g.wants())?;
        if g.wants() {
            // The query path: d(query projection) summed over the rows it was repeated to.
            let dq = merge_heads(&r.dq)?.reshape(&[a, d])?;
            let dqp = ops::add_broadcast_backward(&dq, 0)?.reshape(&[1, d])?;
            let gq = ops::linear_backward(&sv.qv, &w[0], &dqp, true)?;
            let cat = |x: Option<Tensor>, y: Option<Tensor>| -> Result<Option<Tensor>> {
                match (x, y) {
                    (Some(x), Some(y)) => Ok(Some(ops::concat(&[&x, &y], 0)?)),
                    _ => Ok(None),
                }
            };
            g.add(&format!("{pre}.in_proj_weight"), cat(gq.dw, gkv.dw)?)?;
            g.add(&format!("{pre}.in_proj_bias"), cat(gq.db, gkv.db)?)?;
            g.add(
                &format!("{EXT}.query_vector"),
                Some(gq.dx.reshape(&[1, 1, d])?),
            )?;
        }
        Ok(gkv.dx)
    }
}

fn first_layer_name(name: &str) -> Option<String> {
    let i = name.find(".transformer.layers.")? + ".transformer.layers.".len();
    let rest = &name[i..];
    let dot = rest.find('.')?;
    (&rest[..dot] != "0").then(|| format!("{}0{}", &name[..i], &rest[dot..]))
}

fn is_norm(name: &str) -> bool {
    name.contains(".norm1.")
        || name.contains(".norm2.")
        || name.starts_with(&format!("{HEAD}.fc.1."))
        || name.starts_with(&format!("{HEAD}.fc.5."))
}

/// A positional-encoding buffer from the file when there (shape (1, len, d); checked against the
/// formula), else computed. The file's values are used as they are: they are what the model was
/// trained with. `len`: the expected length, or `None` for any (only position 0 is read).
fn pe_buffer(
    file: &SafetensorsFile,
    name: &str,
    len: usize,
    d: usize,
    exact: Option<usize>,
) -> Result<Tensor> {
    if !file.contains(name) {
        return Tensor::from_vec(positional_encoding(len, d), &[len, d]);
    }
    let t = file.tensor(name)?.to_dtype(DType::F32)?;
    let sh = t.shape().to_vec();
    let ok =
        sh.len() == 3 && sh[0] == 1 && sh[2] == d && sh[1] >= 1 && exact.is_none_or(|n| sh[1] == n);
    if !ok {
        let want = exact.map_or("L".to_string(), |n| n.to_string());
        return Err(Error::format(
            file.path(),
            format!("`{name}` has shape {sh:?}, expected [1, {want}, {d}]"),
        ));
    }
    let formula = positional_encoding(sh[1], d);
    let got = t.to_vec::<f32>()?;
    let worst = got
        .iter()
        .zip(&formula)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if worst > 1e-3 {
        return Err(Error::format(
            file.path(),
            format!("`{name}` is not the sinusoidal positional encoding (differs by {worst})"),
        ));
    }
    t.reshape(&sh[1..])
}

fn layer_dropout(p: f64, rng: Option<&mut Rng>) -> Option<LayerDropout> {
    match rng {
        Some(rng) if p > 0.0 => Some(LayerDropout {
            p,
            attn: rng.next_u64(),
            sa: rng.next_u64(),
            ff: rng.next_u64(),
            out: rng.next_u64(),
        }),
        _ => None,
    }
}

/// (A, L, 3d) packed projections -> q, k, v as (A, heads, L, d / heads).
fn split3(qkv: &Tensor, d: usize, heads: usize) -> Result<[Tensor; 3]> {
    let mut parts = ops::split(qkv, 2, &[d, d, d])?.into_iter();
    let mut next = || split_heads(&parts.next().expect("three parts"), heads);
    Ok([next()?, next()?, next()?])
}

/// Uniform in [0, 1) from (seed, index): SplitMix64's output function on the index-th state of
/// the stream that starts at `seed`. Random access, so a mask is recomputed rather than stored.
fn hash_uniform(seed: u64, i: u64) -> f64 {
    let mut z = seed.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The dropout multiplier of element `i`: 0 with probability p, else 1 / (1 - p).
fn dropout_factor<T: Float>(seed: u64, i: u64, p: f64, keep_scale: T) -> T {
    if hash_uniform(seed, i) < p {
        T::ZERO
    } else {
        keep_scale
    }
}

/// Inverted dropout with the mask of `(p, seed)`; identity for `None`. Linear in `x`, so it is
/// also its own backward (applied to the output gradient with the same seed).
fn dropout(x: &Tensor, drop: Option<(f64, u64)>) -> Result<Tensor> {
    const OP: &str = "dropout";
    let Some((p, seed)) = drop else {
        return Ok(x.clone());
    };
    float_dispatch!(OP, x.dtype(), T => {
        let xv = x.slice::<T>(OP)?;
        let keep = T::of(1.0 / (1.0 - p));
        let out: Vec<T> = xv
            .par_iter()
            .enumerate()
            .map(|(i, &v)| v * dropout_factor(seed, i as u64, p, keep))
            .collect();
        Tensor::from_vec(out, x.shape())
    })
}

/// softmax(q k^T * scale) with dropout on the probabilities, times v; (A, H, L, hd) each.
/// Only training uses it (eval runs `ops::attention`).
fn attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    p: f64,
    seed: u64,
) -> Result<Tensor> {
    const OP: &str = "attention_dropout";
    let (bh, l, hd) = attn_dims(q, k, v)?;
    float_dispatch!(OP, q.dtype(), T => {
        let (qv, kv, vv) = (q.slice::<T>(OP)?, k.slice::<T>(OP)?, v.slice::<T>(OP)?);
        let mut out = vec![T::ZERO; bh * l * hd];
        out.par_chunks_mut(l * hd).enumerate().for_each(|(i, o)| {
            let r = i * l * hd..(i + 1) * l * hd;
            let (_, pd) = probs_with_dropout(&qv[r.clone()], &kv[r.clone()], l, hd, scale, p, seed, i);
            gemm(l, hd, l, &pd, Layout::N, &vv[r], Layout::N, o, false);
        });
        Tensor::from_vec(out, q.shape())
    })
}

/// Gradients (dq, dk, dv) of `sum(attention_dropout(q, k, v, ..) * dout)`.
fn attention_dropout_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    p: f64,
    seed: u64,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "attention_dropout_backward";
    let (bh, l, hd) = attn_dims(q, k, v)?;
    if dout.shape() != q.shape() {
        return Err(Error::shape(
            OP,
            format!("dout {:?} vs q {:?}", dout.shape(), q.shape()),
        ));
    }
    float_dispatch!(OP, q.dtype(), T => {
        let (qv, kv, vv) = (q.slice::<T>(OP)?, k.slice::<T>(OP)?, v.slice::<T>(OP)?);
        let dov = dout.slice::<T>(OP)?;
        let keep = T::of(1.0 / (1.0 - p));
        let per: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..bh)
            .into_par_iter()
            .map(|i| {
                let r = i * l * hd..(i + 1) * l * hd;
                let (qh, kh, vh, doh) = (&qv[r.clone()], &kv[r.clone()], &vv[r.clone()], &dov[r]);
                let (pr, pd) = probs_with_dropout(qh, kh, l, hd, scale, p, seed, i);
                let mut dv = vec![T::ZERO; l * hd];
                gemm(l, hd, l, &pd, Layout::T, doh, Layout::N, &mut dv, false);
                // dP' = dO V^T; dP = dP' * mask; dS = softmax backward; times scale.
                let mut dpd = vec![T::ZERO; l * l];
                gemm(l, l, hd, doh, Layout::N, vh, Layout::T, &mut dpd, false);
                let base = (i * l * l) as u64;
                dpd.iter_mut().enumerate().for_each(|(j, x)| *x *= dropout_factor(seed, base + j as u64, p, keep));
                let mut ds = vec![T::ZERO; l * l];
                for row in 0..l {
                    let rr = row * l..(row + 1) * l;
                    softmax_row_backward(&pr[rr.clone()], &dpd[rr.clone()], &mut ds[rr]);
                }
                ds.iter_mut().for_each(|x| *x *= T::of(scale));
                let mut dq = vec![T::ZERO; l * hd];
                gemm(l, hd, l, &ds, Layout::N, kh, Layout::N, &mut dq, false);
                let mut dk = vec![T::ZERO; l * hd];
                gemm(l, hd, l, &ds, Layout::T, qh, Layout::N, &mut dk, false);
                (dq, dk, dv)
            })
            .collect();
        let (mut dq, mut dk, mut dv) = (Vec::with_capacity(qv.len()), Vec::with_capacity(qv.len()), Vec::with_capacity(qv.len()));
        for (a, b, c) in per {
            dq.extend(a);
            dk.extend(b);
            dv.extend(c);
        }
        Ok((Tensor::from_vec(dq, q.shape())?, Tensor::from_vec(dk, k.shape())?, Tensor::from_vec(dv, v.shape())?))
    })
}

/// The probabilities of head `i` (L x L) and the same after dropout.
#[allow(clippy::too_many_arguments)]
fn probs_with_dropout<T: Float>(
    qh: &[T],
    kh: &[T],
    l: usize,
    hd: usize,
    scale: f64,
    p: f64,
    seed: u64,
    i: usize,
) -> (Vec<T>, Vec<T>) {
    let mut s = vec![T::ZERO; l * l];
    gemm(l, l, hd, qh, Layout::N, kh, Layout::T, &mut s, false);
    s.iter_mut().for_each(|x| *x *= T::of(scale));
    s.chunks_mut(l).for_each(softmax_row);
    let keep = T::of(1.0 / (1.0 - p));
    let base = (i * l * l) as u64;
    let pd = s
        .iter()
        .enumerate()
        .map(|(j, &x)| x * dropout_factor(seed, base + j as u64, p, keep))
        .collect();
    (s, pd)
}

/// (A*H, L, hd) of self-attention operands (all three the same shape).
fn attn_dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(usize, usize, usize)> {
    let s = q.shape();
    if s.len() != 4 || k.shape() != s || v.shape() != s {
        return Err(Error::shape(
            "attention_dropout",
            format!(
                "q {s:?}, k {:?}, v {:?} must be equal (A, H, L, hd)",
                k.shape(),
                v.shape()
            ),
        ));
    }
    Ok((s[0] * s[1], s[2], s[3]))
}

/// Row 0 of a (L, D) tensor, as (D).
fn first_row(t: &Tensor) -> Result<Tensor> {
    let (l, d) = (t.shape()[0], t.shape()[1]);
    let row = if l == 1 {
        t.clone()
    } else {
        ops::split(t, 0, &[1, l - 1])?.remove(0)
    };
    row.reshape(&[d])
}

/// `v (1, K)` repeated to (R, K).
fn repeat_rows(v: &Tensor, r: usize) -> Result<Tensor> {
    let k = v.numel();
    ops::concat(&vec![v; r], 0)?.reshape(&[r, k])
}
