//! The relation classifier against the reference implementation's own model
//! (tests/reference/classifier_fixtures.py: EnhancedRelationClassifier with SD2.1's config but
//! d_model 16, N = 6, random weights, converted by scripts/convert_classifier.py), a
//! finite-difference check of the backward, the error paths and `steer classify` end to end.
//!
//! Tolerances (relative to the reference's largest magnitude, `Tensor::rel_error`):
//! - float64 (our f64 path vs PyTorch float64 on the same widened float32 weights): logits 1e-12,
//!   maps_grad and parameter gradients 1e-10 (measured: about 1e-15 and 1e-14);
//! - float32 path vs PyTorch float64: logits 1e-5, maps_grad 1e-4 (PyTorch's own float32 is
//!   2.7e-7 and 5.3e-7 from its float64; ours is printed with --nocapture);
//! - finite differences in f64, central, step 1e-6: directional derivatives within 1e-6
//!   relative.

use std::path::PathBuf;
use std::process::Command;

use steer::rng::Rng;
use steer::safetensors_io::{save, SafetensorsFile};
use steer::steering::classifier::{
    bucket_step, ClassifierConfig, ExtractorConfig, HeadConfig, RelationClassifier, StepEmbedding,
};
use steer::steering::params::Params;
use steer::{DType, Tensor};

const MODEL: &str = "tests/fixtures/classifier-sd.safetensors";
const REFERENCE: &str = "tests/fixtures/classifier-reference.safetensors";

fn reference() -> SafetensorsFile {
    SafetensorsFile::open(REFERENCE).unwrap()
}

fn steps(r: &SafetensorsFile) -> Vec<usize> {
    r.tensor("steps")
        .unwrap()
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|s| s as usize)
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-classifier-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn loads_the_converted_checkpoint() {
    let m = RelationClassifier::load(MODEL).unwrap();
    assert_eq!(
        m.classes(),
        ["to the left of", "above", "to the right of", "below", "is"]
    );
    assert_eq!(m.class_index("below"), Some(3));
    assert_eq!(m.class_index("near"), None);
    assert_eq!(m.maps_per_word(), 6);
    assert_eq!(m.dtype(), DType::F32);
    let c = m.config();
    assert_eq!((c.d_model, c.map_size, c.num_timesteps), (16, 16, 50));
    assert_eq!(c.extractor.step_embedding, StepEmbedding::Mid);
    assert_eq!(
        (c.extractor.heads, c.extractor.layers, c.extractor.ff),
        (2, 2, 128)
    );
    assert_eq!((c.head.heads, c.head.layers, c.head.ff), (4, 2, 128));
    assert_eq!(c.head.step_embedding_dim, 16);
    // The buckets come from training_config.timesteps.
    assert_eq!(m.step_buckets(), [5, 10, 15, 20, 25, 49]);
    // PyTorch's named_parameters() order, as the fixture recorded it.
    let meta = reference().metadata().unwrap();
    let order: Vec<String> = serde_json::from_str(&meta["parameter_order"]).unwrap();
    let ours: Vec<&str> = m.params().names().collect();
    assert_eq!(ours, order);
}

#[test]
fn bucketing_follows_the_training_steps() {
    let m = RelationClassifier::load(MODEL).unwrap();
    let expect = |i: usize| match i {
        0..=5 => 5,
        6..=10 => 10,
        11..=15 => 15,
        16..=20 => 20,
        21..=25 => 25,
        _ => 49,
    };
    for i in 0..60 {
        assert_eq!(m.bucket_step(i), expect(i), "step {i}");
    }
    assert_eq!(bucket_step(&[1, 3], 0), 1);
    assert_eq!(bucket_step(&[1, 3], 2), 3);
    let mut m = m;
    m.set_step_buckets(vec![10, 20]).unwrap();
    assert_eq!(m.bucket_step(11), 20);
    assert!(m.set_step_buckets(vec![20, 10]).is_err());
    assert!(m.set_step_buckets(vec![5, 50]).is_err());
}

