//! `steer collect`: the classifier's training data by dual inversion (SPEC section 5), for SD2.1.
//!
//! # What one manifest line becomes
//!
//! A manifest is JSON lines, one image each:
//! `{"image": "imgs/1.png", "subject": "dog", "relation": "to the left of", "object": "teddy bear"}`
//! (`image` a PNG, relative to the manifest's folder unless absolute: the crate has no JPEG
//! decoder, so GQA's JPEGs must be converted first; `relation` in any phrasing that
//! [`Relation::from_name`] accepts, stored under its class name). For each line, as the reference
//! implementation (`train_relation_classifier/data_creation/attention_maps_generation/
//! generate_relations_data.py`, `Sd2Handler`, and `prompt_generator.py`) does:
//!
//! 1. The image is centre-cropped to a square and resized to the model's default size
//!    ([`preprocess_image`]: PIL's `crop` rounding and PIL's default bicubic resize, reproduced
//!    exactly on the 8-bit values; the reference hard-codes 512, SD2.1-base's default size).
//! 2. Prompts: the true prompt `"A {subject} {relation} a {object}"` (the reference's format,
//!    capital A, "a" even before a vowel), and, unless `single_inversion`, a second prompt with the
//!    same objects and a different relation drawn uniformly from the other classes (the
//!    reference's `PosNegPromptGenerator` with one negative prompt). The draw uses
//!    [`line_rng`]: deterministic given the seed and the line's index.
//! 3. For each prompt: the image's latent (the VAE posterior's *mean*; the reference samples
//!    the posterior with an unseeded generator, which we do not reproduce) is inverted with
//!    fixed-point DDIM inversion on that prompt's conditional embedding (guidance 1), then
//!    reconstructed from the inverted noise by DDIM with guidance 1, recording the maps of the
//!    subject's and the object's tokens (first occurrence in the prompt, as the reference's
//!    `find_word_token_inds` with `instance_idx=0`) at the record steps; the reconstruction is
//!    decoded and its PSNR against the preprocessed input measured on 8-bit values
//!    (`compute_psnr` of the two PIL images).
//! 4. As in the reference loop (`if psnr < min_psnr: break`): a true prompt below the threshold
//!    drops the whole line (its swapped prompt is not even inverted); a swapped prompt below it
//!    drops only the swapped prompt's samples.
//! 5. Each kept (prompt, record step) is one sample: `maps` (2, N, 16, 16) [subject, object],
//!    `step` (the record step index), `label` (the index of the line's *true* relation in the
//!    class list, for both prompts), `prompt_kind` (0 true, 1 swapped), `psnr` and `line` (the
//!    1-based manifest line number: every sample of one image carries it, so a trainer can keep
//!    an image's samples, both prompts and all steps, on one side of a train/validation split).
//!
//! # Shards, workers and resuming
//!
//! Worker `i` of `n` takes the manifest lines whose 0-based index `l` has `l % n == i`. Its lines,
//! in order, are cut into blocks of `lines_per_shard`; block `k` is written, once all its lines
//! are done, to `shard-{i}-of-{n}-{k:05}.safetensors` in one atomic write (temporary file, then a
//! rename). A shard's content is a function of its lines and the settings alone, so a crash loses
//! at most the shard in progress, and a rerun skips every shard file that exists (after checking
//! that it was made from the same lines with the same settings; a mismatch is refused rather than
//! mixed). Workers never write the same file, so `n` machines can split one manifest with no
//! coordination. Blank lines are ignored.
//!
//! Shard tensors (S samples; S may be 0): `maps` (S, 2, N, 16, 16) f32 (f16 with `maps_f16`, half
//! the size: N = 195 for SD2.1 makes a sample 400 kB in f32), `step` (S,) i64, `label` (S,) i64,
//! `prompt_kind` (S,) i64, `psnr` (S,) f32, `line` (S,) i64 (since format version 2; version 1
//! shards have no `line`). Metadata (strings; JSON where structured): `format`
//! ("steer-collect"), `format_version` ("2"), `classes` (JSON list), `n_maps`, `map_size`,
//! `record_steps` (JSON list), `steps`, `fixed_point_iters`, `min_psnr`, `single_inversion`,
//! `seed`, `image_size`, `maps_dtype`, `model`, `manifest`, `worker` ("i/n"), `shard`,
//! `lines_per_shard`, `lines` (JSON list of the 1-based manifest line numbers in the block),
//! `lines_fnv1a64` (a hash of their text) and `counts` (JSON [`Counts`] of the block).
//! Each run also writes `summary-{i}-of-{n}.json` ([`Summary`]) with the worker's totals, shards
//! done by earlier runs included.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hash::Fnv1a;
use crate::image;
use crate::pipelines::{GenerateRequest, StableDiffusion};
use crate::rng::Rng;
use crate::safetensors_io::{self, SafetensorsFile};
use crate::steering::capture::MAP_SIZE;
use crate::steering::prompt::Relation;
use crate::steering::unet_maps::unet_with_maps;
use crate::{DType, Error, Result, Tensor};

