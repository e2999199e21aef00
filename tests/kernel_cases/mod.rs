//! The kernel checks, written once and run on two targets: the host emulation of the kernels
//! (tests/kernels_emulated.rs, every CI run) and a real GPU (tests/cuda.rs, the device check).
//! Each compares a kernel with the CPU backend, the numerical reference, on random inputs.
//!
//! Tolerances (Tensor::rel_error: max abs difference over max abs reference):
//! - latent_update: 0, bit for bit (the kernel rounds after the multiply and the subtract, as the
//!   CPU does).
//! - attention outputs and gradients: 1e-2. The kernels take bf16 inputs (the reference sees the
//!   same bf16 values in f32), round P and dS to bf16 for the tensor cores and store bf16 results:
//!   several roundings of 2^-9 relative each; measured about 3e-3.
//! - pointwise ops, norms, linear and conv2d: 1e-2 (bf16 inputs as above, f32 arithmetic, one
//!   rounding of the output to bf16: 2^-9 of each element).
//! - data movement (permute, concat, split, upsample): 0, exact copies.
//! - the tiny SD2.1 UNet against diffusers (f32): see `unet_forward_matches_diffusers_in_bf16`.
//! - map resizing and renormalisation (f32 in, f32 out): 1e-5. The kernels compute the bilinear
//!   weights in f32 (the CPU in f64) and sum in another order: a few f32 roundings.
//! - maps: 1e-4. They are f32 exps of f32 dot products of the bf16 inputs, as on the CPU; only the
//!   summation order differs (measured about 2e-7).

use steer::models::autoencoder::AutoencoderKL;
use steer::models::clip_text::CLIPTextModel;
use steer::models::unet::UNet2DConditionModel;
use steer::ops::{self, Activation, Capture, Conv2dParams};
use steer::pipelines::{GenerateRequest, StableDiffusion};
use steer::safetensors_io::SafetensorsFile;
use steer::steering::capture::{assemble, assemble_backward, NativeMaps};
use steer::steering::classifier::RelationClassifier;
use steer::steering::unet_maps::unet_with_maps;
use steer::weights::Placement;
use steer::{cuda::emulated, DType, Tensor};

/// Where the kernels run: the GPU (tensors moved there; ops dispatch on their storage) or the
/// host emulation (host tensors; ops run inside `emulated::run`).
pub struct Target {
    pub name: &'static str,
    pub place: Box<dyn Fn(&Tensor) -> Tensor>,
    pub emulate: bool,
    /// Where a model's weights go for this target (bf16, on the GPU or the host).
    pub placement: Placement,
}

impl Target {
    /// Runs `f`, whose ops take this target's tensors, on the kernels.
    pub fn on<R>(&self, f: impl FnOnce() -> R) -> R {
        if self.emulate {
            emulated::run(f)
        } else {
            f()
        }
    }
}

const OUT_TOL: f64 = 1e-2;
const MAP_TOL: f64 = 1e-4;
const RESIZE_TOL: f64 = 1e-5;
/// The tiny SD2.1 UNet's maps and latent gradient computed in bf16, against diffusers in f32:
/// PyTorch's own bf16 run of the same computation (diffusers 0.42.1, torch 2.15, CPU, the
/// fixture script's capture processor) is 6.4e-2 and 1.19e-1 away, since the random-weight model
/// amplifies rounding; we allow twice that.
const MODEL_MAPS_TOL: f64 = 0.13;
const MODEL_GRAD_TOL: f64 = 0.24;

/// bf16 random values (on the target) and the same values in f32 (on the host, for the CPU).
fn bf16_pair(t: &Target, shape: &[usize], seed: u64) -> (Tensor, Tensor) {
    let x = Tensor::randn(shape, DType::BF16, seed);
    ((t.place)(&x), x.to_dtype(DType::F32).expect("bf16 to f32"))
}

/// The tiny SD2.1 models' PyTorch reference (tests/reference/sd21_fixtures.py).
const TINY_REFERENCE: &str = "tests/fixtures/tiny-sd21-reference.safetensors";

/// A fixture tensor as f32.
fn f32_tensor(file: &SafetensorsFile, name: &str) -> Tensor {
    file.tensor(name).unwrap().to_dtype(DType::F32).unwrap()
}

fn f32_host(x: &Tensor) -> Tensor {
    x.to_host()
        .and_then(|h| h.to_dtype(DType::F32))
        .expect("download")
}

struct Case {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    d: usize,
    dv: usize,
    capture: Option<Capture>,
}

/// Shapes that exercise the tiling edges (rows past a 64-row block, keys past a 32-key tile,
/// head dims below, between and at the fragment sizes up to the 128 maximum) and both capture
/// modes: the maps as the full softmax (SD2.1), and as a softmax over a column range (FLUX).
fn cases() -> Vec<Case> {
    let words = |w: Vec<Vec<usize>>, cols: Option<std::ops::Range<usize>>| {
        Some(Capture {
            words: w,
            softmax_cols: cols,
        })
    };
    vec![
        // Head dims off the 8-element vector loads.
        Case {
            b: 1,
            h: 1,
            lq: 16,
            lk: 16,
            d: 12,
            dv: 20,
            capture: None,
        },
        // A word of two tokens, a column shared by two words, odd sizes and Dv != D.
        Case {
            b: 2,
            h: 3,
            lq: 70,
            lk: 45,
            d: 24,
            dv: 40,
            capture: words(vec![vec![5], vec![7, 8], vec![8]], None),
        },
        // SD2.1 cross-attention: 77 text keys, head dim 64.
        Case {
            b: 1,
            h: 2,
            lq: 130,
            lk: 77,
            d: 64,
            dv: 64,
            capture: words(vec![vec![2, 3], vec![6]], None),
        },
        // FLUX-style joint attention: maps over the first 30 (text) keys only; head dim 128.
        Case {
            b: 1,
            h: 1,
            lq: 40,
            lk: 100,
            d: 128,
            dv: 128,
            capture: words(vec![vec![4], vec![9, 10]], Some(0..30)),
        },
        // More than two key tiles (the forward's double buffers are reused), a map range that
        // starts past 0 and ends mid-tile, head dim 24.
        Case {
            b: 1,
            h: 2,
            lq: 40,
            lk: 200,
            d: 24,
            dv: 24,
            capture: words(vec![vec![30], vec![70, 71]], Some(20..150)),
        },
        // ShapesWorld self-attention: head dim 8.
        Case {
            b: 2,
            h: 4,
            lq: 96,
            lk: 96,
            d: 8,
            dv: 8,
            capture: None,
        },
    ]
}