/// Our result in `dtype` against the reference fixture: (logits, maps_grad, worst param grad).
fn against_reference(dtype: DType) -> (f64, f64, f64) {
    let r = reference();
    let m = RelationClassifier::load(MODEL)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let maps = r.tensor("maps").unwrap().to_dtype(dtype).unwrap();
    let cot = r
        .tensor("logits_cotangent")
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let (logits, saved) = m.forward(&maps, &steps(&r), None).unwrap();
    let (dmaps, grads) = m.backward(&saved, &cot).unwrap();
    assert!(grads.same_layout(m.params()));
    let e_logits = logits.rel_error(&r.tensor("logits").unwrap()).unwrap();
    let e_maps = dmaps.rel_error(&r.tensor("maps_grad").unwrap()).unwrap();
    let mut e_grad = 0.0f64;
    for name in r.names() {
        if let Some(p) = name.strip_prefix("grad.") {
            let e = grads
                .get(p)
                .unwrap()
                .rel_error(&r.tensor(&name).unwrap())
                .unwrap();
            println!("  {dtype:?} grad {p}: {e:.2e}");
            e_grad = e_grad.max(e);
        }
    }
    // Every parameter's gradient: its L2 norm and its sum.
    let l2: Vec<f64> = r.tensor("grad_l2").unwrap().to_vec().unwrap();
    let sums: Vec<f64> = r.tensor("grad_sum").unwrap().to_vec().unwrap();
    assert_eq!(l2.len(), grads.len());
    for (i, (name, g)) in grads.iter().enumerate() {
        let v: Vec<f64> = g.to_vec().unwrap();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let sum: f64 = v.iter().sum();
        let e =
            ((norm - l2[i]).abs() / l2[i].max(1e-30)).max((sum - sums[i]).abs() / l2[i].max(1e-30));
        assert!(
            e < if dtype == DType::F64 { 1e-10 } else { 1e-3 },
            "{name}: {e:.2e}"
        );
        e_grad = e_grad.max(e);
    }
    println!("{dtype:?}: logits {e_logits:.2e}, maps_grad {e_maps:.2e}, param grads {e_grad:.2e}");
    (e_logits, e_maps, e_grad)
}

#[test]
fn matches_reference_in_f64() {
    let (l, g, p) = against_reference(DType::F64);
    assert!(l < 1e-12, "logits {l:.2e}");
    assert!(g < 1e-10, "maps_grad {g:.2e}");
    assert!(p < 1e-10, "param grads {p:.2e}");
}

#[test]
fn matches_reference_in_f32() {
    let (l, g, p) = against_reference(DType::F32);
    assert!(l < 1e-5, "logits {l:.2e}");
    assert!(g < 1e-4, "maps_grad {g:.2e}");
    assert!(p < 1e-3, "param grads {p:.2e}");
    // And against PyTorch's own float32 run.
    let r = reference();
    let m = RelationClassifier::load(MODEL).unwrap();
    let maps = r.tensor("maps").unwrap().to_dtype(DType::F32).unwrap();
    let (logits, saved) = m.forward(&maps, &steps(&r), None).unwrap();
    let cot = r.tensor("logits_cotangent").unwrap();
    let dmaps = m
        .input_grad(&saved, &cot.to_dtype(DType::F32).unwrap())
        .unwrap();
    let e1 = logits.rel_error(&r.tensor("logits_f32").unwrap()).unwrap();
    let e2 = dmaps
        .rel_error(&r.tensor("maps_grad_f32").unwrap())
        .unwrap();
    println!("F32 vs PyTorch float32: logits {e1:.2e}, maps_grad {e2:.2e}");
    assert!(e1 < 1e-5 && e2 < 1e-4);
}

#[test]
fn input_grad_equals_full_backward() {
    let r = reference();
    let m = RelationClassifier::load(MODEL).unwrap();
    let maps = r.tensor("maps").unwrap().to_dtype(DType::F32).unwrap();
    let cot = r
        .tensor("logits_cotangent")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (_, saved) = m.forward(&maps, &steps(&r), None).unwrap();
    let a = m.input_grad(&saved, &cot).unwrap();
    let (b, _) = m.backward(&saved, &cot).unwrap();
    assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
}