/// The `format` metadata value of a shard.
pub const FORMAT: &str = "steer-collect";
/// The shard layout's version (`format_version`). 2 added the per-sample `line` tensor; readers
/// (`steer train`) accept 1 and 2. A resumed collection refuses to mix versions in one folder
/// (`format_version` is one of the settings a shard must share).
pub const FORMAT_VERSION: u32 = 2;
/// `prompt_kind` of a sample from the true prompt.
pub const PROMPT_TRUE: i64 = 0;
/// `prompt_kind` of a sample from the prompt with the swapped (randomly drawn) relation.
pub const PROMPT_SWAPPED: i64 = 1;

/// One usable manifest line.
#[derive(Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    /// The image's path, resolved against the manifest's folder.
    pub image: PathBuf,
    pub subject: String,
    pub relation: Relation,
    pub object: String,
}

/// Why a manifest line was skipped. Skipped lines are reported and counted, never fatal.
#[derive(Clone, Debug, PartialEq)]
pub enum SkipReason {
    /// Not a JSON object.
    BadJson(String),
    /// A required field is absent, empty or not a string.
    MissingField(&'static str),
    /// A relation no phrasing matches.
    UnknownRelation(String),
    /// A known relation that is not one of the run's classes.
    RelationNotInClasses(Relation),
    /// The image file does not exist.
    MissingImage(PathBuf),
    /// The image file exists but cannot be read as a PNG.
    UnreadableImage(String),
    /// An object word is not found in the prompt's tokens.
    WordNotInPrompt(String),
}

impl SkipReason {
    /// The reason's name in summaries.
    pub fn category(&self) -> &'static str {
        match self {
            SkipReason::BadJson(_) => "bad json",
            SkipReason::MissingField(_) => "missing field",
            SkipReason::UnknownRelation(_) => "unknown relation",
            SkipReason::RelationNotInClasses(_) => "relation not in classes",
            SkipReason::MissingImage(_) => "missing image",
            SkipReason::UnreadableImage(_) => "unreadable image",
            SkipReason::WordNotInPrompt(_) => "word not in prompt",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::BadJson(e) => write!(f, "not a JSON object: {e}"),
            SkipReason::MissingField(name) => {
                write!(f, "field {name:?} is missing, empty or not a string")
            }
            SkipReason::UnknownRelation(r) => write!(
                f,
                "unknown relation {r:?} (expected above, below, to the left of, to the right of, or a phrasing such as \"left of\", \"on top of\", \"under\")"
            ),
            SkipReason::RelationNotInClasses(r) => {
                write!(f, "relation {:?} is not one of --classes", r.name())
            }
            SkipReason::MissingImage(p) => write!(f, "image {} does not exist", p.display()),
            SkipReason::UnreadableImage(e) => write!(f, "{e}"),
            SkipReason::WordNotInPrompt(e) => write!(f, "{e}"),
        }
    }
}