pub fn attention_forward_matches_cpu(t: &Target) {
    for (i, c) in cases().into_iter().enumerate() {
        let seed = 100 * i as u64;
        let (q, q32) = bf16_pair(t, &[c.b, c.h, c.lq, c.d], seed);
        let (k, k32) = bf16_pair(t, &[c.b, c.h, c.lk, c.d], seed + 1);
        let (v, v32) = bf16_pair(t, &[c.b, c.h, c.lk, c.dv], seed + 2);
        let scale = 1.0 / (c.d as f64).sqrt();
        let got = t
            .on(|| ops::attention(&q, &k, &v, scale, c.capture.as_ref()))
            .unwrap_or_else(|e| panic!("{}: case {i}: {e}", t.name));
        let want = ops::attention(&q32, &k32, &v32, scale, c.capture.as_ref()).unwrap();
        assert_eq!(got.out.dtype(), DType::BF16);
        let err = f32_host(&got.out).rel_error(&want.out).unwrap();
        eprintln!("{}: case {i}: out rel error {err:.2e}", t.name);
        assert!(err < OUT_TOL, "{}: case {i}: out rel error {err}", t.name);
        match (got.maps, want.maps) {
            (Some(g), Some(w)) => {
                let err = f32_host(&g).rel_error(&w).unwrap();
                eprintln!("{}: case {i}: maps rel error {err:.2e}", t.name);
                assert!(err < MAP_TOL, "{}: case {i}: maps rel error {err}", t.name);
            }
            (None, None) => {}
            _ => panic!("{}: case {i}: maps present on one side only", t.name),
        }
    }
}

pub fn attention_backward_matches_cpu(t: &Target) {
    for (i, c) in cases().into_iter().enumerate() {
        let seed = 100 * i as u64 + 50;
        let (q, q32) = bf16_pair(t, &[c.b, c.h, c.lq, c.d], seed);
        let (k, k32) = bf16_pair(t, &[c.b, c.h, c.lk, c.d], seed + 1);
        let (v, v32) = bf16_pair(t, &[c.b, c.h, c.lk, c.dv], seed + 2);
        let (dout, dout32) = bf16_pair(t, &[c.b, c.h, c.lq, c.dv], seed + 3);
        let dmaps32 = c
            .capture
            .as_ref()
            .map(|cap| Tensor::randn(&[c.b, cap.words.len(), c.h, c.lq], DType::F32, seed + 4));
        let dmaps = dmaps32.as_ref().map(|m| (t.place)(m));
        let scale = 1.0 / (c.d as f64).sqrt();
        // Case 0 also checks the dQ-only path (cross-attention from frozen text).
        let kv_grads = i != 0;
        let got = t
            .on(|| {
                ops::attention_backward(
                    &q,
                    &k,
                    &v,
                    scale,
                    &dout,
                    c.capture.as_ref().zip(dmaps.as_ref()),
                    kv_grads,
                )
            })
            .unwrap_or_else(|e| panic!("{}: case {i}: {e}", t.name));
        let want = ops::attention_backward(
            &q32,
            &k32,
            &v32,
            scale,
            &dout32,
            c.capture.as_ref().zip(dmaps32.as_ref()),
            kv_grads,
        )
        .unwrap();
        let mut pairs = vec![("dq", got.dq, want.dq)];
        if kv_grads {
            pairs.push(("dk", got.dk.expect("dk"), want.dk.unwrap()));
            pairs.push(("dv", got.dv.expect("dv"), want.dv.unwrap()));
        } else {
            assert!(got.dk.is_none() && got.dv.is_none());
        }
        for (name, g, w) in pairs {
            let err = f32_host(&g).rel_error(&w).unwrap();
            eprintln!("{}: case {i}: {name} rel error {err:.2e}", t.name);
            assert!(
                err < OUT_TOL,
                "{}: case {i}: {name} rel error {err}",
                t.name
            );
        }
    }
}

/// The maps' gradient alone must move dQ: a kernel that dropped the injection would still pass
/// the checks above only if the output term dominated, so this one has dout = 0.
pub fn attention_map_gradient_alone_matches_cpu(t: &Target) {
    let (b, h, lq, lk, d) = (1, 2, 50, 77, 64);
    let (q, q32) = bf16_pair(t, &[b, h, lq, d], 7);
    let (k, k32) = bf16_pair(t, &[b, h, lk, d], 8);
    let (v, v32) = bf16_pair(t, &[b, h, lk, d], 9);
    let zeros = Tensor::zeros(&[b, h, lq, d], DType::BF16);
    let cap = Capture {
        words: vec![vec![1, 2], vec![5]],
        softmax_cols: None,
    };
    let dmaps32 = Tensor::randn(&[b, 2, h, lq], DType::F32, 10);
    let (dout, dmaps) = ((t.place)(&zeros), (t.place)(&dmaps32));
    let got = t
        .on(|| ops::attention_backward(&q, &k, &v, 0.125, &dout, Some((&cap, &dmaps)), true))
        .unwrap();
    let want = ops::attention_backward(
        &q32,
        &k32,
        &v32,
        0.125,
        &zeros.to_dtype(DType::F32).unwrap(),
        Some((&cap, &dmaps32)),
        true,
    )
    .unwrap();
    for (name, g, w) in [
        ("dq", got.dq, want.dq),
        ("dk", got.dk.unwrap(), want.dk.unwrap()),
        ("dv", got.dv.unwrap(), want.dv.unwrap()),
    ] {
        let w_max = w
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .fold(0f32, |m, x| m.max(x.abs()));
        let err = f32_host(&g).rel_error(&w).unwrap();
        eprintln!(
            "{}: maps only: {name} rel error {err:.2e} (max |ref| {w_max:.2e})",
            t.name
        );
        if name == "dv" {
            // dV = P^T dO does not see the maps: exactly zero on both sides.
            assert_eq!(w_max, 0.0);
            assert!(f32_host(&g)
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .all(|&x| x == 0.0));
        } else {
            assert!(w_max > 0.0);
            assert!(
                err < OUT_TOL,
                "{}: maps only: {name} rel error {err}",
                t.name
            );
        }
    }
}