#[test]
fn batched_equals_one_at_a_time() {
    let r = reference();
    let m = RelationClassifier::load(MODEL)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let maps = r.tensor("maps").unwrap();
    let st = steps(&r);
    let (all, _) = m.forward(&maps, &st, None).unwrap();
    let all: Vec<f64> = all.to_vec().unwrap();
    let per = maps.numel() / 3;
    let mv: Vec<f64> = maps.to_vec().unwrap();
    for i in 0..3 {
        let one =
            Tensor::from_vec(mv[i * per..(i + 1) * per].to_vec(), &[1, 2, 6, 16, 16]).unwrap();
        let (l, _) = m.forward(&one, &st[i..i + 1], None).unwrap();
        let l: Vec<f64> = l.to_vec().unwrap();
        for (a, b) in l.iter().zip(&all[i * 5..(i + 1) * 5]) {
            assert!((a - b).abs() < 1e-12, "sample {i}: {a} vs {b}");
        }
    }
}

/// A small config for the finite-difference checks (every code path: mid step embedding, packed
/// attention, pooling heads, head layers, the fc head with its step embedding).
fn small_config(mode: StepEmbedding, head_te: usize) -> ClassifierConfig {
    ClassifierConfig {
        maps_per_word: 3,
        map_size: 4,
        d_model: 8,
        num_timesteps: 7,
        extractor: ExtractorConfig {
            heads: 2,
            layers: 2,
            ff: 12,
            pool_heads: 2,
            dropout: 0.3,
            step_embedding: mode,
        },
        head: HeadConfig {
            heads: 2,
            layers: 2,
            ff: 10,
            dropout: 0.3,
            step_embedding_dim: head_te,
        },
        classes: vec!["a".into(), "b".into(), "c".into()],
        step_buckets: vec![2, 6],
        input_scale: 1.0,
    }
}

/// A random f64 classifier: PyTorch's init, then every parameter perturbed (so biases and
/// LayerNorms are not 0 and 1).
fn random_model(config: ClassifierConfig, seed: u64) -> RelationClassifier {
    let mut m = RelationClassifier::init(config, seed)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let mut rng = Rng::new(seed + 1);
    for (_, t) in m.params_mut().iter_mut() {
        let mut v: Vec<f64> = t.to_vec().unwrap();
        v.iter_mut().for_each(|x| *x += 0.3 * rng.normal());
        *t = Tensor::from_vec(v, t.shape()).unwrap();
    }
    m
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b): (Vec<f64>, Vec<f64>) = (a.to_vec().unwrap(), b.to_vec().unwrap());
    a.iter().zip(&b).map(|(x, y)| x * y).sum()
}

fn axpy(x: &Tensor, a: f64, d: &Tensor) -> Tensor {
    let (xv, dv): (Vec<f64>, Vec<f64>) = (x.to_vec().unwrap(), d.to_vec().unwrap());
    Tensor::from_vec(
        xv.iter()
            .zip(&dv)
            .map(|(x, d)| x + a * d)
            .collect::<Vec<_>>(),
        x.shape(),
    )
    .unwrap()
}

