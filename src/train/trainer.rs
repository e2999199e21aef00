//! `steer train`: the relation classifier trained on `steer collect`'s shards (SPEC section 5),
//! as the reference trainer (`train_relation_classifier/train.py`) does it, made resumable.
//!
//! # What one run does
//!
//! 1. **Data** ([`Dataset::open`]): every shard named (a folder stands for its `*.safetensors`
//!    files). The shards must agree on the class list, N (maps per word) and the map size; a
//!    shard that is not a `steer collect` shard, or disagrees, is an error naming the file. The
//!    maps stay memory-mapped (f32 or f16, as stored); batches are gathered from the mapping
//!    and converted to f32.
//! 2. **Split** ([`split_by_image`]): the reference trains on separately made train/val/test
//!    folders. We take a seeded split *by image*: every sample of one image (both the true and the
//!    swapped prompt, every step) lands on the same side, so the validation accuracy is on
//!    unseen images. An image is a (manifest, line) pair: the per-sample `line` of format-2
//!    shards (format-1 shards have none; their samples are grouped by the order `collect` writes
//!    them in, see [`Dataset::open`]). The split is stratified by the image's label: a fraction
//!    `val_fraction` (rounded) of each class's images is drawn for validation. `--val-data`
//!    replaces the split by a separate validation set, as the reference has.
//! 3. **Model**: [`RelationClassifier::init`] with the reference's SD2.1 or FLUX sizes
//!    ([`ClassifierSizes`]), N and the classes from the data, the step buckets = the steps the
//!    data was recorded at (the reference's `training_config.timesteps`).
//! 4. **Epochs**, as the reference's loop: the training samples shuffled (batch 64, the last
//!    batch partial, as its `DataLoader(shuffle=True)`), dropout on, cross-entropy (the batch
//!    mean), one AdamW step per batch (lr 1e-4 SD / 5e-5 FLUX, weight decay 0.05); then the
//!    validation loss in eval mode, averaged as the reference's `EpochStats` does it (the mean
//!    of the means of blocks of 256 samples, its validation `batch_size`);
//!    `ReduceLROnPlateau(factor 0.5, patience 5, threshold 0, min_lr 1e-6)` steps on it, then
//!    early stopping (patience 10, min_delta 0). A batch whose gradient holds NaN or Inf is not
//!    applied (AdamW's [`Update::SkippedNonFinite`]): reported, counted, and training goes on.
//! 5. **Checkpoints**, every epoch, each file written atomically (a temporary file, then a
//!    rename): `best.safetensors` when the validation loss is the lowest so far (the reference
//!    keeps `final_model.pth`, the last model, and `ES_final_model.pth`, the model at the first
//!    epoch *without* improvement; we keep the lowest-validation-loss model instead, which is
//!    what early stopping is for), `last.safetensors`, then `train-state.safetensors` (the model,
//!    AdamW's moments, the scheduler, early stopping, the epoch count, the history and the
//!    settings). The state file is written last and alone decides where a resumed run starts,
//!    so a crash loses at most the epoch in progress.
//! 6. **Report**: `report.json` ([`TrainReport`], rewritten each epoch) with the history and
//!    the best model's validation metrics: per-class accuracy, the confusion matrix (rows: true
//!    class, columns: predicted), accuracy per step and per prompt kind (true / swapped: the
//!    reference logs per-timestep accuracy and sklearn's per-class report).
//!
//! # Determinism and resuming
//!
//! Everything random is a function of the seed: the model's initialisation (`seed`), the split,
//! and, per epoch, the shuffle and the dropout masks (each drawn from a generator seeded by
//! (`seed`, epoch), not from one generator running across epochs). So an epoch's result depends
//! only on the state at its start, and `resume` (reading `train-state.safetensors`) continues
//! bit-identically: `--epochs 2` then `--epochs 4 --resume` gives the weights of one
//! `--epochs 4` run. A resumed run must have the same data, split and hyperparameters (checked;
//! only the epoch limit may change). The reference does not resume.
//!
//! Training accuracy is measured on the training batches with dropout on, as the reference
//! measures it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::optim::{
    AdamW, AdamWConfig, EarlyStopping, NamedTensors, PlateauConfig, ReduceLROnPlateau, Update,
};
use crate::data::collect::{self, PROMPT_SWAPPED, PROMPT_TRUE};
use crate::hash::Fnv1a;
use crate::ops;
use crate::rng::Rng;
use crate::safetensors_io::SafetensorsFile;
use crate::steering::classifier::{ClassifierConfig, RelationClassifier};
use crate::steering::params::Params;
use crate::{DType, Error, Result, Tensor};

/// The classifier checkpoint with the lowest validation loss.
pub const BEST_FILE: &str = "best.safetensors";
/// The classifier after the last finished epoch.
pub const LAST_FILE: &str = "last.safetensors";
/// Everything a resumed run needs.
pub const STATE_FILE: &str = "train-state.safetensors";
/// The run's report.
pub const REPORT_FILE: &str = "report.json";
/// The `format` metadata of the state file.
pub const STATE_FORMAT: &str = "steer-train-state";
/// The state file's layout version.
pub const STATE_FORMAT_VERSION: u32 = 1;

const MODEL_PREFIX: &str = "model.";
const TRAINER_EPOCH: &str = "trainer.epoch";
const TRAINER_BEST: &str = "trainer.best";