pub fn attention_rejects_bad_input(t: &Target) {
    let x = |shape: &[usize], dtype| (t.place)(&Tensor::randn(shape, dtype, 1));
    let (q, k) = (
        x(&[1, 1, 8, 136], DType::BF16),
        x(&[1, 1, 8, 136], DType::BF16),
    );
    // Past the fused kernel's head dims only the plain forward runs (the explicit path).
    let cap = Capture {
        words: vec![vec![1]],
        softmax_cols: None,
    };
    let msg = t
        .on(|| ops::attention(&q, &k, &k, 0.1, Some(&cap)))
        .err()
        .expect("head dim 136 with capture")
        .to_string();
    assert!(msg.contains("at most 128"), "{msg}");
    let msg = t
        .on(|| ops::attention_causal(&q, &k, &k, 0.1))
        .expect_err("head dim 136, causal")
        .to_string();
    assert!(msg.contains("at most 128"), "{msg}");
    let k9 = x(&[1, 1, 9, 16], DType::BF16);
    let q8 = x(&[1, 1, 8, 16], DType::BF16);
    let msg = t
        .on(|| ops::attention_causal(&q8, &k9, &k9, 0.1))
        .expect_err("causal with Lq != Lk")
        .to_string();
    assert!(msg.contains("Lq == Lk"), "{msg}");
    // f32 on a GPU is refused; under emulation f32 host tensors run the CPU backend, as beside a
    // GPU.
    if !t.emulate {
        let q = x(&[1, 1, 8, 16], DType::F32);
        let msg = t
            .on(|| ops::attention(&q, &q, &q, 0.1, None))
            .err()
            .expect("f32")
            .to_string();
        assert!(msg.contains("bf16"), "{msg}");
    }
    let q = x(&[1, 1, 8, 16], DType::BF16);
    let cap = Capture {
        words: vec![vec![9]],
        softmax_cols: None,
    };
    let msg = t
        .on(|| ops::attention(&q, &q, &q, 0.1, Some(&cap)))
        .err()
        .expect("column 9 of 8")
        .to_string();
    assert!(msg.contains("token index 9"), "{msg}");
}

/// The causal forward (CLIP's text encoder: one tile, and several tiles so that whole key tiles
/// are skipped) and the explicit path for head dims past 128 (the VAE's one wide head), against
/// the CPU. Tolerance 1e-2 as for the fused kernel: the explicit path also rounds S to bf16,
/// 2^-9 |S| scale (about 4e-3 here) in each logit.
pub fn attention_variants_match_cpu(t: &Target) {
    for (i, (h, l, d)) in [(2, 77, 64), (1, 150, 40)].into_iter().enumerate() {
        let seed = 10 * i as u64;
        let (q, q32) = bf16_pair(t, &[1, h, l, d], seed);
        let (k, k32) = bf16_pair(t, &[1, h, l, d], seed + 1);
        let (v, v32) = bf16_pair(t, &[1, h, l, d], seed + 2);
        let scale = 1.0 / (d as f64).sqrt();
        let got = t.on(|| ops::attention_causal(&q, &k, &v, scale)).unwrap();
        let want = ops::attention_causal(&q32, &k32, &v32, scale).unwrap();
        compare(t, &format!("causal attention L {l}"), &got, &want, OUT_TOL);
    }
    let (q, q32) = bf16_pair(t, &[2, 1, 70, 160], 30);
    let (k, k32) = bf16_pair(t, &[2, 1, 45, 160], 31);
    let (v, v32) = bf16_pair(t, &[2, 1, 45, 144], 32);
    let scale = 1.0 / 160f64.sqrt();
    let got = t
        .on(|| ops::attention(&q, &k, &v, scale, None))
        .unwrap()
        .out;
    let want = ops::attention(&q32, &k32, &v32, scale, None).unwrap().out;
    compare(
        t,
        "attention, head dims 160/144 (explicit)",
        &got,
        &want,
        OUT_TOL,
    );
}

pub fn latent_update_matches_cpu_bit_for_bit(t: &Target) {
    // Sizes around the block size, and past the grid cap (4096 blocks of 256) for the grid-stride
    // loop.
    for (i, &n) in [1usize, 255, 257, 4 * 64 * 64, 4096 * 256 + 3]
        .iter()
        .enumerate()
    {
        let z = Tensor::randn(&[n], DType::F32, 10 + i as u64);
        let g = Tensor::randn(&[n], DType::F32, 20 + i as u64);
        let mut cpu = z.clone();
        assert!(ops::latent_update(&mut cpu, &g, 0.37).unwrap());
        let mut got = (t.place)(&z);
        assert!(t
            .on(|| ops::latent_update(&mut got, &(t.place)(&g), 0.37))
            .unwrap());
        let got = got.to_host().unwrap();
        assert_eq!(
            got.host("test").unwrap().as_bytes(),
            cpu.host("test").unwrap().as_bytes(),
            "{}: n = {n}",
            t.name
        );
    }
}