/// Parse one manifest line. `base` is the manifest's folder (relative image paths start there).
pub fn parse_manifest_line(
    text: &str,
    base: &Path,
) -> std::result::Result<ManifestEntry, SkipReason> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| SkipReason::BadJson(e.to_string()))?;
    let obj = value
        .as_object()
        .ok_or_else(|| SkipReason::BadJson(format!("found {}", json_kind(&value))))?;
    let field = |name: &'static str| -> std::result::Result<String, SkipReason> {
        obj.get(name)
            .and_then(|v| v.as_str())
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|s| !s.is_empty())
            .ok_or(SkipReason::MissingField(name))
    };
    let image = field("image")?;
    let subject = field("subject")?;
    let relation_text = field("relation")?;
    let object = field("object")?;
    let relation =
        Relation::from_name(&relation_text).ok_or(SkipReason::UnknownRelation(relation_text))?;
    let image = PathBuf::from(image);
    let image = if image.is_absolute() {
        image
    } else {
        base.join(image)
    };
    Ok(ManifestEntry {
        image,
        subject,
        relation,
        object,
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The reference's inversion prompt: `"A {subject} {relation} a {object}"`.
pub fn prompt_for(subject: &str, relation: Relation, object: &str) -> String {
    format!("A {subject} {} a {object}", relation.name())
}

/// The random stream of manifest line `line_index` (0-based): depends on the seed and the line
/// only, so a line draws the same swapped relation whichever worker or run processes it.
pub fn line_rng(seed: u64, line_index: usize) -> Rng {
    let mut mix = Rng::new(seed);
    let base = mix.next_u64();
    Rng::new(base ^ (line_index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93))
}

/// A class other than `truth`, drawn uniformly (the reference's `np.random.choice` over the
/// other relation names); `None` when there is no other class.
pub fn swapped_relation(classes: &[Relation], truth: Relation, rng: &mut Rng) -> Option<Relation> {
    let others: Vec<Relation> = classes.iter().copied().filter(|&r| r != truth).collect();
    if others.is_empty() {
        None
    } else {
        Some(others[rng.below(others.len())])
    }
}

// ---------------------------------------------------------------------------------------------
// Image preprocessing, as the reference's `load_im_into_format_from_img`:
// `center_crop(img).resize((512, 512))` with PIL.

/// Python's `round` (half to even) of `twice / 2`.
fn round_half_even_of_half(twice: usize) -> usize {
    let floor = twice / 2;
    if twice % 2 == 1 && floor % 2 == 1 {
        floor + 1
    } else {
        floor
    }
}

/// The reference's centre-crop box `(left, top, right, bottom)` for a `width` x `height` image:
/// the float box `((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)` with `m = min(w, h)`,
/// rounded as PIL's `crop` rounds (Python's `round`, half to even). So the crop is not always
/// square: 3x4 gives (0, 0, 3, 4), as PIL does.
pub fn center_crop_box(width: usize, height: usize) -> (usize, usize, usize, usize) {
    let m = width.min(height);
    (
        round_half_even_of_half(width - m),
        round_half_even_of_half(height - m),
        round_half_even_of_half(width + m),
        round_half_even_of_half(height + m),
    )
}

/// PIL's bicubic kernel (a = -0.5), support 2.
fn pil_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS = 32 - 8 - 2`).
const PIL_PRECISION_BITS: u32 = 22;

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis: per output pixel, the first
/// input pixel and the fixed-point weights. Downscaling widens the kernel (antialiasing).
fn pil_coeffs(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero, as `as` does.
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| pil_bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let s = v * (1u32 << PIL_PRECISION_BITS) as f64;
                    (if s < 0.0 { s - 0.5 } else { s + 0.5 }) as i32
                })
                .collect();
            (xmin as usize, fixed)
        })
        .collect()
}

fn pil_clip8(acc: i64) -> u8 {
    if acc >= (1i64 << PIL_PRECISION_BITS) << 8 {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PIL_PRECISION_BITS) as u8
    }
}

/// Resize one 8-bit plane (h, w) row-major as PIL's `Image.resize((out_w, out_h))` does with its
/// default filter (bicubic, antialiased): a horizontal pass then a vertical pass, each rounding
/// to 8 bits, skipped when that axis keeps its size.
pub fn pil_resize_bicubic(plane: &[u8], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<u8> {
    assert_eq!(plane.len(), h * w, "plane size");
    let half = 1i64 << (PIL_PRECISION_BITS - 1);
    let horizontal: Vec<u8> = if out_w != w {
        let taps = pil_coeffs(w, out_w);
        let mut out = vec![0u8; h * out_w];
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            for (x, (start, k)) in taps.iter().enumerate() {
                let acc = k
                    .iter()
                    .enumerate()
                    .fold(half, |a, (j, &kj)| a + row[start + j] as i64 * kj as i64);
                out[y * out_w + x] = pil_clip8(acc);
            }
        }
        out
    } else {
        plane.to_vec()
    };
    if out_h == h {
        return horizontal;
    }
    let taps = pil_coeffs(h, out_h);
    let mut out = vec![0u8; out_h * out_w];
    for (y, (start, k)) in taps.iter().enumerate() {
        for x in 0..out_w {
            let acc = k.iter().enumerate().fold(half, |a, (j, &kj)| {
                a + horizontal[(start + j) * out_w + x] as i64 * kj as i64
            });
            out[y * out_w + x] = pil_clip8(acc);
        }
    }
    out
}

/// An image (1, 3, H, W) in [-1, 1] as read by [`image::load_png`] to the model's input
/// (1, 3, size, size) in [-1, 1]: PIL's centre crop ([`center_crop_box`]) and bicubic resize
/// ([`pil_resize_bicubic`]) on the 8-bit values, then diffusers' `x / 255 * 2 - 1`. Matches the
/// reference's `load_im_into_format_from_img` + `preprocess` exactly for 8-bit RGB input.
pub fn preprocess_image(img: &Tensor, size: usize) -> Result<Tensor> {
    let s = img.shape();
    if s.len() != 4 || s[0] != 1 || s[1] != 3 || s[2] == 0 || s[3] == 0 || size == 0 {
        return Err(Error::shape(
            "preprocess_image",
            format!("image {s:?} must be (1, 3, H, W) and size {size} positive"),
        ));
    }
    let (h, w) = (s[2], s[3]);
    let v = img.to_vec::<f32>()?;
    let (x0, y0, x1, y1) = center_crop_box(w, h);
    let (ch, cw) = (y1 - y0, x1 - x0);
    let mut out = Vec::with_capacity(3 * size * size);
    for c in 0..3 {
        let plane = &v[c * h * w..(c + 1) * h * w];
        let mut crop = Vec::with_capacity(ch * cw);
        for y in y0..y1 {
            for x in x0..x1 {
                let level = ((plane[y * w + x] + 1.0) * 127.5).round().clamp(0.0, 255.0);
                crop.push(level as u8);
            }
        }
        let resized = pil_resize_bicubic(&crop, ch, cw, size, size);
        out.extend(resized.iter().map(|&b| b as f32 / 255.0 * 2.0 - 1.0));
    }
    Tensor::from_vec(out, &[1, 3, size, size])
}

// ---------------------------------------------------------------------------------------------
// Shards.

/// A worker's shard file name.
pub fn shard_file_name(worker: usize, workers: usize, shard: usize) -> String {
    format!("shard-{worker}-of-{workers}-{shard:05}.safetensors")
}

/// The worker's summary file name.
pub fn summary_file_name(worker: usize, workers: usize) -> String {
    format!("summary-{worker}-of-{workers}.json")
}

/// The 0-based manifest line indices worker `worker` of `workers` takes: `l % workers == worker`.
pub fn worker_lines(total: usize, worker: usize, workers: usize) -> Vec<usize> {
    (worker..total).step_by(workers.max(1)).collect()
}

/// FNV-1a (64 bit) of the lines' text joined by newlines: ties a shard to the manifest lines it
/// was made from.
fn lines_hash<'a>(lines: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = Fnv1a::default();
    for (i, line) in lines.into_iter().enumerate() {
        if i > 0 {
            h.update(b"\n");
        }
        h.update(line.as_bytes());
    }
    h.hex()
}

/// Per-shard (and, summed, per-worker) counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Non-blank manifest lines handled.
    pub lines: usize,
    /// Lines that gave samples.
    pub kept_lines: usize,
    /// Samples written.
    pub samples: usize,
    /// Lines dropped because the true prompt's reconstruction PSNR was below the threshold.
    pub dropped_psnr: usize,
    /// Lines kept without their swapped prompt (its reconstruction PSNR was below the threshold).
    pub dropped_psnr_swapped: usize,
    /// Skipped lines by reason ([`SkipReason::category`]).
    pub skipped: BTreeMap<String, usize>,
}

impl Counts {
    pub fn skipped_total(&self) -> usize {
        self.skipped.values().sum()
    }

    pub fn add(&mut self, other: &Counts) {
        self.lines += other.lines;
        self.kept_lines += other.kept_lines;
        self.samples += other.samples;
        self.dropped_psnr += other.dropped_psnr;
        self.dropped_psnr_swapped += other.dropped_psnr_swapped;
        for (k, v) in &other.skipped {
            *self.skipped.entry(k.clone()).or_default() += v;
        }
    }
}

/// What a run did, written to `summary-{i}-of-{n}.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub worker: usize,
    pub workers: usize,
    pub manifest: String,
    /// This worker's shards, in all.
    pub shards: usize,
    /// Shards found complete from an earlier run, and skipped.
    pub shards_resumed: usize,
    /// Shards written by this run.
    pub shards_written: usize,
    /// Totals over all this worker's shards (resumed ones included).
    pub counts: Counts,
}

/// Everything `collect` needs besides the model.
#[derive(Clone, Debug)]
pub struct CollectOptions {
    pub manifest: PathBuf,
    pub out: PathBuf,
    /// This worker's index and the number of workers (`--shard i/n`).
    pub worker: usize,
    pub workers: usize,
    pub lines_per_shard: usize,
    /// Invert with the true prompt only (the ablation).
    pub single_inversion: bool,
    pub steps: usize,
    /// Step indices (0-based, of `steps`) at which maps are recorded.
    pub record_steps: Vec<usize>,
    pub fixed_point_iters: usize,
    /// Keep reconstructions with PSNR >= this (dB).
    pub min_psnr: f64,
    pub seed: u64,
    /// The class list; labels are indices into it.
    pub classes: Vec<Relation>,
    /// Store maps as f16.
    pub maps_f16: bool,
}

impl CollectOptions {
    /// The reference's SD2.1 settings: 50 steps, maps at [5, 10, 15, 20, 25, 49], 5 fixed-point
    /// iterations, PSNR >= 19.5 dB, the four spatial classes in the reference's order.
    pub fn new(manifest: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        CollectOptions {
            manifest: manifest.into(),
            out: out.into(),
            worker: 0,
            workers: 1,
            lines_per_shard: 8,
            single_inversion: false,
            steps: 50,
            record_steps: vec![5, 10, 15, 20, 25, 49],
            fixed_point_iters: 5,
            min_psnr: 19.5,
            seed: 0,
            classes: Relation::ALL.to_vec(),
            maps_f16: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.workers == 0 || self.worker >= self.workers {
            return bad(format!(
                "--shard {}/{}: expected i/n with 0 <= i < n",
                self.worker, self.workers
            ));
        }
        if self.lines_per_shard == 0 {
            return bad("--lines-per-shard must be at least 1".into());
        }
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.record_steps.is_empty() {
            return bad("--record-steps is empty".into());
        }
        if let Some(&s) = self.record_steps.iter().find(|&&s| s >= self.steps) {
            return bad(format!(
                "--record-steps: step {s} is not below --steps {}",
                self.steps
            ));
        }
        let mut sorted = self.record_steps.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != self.record_steps.len() {
            return bad(format!(
                "--record-steps {:?} repeats a step",
                self.record_steps
            ));
        }
        for (i, c) in self.classes.iter().enumerate() {
            if self.classes[..i].contains(c) {
                return bad(format!("--classes names {:?} twice", c.name()));
            }
        }
        let need = if self.single_inversion { 1 } else { 2 };
        if self.classes.len() < need {
            return bad(format!(
                "--classes has {} class(es); dual inversion needs at least 2 (or --single-inversion)",
                self.classes.len()
            ));
        }
        if self.min_psnr.is_nan() {
            return bad("--min-psnr is NaN".into());
        }
        Ok(())
    }

    fn class_names(&self) -> Vec<&'static str> {
        self.classes.iter().map(|c| c.name()).collect()
    }

    /// The settings a shard records and a resumed run must share.
    fn settings(&self, image_size: usize, n_maps: usize) -> BTreeMap<&'static str, String> {
        fn json<T: Serialize + ?Sized>(v: &T) -> String {
            serde_json::to_string(v).expect("plain data serialises")
        }
        BTreeMap::from([
            ("format", FORMAT.to_string()),
            ("format_version", FORMAT_VERSION.to_string()),
            ("classes", json(&self.class_names())),
            ("n_maps", n_maps.to_string()),
            ("map_size", MAP_SIZE.to_string()),
            ("record_steps", json(&self.record_steps)),
            ("steps", self.steps.to_string()),
            ("fixed_point_iters", self.fixed_point_iters.to_string()),
            ("min_psnr", self.min_psnr.to_string()),
            ("single_inversion", self.single_inversion.to_string()),
            ("seed", self.seed.to_string()),
            ("image_size", image_size.to_string()),
            (
                "maps_dtype",
                if self.maps_f16 { "f16" } else { "f32" }.to_string(),
            ),
            ("lines_per_shard", self.lines_per_shard.to_string()),
        ])
    }
}