/// Directional finite differences of f = sum(logits * cot) along a random direction for the
/// maps and for every parameter, against the backward. `train_seed`: dropout with a fixed mask.
fn finite_differences(mut m: RelationClassifier, train_seed: Option<u64>) -> f64 {
    let b = 2;
    let st = [1usize, 6];
    let maps = Tensor::rand_uniform(&[b, 2, 3, 4, 4], 0.0, 1.0, DType::F64, 11);
    let cot = Tensor::randn(&[b, 3], DType::F64, 12);
    let f = |m: &RelationClassifier, maps: &Tensor| -> f64 {
        let mut rng = train_seed.map(Rng::new);
        let (l, _) = m.forward(maps, &st, rng.as_mut()).unwrap();
        dot(&l, &cot)
    };
    let mut rng = train_seed.map(Rng::new);
    let (_, saved) = m.forward(&maps, &st, rng.as_mut()).unwrap();
    let (dmaps, grads) = m.backward(&saved, &cot).unwrap();
    let eps = 1e-6;
    let mut worst = 0.0f64;
    let mut check = |what: &str, analytic: f64, numeric: f64| {
        let e = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-3);
        assert!(
            e < 1e-6,
            "{what}: analytic {analytic:.10e} vs numeric {numeric:.10e} ({e:.2e})"
        );
        worst = worst.max(e);
    };
    let dir = Tensor::randn(maps.shape(), DType::F64, 13);
    let numeric = (f(&m, &axpy(&maps, eps, &dir)) - f(&m, &axpy(&maps, -eps, &dir))) / (2.0 * eps);
    check("maps", dot(&dmaps, &dir), numeric);
    let names: Vec<String> = m.params().names().map(String::from).collect();
    for (i, name) in names.iter().enumerate() {
        let p = m.params().get(name).unwrap().clone();
        let dir = Tensor::randn(p.shape(), DType::F64, 100 + i as u64);
        *m.params_mut().get_mut(name).unwrap() = axpy(&p, eps, &dir);
        let up = f(&m, &maps);
        *m.params_mut().get_mut(name).unwrap() = axpy(&p, -eps, &dir);
        let down = f(&m, &maps);
        *m.params_mut().get_mut(name).unwrap() = p;
        let analytic = dot(grads.get(name).unwrap(), &dir);
        check(name, analytic, (up - down) / (2.0 * eps));
    }
    worst
}

#[test]
fn finite_differences_eval() {
    let e = finite_differences(random_model(small_config(StepEmbedding::Mid, 3), 1), None);
    println!("finite differences (eval, mid): worst {e:.2e}");
}

#[test]
fn finite_differences_train_dropout() {
    let e = finite_differences(
        random_model(small_config(StepEmbedding::Mid, 3), 2),
        Some(77),
    );
    println!("finite differences (train, fixed dropout masks): worst {e:.2e}");
}

#[test]
fn input_scale_scales_the_maps_and_their_gradient() {
    // The gradient to the maps includes the scale (finite differences), and a config's
    // input_scale survives the checkpoint's JSON.
    let mut config = small_config(StepEmbedding::Mid, 3);
    config.input_scale = 4.0;
    let json = config.to_reference_json();
    assert_eq!(json["input_scale"], 4.0);
    let buckets = serde_json::json!({ "timesteps": config.step_buckets });
    let back =
        ClassifierConfig::from_reference(&json, 3, config.classes.clone(), Some(&buckets)).unwrap();
    assert_eq!(back.input_scale, 4.0);
    assert!(small_config(StepEmbedding::Mid, 3)
        .to_reference_json()
        .get("input_scale")
        .is_none());
    let e = finite_differences(random_model(config, 6), None);
    println!("finite differences (input_scale 4): worst {e:.2e}");
}

#[test]
fn finite_differences_other_variants() {
    let e1 = finite_differences(random_model(small_config(StepEmbedding::Pre, 0), 3), None);
    let e2 = finite_differences(
        random_model(small_config(StepEmbedding::Off, 5), 4),
        Some(5),
    );
    println!("finite differences (pre, no head embedding): {e1:.2e}; (off, train): {e2:.2e}");
}

#[test]
fn dropout_only_in_training() {
    let m = RelationClassifier::load(MODEL).unwrap();
    let r = reference();
    let maps = r.tensor("maps").unwrap().to_dtype(DType::F32).unwrap();
    let st = steps(&r);
    let eval: Vec<f32> = m.forward(&maps, &st, None).unwrap().0.to_vec().unwrap();
    let eval2: Vec<f32> = m.forward(&maps, &st, None).unwrap().0.to_vec().unwrap();
    assert_eq!(eval, eval2);
    let t1: Vec<f32> = m
        .forward(&maps, &st, Some(&mut Rng::new(3)))
        .unwrap()
        .0
        .to_vec()
        .unwrap();
    let t2: Vec<f32> = m
        .forward(&maps, &st, Some(&mut Rng::new(3)))
        .unwrap()
        .0
        .to_vec()
        .unwrap();
    let t3: Vec<f32> = m
        .forward(&maps, &st, Some(&mut Rng::new(4)))
        .unwrap()
        .0
        .to_vec()
        .unwrap();
    assert_eq!(t1, t2, "same generator state, same masks");
    assert_ne!(t1, eval);
    assert_ne!(t1, t3);
}