pub fn latent_update_skips_non_finite_gradient(t: &Target) {
    for bad in [f32::NAN, f32::INFINITY] {
        let z = Tensor::randn(&[5000], DType::F32, 1);
        let mut g: Vec<f32> = Tensor::randn(&[5000], DType::F32, 2).to_vec().unwrap();
        g[4999] = bad;
        let g = Tensor::from_vec(g, &[5000]).unwrap();
        let mut got = (t.place)(&z);
        assert!(!t
            .on(|| ops::latent_update(&mut got, &(t.place)(&g), 0.5))
            .unwrap());
        assert_eq!(
            got.to_host().unwrap().to_vec::<f32>().unwrap(),
            z.to_vec::<f32>().unwrap(),
            "{}: a {bad} gradient changed z",
            t.name
        );
    }
}

/// `got` (on the target, bf16) against `want` (host f32) within `tol`.
fn compare(t: &Target, what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    compare_as(t, what, got, DType::BF16, want, tol);
}

/// `compare` for a kernel whose output has `dtype`.
fn compare_as(t: &Target, what: &str, got: &Tensor, dtype: DType, want: &Tensor, tol: f64) {
    assert_eq!(got.dtype(), dtype, "{}: {what}: dtype", t.name);
    let err = f32_host(got).rel_error(want).unwrap();
    eprintln!("{}: {what}: rel error {err:.2e}", t.name);
    assert!(
        err <= tol,
        "{}: {what}: rel error {err:e} > {tol:e}",
        t.name
    );
}

pub fn pointwise_ops_match_cpu(t: &Target) {
    let shape = [2, 3, 17, 9];
    let (a, a32) = bf16_pair(t, &shape, 1);
    let (b, b32) = bf16_pair(t, &shape, 2);
    let (v, v32) = bf16_pair(t, &[2, 3], 3);
    let (g, g32) = bf16_pair(t, &[5, 48], 4);
    type Op = fn(&Tensor, &Tensor, &Tensor, &Tensor) -> steer::Result<Tensor>;
    let cases: [(&str, Op); 15] = [
        ("add", |a, b, _, _| ops::add(a, b)),
        ("sub", |a, b, _, _| ops::sub(a, b)),
        ("mul", |a, b, _, _| ops::mul(a, b)),
        ("scale", |a, _, _, _| ops::scale(a, -0.7)),
        ("silu", |a, _, _, _| ops::activation(a, Activation::Silu)),
        ("gelu", |a, _, _, _| ops::activation(a, Activation::Gelu)),
        ("quick_gelu", |a, _, _, _| {
            ops::activation(a, Activation::QuickGelu)
        }),
        ("relu", |a, _, _, _| ops::activation(a, Activation::Relu)),
        ("leaky_relu", |a, _, _, _| {
            ops::activation(a, Activation::LeakyRelu(0.01))
        }),
        ("add_channels", |a, _, v, _| ops::add_channels(a, v)),
        ("add_broadcast axis 1", |_, _, _, g| {
            let v = ops::split(g, 1, &[8, 40])?.remove(0);
            ops::add_broadcast(&g.reshape(&[5, 6, 8])?, &v, 1)
        }),
        ("add_broadcast axis 0", |_, _, _, g| {
            let v = ops::split(g, 0, &[1, 4])?.remove(0).reshape(&[6, 8])?;
            ops::add_broadcast(&g.reshape(&[5, 6, 8])?, &v, 0)
        }),
        ("embedding", |_, _, _, g| ops::embedding(g, &[4, 0, 4, 2])),
        ("geglu", |_, _, _, g| ops::geglu(g)),
        ("upsample_nearest2x", |a, _, _, _| {
            ops::upsample_nearest2x(a)
        }),
    ];
    for (name, f) in cases {
        let got = t.on(|| f(&a, &b, &v, &g)).unwrap();
        let want = f(&a32, &b32, &v32, &g32).unwrap();
        let tol = if name == "upsample_nearest2x" || name == "embedding" {
            0.0
        } else {
            OUT_TOL
        };
        compare(t, name, &got, &want, tol);
    }
}

pub fn data_movement_matches_cpu(t: &Target) {
    let (x, x32) = bf16_pair(t, &[2, 3, 4, 5], 1);
    let (y, y32) = bf16_pair(t, &[2, 6, 4, 5], 2);
    // f32 arithmetic (latents): the same IEEE operations as the CPU, bit for bit.
    let a = Tensor::randn(&[3, 70], DType::F32, 3);
    let b = Tensor::randn(&[3, 70], DType::F32, 4);
    let (ap, bp) = ((t.place)(&a), (t.place)(&b));
    type F32Op = fn(&Tensor, &Tensor) -> steer::Result<Tensor>;
    let f32_ops: [(&str, F32Op); 3] = [
        ("f32 add", |a, b| ops::add(a, b)),
        ("f32 sub", |a, b| ops::sub(a, b)),
        ("f32 scale", |a, _| ops::scale(a, 0.37)),
    ];
    for (name, f) in f32_ops {
        let got = t.on(|| f(&ap, &bp)).unwrap();
        compare_as(t, name, &got, DType::F32, &f(&a, &b).unwrap(), 0.0);
    }
    for perm in [[0, 2, 3, 1], [0, 2, 1, 3], [3, 1, 0, 2]] {
        let got = t.on(|| ops::permute(&x, &perm)).unwrap();
        compare(
            t,
            &format!("permute {perm:?}"),
            &got,
            &ops::permute(&x32, &perm).unwrap(),
            0.0,
        );
    }
    for axis in [1, 3] {
        let z = if axis == 1 { &y } else { &x };
        let z32 = if axis == 1 { &y32 } else { &x32 };
        let got = t.on(|| ops::concat(&[&x, z], axis)).unwrap();
        compare(
            t,
            &format!("concat axis {axis}"),
            &got,
            &ops::concat(&[&x32, z32], axis).unwrap(),
            0.0,
        );
    }
    let pad = ops::Pad2d {
        left: 0,
        right: 1,
        top: 2,
        bottom: 1,
    };
    let got = t.on(|| ops::pad2d(&x, pad)).unwrap();
    compare(t, "pad2d", &got, &ops::pad2d(&x32, pad).unwrap(), 0.0);
    let got = t.on(|| ops::split(&y, 1, &[1, 3, 2])).unwrap();
    for (i, (g, w)) in got
        .iter()
        .zip(ops::split(&y32, 1, &[1, 3, 2]).unwrap())
        .enumerate()
    {
        compare(t, &format!("split part {i}"), g, &w, 0.0);
    }
}