/// Progress and reports from [`collect`]; every method has a default.
pub trait Events {
    /// The worker's manifest lines, and how many of them earlier runs already finished.
    fn start(&mut self, _lines: usize, _already_done: usize) {}
    /// What the current line is doing.
    fn phase(&mut self, _msg: &str) {}
    /// One more manifest line finished (blank ones included); the run's running totals.
    fn line_done(&mut self, _totals: &Counts) {}
    /// One line for the user: a skipped or dropped line, a shard redone.
    fn report(&mut self, msg: &str) {
        eprintln!("{msg}");
    }
}

/// [`Events`] that only print reports to stderr.
pub struct PlainEvents;
impl Events for PlainEvents {}

/// One kept (prompt, record step).
#[derive(Clone, Debug)]
pub struct Sample {
    /// (2, N, 16, 16) flattened: subject, then object.
    pub maps: Vec<f32>,
    pub step: i64,
    pub label: i64,
    pub prompt_kind: i64,
    pub psnr: f32,
    /// The 1-based manifest line number of the image.
    pub line: i64,
}

/// What became of one manifest line.
#[derive(Clone, Debug)]
pub enum LineOutcome {
    Skipped(SkipReason),
    /// The true prompt's reconstruction PSNR was below the threshold.
    DroppedPsnr {
        psnr: f64,
    },
    Kept {
        samples: Vec<Sample>,
        /// The swapped prompt's PSNR when it fell below the threshold.
        swapped_dropped: Option<f64>,
    },
}