impl NamedTensors for Params {
    fn named(&self) -> Vec<(&str, &Tensor)> {
        self.iter().collect()
    }
    fn named_mut(&mut self) -> Vec<(&str, &mut Tensor)> {
        self.iter_mut().collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Data

/// One shard file, its maps memory-mapped.
struct ShardFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// Byte offset of the `maps` data in the mapping.
    offset: usize,
    dtype: DType,
    samples: usize,
}

/// The samples of one or more `steer collect` shards: labels, steps, prompt kinds and image
/// groups in memory, the maps memory-mapped.
pub struct Dataset {
    files: Vec<ShardFile>,
    /// Per sample: its file and row.
    file_of: Vec<u32>,
    row_of: Vec<u32>,
    steps: Vec<usize>,
    labels: Vec<usize>,
    prompt_kinds: Vec<i64>,
    /// Per sample: its image's index in `image_keys`.
    image_of: Vec<usize>,
    image_keys: Vec<String>,
    classes: Vec<String>,
    n_maps: usize,
    map_size: usize,
}

/// `paths`, with each folder replaced by its `*.safetensors` files; sorted, duplicates removed.
pub fn shard_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = BTreeSet::new();
    for p in paths {
        if p.is_dir() {
            let mut found = 0;
            for entry in std::fs::read_dir(p).map_err(|e| Error::io(p, e))? {
                let path = entry.map_err(|e| Error::io(p, e))?.path();
                if path.is_file() && path.extension().is_some_and(|e| e == "safetensors") {
                    out.insert(path);
                    found += 1;
                }
            }
            if found == 0 {
                return Err(Error::Invalid(format!(
                    "{}: no shards (*.safetensors files) in this folder",
                    p.display()
                )));
            }
        } else if p.is_file() {
            out.insert(p.clone());
        } else {
            return Err(Error::io(
                p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
            ));
        }
    }
    Ok(out.into_iter().collect())
}