/// bf16 <-> f32 conversions where the tensor lives (kernels on the target), against the host's
/// round to nearest even: bit for bit both ways.
pub fn casts_match_cpu(t: &Target) {
    let x = Tensor::randn(&[5, 333], DType::F32, 9);
    let want = x.to_dtype(DType::BF16).unwrap();
    let like_bf16 = (t.place)(&Tensor::zeros(&[1], DType::BF16));
    let like_f32 = (t.place)(&Tensor::zeros(&[1], DType::F32));
    let placed = (t.place)(&x);
    let (down, up) = t.on(|| {
        let down = placed.to_like(&like_bf16).unwrap();
        let up = down.to_like(&like_f32).unwrap();
        (down, up)
    });
    assert_eq!(
        down.is_host(),
        t.emulate,
        "{}: the cast stays on the target",
        t.name
    );
    let bytes = |t: &Tensor| {
        t.to_host()
            .unwrap()
            .host("cast")
            .unwrap()
            .as_bytes()
            .to_vec()
    };
    assert_eq!(bytes(&down), bytes(&want), "{}: f32 -> bf16", t.name);
    let back = want.to_dtype(DType::F32).unwrap();
    assert_eq!(bytes(&up), bytes(&back), "{}: bf16 -> f32", t.name);
}

/// FLUX's adaLN modulation (forward, and its backward with the sums over L) and rotary embedding
/// (forward and inverse), against the CPU.
pub fn flux_ops_match_cpu(t: &Target) {
    let (x, x32) = bf16_pair(t, &[2, 7, 24], 1);
    let (shift, shift32) = bf16_pair(t, &[2, 24], 2);
    let (scale, scale32) = bf16_pair(t, &[2, 24], 3);
    let (dy, dy32) = bf16_pair(t, &[2, 7, 24], 4);
    let got = t.on(|| ops::modulate(&x, &shift, &scale)).unwrap();
    let want = ops::modulate(&x32, &shift32, &scale32).unwrap();
    compare(t, "modulate", &got, &want, OUT_TOL);
    let got = t.on(|| ops::modulate_backward(&x, &scale, &dy)).unwrap();
    let want = ops::modulate_backward(&x32, &scale32, &dy32).unwrap();
    for (what, g, w) in [
        ("modulate_backward dx", &got.0, &want.0),
        ("modulate_backward dshift", &got.1, &want.1),
        ("modulate_backward dscale", &got.2, &want.2),
    ] {
        compare(t, what, g, w, OUT_TOL);
    }
    let (q, q32) = bf16_pair(t, &[1, 3, 10, 16], 5);
    let (cos, cos32) = bf16_pair(t, &[10, 8], 6);
    let (sin, sin32) = bf16_pair(t, &[10, 8], 7);
    let got = t.on(|| ops::rope(&q, &cos, &sin)).unwrap();
    compare(
        t,
        "rope",
        &got,
        &ops::rope(&q32, &cos32, &sin32).unwrap(),
        OUT_TOL,
    );
    let got = t.on(|| ops::rope_backward(&q, &cos, &sin)).unwrap();
    let want = ops::rope_backward(&q32, &cos32, &sin32).unwrap();
    compare(t, "rope_backward", &got, &want, OUT_TOL);
}

/// kernels/maps.cu and the f32 copies: bilinear resizes down, up, to the same size and odd both
/// ways, with their backward, then the whole assembly of the classifier's input (SPEC section 3)
/// from maps at three resolutions, and its backward.
pub fn maps_match_cpu(t: &Target) {
    for (i, (h, w, oh, ow)) in [
        (12, 20, 5, 7),
        (3, 4, 16, 16),
        (16, 16, 16, 16),
        (7, 5, 9, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 10 * i as u64;
        let x = Tensor::rand_uniform(&[2, 3, h, w], 0.0, 1.0, DType::F32, seed);
        let dy = Tensor::randn(&[2, 3, oh, ow], DType::F32, seed + 1);
        let what = format!("resize {h}x{w} -> {oh}x{ow}");
        let got = t
            .on(|| ops::resize_bilinear(&(t.place)(&x), oh, ow))
            .unwrap();
        let want = ops::resize_bilinear(&x, oh, ow).unwrap();
        compare_as(t, &what, &got, DType::F32, &want, RESIZE_TOL);
        let got = t
            .on(|| ops::resize_bilinear_backward(&(t.place)(&dy), h, w))
            .unwrap();
        let want = ops::resize_bilinear_backward(&dy, h, w).unwrap();
        compare_as(
            t,
            &format!("{what} backward"),
            &got,
            DType::F32,
            &want,
            RESIZE_TOL,
        );
    }
    let sizes = [(8, 3), (32, 2), (16, 1)];
    let natives: Vec<Tensor> = sizes
        .iter()
        .enumerate()
        .map(|(i, &(s, heads))| {
            Tensor::rand_uniform(&[1, 2, heads, s * s], 0.0, 1.0, DType::F32, 50 + i as u64)
        })
        .collect();
    fn layers<'a>(ts: &'a [Tensor], sizes: &[(usize, usize)]) -> Vec<NativeMaps<'a>> {
        ts.iter()
            .zip(sizes)
            .map(|(maps, &(s, _))| NativeMaps {
                maps,
                height: s,
                width: s,
            })
            .collect()
    }
    let placed: Vec<Tensor> = natives.iter().map(|x| (t.place)(x)).collect();
    let dmaps = Tensor::randn(&[1, 2, 6, 16, 16], DType::F32, 60);
    let (got, got_grads) = t.on(|| {
        let (maps, a) = assemble(&layers(&placed, &sizes)).unwrap();
        let grads = assemble_backward(&layers(&placed, &sizes), &a, &(t.place)(&dmaps)).unwrap();
        (maps, grads)
    });
    let (want, a) = assemble(&layers(&natives, &sizes)).unwrap();
    compare_as(t, "assembled maps", &got, DType::F32, &want, RESIZE_TOL);
    let want_grads = assemble_backward(&layers(&natives, &sizes), &a, &dmaps).unwrap();
    for (i, (g, w)) in got_grads.iter().zip(&want_grads).enumerate() {
        let what = format!("assembly backward, layer {i}");
        compare_as(t, &what, g, DType::F32, w, RESIZE_TOL);
    }
}