/// N (maps per word) of this model: one UNet forward with capture on a zero latent.
fn probe_maps_per_word(pipe: &StableDiffusion, size: usize, steps: usize) -> Result<usize> {
    let f = pipe.vae_scale_factor();
    let c = pipe.unet.config.in_channels;
    let z = Tensor::zeros(&[1, c, size / f, size / f], DType::F32);
    let cond = pipe.encode_prompt("")?;
    let t = pipe.scheduler.timesteps(steps)?[0];
    let o = unet_with_maps(&pipe.unet, &z, t as f64, &cond, &[vec![1]], false)?;
    Ok(o.maps.shape()[2])
}

/// Dual inversion of one manifest line (module docs, steps 1-5).
pub fn process_line(
    pipe: &StableDiffusion,
    opts: &CollectOptions,
    line_index: usize,
    text: &str,
    events: &mut dyn Events,
) -> Result<LineOutcome> {
    let base = opts.manifest.parent().unwrap_or(Path::new(""));
    let entry = match parse_manifest_line(text, base) {
        Ok(e) => e,
        Err(r) => return Ok(LineOutcome::Skipped(r)),
    };
    let Some(label) = opts.classes.iter().position(|&c| c == entry.relation) else {
        return Ok(LineOutcome::Skipped(SkipReason::RelationNotInClasses(
            entry.relation,
        )));
    };
    if !entry.image.is_file() {
        return Ok(LineOutcome::Skipped(SkipReason::MissingImage(entry.image)));
    }
    let img = match image::load_png(&entry.image) {
        Ok(i) => i,
        Err(e) => {
            return Ok(LineOutcome::Skipped(SkipReason::UnreadableImage(
                e.to_string(),
            )))
        }
    };
    let size = pipe.default_size();
    let input = preprocess_image(&img, size)?;

    let mut prompts = vec![(
        PROMPT_TRUE,
        prompt_for(&entry.subject, entry.relation, &entry.object),
    )];
    if !opts.single_inversion {
        let mut rng = line_rng(opts.seed, line_index);
        let other = swapped_relation(&opts.classes, entry.relation, &mut rng)
            .ok_or_else(|| Error::Invalid("dual inversion needs two classes".into()))?;
        prompts.push((
            PROMPT_SWAPPED,
            prompt_for(&entry.subject, other, &entry.object),
        ));
    }
    // Token positions first: a word the tokenizer cannot find skips the line before any work.
    let mut words = Vec::with_capacity(prompts.len());
    for (_, prompt) in &prompts {
        let mut w = Vec::with_capacity(2);
        for word in [&entry.subject, &entry.object] {
            match pipe.tokenizer.word_token_indices(prompt, word) {
                Ok(ix) => w.push(ix),
                Err(e) => {
                    return Ok(LineOutcome::Skipped(SkipReason::WordNotInPrompt(
                        e.to_string(),
                    )))
                }
            }
        }
        words.push(w);
    }

    let line_no = line_index + 1;
    let z0 = pipe.encode_image(&input)?;
    let mut samples = Vec::new();
    let mut swapped_dropped = None;
    for ((kind, prompt), words) in prompts.iter().zip(&words) {
        events.phase(&format!("line {line_no}: inverting {prompt:?}"));
        let cond = pipe.encode_prompt(prompt)?;
        let inversion = pipe.invert(&z0, &cond, opts.steps, opts.fixed_point_iters)?;
        let req = GenerateRequest {
            cond: &cond,
            uncond: None,
            guidance: 1.0,
            steps: opts.steps,
            init_latents: inversion.noise().clone(),
            record_maps: Some((words, &opts.record_steps)),
        };
        let steps = opts.steps;
        let out = pipe.generate(&req, None, |i| {
            events.phase(&format!(
                "line {line_no}: reconstructing {prompt:?} {}/{steps}",
                i + 1
            ))
        })?;
        let recon = pipe.decode(&out.latents)?;
        let psnr = image::psnr(&input, &recon)?;
        // A NaN reconstruction is dropped too.
        if psnr.is_nan() || psnr < opts.min_psnr {
            if *kind == PROMPT_TRUE {
                return Ok(LineOutcome::DroppedPsnr { psnr });
            }
            swapped_dropped = Some(psnr);
            break;
        }
        for (step, maps) in &out.maps {
            samples.push(Sample {
                maps: maps.to_vec::<f32>()?,
                step: *step as i64,
                label: label as i64,
                prompt_kind: *kind,
                psnr: psnr as f32,
                line: line_no as i64,
            });
        }
    }
    Ok(LineOutcome::Kept {
        samples,
        swapped_dropped,
    })
}