fn int_column(
    path: &Path,
    st: &safetensors::SafeTensors<'_>,
    name: &str,
    s: usize,
) -> Result<Option<Vec<i64>>> {
    let Ok(view) = st.tensor(name) else {
        return Ok(None);
    };
    if view.dtype() != safetensors::Dtype::I64 || view.shape() != [s] {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}` is {:?} {:?}, expected I64 [{s}]",
                view.dtype(),
                view.shape()
            ),
        ));
    }
    Ok(Some(
        view.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
    ))
}

/// Image groups of a format-1 shard (no `line` tensor): `collect` writes each kept line's
/// samples together, the true prompt's `record_steps` samples first, then the swapped prompt's.
/// A new image starts at a true-prompt sample that follows a swapped-prompt sample or a complete
/// run of `per_prompt` true-prompt samples.
fn v1_groups(kinds: &[i64], per_prompt: usize) -> Vec<usize> {
    let (mut g, mut run) = (0, 0);
    let mut out = Vec::with_capacity(kinds.len());
    for (i, &k) in kinds.iter().enumerate() {
        if k == PROMPT_TRUE {
            if i > 0 && (kinds[i - 1] != PROMPT_TRUE || run == per_prompt) {
                g += 1;
                run = 0;
            }
            run += 1;
        }
        out.push(g);
    }
    out
}

impl Dataset {
    /// Open shards (files, or folders of `*.safetensors` files). See the module documentation.
    /// Errors name the file: not a shard, an unsupported format version, malformed tensors, a
    /// label outside the class list, or classes / N / map size that differ from the first
    /// file's. No files at all is an error; files with no samples are not (check
    /// [`Dataset::is_empty`]).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let paths = shard_paths(paths)?;
        if paths.is_empty() {
            return Err(Error::Invalid(
                "no data: give shard files or folders".into(),
            ));
        }
        let mut ds = Dataset {
            files: Vec::new(),
            file_of: Vec::new(),
            row_of: Vec::new(),
            steps: Vec::new(),
            labels: Vec::new(),
            prompt_kinds: Vec::new(),
            image_of: Vec::new(),
            image_keys: Vec::new(),
            classes: Vec::new(),
            n_maps: 0,
            map_size: 0,
        };
        let mut image_ids: HashMap<String, usize> = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: read-only mapping; a concurrent writer could change the bytes, which at
            // worst yields wrong values (collect writes shards by rename, never in place).
            let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let st = safetensors::SafeTensors::deserialize(&mmap)
                .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
            let meta = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::format(path, format!("bad header: {e}")))?
                .1
                .metadata()
                .clone()
                .unwrap_or_default();
            let get = |k: &str| {
                meta.get(k).ok_or_else(|| {
                    Error::format(
                        path,
                        format!("no `{k}` metadata: not a `steer collect` shard"),
                    )
                })
            };
            let format = get("format")?;
            if format != collect::FORMAT {
                return Err(Error::format(
                    path,
                    format!("format is {format:?}: not a `steer collect` shard"),
                ));
            }
            let version: u32 = match get("format_version")?.parse() {
                Ok(v) if (1..=collect::FORMAT_VERSION).contains(&v) => v,
                _ => {
                    return Err(Error::format(
                        path,
                        format!(
                            "format_version {:?}: this build reads 1..={}",
                            get("format_version")?,
                            collect::FORMAT_VERSION
                        ),
                    ))
                }
            };
            let classes: Vec<String> = serde_json::from_str(get("classes")?)
                .map_err(|e| Error::format(path, format!("metadata `classes`: {e}")))?;
            let num = |k: &str| -> Result<usize> {
                get(k)?
                    .parse()
                    .map_err(|_| Error::format(path, format!("metadata `{k}` is not a count")))
            };
            let (n_maps, map_size) = (num("n_maps")?, num("map_size")?);
            if fi == 0 {
                ds.classes = classes;
                ds.n_maps = n_maps;
                ds.map_size = map_size;
            } else {
                let first = paths[0].display();
                if classes != ds.classes {
                    return Err(Error::format(
                        path,
                        format!(
                            "classes {classes:?} differ from {first}'s {:?}: shards collected \
                             with other --classes cannot be mixed",
                            ds.classes
                        ),
                    ));
                }
                if n_maps != ds.n_maps {
                    return Err(Error::format(
                        path,
                        format!(
                            "N = {n_maps} maps per word, but {first} has N = {}: shards of \
                             different models cannot be mixed",
                            ds.n_maps
                        ),
                    ));
                }
                if map_size != ds.map_size {
                    return Err(Error::format(
                        path,
                        format!(
                            "maps are {map_size}x{map_size}, {first}'s {}x{}",
                            ds.map_size, ds.map_size
                        ),
                    ));
                }
            }

            let view = st
                .tensor("maps")
                .map_err(|_| Error::format(path, "missing tensor `maps`"))?;
            let sh = view.shape().to_vec();
            if sh.len() != 5
                || sh[1] != 2
                || sh[2] != n_maps
                || sh[3] != map_size
                || sh[4] != map_size
            {
                return Err(Error::format(
                    path,
                    format!("maps {sh:?}, expected (S, 2, {n_maps}, {map_size}, {map_size})"),
                ));
            }
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                other => {
                    return Err(Error::format(
                        path,
                        format!("maps are {other:?}, expected F32 or F16"),
                    ))
                }
            };
            let s = sh[0];
            let offset = view.data().as_ptr() as usize - mmap.as_ptr() as usize;
            let column = |name: &str| -> Result<Vec<i64>> {
                int_column(path, &st, name, s)?
                    .ok_or_else(|| Error::format(path, format!("missing tensor `{name}`")))
            };
            let steps = column("step")?;
            let labels = column("label")?;
            let kinds = column("prompt_kind")?;
            let lines = int_column(path, &st, "line", s)?;
            if version >= 2 && lines.is_none() {
                return Err(Error::format(
                    path,
                    "missing tensor `line` (format version 2)",
                ));
            }
            let manifest = meta.get("manifest").cloned().unwrap_or_default();
            let keys: Vec<String> = match &lines {
                Some(lines) => lines.iter().map(|l| format!("{manifest}#{l}")).collect(),
                None => {
                    let per_prompt = meta
                        .get("record_steps")
                        .and_then(|r| serde_json::from_str::<Vec<usize>>(r).ok())
                        .map_or(1, |r| r.len().max(1));
                    v1_groups(&kinds, per_prompt)
                        .into_iter()
                        .map(|g| format!("{}#group{g}", path.display()))
                        .collect()
                }
            };
            for r in 0..s {
                let bad = |what: &str, v: i64| {
                    Err(Error::format(
                        path,
                        format!("sample {r}: {what} {v} out of range"),
                    ))
                };
                if labels[r] < 0 || labels[r] as usize >= ds.classes.len() {
                    return bad("label", labels[r]);
                }
                if steps[r] < 0 {
                    return bad("step", steps[r]);
                }
                if kinds[r] != PROMPT_TRUE && kinds[r] != PROMPT_SWAPPED {
                    return bad("prompt_kind", kinds[r]);
                }
                let next = image_ids.len();
                let id = *image_ids.entry(keys[r].clone()).or_insert(next);
                if id == ds.image_keys.len() {
                    ds.image_keys.push(keys[r].clone());
                }
                ds.file_of.push(ds.files.len() as u32);
                ds.row_of.push(r as u32);
                ds.steps.push(steps[r] as usize);
                ds.labels.push(labels[r] as usize);
                ds.prompt_kinds.push(kinds[r]);
                ds.image_of.push(id);
            }
            drop(st);
            ds.files.push(ShardFile {
                path: path.clone(),
                mmap,
                offset,
                dtype,
                samples: s,
            });
        }
        Ok(ds)
    }

    /// Drop every swapped-prompt sample (keep `prompt_kind` 0).
    pub fn keep_true_prompts(&mut self) {
        let keep: Vec<bool> = self
            .prompt_kinds
            .iter()
            .map(|&k| k == PROMPT_TRUE)
            .collect();
        fn filter<T: Copy>(v: &mut Vec<T>, keep: &[bool]) {
            let mut i = 0;
            v.retain(|_| {
                i += 1;
                keep[i - 1]
            });
        }
        filter(&mut self.file_of, &keep);
        filter(&mut self.row_of, &keep);
        filter(&mut self.steps, &keep);
        filter(&mut self.labels, &keep);
        filter(&mut self.prompt_kinds, &keep);
        filter(&mut self.image_of, &keep);
    }

    /// Samples in all.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Distinct images (manifest lines).
    pub fn num_images(&self) -> usize {
        self.image_keys.len()
    }
    pub fn classes(&self) -> &[String] {
        &self.classes
    }
    /// N: maps per word.
    pub fn maps_per_word(&self) -> usize {
        self.n_maps
    }
    pub fn map_size(&self) -> usize {
        self.map_size
    }
    /// The shard files, sorted.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }
    pub fn steps(&self) -> &[usize] {
        &self.steps
    }
    pub fn prompt_kinds(&self) -> &[i64] {
        &self.prompt_kinds
    }
    /// Per sample, the index of its image.
    pub fn images(&self) -> &[usize] {
        &self.image_of
    }

    /// A fingerprint of the data (file names and sample counts), for checking that a resumed
    /// run trains on the same data.
    fn fingerprint(&self) -> Value {
        let mut h = Fnv1a::default();
        for f in &self.files {
            let name = f.path.file_name().unwrap_or_default().to_string_lossy();
            h.update(format!("{name}:{}\n", f.samples).as_bytes());
        }
        json!({
            "files": self.files.len(),
            "samples": self.len(),
            "images": self.num_images(),
            "fnv1a64": h.hex(),
        })
    }

    /// The maps of samples `idx`, (B, 2, N, S, S) f32.
    pub fn gather(&self, idx: &[usize]) -> Result<Tensor> {
        let per = 2 * self.n_maps * self.map_size * self.map_size;
        let mut out = vec![0.0f32; idx.len() * per];
        if per > 0 {
            out.par_chunks_mut(per)
                .zip(idx.par_iter())
                .for_each(|(o, &i)| {
                    let f = &self.files[self.file_of[i] as usize];
                    let row = self.row_of[i] as usize;
                    match f.dtype {
                        DType::F16 => {
                            let start = f.offset + row * per * 2;
                            let bytes = &f.mmap[start..start + per * 2];
                            for (v, c) in o.iter_mut().zip(bytes.chunks_exact(2)) {
                                *v = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                            }
                        }
                        _ => {
                            let start = f.offset + row * per * 4;
                            let bytes = &f.mmap[start..start + per * 4];
                            for (v, c) in o.iter_mut().zip(bytes.chunks_exact(4)) {
                                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            }
                        }
                    }
                });
        }
        Tensor::from_vec(
            out,
            &[idx.len(), 2, self.n_maps, self.map_size, self.map_size],
        )
    }
}

/// Which samples train and which validate.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Sample indices, ascending.
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub train_images: usize,
    pub val_images: usize,
}

/// A seed for one purpose (and epoch) derived from the run's seed.
fn derived_seed(seed: u64, purpose: u64, epoch: u64) -> u64 {
    let mut r = Rng::new(
        seed ^ purpose.wrapping_mul(0xA076_1D64_78BD_642F)
            ^ epoch.wrapping_mul(0xE703_7ED1_A0B4_28DB),
    );
    r.next_u64()
}
const SPLIT: u64 = 1;
const SHUFFLE: u64 = 2;
const DROPOUT: u64 = 3;

fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i + 1);
        v.swap(i, j);
    }
}

/// The seeded split by image (module documentation): per class (of the image's first sample),
/// the images in key order are shuffled and `round(val_fraction * count)` of them validate.
/// Errors when either side would be empty.
pub fn split_by_image(ds: &Dataset, val_fraction: f64, seed: u64) -> Result<Split> {
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::Invalid(format!(
            "--val-fraction {val_fraction} must be in (0, 1) (or give --val-data)"
        )));
    }
    let mut image_label = vec![usize::MAX; ds.num_images()];
    for (i, &img) in ds.image_of.iter().enumerate() {
        if image_label[img] == usize::MAX {
            image_label[img] = ds.labels[i];
        }
    }
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); ds.classes.len()];
    for (img, &l) in image_label.iter().enumerate() {
        by_class[l].push(img);
    }
    let mut rng = Rng::new(derived_seed(seed, SPLIT, 0));
    let mut is_val = vec![false; ds.num_images()];
    for imgs in &mut by_class {
        imgs.sort_by(|&a, &b| ds.image_keys[a].cmp(&ds.image_keys[b]));
        shuffle(imgs, &mut rng);
        let n_val = (val_fraction * imgs.len() as f64).round() as usize;
        for &img in &imgs[..n_val.min(imgs.len())] {
            is_val[img] = true;
        }
    }
    let val_images = is_val.iter().filter(|&&v| v).count();
    let train_images = ds.num_images() - val_images;
    if val_images == 0 || train_images == 0 {
        return Err(Error::Invalid(format!(
            "cannot split {} image(s) with --val-fraction {val_fraction}: {train_images} would \
             train and {val_images} validate; add data, change --val-fraction, or give --val-data",
            ds.num_images()
        )));
    }
    let (val, train): (Vec<usize>, Vec<usize>) =
        (0..ds.len()).partition(|&i| is_val[ds.image_of[i]]);
    Ok(Split {
        train,
        val,
        train_images,
        val_images,
    })
}

// ---------------------------------------------------------------------------------------------
// Options, records, report

/// The classifier's sizes.
#[derive(Clone, Debug, PartialEq)]
pub enum ClassifierSizes {
    /// The reference's SD2.1 sizes ([`ClassifierConfig::sd2`]).
    Sd,
    /// The reference's FLUX.1-dev sizes ([`ClassifierConfig::flux`]).
    Flux,
    /// Any sizes (tests, experiments); N, the classes and the step buckets are replaced by the
    /// data's.
    Custom(ClassifierConfig),
}

impl ClassifierSizes {
    fn config(&self, n: usize, classes: Vec<String>, buckets: Vec<usize>) -> ClassifierConfig {
        let mut c = match self {
            ClassifierSizes::Sd => ClassifierConfig::sd2(n, classes),
            ClassifierSizes::Flux => ClassifierConfig::flux(n, classes),
            ClassifierSizes::Custom(c) => {
                let mut c = c.clone();
                c.maps_per_word = n;
                c.classes = classes;
                c
            }
        };
        c.step_buckets = buckets;
        c
    }
}

/// Everything [`train`] needs.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Shard files or folders.
    pub data: Vec<PathBuf>,
    /// A separate validation set; empty: split `data` by image.
    pub val_data: Vec<PathBuf>,
    /// Output folder: checkpoints, state, report.
    pub out: PathBuf,
    pub sizes: ClassifierSizes,
    /// The epoch limit (a resumed run continues up to it).
    pub epochs: usize,
    pub batch_size: usize,
    /// Validation loss averaging: the mean of the means of blocks of this many samples (the
    /// reference's validation batch size, 256). Only the averaging: the computation runs in
    /// batches of `batch_size`.
    pub val_block: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub val_fraction: f64,
    /// Early stopping.
    pub patience: u32,
    pub min_delta: f64,
    pub plateau: PlateauConfig,
    pub seed: u64,
    /// Continue the run in `out` (start afresh when it has no state file).
    pub resume: bool,
    /// Train on the true prompts' samples only: single inversion, the linguistic-shortcut
    /// ablation (SPEC section 5), from the same dual-inversion shards.
    pub true_prompts_only: bool,
}

impl TrainOptions {
    /// The reference's settings for these sizes: lr 1e-4 and 100 epochs (SD, and custom sizes)
    /// or 5e-5 and 200 epochs (FLUX); weight decay 0.05, batch 64, validation blocks of 256,
    /// ReduceLROnPlateau as the reference, early stopping patience 10, min_delta 0; and a 20%
    /// validation split, seed 0.
    pub fn new(data: Vec<PathBuf>, out: impl Into<PathBuf>, sizes: ClassifierSizes) -> Self {
        let (lr, epochs) = match sizes {
            ClassifierSizes::Flux => (5e-5, 200),
            _ => (1e-4, 100),
        };
        TrainOptions {
            data,
            val_data: Vec::new(),
            out: out.into(),
            sizes,
            epochs,
            batch_size: 64,
            val_block: 256,
            lr,
            weight_decay: 0.05,
            val_fraction: 0.2,
            patience: 10,
            min_delta: 0.0,
            plateau: PlateauConfig::reference(),
            seed: 0,
            resume: false,
            true_prompts_only: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(m));
        if self.data.is_empty() {
            return bad("no --data given".into());
        }
        if self.batch_size == 0 || self.val_block == 0 {
            return bad(format!(
                "--batch-size ({}) and --val-block ({}) must be positive",
                self.batch_size, self.val_block
            ));
        }
        if self.min_delta.is_nan() || self.min_delta < 0.0 {
            return bad(format!("--min-delta {} must be >= 0", self.min_delta));
        }
        if self.val_data.is_empty() && !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            return bad(format!(
                "--val-fraction {} must be in (0, 1) (or give --val-data)",
                self.val_fraction
            ));
        }
        AdamW::new(AdamWConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            ..Default::default()
        })?;
        ReduceLROnPlateau::new(self.lr, self.plateau)?;
        Ok(())
    }
}

/// NaN and infinities as JSON `null` (read back as NaN).
mod nullable {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One finished epoch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    /// The mean of the batch losses (dropout on).
    #[serde(with = "nullable")]
    pub train_loss: f64,
    /// Fraction of training samples classified right during the epoch (dropout on).
    #[serde(with = "nullable")]
    pub train_accuracy: f64,
    #[serde(with = "nullable")]
    pub val_loss: f64,
    #[serde(with = "nullable")]
    pub val_accuracy: f64,
    /// The learning rate the epoch trained with.
    pub lr: f64,
    /// The rate for the next epoch (after the scheduler's step).
    pub next_lr: f64,
    /// Batches whose update was skipped for a NaN/Inf gradient.
    pub skipped_updates: usize,
    /// Whether this epoch's validation loss is the lowest so far (best.safetensors written).
    pub best: bool,
    /// Early stopping's count of epochs without improvement, after this one.
    pub epochs_without_improvement: u32,
    pub seconds: f64,
}

/// Accuracy on a subset of the validation samples.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SubsetAccuracy {
    pub samples: usize,
    pub correct: usize,
    #[serde(with = "nullable")]
    pub accuracy: f64,
}

impl SubsetAccuracy {
    fn new(samples: usize, correct: usize) -> Self {
        SubsetAccuracy {
            samples,
            correct,
            accuracy: if samples == 0 {
                f64::NAN
            } else {
                correct as f64 / samples as f64
            },
        }
    }
}

/// One class's validation metrics.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassMetrics {
    pub class: String,
    /// Validation samples of this class.
    pub support: usize,
    pub correct: usize,
    /// correct / support (the class's recall).
    #[serde(with = "nullable")]
    pub accuracy: f64,
    /// Of the samples predicted as this class, the fraction that are (NaN: none predicted).
    #[serde(with = "nullable")]
    pub precision: f64,
}

/// A model's metrics on the validation samples.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    /// The reference's average (module documentation).
    #[serde(with = "nullable")]
    pub loss: f64,
    #[serde(with = "nullable")]
    pub accuracy: f64,
    pub samples: usize,
    pub per_class: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`: sample counts.
    pub confusion: Vec<Vec<usize>>,
    /// By recorded step.
    pub per_step: BTreeMap<usize, SubsetAccuracy>,
    /// By prompt: "true" (the image's relation in the prompt) and "swapped".
    pub per_prompt: BTreeMap<String, SubsetAccuracy>,
}