pub fn norms_match_cpu(t: &Target) {
    let (x, x32) = bf16_pair(t, &[2, 8, 5, 7], 1);
    let (gamma, gamma32) = bf16_pair(t, &[8], 2);
    let (beta, beta32) = bf16_pair(t, &[8], 3);
    let got = t
        .on(|| ops::group_norm(&x, 4, Some(&gamma), Some(&beta), 1e-5))
        .unwrap();
    let want = ops::group_norm(&x32, 4, Some(&gamma32), Some(&beta32), 1e-5).unwrap();
    compare(t, "group_norm", &got, &want, OUT_TOL);
    let (r, r32) = bf16_pair(t, &[6, 40], 4);
    let (w, w32) = bf16_pair(t, &[40], 5);
    let (bb, bb32) = bf16_pair(t, &[40], 6);
    let got = t
        .on(|| ops::layer_norm(&r, Some(&w), Some(&bb), 1e-5))
        .unwrap();
    compare(
        t,
        "layer_norm",
        &got,
        &ops::layer_norm(&r32, Some(&w32), Some(&bb32), 1e-5).unwrap(),
        OUT_TOL,
    );
    let got = t.on(|| ops::layer_norm(&r, None, None, 1e-6)).unwrap();
    compare(
        t,
        "layer_norm (no affine)",
        &got,
        &ops::layer_norm(&r32, None, None, 1e-6).unwrap(),
        OUT_TOL,
    );
    let got = t.on(|| ops::rms_norm(&r, Some(&w), 1e-6)).unwrap();
    compare(
        t,
        "rms_norm",
        &got,
        &ops::rms_norm(&r32, Some(&w32), 1e-6).unwrap(),
        OUT_TOL,
    );
}

pub fn linear_and_conv_match_cpu(t: &Target) {
    // Row and column counts off the 64-tile, K off the 32-step.
    let (x, x32) = bf16_pair(t, &[3, 70, 40], 1);
    let (w, w32) = bf16_pair(t, &[50, 40], 2);
    let (b, b32) = bf16_pair(t, &[50], 3);
    let got = t.on(|| ops::linear(&x, &w, Some(&b))).unwrap();
    compare(
        t,
        "linear",
        &got,
        &ops::linear(&x32, &w32, Some(&b32)).unwrap(),
        OUT_TOL,
    );
    let got = t.on(|| ops::linear(&x, &w, None)).unwrap();
    compare(
        t,
        "linear (no bias)",
        &got,
        &ops::linear(&x32, &w32, None).unwrap(),
        OUT_TOL,
    );

    let (x, x32) = bf16_pair(t, &[2, 5, 9, 11], 4);
    for (k, stride, padding, bias) in [(3, 1, 1, true), (3, 2, 1, true), (1, 1, 0, false)] {
        let (w, w32) = bf16_pair(t, &[7, 5, k, k], 5 + k as u64);
        let (b, b32) = bf16_pair(t, &[7], 9);
        let p = Conv2dParams { stride, padding };
        let got = t.on(|| ops::conv2d(&x, &w, bias.then_some(&b), p)).unwrap();
        let want = ops::conv2d(&x32, &w32, bias.then_some(&b32), p).unwrap();
        compare(
            t,
            &format!("conv2d k{k} s{stride} p{padding}"),
            &got,
            &want,
            OUT_TOL,
        );
    }
}

/// The tiny random-weight SD2.1 UNet of tests/sd21_unet.rs (diffusers' f32 output as the
/// reference) with bf16 weights and activations on the kernels. Tolerance 5e-2: PyTorch's own
/// bf16 forward of this model (diffusers 0.42.1, torch 2.15, CPU) is 2.2e-2 from its f32 output,
/// since every layer rounds to bf16 and the errors add up through the residual stream; we allow a
/// little over twice that (our rounding points differ: e.g. attention's P is rounded to bf16).
/// The CPU backend in f32 agrees with diffusers to 1e-4 (tests/sd21_unet.rs).
pub fn unet_forward_matches_diffusers_in_bf16(t: &Target) {
    let reference = SafetensorsFile::open(TINY_REFERENCE).unwrap();
    let get = |name: &str| reference.tensor(name).unwrap();
    let unet =
        UNet2DConditionModel::from_dir_placed("tests/fixtures/tiny-sd21/unet", t.placement.clone())
            .unwrap();
    let sample = t.placement.place(&get("unet.sample")).unwrap();
    let context = t
        .placement
        .place(&get("unet.encoder_hidden_states"))
        .unwrap();
    let step = get("unet.timestep").to_vec::<f64>().unwrap()[0];
    let out = t
        .on(|| unet.forward(&sample, step, &context, None, false))
        .unwrap()
        .out;
    let want = get("unet.out").to_dtype(DType::F32).unwrap();
    compare(t, "tiny SD2.1 UNet forward", &out, &want, 5e-2);
}

