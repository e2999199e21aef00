//! `steer collect` end to end on the tiny SD2.1 fixture (32x32 images, random weights, so
//! reconstructions are poor: `--min-psnr=-inf` keeps everything, a high threshold drops
//! everything). Few steps (`--steps 4 --record-steps 1,3 --fixed-point-iters 2`) keep it fast.

use std::path::{Path, PathBuf};
use std::process::Command;

use steer::safetensors_io::SafetensorsFile;
use steer::{image, DType, Tensor};

const MODEL: &str = "tests/fixtures/tiny-sd21";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-collect-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("imgs")).unwrap();
    dir
}

/// Three PNGs of different shapes (cropped and resized to 32x32), and a manifest: good, missing
/// image, good, unknown relation, good. Returns the manifest's path.
fn manifest(dir: &Path) -> PathBuf {
    for (i, (h, w)) in [(30, 40), (32, 32), (36, 24)].into_iter().enumerate() {
        let img = Tensor::rand_uniform(&[1, 3, h, w], -1.0, 1.0, DType::F32, 10 + i as u64);
        image::save_png(&img, dir.join(format!("imgs/{i}.png"))).unwrap();
    }
    let lines = [
        r#"{"image": "imgs/0.png", "subject": "dog", "relation": "left of", "object": "teddy bear"}"#,
        r#"{"image": "imgs/missing.png", "subject": "cat", "relation": "above", "object": "car"}"#,
        r#"{"image": "imgs/1.png", "subject": "cup", "relation": "on top of", "object": "table"}"#,
        r#"{"image": "imgs/2.png", "subject": "cat", "relation": "near", "object": "car"}"#,
        r#"{"image": "imgs/2.png", "subject": "cat", "relation": "under", "object": "car"}"#,
    ];
    let path = dir.join("manifest.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn collect(manifest: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(["collect", "--model", MODEL, "--manifest"])
        .arg(manifest)
        .arg("--out")
        .arg(out)
        .args([
            "--steps",
            "4",
            "--record-steps",
            "1,3",
            "--fixed-point-iters",
            "2",
        ])
        .args(extra)
        .output()
        .unwrap();
    o
}

fn ok(o: &std::process::Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "steer collect failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

fn summary(out: &Path, worker: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join(format!("summary-{worker}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ints(f: &SafetensorsFile, name: &str) -> Vec<i64> {
    f.tensor(name).unwrap().to_vec::<i64>().unwrap()
}

fn meta_lines(f: &SafetensorsFile) -> Vec<usize> {
    serde_json::from_str(&f.metadata().unwrap()["lines"]).unwrap()
}

#[test]
fn dual_inversion_shards_resume_and_refusal() {
    let dir = scratch("dual");
    let manifest = manifest(&dir);
    let out = dir.join("out");
    let args = ["--min-psnr=-inf", "--lines-per-shard", "2", "--seed", "3"];
    let (stdout, stderr) = ok(&collect(&manifest, &out, &args));

    // Bad lines are reported with their line numbers and counted.
    assert!(
        stderr.contains("line 2: skipped (missing image)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("line 4: skipped (unknown relation)"),
        "{stderr}"
    );
    assert!(stdout.contains("lines done:        5"), "{stdout}");
    assert!(
        stdout.contains("kept lines:        3 (12 samples)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("skipped:           2 (missing image: 1, unknown relation: 1)"),
        "{stdout}"
    );
    let s = summary(&out, "0-of-1");
    assert_eq!(s["shards"], 3);
    assert_eq!(s["shards_written"], 3);
    assert_eq!(s["counts"]["samples"], 12);
    assert_eq!(s["counts"]["dropped_psnr"], 0);

    // Shard k holds lines [2k+1, 2k+2]; each kept line gives 2 prompts x 2 record steps, all
    // labelled with the line's true relation (above 0, below 1, to the left of 2).
    let expect = [(vec![1, 2], 2), (vec![3, 4], 0), (vec![5], 1)];
    let mut n_maps = 0;
    for (k, (lines, label)) in expect.iter().enumerate() {
        let f =
            SafetensorsFile::open(out.join(format!("shard-0-of-1-{k:05}.safetensors"))).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(meta_lines(&f), *lines);
        assert_eq!(meta["format"], "steer-collect");
        assert_eq!(meta["record_steps"], "[1,3]");
        assert_eq!(
            meta["classes"],
            r#"["above","below","to the left of","to the right of"]"#
        );
        let maps = f.tensor("maps").unwrap();
        assert_eq!(maps.dtype(), DType::F32);
        n_maps = maps.shape()[2];
        assert_eq!(maps.shape(), &[4, 2, n_maps, 16, 16]);
        assert_eq!(meta["n_maps"], n_maps.to_string());
        assert_eq!(ints(&f, "step"), vec![1, 3, 1, 3]);
        assert_eq!(ints(&f, "label"), vec![*label; 4]);
        assert_eq!(ints(&f, "prompt_kind"), vec![0, 0, 1, 1]);
        // Every sample names its image's manifest line (the one kept line of the block).
        assert_eq!(ints(&f, "line"), vec![lines[0] as i64; 4]);
        assert_eq!(meta["format_version"], "2");
        let psnr = f.tensor("psnr").unwrap().to_vec::<f32>().unwrap();
        assert!(psnr.iter().all(|p| p.is_finite()), "{psnr:?}");
        assert_eq!(psnr[0], psnr[1], "one PSNR per prompt");
        // Maps are renormalised to sum 1; the swapped prompt's differ from the true prompt's.
        let v = maps.to_vec::<f32>().unwrap();
        for m in v.chunks(256) {
            let sum: f32 = m.iter().sum();
            assert!((sum - 1.0).abs() < 1e-3, "map sum {sum}");
        }
        let per = 2 * n_maps * 256;
        assert_ne!(v[..per], v[2 * per..3 * per]);
    }
    assert!(n_maps > 0);

    // Resume: a second run finds every shard and leaves the files as they were.
    let read =
        |k: usize| std::fs::read(out.join(format!("shard-0-of-1-{k:05}.safetensors"))).unwrap();
    let before: Vec<Vec<u8>> = (0..3).map(read).collect();
    let (stdout, _) = ok(&collect(&manifest, &out, &args));
    assert!(
        stdout.contains("(0 written now, 3 from earlier runs)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("kept lines:        3 (12 samples)"),
        "{stdout}"
    );
    assert_eq!((0..3).map(read).collect::<Vec<_>>(), before);

    // A lost shard (a crash before its write) is redone, with the same content.
    let lost = out.join("shard-0-of-1-00001.safetensors");
    let old = SafetensorsFile::open(&lost).unwrap();
    let old_maps = old.tensor("maps").unwrap();
    let old_kind = ints(&old, "prompt_kind");
    drop(old);
    std::fs::remove_file(&lost).unwrap();
    let (stdout, _) = ok(&collect(&manifest, &out, &args));
    assert!(
        stdout.contains("(1 written now, 2 from earlier runs)"),
        "{stdout}"
    );
    let new = SafetensorsFile::open(&lost).unwrap();
    assert_eq!(
        new.tensor("maps").unwrap().to_vec::<f32>().unwrap(),
        old_maps.to_vec::<f32>().unwrap()
    );
    assert_eq!(ints(&new, "prompt_kind"), old_kind);
    assert_eq!(summary(&out, "0-of-1")["counts"]["samples"], 12);

    // Other settings in the same folder are refused, not mixed.
    let o = collect(
        &manifest,
        &out,
        &["--min-psnr=-inf", "--lines-per-shard", "2", "--seed", "4"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("seed = 3") && err.contains("4"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn psnr_filter_and_single_inversion() {
    let dir = scratch("filter");
    let manifest = manifest(&dir);

    // Nothing reconstructs to 200 dB: every good line is dropped (after its true prompt only).
    let out = dir.join("strict");
    let (stdout, stderr) = ok(&collect(&manifest, &out, &["--min-psnr", "200"]));
    assert!(
        stdout.contains("kept lines:        0 (0 samples)"),
        "{stdout}"
    );
    assert!(stdout.contains("dropped for PSNR:  3"), "{stdout}");
    assert!(
        stderr.contains("line 1: dropped: reconstruction PSNR"),
        "{stderr}"
    );
    let s = summary(&out, "0-of-1");
    assert_eq!(s["counts"]["dropped_psnr"], 3);
    assert_eq!(s["counts"]["skipped"]["missing image"], 1);
    let f = SafetensorsFile::open(out.join("shard-0-of-1-00000.safetensors")).unwrap();
    assert_eq!(f.tensor("maps").unwrap().shape()[0], 0);
    assert_eq!(meta_lines(&f), vec![1, 2, 3, 4, 5]);

    // Single inversion: one prompt per line, the true one; f16 maps.
    let out = dir.join("single");
    let (stdout, _) = ok(&collect(
        &manifest,
        &out,
        &["--min-psnr=-inf", "--single-inversion", "--f16"],
    ));
    assert!(
        stdout.contains("kept lines:        3 (6 samples)"),
        "{stdout}"
    );
    let f = SafetensorsFile::open(out.join("shard-0-of-1-00000.safetensors")).unwrap();
    let maps = f.tensor("maps").unwrap();
    assert_eq!(maps.dtype(), DType::F16);
    assert_eq!(maps.shape()[..2], [6, 2]);
    assert_eq!(ints(&f, "prompt_kind"), vec![0; 6]);
    assert_eq!(ints(&f, "label"), vec![2, 2, 0, 0, 1, 1]);
    assert_eq!(ints(&f, "step"), vec![1, 3, 1, 3, 1, 3]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn workers_split_the_manifest() {
    let dir = scratch("workers");
    let manifest = manifest(&dir);
    let out = dir.join("out");
    let mut lines = Vec::new();
    let mut samples = 0;
    for (worker, expect) in [("0/2", vec![1, 3, 5]), ("1/2", vec![2, 4])] {
        let args = ["--min-psnr=-inf", "--single-inversion", "--shard", worker];
        ok(&collect(&manifest, &out, &args));
        let tag = worker.replace('/', "-of-");
        let f = SafetensorsFile::open(out.join(format!("shard-{tag}-00000.safetensors"))).unwrap();
        assert_eq!(meta_lines(&f), expect);
        assert_eq!(f.metadata().unwrap()["worker"], worker);
        samples += f.tensor("step").unwrap().shape()[0];
        lines.extend(expect);
        let s = summary(&out, &tag);
        assert_eq!(s["counts"]["lines"], if worker == "0/2" { 3 } else { 2 });
    }
    lines.sort_unstable();
    assert_eq!(lines, vec![1, 2, 3, 4, 5]);
    assert_eq!(samples, 6);

    let o = collect(&manifest, &out, &["--shard", "2/2"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("2/2"));
    let _ = std::fs::remove_dir_all(&dir);
}
