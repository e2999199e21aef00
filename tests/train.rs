//! `steer train` on synthetic shards with a learnable signal: each word's N maps are a blob at
//! the word's position (plus noise), and the label is where the subject's blob is relative to
//! the object's (above: smaller row; below: larger row; left of: smaller column; right of: larger
//! column). Shards are written in `steer collect`'s format (version 2, with the per-sample
//! `line`); every image gives 2 prompts (true and "swapped", same geometry, other noise) x 2
//! steps = 4 samples, all carrying the image's line.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use steer::rng::Rng;
use steer::safetensors_io::{self, SafetensorsFile};
use steer::steering::classifier::{
    ClassifierConfig, ExtractorConfig, HeadConfig, RelationClassifier, StepEmbedding,
};
use steer::train::trainer::{
    self, split_by_image, ClassifierSizes, Dataset, PlainEvents, TrainOptions,
};
use steer::{DType, Tensor};

const CLASSES: [&str; 4] = ["above", "below", "to the left of", "to the right of"];
const STEPS: [i64; 2] = [5, 49];
const S: usize = 16;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// One word's N maps: a Gaussian blob at (row, col) of random width and height, noise added.
/// (Captured maps are normalised to sum 1; these peak near 1, which only rescales the input and
/// lets a few epochs learn.)
fn word_maps(n: usize, row: f64, col: f64, rng: &mut Rng, out: &mut Vec<f32>) {
    for _ in 0..n {
        let sigma = 1.0 + 1.5 * rng.uniform();
        let height = 0.5 + 0.5 * rng.uniform();
        out.extend((0..S * S).map(|k| {
            let (r, c) = ((k / S) as f64, (k % S) as f64);
            let d2 = (r - row).powi(2) + (c - col).powi(2);
            (height * (-d2 / (2.0 * sigma * sigma)).exp() + 0.1 * rng.uniform()) as f32
        }));
    }
}

struct Shard {
    maps: Vec<f32>,
    step: Vec<i64>,
    label: Vec<i64>,
    kind: Vec<i64>,
    line: Vec<i64>,
}

/// `images` images starting at manifest line `first_line`, labels cycling through the classes.
fn synth(n: usize, first_line: usize, images: usize, seed: u64) -> Shard {
    let mut rng = Rng::new(seed);
    let mut sh = Shard {
        maps: Vec::new(),
        step: Vec::new(),
        label: Vec::new(),
        kind: Vec::new(),
        line: Vec::new(),
    };
    for i in 0..images {
        let label = (first_line + i) % 4;
        // The relation's axis: the two blobs 4..10 apart on it, within 2 on the other axis.
        let a = 2.0 + 3.0 * rng.uniform();
        let b = a + 4.0 + 6.0 * rng.uniform();
        let o1 = 2.0 + 11.0 * rng.uniform();
        let o2 = (o1 + 4.0 * rng.uniform() - 2.0).clamp(0.0, 15.0);
        let (s_on, o_on) = if label.is_multiple_of(2) {
            (a, b)
        } else {
            (b, a)
        };
        let ((sr, sc), (or, oc)) = if label < 2 {
            ((s_on, o1), (o_on, o2))
        } else {
            ((o1, s_on), (o2, o_on))
        };
        for kind in [0, 1] {
            for &step in &STEPS {
                word_maps(n, sr, sc, &mut rng, &mut sh.maps);
                word_maps(n, or, oc, &mut rng, &mut sh.maps);
                sh.step.push(step);
                sh.label.push(label as i64);
                sh.kind.push(kind);
                sh.line.push((first_line + i + 1) as i64);
            }
        }
    }
    sh
}

fn write_shard(path: &Path, n: usize, sh: &Shard, classes: &[&str], version: u32, f16: bool) {
    let s = sh.step.len();
    let mut maps = Tensor::from_vec(sh.maps.clone(), &[s, 2, n, S, S]).unwrap();
    if f16 {
        maps = maps.to_dtype(DType::F16).unwrap();
    }
    let ints = |v: &Vec<i64>| Tensor::from_vec(v.clone(), &[s]).unwrap();
    let (step, label, kind, line) = (
        ints(&sh.step),
        ints(&sh.label),
        ints(&sh.kind),
        ints(&sh.line),
    );
    let psnr = Tensor::from_vec(vec![25.0f32; s], &[s]).unwrap();
    let mut tensors = vec![
        ("maps", &maps),
        ("step", &step),
        ("label", &label),
        ("prompt_kind", &kind),
        ("psnr", &psnr),
    ];
    if version >= 2 {
        tensors.push(("line", &line));
    }
    let meta = HashMap::from([
        ("format".to_string(), "steer-collect".to_string()),
        ("format_version".to_string(), version.to_string()),
        (
            "classes".to_string(),
            serde_json::to_string(classes).unwrap(),
        ),
        ("n_maps".to_string(), n.to_string()),
        ("map_size".to_string(), S.to_string()),
        ("record_steps".to_string(), "[5,49]".to_string()),
        ("manifest".to_string(), "synthetic.jsonl".to_string()),
    ]);
    safetensors_io::save(path, &tensors, Some(meta)).unwrap();
}