/// The tiny SD2.1 text encoder and VAE (encode and decode) with bf16 weights and activations on
/// the kernels, against transformers' and diffusers' f32 outputs; their inputs and outputs are
/// host f32. Tolerances: twice how far PyTorch's own bf16 run of the same model lands
/// (tests/reference/bf16_errors.py: text encoder 8.8e-3, VAE decode 1.5e-2, encode 1.2e-2).
pub fn text_encoder_and_vae_match_pytorch_in_bf16(t: &Target) {
    let reference = SafetensorsFile::open(TINY_REFERENCE).unwrap();
    let get = |name: &str| f32_tensor(&reference, name);
    let dir = "tests/fixtures/tiny-sd21";
    let te =
        CLIPTextModel::from_dir_placed(format!("{dir}/text_encoder"), t.placement.clone()).unwrap();
    let ids = reference.tensor("text.input_ids").unwrap();
    let vae = AutoencoderKL::from_dir_placed(format!("{dir}/vae"), t.placement.clone()).unwrap();
    let (hidden, decoded, encoded) = t.on(|| {
        (
            te.forward_tensor(&ids).unwrap().last_hidden_state,
            vae.decode(&get("vae.latent")).unwrap(),
            vae.encode(&get("vae.image")).unwrap(),
        )
    });
    for (what, got, want, tol) in [
        ("text encoder", &hidden, "text.last_hidden_state", 1.8e-2),
        ("VAE decode", &decoded, "vae.decoded", 3.0e-2),
        ("VAE encode", &encoded, "vae.encoded_mean", 2.4e-2),
    ] {
        assert!(
            got.is_host(),
            "{}: {what}: the output comes back to the host",
            t.name
        );
        compare_as(t, what, got, DType::F32, &get(want), tol);
    }
}

/// The whole tiny SD2.1 pipeline on the target: the prompt and the empty negative prompt through
/// the text encoder, 3 DDIM steps with guidance 7.5 (on a GPU the latent, the guidance and the
/// scheduler's steps stay there, f32), against diffusers' StableDiffusionPipeline in f32.
/// Tolerance 0.12: twice how far diffusers' own bf16 run lands (6.0e-2,
/// tests/reference/bf16_errors.py; guidance 7.5 amplifies the UNet's rounding).
pub fn sampling_matches_diffusers_in_bf16(t: &Target) {
    let reference = SafetensorsFile::open(TINY_REFERENCE).unwrap();
    let prompt = reference.metadata().unwrap()["prompt"].clone();
    let get = |name: &str| f32_tensor(&reference, name);
    let pipe =
        StableDiffusion::from_dir_placed("tests/fixtures/tiny-sd21", t.placement.clone()).unwrap();
    let latents = t.on(|| {
        let cond = pipe.encode_prompt(&prompt).unwrap();
        let uncond = pipe.encode_prompt("").unwrap();
        let req = GenerateRequest {
            cond: &cond,
            uncond: Some(&uncond),
            guidance: 7.5,
            steps: 3,
            init_latents: get("ddim.init_latents"),
            record_maps: None,
        };
        pipe.generate(&req, None, |_| {}).unwrap().latents
    });
    assert!(
        latents.is_host(),
        "{}: latents come back to the host",
        t.name
    );
    let want = get("ddim.final_latents");
    compare_as(
        t,
        "tiny SD2.1 DDIM, 3 steps",
        &latents,
        DType::F32,
        &want,
        0.12,
    );
}

pub fn backward_ops_match_cpu(t: &Target) {
    let (x, x32) = bf16_pair(t, &[2, 8, 6, 10], 1);
    let (dy, dy32) = bf16_pair(t, &[2, 8, 6, 10], 2);
    for act in [
        Activation::Silu,
        Activation::Gelu,
        Activation::QuickGelu,
        Activation::Relu,
        Activation::LeakyRelu(0.01),
    ] {
        let got = t.on(|| ops::activation_backward(&x, &dy, act)).unwrap();
        let want = ops::activation_backward(&x32, &dy32, act).unwrap();
        compare(
            t,
            &format!("activation_backward {act:?}"),
            &got,
            &want,
            OUT_TOL,
        );
    }
    let (g, g32) = bf16_pair(t, &[7, 24], 3);
    let (dg, dg32) = bf16_pair(t, &[7, 12], 4);
    let got = t.on(|| ops::geglu_backward(&g, &dg)).unwrap();
    compare(
        t,
        "geglu_backward",
        &got,
        &ops::geglu_backward(&g32, &dg32).unwrap(),
        OUT_TOL,
    );
    let got = t.on(|| ops::upsample_nearest2x_backward(&dy)).unwrap();
    let want = ops::upsample_nearest2x_backward(&dy32).unwrap();
    compare(t, "upsample_nearest2x_backward", &got, &want, OUT_TOL);

    let (gamma, gamma32) = bf16_pair(t, &[8], 5);
    let got = t
        .on(|| ops::group_norm_backward(&x, 4, Some(&gamma), true, 1e-5, &dy))
        .unwrap();
    let want = ops::group_norm_backward(&x32, 4, Some(&gamma32), true, 1e-5, &dy32).unwrap();
    compare(t, "group_norm_backward dx", &got.dx, &want.dx, OUT_TOL);
    let (r, r32) = bf16_pair(t, &[6, 40], 6);
    let (dr, dr32) = bf16_pair(t, &[6, 40], 7);
    let (w, w32) = bf16_pair(t, &[40], 8);
    let got = t
        .on(|| ops::layer_norm_backward(&r, Some(&w), true, 1e-5, &dr))
        .unwrap();
    let want = ops::layer_norm_backward(&r32, Some(&w32), true, 1e-5, &dr32).unwrap();
    compare(t, "layer_norm_backward dx", &got.dx, &want.dx, OUT_TOL);
    let got = t
        .on(|| ops::rms_norm_backward(&r, Some(&w), 1e-6, &dr))
        .unwrap();
    let want = ops::rms_norm_backward(&r32, Some(&w32), 1e-6, &dr32).unwrap();
    compare(t, "rms_norm_backward dx", &got.dx, &want.dx, OUT_TOL);

    let (lx, lx32) = bf16_pair(t, &[3, 70, 40], 9);
    let (lw, lw32) = bf16_pair(t, &[50, 40], 10);
    let (ly, ly32) = bf16_pair(t, &[3, 70, 50], 11);
    let got = t.on(|| ops::linear_backward(&lx, &lw, &ly, false)).unwrap();
    let want = ops::linear_backward(&lx32, &lw32, &ly32, false).unwrap();
    compare(t, "linear_backward dx", &got.dx, &want.dx, OUT_TOL);
    let msg = t
        .on(|| ops::linear_backward(&lx, &lw, &ly, true))
        .err()
        .expect("dw on the kernels")
        .to_string();
    assert!(msg.contains("weight gradients"), "{msg}");

    let (cx, cx32) = bf16_pair(t, &[2, 5, 9, 11], 12);
    for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
        let (cw, cw32) = bf16_pair(t, &[7, 5, k, k], 13 + k as u64);
        let p = Conv2dParams { stride, padding };
        let out_shape = ops::conv2d(&cx32, &cw32, None, p).unwrap().shape().to_vec();
        let (cy, cy32) = bf16_pair(t, &out_shape, 20);
        let got = t
            .on(|| ops::conv2d_backward(&cx, &cw, &cy, p, false))
            .unwrap();
        let want = ops::conv2d_backward(&cx32, &cw32, &cy32, p, false).unwrap();
        compare(
            t,
            &format!("conv2d_backward dx k{k} s{stride} p{padding}"),
            &got.dx,
            &want.dx,
            OUT_TOL,
        );
    }
}