#[test]
fn init_sizes_and_layers() {
    let classes: Vec<String> = ["above", "below", "to the left of", "to the right of", "is"]
        .map(String::from)
        .to_vec();
    let sd = RelationClassifier::init(ClassifierConfig::sd2(195, classes.clone()), 0).unwrap();
    let flux = RelationClassifier::init(ClassifierConfig::flux(1368, classes), 0).unwrap();
    let (n_sd, n_flux) = (sd.params().numel(), flux.params().numel());
    println!("parameters: SD2.1 {n_sd}, FLUX {n_flux}");
    assert!((1_900_000..2_200_000).contains(&n_sd), "{n_sd}");
    assert!((4_700_000..5_100_000).contains(&n_flux), "{n_flux}");
    // As PyTorch's TransformerEncoder: every layer starts as a copy of layer 0.
    let p = sd.params();
    let a: Vec<f32> = p
        .get("object_extractor.transformer.layers.0.linear1.weight")
        .unwrap()
        .to_vec()
        .unwrap();
    let b: Vec<f32> = p
        .get("object_extractor.transformer.layers.1.linear1.weight")
        .unwrap()
        .to_vec()
        .unwrap();
    assert_eq!(a, b);
    // A forward runs on SD-sized maps.
    let maps = Tensor::rand_uniform(&[1, 2, 195, 16, 16], 0.0, 0.01, DType::F32, 0);
    let (logits, _) = sd.forward(&maps, &[sd.bucket_step(3)], None).unwrap();
    assert_eq!(logits.shape(), [1, 5]);
}

#[test]
fn save_and_load_round_trip() {
    let m = RelationClassifier::load(MODEL).unwrap();
    let path = scratch("roundtrip.safetensors");
    m.save(&path).unwrap();
    let m2 = RelationClassifier::load(&path).unwrap();
    assert_eq!(m2.classes(), m.classes());
    assert_eq!(m2.config(), m.config());
    let r = reference();
    let maps = r.tensor("maps").unwrap().to_dtype(DType::F32).unwrap();
    let a: Vec<f32> = m
        .forward(&maps, &steps(&r), None)
        .unwrap()
        .0
        .to_vec()
        .unwrap();
    let b: Vec<f32> = m2
        .forward(&maps, &steps(&r), None)
        .unwrap()
        .0
        .to_vec()
        .unwrap();
    assert_eq!(a, b);
    // A freshly initialised model too (its config written by us).
    let fresh = RelationClassifier::init(small_config(StepEmbedding::Mid, 3), 9).unwrap();
    fresh.save(&path).unwrap();
    let back = RelationClassifier::load(&path).unwrap();
    assert_eq!(back.config(), fresh.config());
    assert!(back.params().same_layout(fresh.params()));
}

#[test]
fn wrong_number_of_maps_is_refused() {
    let m = RelationClassifier::load(MODEL).unwrap();
    let maps = Tensor::rand_uniform(&[1, 2, 195, 16, 16], 0.0, 1.0, DType::F32, 0);
    let msg = m.forward(&maps, &[5], None).err().unwrap().to_string();
    assert!(msg.contains("N = 6") && msg.contains("195"), "{msg}");
    let maps = Tensor::rand_uniform(&[1, 2, 6, 16, 16], 0.0, 1.0, DType::F32, 0);
    let msg = m.forward(&maps, &[50], None).err().unwrap().to_string();
    assert!(msg.contains("50"), "{msg}");
    assert!(m.forward(&maps, &[5, 5], None).is_err());
}