/// `shards` shards of `per` images each in `dir` (the first in f16), N maps per word.
fn dataset(dir: &Path, n: usize, shards: usize, per: usize) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for k in 0..shards {
        let sh = synth(n, k * per, per, 100 + k as u64);
        let path = data.join(format!("shard-0-of-1-{k:05}.safetensors"));
        write_shard(&path, n, &sh, &CLASSES, 2, k == 0);
    }
    data
}

/// A small classifier (d_model 32, one layer each) so the library test trains in a second.
fn small_sizes() -> ClassifierSizes {
    ClassifierSizes::Custom(ClassifierConfig {
        maps_per_word: 0,
        map_size: S,
        d_model: 32,
        num_timesteps: 50,
        extractor: ExtractorConfig {
            heads: 2,
            layers: 1,
            ff: 32,
            pool_heads: 2,
            dropout: 0.1,
            step_embedding: StepEmbedding::Mid,
        },
        head: HeadConfig {
            heads: 2,
            layers: 1,
            ff: 32,
            dropout: 0.1,
            step_embedding_dim: 8,
        },
        classes: Vec::new(),
        step_buckets: Vec::new(),
        input_scale: 1.0,
    })
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = SafetensorsFile::open(path).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let v = f.tensor(&n).unwrap().to_vec::<f32>().unwrap();
            (n, v)
        })
        .collect()
}

/// Validation accuracy of a saved classifier on the validation side of the split.
fn accuracy_of(model: &RelationClassifier, ds: &Dataset, val: &[usize]) -> f64 {
    let mut correct = 0;
    for idx in val.chunks(64) {
        let maps = ds.gather(idx).unwrap();
        let steps: Vec<usize> = idx.iter().map(|&i| ds.steps()[i]).collect();
        let (logits, _) = model.forward(&maps, &steps, None).unwrap();
        let c = model.num_classes();
        let lv = logits.to_vec::<f32>().unwrap();
        for (row, &i) in lv.chunks(c).zip(idx) {
            let p = (0..c).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            correct += (p == ds.labels()[i]) as usize;
        }
    }
    correct as f64 / val.len() as f64
}