/// A shard's samples, gathered column by column.
#[derive(Default)]
struct ShardData {
    maps: Vec<f32>,
    step: Vec<i64>,
    label: Vec<i64>,
    prompt_kind: Vec<i64>,
    psnr: Vec<f32>,
    line: Vec<i64>,
}

impl ShardData {
    fn push(&mut self, s: Sample) {
        self.maps.extend_from_slice(&s.maps);
        self.step.push(s.step);
        self.label.push(s.label);
        self.prompt_kind.push(s.prompt_kind);
        self.psnr.push(s.psnr);
        self.line.push(s.line);
    }

    fn write(
        self,
        path: &Path,
        n_maps: usize,
        f16: bool,
        metadata: HashMap<String, String>,
    ) -> Result<()> {
        let s = self.step.len();
        let per = 2 * n_maps * MAP_SIZE * MAP_SIZE;
        if self.maps.len() != s * per {
            return Err(Error::Invalid(format!(
                "internal: {} map values for {s} samples of 2 x {n_maps} maps",
                self.maps.len()
            )));
        }
        let mut maps = Tensor::from_vec(self.maps, &[s, 2, n_maps, MAP_SIZE, MAP_SIZE])?;
        if f16 {
            maps = maps.to_dtype(DType::F16)?;
        }
        let step = Tensor::from_vec(self.step, &[s])?;
        let label = Tensor::from_vec(self.label, &[s])?;
        let kind = Tensor::from_vec(self.prompt_kind, &[s])?;
        let psnr = Tensor::from_vec(self.psnr, &[s])?;
        let line = Tensor::from_vec(self.line, &[s])?;
        safetensors_io::save(
            path,
            &[
                ("maps", &maps),
                ("step", &step),
                ("label", &label),
                ("prompt_kind", &kind),
                ("psnr", &psnr),
                ("line", &line),
            ],
            Some(metadata),
        )
    }
}