/// Steering's UNet pass on the kernels: the tiny SD2.1 UNet's forward with capture, the maps
/// (assembled where the model is, SPEC section 3) and the latent gradient of a loss on the maps, against
/// diffusers + torch autograd in f32 (the fixture of tests/sd21_unet.rs). The model computes in
/// bf16 (see `unet_forward_matches_diffusers_in_bf16`); the caller's tensors stay f32 on the host.
pub fn unet_steering_pass_matches_diffusers_in_bf16(t: &Target) {
    let reference = SafetensorsFile::open(TINY_REFERENCE).unwrap();
    let get = |name: &str| f32_tensor(&reference, name);
    let indices = |name: &str| -> Vec<usize> {
        reference
            .tensor(name)
            .unwrap()
            .to_vec::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as usize)
            .collect()
    };
    let unet =
        UNet2DConditionModel::from_dir_placed("tests/fixtures/tiny-sd21/unet", t.placement.clone())
            .unwrap();
    let step = get("unet.timestep").to_vec::<f64>().unwrap()[0];
    let words = vec![
        indices("maps.capture_tokens_0"),
        indices("maps.capture_tokens_1"),
    ];
    let (sample, context) = (get("unet.sample"), get("unet.encoder_hidden_states"));
    let (maps, grad) = t.on(|| {
        let o = unet_with_maps(&unet, &sample, step, &context, &words, true).unwrap();
        let cot = get("maps.cotangent").reshape(o.maps.shape()).unwrap();
        let grad = o.sample_grad(&unet, &cot).unwrap();
        (o.maps, grad)
    });
    assert!(
        grad.is_host(),
        "{}: the gradient comes back to the host",
        t.name
    );
    assert_eq!(
        maps.is_host(),
        t.emulate,
        "{}: the maps stay where the model is",
        t.name
    );
    let want = get("maps.maps");
    let err = f32_host(&maps)
        .reshape(want.shape())
        .unwrap()
        .rel_error(&want)
        .unwrap();
    eprintln!("{}: tiny SD2.1 maps: rel error {err:.2e}", t.name);
    assert!(err < MODEL_MAPS_TOL, "{}: maps rel error {err:e}", t.name);
    let err = grad.rel_error(&get("maps.sample_grad")).unwrap();
    eprintln!(
        "{}: tiny SD2.1 latent gradient: rel error {err:.2e}",
        t.name
    );
    assert!(
        err < MODEL_GRAD_TOL,
        "{}: latent gradient rel error {err:e}",
        t.name
    );
}

/// The relation classifier placed on the target (bf16 parameters and activations), forward and
/// input gradient, against the reference implementation's model in float64 (the fixture of
/// tests/classifier.rs, written by tests/reference/classifier_fixtures.py). Tolerance: twice how
/// far PyTorch's own bf16 run of the same model lands from float64, which the fixture records
/// (logits 8.9e-3, maps gradient 8.7e-2: the softmax-pooled gradient amplifies rounding).
pub fn classifier_matches_pytorch_in_bf16(t: &Target) {
    let reference =
        SafetensorsFile::open("tests/fixtures/classifier-reference.safetensors").unwrap();
    let meta = reference.metadata().unwrap();
    let tol = |key: &str| 2.0 * meta[key].parse::<f64>().unwrap();
    let get = |name: &str| reference.tensor(name).unwrap();
    let steps: Vec<usize> = get("steps")
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|s| s as usize)
        .collect();
    let model = RelationClassifier::load("tests/fixtures/classifier-sd.safetensors")
        .unwrap()
        .placed(&t.placement)
        .unwrap();
    let maps = (t.place)(&get("maps").to_dtype(DType::BF16).unwrap());
    let cot = (t.place)(&get("logits_cotangent").to_dtype(DType::BF16).unwrap());
    let (logits, grad) = t.on(|| {
        let (logits, saved) = model.forward(&maps, &steps, None).unwrap();
        let grad = model.input_grad(&saved, &cot).unwrap();
        (logits, grad)
    });
    for (what, got, want, key) in [
        ("logits", &logits, "logits", "bf16_vs_f64.logits"),
        ("maps gradient", &grad, "maps_grad", "bf16_vs_f64.maps_grad"),
    ] {
        assert_eq!(got.is_host(), t.emulate, "{}: {what} on the target", t.name);
        let want = get(want).to_dtype(DType::F32).unwrap();
        let err = f32_host(got).rel_error(&want).unwrap();
        let tol = tol(key);
        eprintln!(
            "{}: classifier {what}: rel error {err:.2e} (tolerance {tol:.2e})",
            t.name
        );
        assert!(
            err <= tol,
            "{}: classifier {what}: rel error {err:e} > {tol:e}",
            t.name
        );
    }
}