#[test]
fn library_trains_well_above_chance() {
    let dir = scratch("lib");
    // 96 images (24 per class) in 3 shards: 384 samples.
    let data = dataset(&dir, 4, 3, 32);
    let ds = Dataset::open(std::slice::from_ref(&data)).unwrap();
    assert_eq!(
        (ds.len(), ds.num_images(), ds.maps_per_word()),
        (384, 96, 4)
    );

    // The split is by image, stratified: 20% of each class's 24 images (5) validate.
    let split = split_by_image(&ds, 0.2, 0).unwrap();
    assert_eq!((split.train_images, split.val_images), (76, 20));
    assert_eq!((split.train.len(), split.val.len()), (304, 80));
    let val_images: HashSet<usize> = split.val.iter().map(|&i| ds.images()[i]).collect();
    assert!(split
        .train
        .iter()
        .all(|&i| !val_images.contains(&ds.images()[i])));
    for c in 0..4 {
        let n = split.val.iter().filter(|&&i| ds.labels()[i] == c).count();
        assert_eq!(n, 20, "class {c}: 5 images x 4 samples");
    }
    assert_eq!(split, split_by_image(&ds, 0.2, 0).unwrap(), "seeded");
    assert_ne!(split, split_by_image(&ds, 0.2, 1).unwrap());

    let out = dir.join("run");
    let mut opts = TrainOptions::new(vec![data], &out, small_sizes());
    opts.epochs = 10;
    opts.batch_size = 32;
    opts.lr = 3e-3;
    let t0 = std::time::Instant::now();
    let report = trainer::train(&opts, &mut PlainEvents).unwrap();
    eprintln!("10 epochs in {:.2}s", t0.elapsed().as_secs_f64());
    let best = report.best.as_ref().unwrap();
    eprintln!(
        "{:?}",
        report
            .history
            .iter()
            .map(|h| (h.val_loss, h.val_accuracy))
            .collect::<Vec<_>>()
    );
    // Chance is 25% (4 balanced classes). The 80 validation samples come from 20 images, and
    // an image's 4 samples share its geometry, so count 20 independent trials: a classifier at
    // chance gets 25% +- 9.7% (one standard deviation), and 75% is more than 5 of them above.
    assert!(
        best.accuracy >= 0.75,
        "best validation accuracy {}",
        best.accuracy
    );
    assert_eq!(best.samples, 80);
    let confusion_total: usize = best.confusion.iter().flatten().sum();
    assert_eq!(confusion_total, 80);
    assert!(best.per_class.iter().all(|c| c.support == 20));
    assert_eq!(best.per_step.len(), 2);
    assert_eq!(best.per_prompt["true"].samples, 40);

    // The checkpoint loads as a classifier and classifies the validation images as reported.
    let model = RelationClassifier::load(out.join("best.safetensors")).unwrap();
    assert_eq!(model.classes(), CLASSES);
    assert_eq!(model.maps_per_word(), 4);
    assert_eq!(model.step_buckets(), &[5, 49]);
    let acc = accuracy_of(&model, &ds, &split.val);
    assert!(
        (acc - best.accuracy).abs() < 1e-12,
        "{acc} vs {}",
        best.accuracy
    );
    let last = RelationClassifier::load(out.join("last.safetensors")).unwrap();
    assert_eq!(last.params().numel(), model.params().numel());

    // report.json is the returned report.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["finished"], true);
    assert_eq!(json["best_epoch"], report.best_epoch);
    assert_eq!(
        json["history"].as_array().unwrap().len(),
        report.epochs_done
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn steer(args: &[&str], paths: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_steer"));
    cmd.arg("train").args(args);
    for (flag, p) in paths {
        cmd.arg(flag).arg(p);
    }
    cmd.output().unwrap()
}

fn ok(o: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "steer train failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// The reference's SD2.1 sizes through the command line: 2 + 2 epochs with --resume give the
/// bit-identical weights, optimizer state and history of one 4-epoch run (the shuffle and the
/// dropout masks depend only on the seed and the epoch).
#[test]
fn binary_resume_is_bit_identical() {
    let dir = scratch("resume");
    let data = dataset(&dir, 4, 2, 12);
    let (a, b) = (dir.join("a"), dir.join("b"));
    let common = ["--batch-size", "32", "--lr", "1e-3", "--seed", "7"];
    let t0 = std::time::Instant::now();
    // --resume with nothing to resume starts a new run.
    let o = steer(
        &[&common[..], &["--epochs", "2", "--resume"]].concat(),
        &[("--data", &data), ("--out", &a)],
    );
    let first = ok(&o);
    assert!(first.contains("2 of 2 epochs"), "{first}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("starting a new run"), "{stderr}");
    assert!(stderr.contains("epoch   2: train loss"), "{stderr}");
    // Without --resume an existing run is not overwritten.
    let o = steer(
        &[&common[..], &["--epochs", "4"]].concat(),
        &[("--data", &data), ("--out", &a)],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let resumed = ok(&steer(
        &[&common[..], &["--epochs", "4", "--resume"]].concat(),
        &[("--data", &data), ("--out", &a)],
    ));
    assert!(resumed.contains("4 of 4 epochs"), "{resumed}");
    let whole = ok(&steer(
        &[&common[..], &["--epochs", "4"]].concat(),
        &[("--data", &data), ("--out", &b)],
    ));
    eprintln!("3 runs in {:.2}s", t0.elapsed().as_secs_f64());
    for f in [
        "last.safetensors",
        "best.safetensors",
        "train-state.safetensors",
    ] {
        assert_eq!(tensors(&a.join(f)), tensors(&b.join(f)), "{f}");
    }
    let history = |d: &Path| {
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("report.json")).unwrap()).unwrap();
        j["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["train_loss"].as_f64(),
                    h["val_loss"].as_f64(),
                    h["lr"].as_f64(),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(history(&a), history(&b));
    assert_eq!(history(&a).len(), 4);
    // The final table: per-class accuracy and the confusion matrix.
    for s in [&resumed, &whole] {
        assert!(s.contains("confusion matrix"), "{s}");
        assert!(s.contains("to the right of"), "{s}");
        assert!(s.contains("best: epoch"), "{s}");
    }
    // The checkpoint is a classifier `steer classify` / `generate --classifier` can read.
    let m = RelationClassifier::load(a.join("last.safetensors")).unwrap();
    assert_eq!(m.config().d_model, 256);
    assert_eq!(m.config().extractor.layers, 2);

    // Resuming with other settings is refused, naming them.
    let o = steer(
        &[
            "--epochs",
            "5",
            "--resume",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--seed",
            "7",
        ],
        &[("--data", &data), ("--out", &a)],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("batch_size: 32 then, 16 now"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The reference's `model` section for a small classifier (d_model 32, one layer each).
const SMALL_JSON: &str = r#"{"model": {
  "extractor": {"nhead": 2, "num_layers": 1, "dim_feedforward": 32, "layer_attn_nheads": 2,
                "dropout": 0.1, "timestep_embedding": {"enable": true, "mode": "mid"}},
  "classifier": {"mode": "multiclass", "timestep_embedding_dim": 8, "nhead": 2, "num_layers": 1,
                 "dim_feedforward": 32, "fc_ver": "v1", "dropout": 0.1},
  "map_size": 16, "d_model": 32, "num_timesteps": 50, "architecture": "attention"}}"#;

/// The command line learns the synthetic relations (a small classifier from a JSON config, so
/// that it takes a couple of seconds; the SD2.1 sizes learn too, in more epochs than a test
/// should take).
#[test]
fn binary_trains_well_above_chance() {
    let dir = scratch("cli");
    let data = dataset(&dir, 4, 2, 40);
    let config = dir.join("small.json");
    std::fs::write(&config, SMALL_JSON).unwrap();
    let out = dir.join("run");
    let t0 = std::time::Instant::now();
    let stdout = ok(&steer(
        &["--epochs", "10", "--lr", "3e-3", "--batch-size", "32"],
        &[
            ("--data", &data),
            ("--out", &out),
            ("--model-config", &config),
        ],
    ));
    eprintln!("{stdout}\n10 epochs in {:.2}s", t0.elapsed().as_secs_f64());
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let acc = j["best"]["accuracy"].as_f64().unwrap();
    // 80 images, 16 of them validate (64 samples; an image's 4 samples share its geometry, so
    // count 16 independent trials): a classifier at chance gets 25% +- 11% (one standard
    // deviation); 75% is more than 4 of them above.
    assert!(acc >= 0.75, "best validation accuracy {acc}");
    assert_eq!(j["split"]["val_images"], 16);
    let m = RelationClassifier::load(out.join("best.safetensors")).unwrap();
    assert_eq!(m.config().d_model, 32);
    let _ = std::fs::remove_dir_all(&dir);
}

fn err<T>(r: steer::Result<T>) -> String {
    match r {
        Ok(_) => panic!("should have failed"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_data_is_refused_with_the_file_named() {
    let dir = scratch("bad");
    let good = dir.join("good.safetensors");
    write_shard(&good, 4, &synth(4, 0, 2, 1), &CLASSES, 2, false);

    // Another N.
    let other_n = dir.join("n3.safetensors");
    write_shard(&other_n, 3, &synth(3, 2, 2, 2), &CLASSES, 2, false);
    let e = err(Dataset::open(&[good.clone(), other_n.clone()]));
    assert!(
        e.contains("n3.safetensors") && e.contains("N = 3") && e.contains("N = 4"),
        "{e}"
    );

    // Other classes.
    let other_c = dir.join("classes.safetensors");
    let mut reversed = CLASSES;
    reversed.reverse();
    write_shard(&other_c, 4, &synth(4, 2, 2, 3), &reversed, 2, false);
    let e = err(Dataset::open(&[good.clone(), other_c]));
    assert!(
        e.contains("classes.safetensors") && e.contains("classes"),
        "{e}"
    );

    // Not a shard: a classifier checkpoint.
    let clf = dir.join("clf.safetensors");
    let classes: Vec<String> = CLASSES.iter().map(|s| s.to_string()).collect();
    let ClassifierSizes::Custom(mut c) = small_sizes() else {
        unreachable!()
    };
    (c.maps_per_word, c.classes, c.step_buckets) = (4, classes, vec![5, 49]);
    RelationClassifier::init(c, 0).unwrap().save(&clf).unwrap();
    let e = err(Dataset::open(&[good.clone(), clf]));
    assert!(
        e.contains("clf.safetensors") && e.contains("not a `steer collect` shard"),
        "{e}"
    );

    // Format 2 without `line`.
    let noline = dir.join("noline.safetensors");
    write_shard(&noline, 4, &synth(4, 0, 1, 4), &CLASSES, 2, false);
    let f = SafetensorsFile::open(&noline).unwrap();
    let meta = f.metadata().unwrap();
    let keep: Vec<(String, Tensor)> = f
        .names()
        .into_iter()
        .filter(|n| n != "line")
        .map(|n| (n.clone(), f.tensor(&n).unwrap()))
        .collect();
    drop(f);
    let refs: Vec<(&str, &Tensor)> = keep.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors_io::save(&noline, &refs, Some(meta)).unwrap();
    let e = err(Dataset::open(std::slice::from_ref(&noline)));
    assert!(
        e.contains("noline.safetensors") && e.contains("`line`"),
        "{e}"
    );

    // Empty data: shards without samples, an empty folder, nothing at all.
    let empty_dir = dir.join("empty");
    std::fs::create_dir_all(&empty_dir).unwrap();
    let e = err(Dataset::open(std::slice::from_ref(&empty_dir)));
    assert!(e.contains("no shards"), "{e}");
    let empty = dir.join("empty.safetensors");
    write_shard(&empty, 4, &synth(4, 0, 0, 5), &CLASSES, 2, false);
    let opts = TrainOptions::new(vec![empty.clone()], dir.join("run"), small_sizes());
    let e = err(trainer::train(&opts, &mut PlainEvents));
    assert!(e.contains("no samples"), "{e}");
    let e = err(Dataset::open(&[]));
    assert!(e.contains("no data"), "{e}");
    // Too few images to split.
    let one = dir.join("one.safetensors");
    write_shard(&one, 4, &synth(4, 0, 1, 7), &CLASSES, 2, false);
    let opts = TrainOptions::new(vec![one], dir.join("run"), small_sizes());
    let e = err(trainer::train(&opts, &mut PlainEvents));
    assert!(e.contains("cannot split 1 image"), "{e}");

    // The command line says so too, and exits non-zero.
    let o = steer(
        &[],
        &[
            ("--data", &good),
            ("--data", &other_n),
            ("--out", &dir.join("cli")),
        ],
    );
    assert!(!o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("error:") && stderr.contains("n3.safetensors"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Format-1 shards (no per-sample `line`) are grouped by image from the order collect writes
/// samples in: the true prompt's steps, then the swapped prompt's (when kept).
#[test]
fn format_1_shards_are_grouped_by_image() {
    let dir = scratch("v1");
    let path = dir.join("v1.safetensors");
    let mut sh = synth(4, 0, 3, 6);
    // Drop the second image's swapped prompt (its samples 6 and 7), as a failed PSNR would.
    let per = 2 * 4 * S * S;
    sh.maps.drain(6 * per..8 * per);
    for v in [&mut sh.step, &mut sh.label, &mut sh.kind, &mut sh.line] {
        v.drain(6..8);
    }
    write_shard(&path, 4, &sh, &CLASSES, 1, false);
    let ds = Dataset::open(&[path]).unwrap();
    assert_eq!(ds.len(), 10);
    assert_eq!(ds.num_images(), 3);
    assert_eq!(ds.images(), &[0, 0, 0, 0, 1, 1, 2, 2, 2, 2]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Collects the warnings.
struct Warnings(Vec<String>);
impl trainer::TrainEvents for Warnings {
    fn report(&mut self, msg: &str) {
        self.0.push(msg.to_string());
    }
}

/// A NaN in the maps makes its batch's gradient NaN: that update is skipped with a warning and
/// training goes on (here with a separate, clean validation set: --val-data).
#[test]
fn nan_gradients_skip_the_update() {
    let dir = scratch("nan");
    let data = dataset(&dir, 4, 1, 8);
    let val = dir.join("val.safetensors");
    write_shard(&val, 4, &synth(4, 100, 8, 9), &CLASSES, 2, false);
    let bad = dir.join("data/bad.safetensors");
    let mut sh = synth(4, 50, 1, 10);
    sh.maps[3] = f32::NAN;
    write_shard(&bad, 4, &sh, &CLASSES, 2, false);

    let mut opts = TrainOptions::new(vec![data], dir.join("run"), small_sizes());
    opts.val_data = vec![val];
    opts.epochs = 2;
    opts.batch_size = 16;
    let mut w = Warnings(Vec::new());
    let report = trainer::train(&opts, &mut w).unwrap();
    assert_eq!(report.split.method, "--val-data");
    assert_eq!((report.split.train_images, report.split.val_images), (9, 8));
    // One bad sample, so one skipped batch per epoch.
    assert_eq!(report.skipped_updates, 2, "{:?}", w.0);
    assert_eq!(
        w.0.iter().filter(|m| m.contains("NaN/Inf")).count(),
        2,
        "{:?}",
        w.0
    );
    assert!(report.history.iter().all(|h| h.val_loss.is_finite()));
    let m = RelationClassifier::load(dir.join("run/last.safetensors")).unwrap();
    assert!(m.params().all_finite().unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}