/// A finished shard's counts, after checking that it was made from `lines` with `settings`.
fn check_existing_shard(
    path: &Path,
    settings: &BTreeMap<&'static str, String>,
    lines_json: &str,
    hash: &str,
) -> Result<Counts> {
    let meta = SafetensorsFile::open(path)?.metadata()?;
    for (key, want) in settings
        .iter()
        .map(|(k, v)| (*k, v.as_str()))
        .chain([("lines", lines_json), ("lines_fnv1a64", hash)])
    {
        let have = meta.get(key).map(String::as_str).unwrap_or("(absent)");
        if have != want {
            return Err(Error::Invalid(format!(
                "{}: this shard was written with {key} = {have}, but this run has {want}; \
                 resume with the same manifest and settings, or write to another --out",
                path.display()
            )));
        }
    }
    let counts = meta
        .get("counts")
        .ok_or_else(|| Error::format(path, "no `counts` in the metadata"))?;
    serde_json::from_str(counts).map_err(|e| Error::format(path, format!("bad `counts`: {e}")))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Run worker `opts.worker` of `opts.workers` over the manifest (module docs).
pub fn collect(
    pipe: &StableDiffusion,
    opts: &CollectOptions,
    events: &mut dyn Events,
) -> Result<Summary> {
    opts.validate()?;
    let text = std::fs::read_to_string(&opts.manifest).map_err(|e| Error::io(&opts.manifest, e))?;
    let lines: Vec<&str> = text.lines().collect();
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let mine = worker_lines(lines.len(), opts.worker, opts.workers);
    let blocks: Vec<&[usize]> = mine.chunks(opts.lines_per_shard).collect();
    let image_size = pipe.default_size();
    let n_maps = if blocks.is_empty() {
        0
    } else {
        probe_maps_per_word(pipe, image_size, opts.steps)?
    };
    let settings = opts.settings(image_size, n_maps);

    // Pass 1: which shards are done already.
    let mut totals = Counts::default();
    let mut todo = Vec::new();
    let mut resumed = 0;
    let mut resumed_lines = 0;
    for (k, block) in blocks.iter().enumerate() {
        let path = opts.out.join(shard_file_name(opts.worker, opts.workers, k));
        let numbers: Vec<usize> = block.iter().map(|&l| l + 1).collect();
        let lines_json = serde_json::to_string(&numbers).expect("numbers serialise");
        let hash = lines_hash(block.iter().map(|&l| lines[l]));
        if path.exists() {
            match check_existing_shard(&path, &settings, &lines_json, &hash) {
                Ok(c) => {
                    totals.add(&c);
                    resumed += 1;
                    resumed_lines += block.len();
                    continue;
                }
                Err(e @ Error::Invalid(_)) => return Err(e),
                Err(e) => events.report(&format!("{e}; redoing this shard")),
            }
        }
        todo.push((k, path, lines_json, hash));
    }
    events.start(mine.len(), resumed_lines);

    // Pass 2: the rest, one shard at a time.
    let mut written = 0;
    for (k, path, lines_json, hash) in todo {
        let mut counts = Counts::default();
        let mut data = ShardData::default();
        for &l in blocks[k] {
            let line = lines[l];
            if line.trim().is_empty() {
                events.line_done(&totals);
                continue;
            }
            counts.lines += 1;
            totals.lines += 1;
            let mut c = Counts::default();
            match process_line(pipe, opts, l, line, events)? {
                LineOutcome::Skipped(r) => {
                    events.report(&format!("line {}: skipped ({}): {r}", l + 1, r.category()));
                    *c.skipped.entry(r.category().to_string()).or_default() += 1;
                }
                LineOutcome::DroppedPsnr { psnr } => {
                    events.report(&format!(
                        "line {}: dropped: reconstruction PSNR {psnr:.2} dB < {} dB with the true prompt",
                        l + 1,
                        opts.min_psnr
                    ));
                    c.dropped_psnr += 1;
                }
                LineOutcome::Kept {
                    samples,
                    swapped_dropped,
                } => {
                    if let Some(psnr) = swapped_dropped {
                        events.report(&format!(
                            "line {}: swapped prompt dropped: reconstruction PSNR {psnr:.2} dB < {} dB",
                            l + 1,
                            opts.min_psnr
                        ));
                        c.dropped_psnr_swapped += 1;
                    }
                    c.kept_lines += 1;
                    c.samples += samples.len();
                    samples.into_iter().for_each(|s| data.push(s));
                }
            }
            // `lines` was counted above.
            counts.add(&c);
            totals.add(&c);
            events.line_done(&totals);
        }
        let mut meta: HashMap<String, String> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        meta.insert("model".into(), pipe.dir.display().to_string());
        meta.insert("manifest".into(), opts.manifest.display().to_string());
        meta.insert("worker".into(), format!("{}/{}", opts.worker, opts.workers));
        meta.insert("shard".into(), k.to_string());
        meta.insert("lines".into(), lines_json);
        meta.insert("lines_fnv1a64".into(), hash);
        meta.insert(
            "counts".into(),
            serde_json::to_string(&counts).expect("counts serialise"),
        );
        data.write(&path, n_maps, opts.maps_f16, meta)?;
        written += 1;
    }

    let summary = Summary {
        worker: opts.worker,
        workers: opts.workers,
        manifest: opts.manifest.display().to_string(),
        shards: blocks.len(),
        shards_resumed: resumed,
        shards_written: written,
        counts: totals,
    };
    let json = serde_json::to_string_pretty(&summary).expect("summary serialises");
    write_atomic(
        &opts.out.join(summary_file_name(opts.worker, opts.workers)),
        json.as_bytes(),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test pattern also used to produce the PIL values below (Pillow 13.0):
    /// `(x * 37 + y * 91 + c * 53 + x * y * 7) % 256`, `Image.fromarray(a)`, the reference's
    /// `center_crop`, then `.resize((s, s))`.
    fn pattern(w: usize, h: usize) -> Tensor {
        let mut v = vec![0f32; 3 * h * w];
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let level = (x * 37 + y * 91 + c * 53 + x * y * 7) % 256;
                    v[(c * h + y) * w + x] = level as f32 / 127.5 - 1.0;
                }
            }
        }
        Tensor::from_vec(v, &[1, 3, h, w]).unwrap()
    }

    fn levels(t: &Tensor) -> Vec<i64> {
        t.to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&x| ((x + 1.0) * 127.5).round() as i64)
            .collect()
    }

    /// (sum, sum of value * HWC index), as printed by the PIL script.
    fn checksums(t: &Tensor) -> (i64, i64) {
        let s = t.shape()[2];
        let l = levels(t);
        let mut sum = 0;
        let mut weighted = 0;
        for c in 0..3 {
            for y in 0..s {
                for x in 0..s {
                    let v = l[(c * s + y) * s + x];
                    sum += v;
                    weighted += v * (((y * s + x) * 3 + c) as i64);
                }
            }
        }
        (sum, weighted)
    }

    #[test]
    fn crop_box_rounds_as_pil() {
        assert_eq!(center_crop_box(7, 5), (1, 0, 6, 5));
        assert_eq!(center_crop_box(3, 4), (0, 0, 3, 4));
        assert_eq!(center_crop_box(640, 480), (80, 0, 560, 480));
        assert_eq!(center_crop_box(641, 480), (80, 0, 560, 480));
        assert_eq!(center_crop_box(643, 480), (82, 0, 562, 480));
        assert_eq!(center_crop_box(500, 500), (0, 0, 500, 500));
    }

    #[test]
    fn preprocessing_matches_pil_bicubic() {
        // Downscale (antialiased) after a crop 7x5 -> 5x5 -> 4x4.
        let down = preprocess_image(&pattern(7, 5), 4).unwrap();
        assert_eq!(
            levels(&down),
            vec![
                58, 119, 126, 146, 170, 141, 92, 90, 125, 99, 194, 129, 168, 167, 111, 149, 125,
                144, 152, 202, 139, 123, 81, 155, 86, 177, 147, 142, 183, 89, 136, 187, 163, 158,
                215, 97, 152, 76, 154, 121, 158, 166, 129, 117, 70, 121, 168, 86
            ]
        );
        // Upscale of PIL's non-square crop of a 3x4 image (3x4 -> 5x5).
        let up = preprocess_image(&pattern(3, 4), 5).unwrap();
        assert_eq!(
            levels(&up),
            vec![
                0, 7, 33, 59, 72, 57, 70, 101, 142, 165, 149, 173, 200, 140, 96, 138, 168, 196,
                101, 36, 6, 27, 68, 116, 142, 46, 60, 86, 112, 125, 108, 131, 172, 202, 216, 213,
                169, 109, 136, 160, 206, 141, 46, 74, 104, 58, 85, 132, 173, 195, 99, 112, 139,
                172, 190, 180, 205, 225, 122, 52, 111, 136, 162, 101, 58, 42, 62, 99, 148, 176,
                123, 145, 185, 225, 248
            ]
        );
        // Same size: a copy.
        assert_eq!(
            checksums(&preprocess_image(&pattern(6, 6), 6).unwrap()),
            (14033, 748383)
        );
        // 40x30 -> crop 30x30 -> 8x8.
        assert_eq!(
            checksums(&preprocess_image(&pattern(40, 30), 8).unwrap()),
            (24585, 2355041)
        );
        // Values are diffusers' x / 255 * 2 - 1.
        let v = down.to_vec::<f32>().unwrap();
        assert_eq!(v[0], 58.0 / 255.0 * 2.0 - 1.0);
    }

    #[test]
    fn workers_partition_the_lines() {
        assert_eq!(worker_lines(7, 0, 2), vec![0, 2, 4, 6]);
        assert_eq!(worker_lines(7, 1, 2), vec![1, 3, 5]);
        assert_eq!(worker_lines(3, 0, 1), vec![0, 1, 2]);
        assert!(worker_lines(1, 2, 3).is_empty());
        assert_eq!(shard_file_name(1, 4, 12), "shard-1-of-4-00012.safetensors");
    }

    #[test]
    fn manifest_lines_and_prompts() {
        let base = Path::new("/data");
        let e = parse_manifest_line(
            r#"{"image": "a/1.png", "subject": "dog", "relation": "Left of", "object": " teddy  bear "}"#,
            base,
        )
        .unwrap();
        assert_eq!(e.image, PathBuf::from("/data/a/1.png"));
        assert_eq!(e.relation, Relation::LeftOf);
        assert_eq!(e.object, "teddy bear");
        assert_eq!(
            prompt_for(&e.subject, e.relation, &e.object),
            "A dog to the left of a teddy bear"
        );
        let e = parse_manifest_line(
            r#"{"image": "/abs.png", "subject": "cup", "relation": "on top of", "object": "table"}"#,
            base,
        )
        .unwrap();
        assert_eq!(
            (e.image.as_path(), e.relation),
            (Path::new("/abs.png"), Relation::Above)
        );
        let err = |t: &str| parse_manifest_line(t, base).unwrap_err().category();
        assert_eq!(err("not json"), "bad json");
        assert_eq!(err("[1]"), "bad json");
        assert_eq!(
            err(r#"{"image": "x.png", "relation": "above", "object": "b"}"#),
            "missing field"
        );
        assert_eq!(
            err(r#"{"image": "x.png", "subject": "a", "relation": "near", "object": "b"}"#),
            "unknown relation"
        );
    }

    #[test]
    fn swapped_relation_differs_and_is_reproducible() {
        let classes = Relation::ALL;
        let mut seen = std::collections::HashSet::new();
        for line in 0..200 {
            for truth in classes {
                let a = swapped_relation(&classes, truth, &mut line_rng(7, line)).unwrap();
                let b = swapped_relation(&classes, truth, &mut line_rng(7, line)).unwrap();
                assert_eq!(a, b);
                assert_ne!(a, truth);
                seen.insert((truth, a));
            }
        }
        assert_eq!(seen.len(), 12, "every other class is drawn");
        assert_eq!(
            swapped_relation(&[Relation::Above], Relation::Above, &mut line_rng(0, 0)),
            None
        );
    }

    #[test]
    fn options_are_checked() {
        let mut o = CollectOptions::new("m.jsonl", "out");
        assert!(o.validate().is_ok());
        o.record_steps = vec![5, 50];
        assert!(o.validate().unwrap_err().to_string().contains("50"));
        o.record_steps = vec![5, 5];
        assert!(o.validate().is_err());
        o.record_steps = vec![5];
        o.worker = 2;
        o.workers = 2;
        assert!(o.validate().is_err());
        o.worker = 0;
        o.classes = vec![Relation::Above];
        assert!(o.validate().is_err());
        o.single_inversion = true;
        assert!(o.validate().is_ok());
    }
}