/// Sizes of the two sides.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SplitInfo {
    pub train_samples: usize,
    pub train_images: usize,
    pub val_samples: usize,
    pub val_images: usize,
    /// "by image" (seeded, stratified) or "--val-data".
    pub method: String,
}

/// What a run did: `report.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub classes: Vec<String>,
    pub maps_per_word: usize,
    pub step_buckets: Vec<usize>,
    pub parameters: usize,
    /// The settings a resumed run must share.
    pub settings: Value,
    pub split: SplitInfo,
    pub epochs_limit: usize,
    pub epochs_done: usize,
    /// Early stopping ended the run.
    pub stopped_early: bool,
    /// All epochs done (or stopped early): false while a run is in progress.
    pub finished: bool,
    /// 1-based epoch of best.safetensors (0: none yet).
    pub best_epoch: usize,
    /// Validation metrics of best.safetensors.
    pub best: Option<EvalMetrics>,
    /// Validation metrics of last.safetensors.
    pub last: Option<EvalMetrics>,
    pub skipped_updates: usize,
    pub history: Vec<EpochRecord>,
    pub best_checkpoint: PathBuf,
    pub last_checkpoint: PathBuf,
    pub state: PathBuf,
}

/// Progress callbacks (a progress bar in the CLI). All optional.
pub trait TrainEvents {
    /// Before the first epoch of this run (`first_epoch` 0-based: > 0 when resumed).
    fn start(&mut self, _report: &TrainReport, _first_epoch: usize) {}
    fn epoch_start(&mut self, _epoch: usize, _epochs: usize, _batches: usize) {}
    /// After each training batch: running mean loss and accuracy of the epoch so far.
    fn batch_done(&mut self, _loss: f64, _accuracy: f64) {}
    fn validating(&mut self) {}
    fn epoch_done(&mut self, _record: &EpochRecord) {}
    /// Warnings and notes.
    fn report(&mut self, msg: &str) {
        eprintln!("{msg}");
    }
}