#[test]
fn bad_files_are_refused() {
    let garbage = scratch("garbage.safetensors");
    std::fs::write(&garbage, b"not a safetensors file").unwrap();
    let msg = RelationClassifier::load(&garbage)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("garbage.safetensors"), "{msg}");

    let missing = RelationClassifier::load(scratch("nope.safetensors"));
    assert!(missing.is_err());

    // Valid safetensors, no classifier metadata.
    let plain = scratch("plain.safetensors");
    let t = Tensor::zeros(&[2], DType::F32);
    save(&plain, &[("x", &t)], None).unwrap();
    let msg = RelationClassifier::load(&plain).err().unwrap().to_string();
    assert!(msg.contains("convert_classifier"), "{msg}");

    // The real file with one tensor left out.
    let src = SafetensorsFile::open(MODEL).unwrap();
    let meta = src.metadata().unwrap();
    let drop = "relation_classifier.fc.4.weight";
    let kept: Vec<(String, Tensor)> = src
        .names()
        .into_iter()
        .filter(|n| n != drop)
        .map(|n| {
            let t = src.tensor(&n).unwrap();
            (n, t)
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = kept.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let cut = scratch("cut.safetensors");
    save(&cut, &refs, Some(meta.clone())).unwrap();
    let msg = RelationClassifier::load(&cut).err().unwrap().to_string();
    assert!(msg.contains(drop), "{msg}");

    // Metadata saying N = 7 while the tensors are for N = 6.
    let mut meta7 = meta;
    meta7.insert("input_channels".into(), "7".into());
    let refs: Vec<(String, Tensor)> = src
        .names()
        .into_iter()
        .map(|n| {
            let t = src.tensor(&n).unwrap();
            (n, t)
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = refs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let wrong = scratch("wrong-n.safetensors");
    save(&wrong, &refs, Some(meta7)).unwrap();
    let msg = RelationClassifier::load(&wrong).err().unwrap().to_string();
    assert!(msg.contains("positional_encoding"), "{msg}");
}

#[test]
fn params_map_behaves() {
    let mut p = Params::new();
    p.insert("b", Tensor::zeros(&[2], DType::F32));
    p.insert("a", Tensor::zeros(&[3], DType::F32));
    p.insert("b", Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap());
    assert_eq!(p.names().collect::<Vec<_>>(), ["b", "a"]);
    p.accumulate("b", &Tensor::from_vec(vec![1.0f32, 1.0], &[2]).unwrap())
        .unwrap();
    assert_eq!(p.get("b").unwrap().to_vec::<f32>().unwrap(), [2.0, 3.0]);
    assert!(p.accumulate("c", &Tensor::zeros(&[1], DType::F32)).is_err());
    assert!(p.accumulate("a", &Tensor::zeros(&[2], DType::F32)).is_err());
    let z = p.zeros_like();
    assert!(z.same_layout(&p));
    assert_eq!(p.numel(), 5);
    assert!(p.all_finite().unwrap());
}

#[test]
fn cli_classify_end_to_end() {
    let r = reference();
    let inputs = scratch("classify-in.safetensors");
    let out = scratch("classify-out.safetensors");
    let maps = r.tensor("maps").unwrap().to_dtype(DType::F32).unwrap();
    let step = r.tensor("steps").unwrap();
    let cot = r
        .tensor("logits_cotangent")
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    save(
        &inputs,
        &[("maps", &maps), ("step", &step), ("logits_cotangent", &cot)],
        None,
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(["classify", "--classifier", MODEL, "--inputs"])
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let res = SafetensorsFile::open(&out).unwrap();
    let e1 = res
        .tensor("logits")
        .unwrap()
        .rel_error(&r.tensor("logits").unwrap())
        .unwrap();
    let e2 = res
        .tensor("maps_grad")
        .unwrap()
        .rel_error(&r.tensor("maps_grad").unwrap())
        .unwrap();
    println!("steer classify: logits {e1:.2e}, maps_grad {e2:.2e}");
    assert!(e1 < 1e-5 && e2 < 1e-4);

    // N mismatch from the command line: refused, naming both numbers.
    let bad = Tensor::rand_uniform(&[1, 2, 5, 16, 16], 0.0, 1.0, DType::F32, 0);
    let one = Tensor::from_vec(vec![5i64], &[1]).unwrap();
    save(&inputs, &[("maps", &bad), ("step", &one)], None).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(["classify", "--classifier", MODEL, "--inputs"])
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("N = 6") && err.contains('5'),
        "{err}"
    );

    let help = Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(["classify", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("passed") && help.contains("bucket"), "{help}");
}