/// [`TrainEvents`] that only print warnings and notes to stderr.
pub struct PlainEvents;
impl TrainEvents for PlainEvents {}

// ---------------------------------------------------------------------------------------------
// Training

/// Samples of one dataset.
struct Part<'a> {
    ds: &'a Dataset,
    idx: Vec<usize>,
}

/// Argmax (first maximum, as torch.argmax) of each row of (B, C) logits.
fn argmax_rows(logits: &[f32], c: usize) -> Vec<usize> {
    logits
        .chunks(c)
        .map(|row| {
            let mut best = 0;
            for (j, &v) in row.iter().enumerate() {
                if v > row[best] || (v.is_nan() && !row[best].is_nan()) {
                    best = j;
                }
            }
            best
        })
        .collect()
}

/// Per-sample cross-entropy of f32 logits, in f64.
fn sample_losses(logits: &[f32], c: usize, labels: &[usize]) -> Vec<f64> {
    logits
        .chunks(c)
        .zip(labels)
        .map(|(row, &t)| {
            let m = row
                .iter()
                .map(|&v| v as f64)
                .fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            lse - row[t] as f64
        })
        .collect()
}

fn evaluate(
    model: &RelationClassifier,
    part: &Part<'_>,
    batch: usize,
    val_block: usize,
) -> Result<EvalMetrics> {
    let c = model.num_classes();
    let mut losses = Vec::with_capacity(part.idx.len());
    let mut preds = Vec::with_capacity(part.idx.len());
    for idx in part.idx.chunks(batch) {
        let maps = part.ds.gather(idx)?;
        let steps: Vec<usize> = idx.iter().map(|&i| part.ds.steps[i]).collect();
        let labels: Vec<usize> = idx.iter().map(|&i| part.ds.labels[i]).collect();
        let (logits, _) = model.forward(&maps, &steps, None)?;
        let lv = logits.to_vec::<f32>()?;
        losses.extend(sample_losses(&lv, c, &labels));
        preds.extend(argmax_rows(&lv, c));
    }
    let blocks: Vec<f64> = losses
        .chunks(val_block)
        .map(|b| b.iter().sum::<f64>() / b.len() as f64)
        .collect();
    let loss = blocks.iter().sum::<f64>() / blocks.len().max(1) as f64;
    let mut confusion = vec![vec![0usize; c]; c];
    let mut per_step: BTreeMap<usize, (usize, usize)> = BTreeMap::new();
    let mut per_prompt: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (&i, &p) in part.idx.iter().zip(&preds) {
        let t = part.ds.labels[i];
        confusion[t][p] += 1;
        let ok = (t == p) as usize;
        let s = per_step.entry(part.ds.steps[i]).or_default();
        s.0 += 1;
        s.1 += ok;
        let kind = if part.ds.prompt_kinds[i] == PROMPT_TRUE {
            "true"
        } else {
            "swapped"
        };
        let s = per_prompt.entry(kind.to_string()).or_default();
        s.0 += 1;
        s.1 += ok;
    }
    let correct: usize = (0..c).map(|k| confusion[k][k]).sum();
    let per_class = (0..c)
        .map(|k| {
            let support: usize = confusion[k].iter().sum();
            let predicted: usize = confusion.iter().map(|r| r[k]).sum();
            ClassMetrics {
                class: model.classes()[k].clone(),
                support,
                correct: confusion[k][k],
                accuracy: SubsetAccuracy::new(support, confusion[k][k]).accuracy,
                precision: SubsetAccuracy::new(predicted, confusion[k][k]).accuracy,
            }
        })
        .collect();
    Ok(EvalMetrics {
        loss,
        accuracy: SubsetAccuracy::new(part.idx.len(), correct).accuracy,
        samples: part.idx.len(),
        per_class,
        confusion,
        per_step: per_step
            .into_iter()
            .map(|(k, (n, ok))| (k, SubsetAccuracy::new(n, ok)))
            .collect(),
        per_prompt: per_prompt
            .into_iter()
            .map(|(k, (n, ok))| (k, SubsetAccuracy::new(n, ok)))
            .collect(),
    })
}

/// What the state file holds besides tensors.
#[derive(Serialize, Deserialize)]
struct StateMeta {
    history: Vec<EpochRecord>,
    best: Option<EvalMetrics>,
    last: Option<EvalMetrics>,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The settings that must not change when resuming, as JSON.
fn settings_json(
    opts: &TrainOptions,
    config: &ClassifierConfig,
    data: Value,
    val_data: Value,
    split: &SplitInfo,
) -> Value {
    json!({
        "model": config.to_reference_json(),
        "classes": config.classes,
        "maps_per_word": config.maps_per_word,
        "step_buckets": config.step_buckets,
        "batch_size": opts.batch_size,
        "val_block": opts.val_block,
        "lr": opts.lr,
        "weight_decay": opts.weight_decay,
        "val_fraction": if opts.val_data.is_empty() { json!(opts.val_fraction) } else { Value::Null },
        "patience": opts.patience,
        "min_delta": opts.min_delta,
        "plateau": {
            "factor": opts.plateau.factor,
            "patience": opts.plateau.patience,
            "threshold": opts.plateau.threshold,
            "min_lr": opts.plateau.min_lr,
            "cooldown": opts.plateau.cooldown,
        },
        "seed": opts.seed,
        "true_prompts_only": opts.true_prompts_only,
        "data": data,
        "val_data": val_data,
        "split": serde_json::to_value(split).expect("plain data"),
    })
}

/// Train as the module documentation says; returns the final report (also in `report.json`).
pub fn train(opts: &TrainOptions, events: &mut dyn TrainEvents) -> Result<TrainReport> {
    opts.validate()?;
    // Open shards, drop the swapped prompts for the single-inversion ablation, refuse no samples.
    let open = |paths: &[PathBuf], what: &str| -> Result<Dataset> {
        let mut ds = Dataset::open(paths)?;
        if opts.true_prompts_only {
            ds.keep_true_prompts();
        }
        if ds.is_empty() {
            return Err(Error::Invalid(format!(
                "no samples in {what}: {} shard file(s), all empty",
                ds.files.len()
            )));
        }
        Ok(ds)
    };
    let train_ds = open(&opts.data, "the data")?;
    let val_ds = if opts.val_data.is_empty() {
        None
    } else {
        let v = open(&opts.val_data, "--val-data")?;
        let (a, b) = (train_ds.files[0].path.display(), v.files[0].path.display());
        if v.classes != train_ds.classes {
            return Err(Error::Invalid(format!(
                "--val-data {b} has classes {:?}, --data {a} {:?}",
                v.classes, train_ds.classes
            )));
        }
        if v.n_maps != train_ds.n_maps || v.map_size != train_ds.map_size {
            return Err(Error::Invalid(format!(
                "--val-data {b} has N = {} maps of {}x{}, --data {a} N = {} of {}x{}",
                v.n_maps,
                v.map_size,
                v.map_size,
                train_ds.n_maps,
                train_ds.map_size,
                train_ds.map_size
            )));
        }
        Some(v)
    };
    let (train_part, val_part, split) = match &val_ds {
        None => {
            let s = split_by_image(&train_ds, opts.val_fraction, opts.seed)?;
            let info = SplitInfo {
                train_samples: s.train.len(),
                train_images: s.train_images,
                val_samples: s.val.len(),
                val_images: s.val_images,
                method: "by image".into(),
            };
            (
                Part {
                    ds: &train_ds,
                    idx: s.train,
                },
                Part {
                    ds: &train_ds,
                    idx: s.val,
                },
                info,
            )
        }
        Some(v) => (
            Part {
                ds: &train_ds,
                idx: (0..train_ds.len()).collect(),
            },
            Part {
                ds: v,
                idx: (0..v.len()).collect(),
            },
            SplitInfo {
                train_samples: train_ds.len(),
                train_images: train_ds.num_images(),
                val_samples: v.len(),
                val_images: v.num_images(),
                method: "--val-data".into(),
            },
        ),
    };

    // The model's configuration: N and classes from the data, steps as recorded.
    let buckets: Vec<usize> = train_part
        .idx
        .iter()
        .map(|&i| train_ds.steps[i])
        .chain(val_part.idx.iter().map(|&i| val_part.ds.steps[i]))
        .collect::<BTreeSet<usize>>()
        .into_iter()
        .collect();
    let config = opts
        .sizes
        .config(train_ds.n_maps, train_ds.classes.clone(), buckets.clone());
    if config.map_size != train_ds.map_size {
        return Err(Error::Invalid(format!(
            "the data's maps are {0}x{0}, the classifier reads {1}x{1}",
            train_ds.map_size, config.map_size
        )));
    }
    if let Some(&s) = buckets.iter().find(|&&s| s >= config.num_timesteps) {
        return Err(Error::Invalid(format!(
            "the data has samples recorded at step {s}, but the classifier's step embeddings \
             have {} rows (steps 0..{})",
            config.num_timesteps, config.num_timesteps
        )));
    }
    config.validate()?;
    let settings = settings_json(
        opts,
        &config,
        train_ds.fingerprint(),
        val_ds.as_ref().map_or(Value::Null, Dataset::fingerprint),
        &split,
    );

    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let state_path = opts.out.join(STATE_FILE);
    let best_path = opts.out.join(BEST_FILE);
    let last_path = opts.out.join(LAST_FILE);
    let report_path = opts.out.join(REPORT_FILE);

    let mut model = RelationClassifier::init(config.clone(), opts.seed)?;
    let mut opt = AdamW::new(AdamWConfig {
        lr: opts.lr,
        weight_decay: opts.weight_decay,
        ..Default::default()
    })?;
    let mut sched = ReduceLROnPlateau::new(opts.lr, opts.plateau)?;
    let mut stopper = EarlyStopping::new(opts.patience, opts.min_delta);
    let mut done = 0usize;
    let mut best_loss = f64::INFINITY;
    let mut best_epoch = 0usize;
    let mut meta = StateMeta {
        history: Vec::new(),
        best: None,
        last: None,
    };
    if state_path.exists() {
        if !opts.resume {
            return Err(Error::Invalid(format!(
                "{} already holds a training run ({STATE_FILE}); pass --resume to continue it, \
                 or choose another --out",
                opts.out.display()
            )));
        }
        let file = SafetensorsFile::open(&state_path)?;
        let m = file.metadata()?;
        if m.get("format").map(String::as_str) != Some(STATE_FORMAT)
            || m.get("format_version") != Some(&STATE_FORMAT_VERSION.to_string())
        {
            return Err(Error::format(
                &state_path,
                format!("not a {STATE_FORMAT} file of version {STATE_FORMAT_VERSION}"),
            ));
        }
        let saved: Value =
            serde_json::from_str(m.get("settings").map_or("null", String::as_str))
                .map_err(|e| Error::format(&state_path, format!("metadata `settings`: {e}")))?;
        let diffs: Vec<String> = settings
            .as_object()
            .expect("an object")
            .iter()
            .filter(|(k, v)| saved.get(k.as_str()) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "{k}: {} then, {v} now",
                    saved.get(k.as_str()).unwrap_or(&Value::Null)
                )
            })
            .collect();
        if !diffs.is_empty() {
            return Err(Error::Invalid(format!(
                "cannot resume {}: it was trained with other settings or data ({}); only \
                 --epochs may change",
                state_path.display(),
                diffs.join("; ")
            )));
        }
        let tensors = super::load_tensors(&state_path)?;
        for (name, t) in &tensors {
            if let Some(p) = name.strip_prefix(MODEL_PREFIX) {
                let dst = model.params_mut().get_mut(p).ok_or_else(|| {
                    Error::format(&state_path, format!("unknown model tensor `{name}`"))
                })?;
                if dst.shape() != t.shape() || t.dtype() != DType::F32 {
                    return Err(Error::format(
                        &state_path,
                        format!("`{name}`: {:?} {:?}", t.dtype(), t.shape()),
                    ));
                }
                *dst = t.clone();
            }
        }
        opt = AdamW::from_state(&tensors)?;
        sched = ReduceLROnPlateau::from_state(&tensors)?;
        stopper = EarlyStopping::from_state(&tensors)?;
        let scalar = |name: &str| -> Result<Vec<f64>> {
            let t = tensors
                .iter()
                .find(|(n, _)| n == name)
                .ok_or_else(|| Error::format(&state_path, format!("missing tensor `{name}`")))?;
            t.1.to_vec::<f64>()
        };
        done = scalar(TRAINER_EPOCH)?[0] as usize;
        let b = scalar(TRAINER_BEST)?;
        (best_loss, best_epoch) = (b[0], b[1] as usize);
        meta = serde_json::from_str(m.get("state").map_or("null", String::as_str))
            .map_err(|e| Error::format(&state_path, format!("metadata `state`: {e}")))?;
        events.report(&format!(
            "resuming {} after epoch {done}{}",
            opts.out.display(),
            if stopper.should_stop() {
                " (it had stopped early)"
            } else {
                ""
            }
        ));
    } else if opts.resume {
        events.report(&format!(
            "{} has no {STATE_FILE}: starting a new run",
            opts.out.display()
        ));
    }

    let make_report = |meta: &StateMeta,
                       done: usize,
                       best_epoch: usize,
                       stopped: bool,
                       finished: bool,
                       model: &RelationClassifier| TrainReport {
        classes: model.classes().to_vec(),
        maps_per_word: model.maps_per_word(),
        step_buckets: model.step_buckets().to_vec(),
        parameters: model.params().numel(),
        settings: settings.clone(),
        split: split.clone(),
        epochs_limit: opts.epochs,
        epochs_done: done,
        stopped_early: stopped,
        finished,
        best_epoch,
        best: meta.best.clone(),
        last: meta.last.clone(),
        skipped_updates: meta.history.iter().map(|r| r.skipped_updates).sum(),
        history: meta.history.clone(),
        best_checkpoint: best_path.clone(),
        last_checkpoint: last_path.clone(),
        state: state_path.clone(),
    };
    events.start(
        &make_report(
            &meta,
            done,
            best_epoch,
            stopper.should_stop(),
            false,
            &model,
        ),
        done,
    );

    let c = model.num_classes();
    let batches = train_part.idx.len().div_ceil(opts.batch_size);
    while done < opts.epochs && !stopper.should_stop() {
        let epoch = done;
        let t0 = Instant::now();
        events.epoch_start(epoch, opts.epochs, batches);
        let mut order = train_part.idx.clone();
        shuffle(
            &mut order,
            &mut Rng::new(derived_seed(opts.seed, SHUFFLE, epoch as u64)),
        );
        let mut drop_rng = Rng::new(derived_seed(opts.seed, DROPOUT, epoch as u64));
        let lr = opt.lr();
        let (mut loss_sum, mut correct, mut seen, mut skipped) = (0.0f64, 0usize, 0usize, 0usize);
        for (bi, idx) in order.chunks(opts.batch_size).enumerate() {
            let maps = train_ds.gather(idx)?;
            let steps: Vec<usize> = idx.iter().map(|&i| train_ds.steps[i]).collect();
            let labels: Vec<usize> = idx.iter().map(|&i| train_ds.labels[i]).collect();
            let (logits, saved) = model.forward(&maps, &steps, Some(&mut drop_rng))?;
            let loss = ops::cross_entropy(&logits, &labels)?.to_vec::<f64>()?[0];
            let lv = logits.to_vec::<f32>()?;
            correct += argmax_rows(&lv, c)
                .iter()
                .zip(&labels)
                .filter(|(p, t)| p == t)
                .count();
            seen += idx.len();
            loss_sum += loss;
            let dlogits = ops::cross_entropy_backward(&logits, &labels, 1.0)?;
            let (_, grads) = model.backward(&saved, &dlogits)?;
            if let Update::SkippedNonFinite { param } = opt.step(model.params_mut(), &grads)? {
                skipped += 1;
                events.report(&format!(
                    "warning: epoch {}, batch {}: NaN/Inf in the gradient of `{param}` (loss \
                     {loss}); this update is skipped",
                    epoch + 1,
                    bi + 1
                ));
            }
            events.batch_done(loss_sum / (bi + 1) as f64, correct as f64 / seen as f64);
        }
        events.validating();
        let val = evaluate(&model, &val_part, opts.batch_size, opts.val_block)?;
        // The reference's order: the scheduler, then early stopping, on the validation loss.
        let next_lr = sched.step(val.loss);
        opt.set_lr(next_lr);
        stopper.step(val.loss);
        let is_best = val.loss < best_loss;
        if is_best {
            best_loss = val.loss;
            best_epoch = epoch + 1;
            model.save(&best_path)?;
            meta.best = Some(val.clone());
        }
        model.save(&last_path)?;
        let record = EpochRecord {
            epoch: epoch + 1,
            train_loss: loss_sum / batches.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            val_loss: val.loss,
            val_accuracy: val.accuracy,
            lr,
            next_lr,
            skipped_updates: skipped,
            best: is_best,
            epochs_without_improvement: stopper.counter(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        meta.history.push(record.clone());
        meta.last = Some(val);
        done = epoch + 1;

        // The state last: it alone says where a resumed run starts.
        let mut tensors: Vec<(String, Tensor)> = model
            .params()
            .iter()
            .map(|(n, t)| (format!("{MODEL_PREFIX}{n}"), t.clone()))
            .collect();
        tensors.extend(opt.state_tensors()?);
        tensors.extend(sched.state_tensors()?);
        tensors.extend(stopper.state_tensors()?);
        tensors.push((
            TRAINER_EPOCH.into(),
            Tensor::from_vec(vec![done as f64], &[1])?,
        ));
        tensors.push((
            TRAINER_BEST.into(),
            Tensor::from_vec(vec![best_loss, best_epoch as f64], &[2])?,
        ));
        let state_meta = HashMap::from([
            ("format".to_string(), STATE_FORMAT.to_string()),
            (
                "format_version".to_string(),
                STATE_FORMAT_VERSION.to_string(),
            ),
            ("settings".to_string(), settings.to_string()),
            (
                "state".to_string(),
                serde_json::to_string(&meta).expect("plain data"),
            ),
        ]);
        super::save_tensors(&state_path, &tensors, Some(state_meta))?;
        let finished = done >= opts.epochs || stopper.should_stop();
        let report = make_report(
            &meta,
            done,
            best_epoch,
            stopper.should_stop(),
            finished,
            &model,
        );
        write_atomic(
            &report_path,
            serde_json::to_string_pretty(&report)
                .expect("plain data")
                .as_bytes(),
        )?;
        events.epoch_done(&record);
    }
    let report = make_report(&meta, done, best_epoch, stopper.should_stop(), true, &model);
    write_atomic(
        &report_path,
        serde_json::to_string_pretty(&report)
            .expect("plain data")
            .as_bytes(),
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_grouping_follows_collect_order() {
        // Two steps per prompt: line A (true, swapped), line B (true only), line C (true,
        // swapped), line D (true only), line E (true only).
        let k = [0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0];
        assert_eq!(
            v1_groups(&k, 2),
            vec![0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 4, 4]
        );
        // Single inversion, one step.
        assert_eq!(v1_groups(&[0, 0, 0], 1), vec![0, 1, 2]);
    }

    #[test]
    fn argmax_and_losses() {
        let l = [1.0f32, 3.0, 3.0, 0.0, -1.0, 2.0];
        assert_eq!(argmax_rows(&l, 3), vec![1, 2]);
        let s = sample_losses(&[0.0, 0.0], 2, &[1]);
        assert!((s[0] - 2f64.ln()).abs() < 1e-12);
    }
}
