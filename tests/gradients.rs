//! Every op's backward against central finite differences, in f64, on random non-zero inputs.
//!
//! For an op y = f(x1, .., xn) and a random cotangent dy, the scalar L = sum(y * dy) has
//! dL/dxi = the op's backward. Each check perturbs (a sample of) the entries of each input by
//! +-EPS and compares (L+ - L-) / 2 EPS with the backward's value.
//!
//! Tolerance: max |fd - analytic| <= 1e-6 * max(1, max |analytic|). With EPS = 1e-5 in f64 the
//! central difference's truncation error is about EPS^2 * |f'''| ~ 1e-10 and its rounding error
//! about 1e-16 * |L| / EPS ~ 1e-10 for these sizes, so 1e-6 leaves room for curvature while
//! still catching any wrong term (a wrong factor or index gives errors of order 1).

use steer::ops::{self, Activation, Capture, Conv2dParams};
use steer::{DType, Tensor};

const EPS: f64 = 1e-5;
const TOL: f64 = 1e-6;
/// Entries perturbed per input (all of them when the input is smaller).
const SAMPLES: usize = 48;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, DType::F64, seed)
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_vec::<f64>().unwrap()
}

/// L = sum over outputs of sum(y * dy).
fn loss(ys: &[Tensor], dys: &[Tensor]) -> f64 {
    ys.iter()
        .zip(dys)
        .map(|(y, d)| vals(y).iter().zip(vals(d)).map(|(a, b)| a * b).sum::<f64>())
        .sum()
}

/// Check `grads` (the backward, one optional gradient per input) against finite differences of
/// `f` (the forward, any number of outputs).
fn check(
    name: &str,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Vec<Tensor>,
    grads: impl Fn(&[Tensor], &[Tensor]) -> Vec<Option<Tensor>>,
) {
    let ys = f(inputs);
    let dys: Vec<Tensor> = ys
        .iter()
        .enumerate()
        .map(|(i, y)| randn(y.shape(), 1000 + i as u64))
        .collect();
    let analytic = grads(inputs, &dys);
    assert_eq!(
        analytic.len(),
        inputs.len(),
        "{name}: one gradient slot per input"
    );
    let mut checked = 0;
    for (i, g) in analytic.iter().enumerate() {
        let Some(g) = g else { continue };
        assert_eq!(g.shape(), inputs[i].shape(), "{name}: gradient {i} shape");
        let gv = vals(g);
        let scale = gv.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let n = inputs[i].numel();
        let step = (n / SAMPLES).max(1);
        for j in (0..n).step_by(step).take(SAMPLES) {
            let eval = |delta: f64| {
                let mut xs = inputs.to_vec();
                let mut v = vals(&xs[i]);
                v[j] += delta;
                xs[i] = Tensor::from_vec(v, inputs[i].shape()).unwrap();
                loss(&f(&xs), &dys)
            };
            let fd = (eval(EPS) - eval(-EPS)) / (2.0 * EPS);
            let err = (fd - gv[j]).abs();
            assert!(
                err <= TOL * scale,
                "{name}: input {i} entry {j}: finite difference {fd}, backward {}, error {err:e}",
                gv[j]
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{name}: nothing was checked");
}

#[test]
fn linear() {
    let xs = [randn(&[2, 3, 5], 1), randn(&[4, 5], 2), randn(&[4], 3)];
    check(
        "linear",
        &xs,
        |x| vec![ops::linear(&x[0], &x[1], Some(&x[2])).unwrap()],
        |x, dy| {
            let g = ops::linear_backward(&x[0], &x[1], &dy[0], true).unwrap();
            vec![Some(g.dx), g.dw, g.db]
        },
    );
}

#[test]
fn matmul_batched_and_shared() {
    for (bshape, name) in [
        (vec![2, 3, 6, 4], "matmul batched"),
        (vec![6, 4], "matmul shared rhs"),
    ] {
        let xs = [randn(&[2, 3, 5, 6], 4), randn(&bshape, 5)];
        check(
            name,
            &xs,
            |x| vec![ops::matmul(&x[0], &x[1]).unwrap()],
            |x, dy| {
                let (da, db) = ops::matmul_backward(&x[0], &x[1], &dy[0]).unwrap();
                vec![Some(da), Some(db)]
            },
        );
    }
}

#[test]
fn conv2d_all_kinds() {
    // 3x3 pad 1, 1x1, 3x3 stride 2 pad 1 (the UNet's downsampler), and an odd-sized input.
    for (k, p, hw) in [
        (
            3,
            Conv2dParams {
                stride: 1,
                padding: 1,
            },
            5,
        ),
        (
            1,
            Conv2dParams {
                stride: 1,
                padding: 0,
            },
            4,
        ),
        (
            3,
            Conv2dParams {
                stride: 2,
                padding: 1,
            },
            7,
        ),
    ] {
        let xs = [
            randn(&[2, 3, hw, hw], 6),
            randn(&[4, 3, k, k], 7),
            randn(&[4], 8),
        ];
        check(
            &format!("conv2d k{k} {p:?}"),
            &xs,
            |x| vec![ops::conv2d(&x[0], &x[1], Some(&x[2]), p).unwrap()],
            |x, dy| {
                let g = ops::conv2d_backward(&x[0], &x[1], &dy[0], p, true).unwrap();
                vec![Some(g.dx), g.dw, g.db]
            },
        );
    }
}

#[test]
fn group_norm() {
    let xs = [randn(&[2, 6, 3, 2], 9), randn(&[6], 10), randn(&[6], 11)];
    check(
        "group_norm",
        &xs,
        |x| vec![ops::group_norm(&x[0], 3, Some(&x[1]), Some(&x[2]), 1e-6).unwrap()],
        |x, dy| {
            let g = ops::group_norm_backward(&x[0], 3, Some(&x[1]), true, 1e-6, &dy[0]).unwrap();
            vec![Some(g.dx), g.dgamma, g.dbeta]
        },
    );
}

#[test]
fn layer_norm_affine_and_plain() {
    let xs = [randn(&[3, 4, 7], 12), randn(&[7], 13), randn(&[7], 14)];
    check(
        "layer_norm affine",
        &xs,
        |x| vec![ops::layer_norm(&x[0], Some(&x[1]), Some(&x[2]), 1e-5).unwrap()],
        |x, dy| {
            let g = ops::layer_norm_backward(&x[0], Some(&x[1]), true, 1e-5, &dy[0]).unwrap();
            vec![Some(g.dx), g.dgamma, g.dbeta]
        },
    );
    check(
        "layer_norm plain",
        &xs[..1],
        |x| vec![ops::layer_norm(&x[0], None, None, 1e-6).unwrap()],
        |x, dy| {
            vec![Some(
                ops::layer_norm_backward(&x[0], None, false, 1e-6, &dy[0])
                    .unwrap()
                    .dx,
            )]
        },
    );
}

#[test]
fn rms_norm() {
    let xs = [randn(&[2, 3, 2, 8], 15), randn(&[8], 16)];
    check(
        "rms_norm",
        &xs,
        |x| vec![ops::rms_norm(&x[0], Some(&x[1]), 1e-6).unwrap()],
        |x, dy| {
            let g = ops::rms_norm_backward(&x[0], Some(&x[1]), 1e-6, &dy[0]).unwrap();
            vec![Some(g.dx), g.dgamma]
        },
    );
}

#[test]
fn activations() {
    for act in Activation::ALL {
        let xs = [Tensor::rand_uniform(&[5, 9], -3.0, 3.0, DType::F64, 17)];
        check(
            &format!("{act:?}"),
            &xs,
            |x| vec![ops::activation(&x[0], act).unwrap()],
            |x, dy| vec![Some(ops::activation_backward(&x[0], &dy[0], act).unwrap())],
        );
    }
}

#[test]
fn geglu() {
    let xs = [randn(&[2, 3, 10], 18)];
    check(
        "geglu",
        &xs,
        |x| vec![ops::geglu(&x[0]).unwrap()],
        |x, dy| vec![Some(ops::geglu_backward(&x[0], &dy[0]).unwrap())],
    );
}

#[test]
fn softmax() {
    let xs = [randn(&[3, 2, 7], 19)];
    check(
        "softmax",
        &xs,
        |x| vec![ops::softmax(&x[0]).unwrap()],
        |x, dy| {
            vec![Some(
                ops::softmax_backward(&ops::softmax(&x[0]).unwrap(), &dy[0]).unwrap(),
            )]
        },
    );
}

fn attention_case(name: &str, lq: usize, lk: usize, capture: Option<Capture>) {
    let xs = [
        randn(&[2, 2, lq, 4], 20),
        randn(&[2, 2, lk, 4], 21),
        randn(&[2, 2, lk, 3], 22),
    ];
    let scale = 0.5;
    let c = capture.clone();
    check(
        name,
        &xs,
        move |x| {
            let o = ops::attention(&x[0], &x[1], &x[2], scale, c.as_ref()).unwrap();
            std::iter::once(o.out).chain(o.maps).collect()
        },
        |x, dy| {
            let cap = capture.as_ref().map(|c| (c, &dy[1]));
            let g = ops::attention_backward(&x[0], &x[1], &x[2], scale, &dy[0], cap, true).unwrap();
            vec![Some(g.dq), g.dk, g.dv]
        },
    );
}

#[test]
fn attention_self_and_cross() {
    attention_case("self attention", 6, 6, None);
    attention_case("cross attention", 5, 7, None);
}

#[test]
fn attention_with_map_capture() {
    // SD2.1-style maps: probabilities of the full softmax, a one-token and a two-token word.
    let sd = Capture {
        words: vec![vec![1], vec![3, 4]],
        softmax_cols: None,
    };
    attention_case("attention capture (full softmax)", 5, 7, Some(sd));
    // FLUX-style maps: a softmax over the text columns 2..6 only, inside joint attention.
    let flux = Capture {
        words: vec![vec![2], vec![4, 5]],
        softmax_cols: Some(2..6),
    };
    attention_case("attention capture (text-only softmax)", 5, 8, Some(flux));
}

#[test]
fn attention_many_query_blocks() {
    // More query rows than one internal block (128), so the blockwise paths are exercised.
    let c = Capture {
        words: vec![vec![0, 2]],
        softmax_cols: None,
    };
    let xs = [
        randn(&[1, 1, 300, 4], 23),
        randn(&[1, 1, 5, 4], 24),
        randn(&[1, 1, 5, 2], 25),
    ];
    check(
        "attention 300 queries",
        &xs,
        |x| {
            let o = ops::attention(&x[0], &x[1], &x[2], 0.3, Some(&c)).unwrap();
            vec![o.out, o.maps.unwrap()]
        },
        |x, dy| {
            let g =
                ops::attention_backward(&x[0], &x[1], &x[2], 0.3, &dy[0], Some((&c, &dy[1])), true)
                    .unwrap();
            vec![Some(g.dq), g.dk, g.dv]
        },
    );
}

#[test]
fn rope() {
    let angles = Tensor::rand_uniform(&[5, 3], -3.0, 3.0, DType::F64, 26);
    let a = vals(&angles);
    let cos = Tensor::from_vec(a.iter().map(|v| v.cos()).collect(), &[5, 3]).unwrap();
    let sin = Tensor::from_vec(a.iter().map(|v| v.sin()).collect(), &[5, 3]).unwrap();
    let xs = [randn(&[2, 2, 5, 6], 27)];
    check(
        "rope",
        &xs,
        |x| vec![ops::rope(&x[0], &cos, &sin).unwrap()],
        |_, dy| vec![Some(ops::rope_backward(&dy[0], &cos, &sin).unwrap())],
    );
}

#[test]
fn upsample_nearest2x() {
    let xs = [randn(&[2, 3, 3, 4], 28)];
    check(
        "upsample_nearest2x",
        &xs,
        |x| vec![ops::upsample_nearest2x(&x[0]).unwrap()],
        |_, dy| vec![Some(ops::upsample_nearest2x_backward(&dy[0]).unwrap())],
    );
}

#[test]
fn resize_bilinear_up_down_and_odd() {
    for (h, w) in [(8, 8), (32, 32), (5, 7)] {
        let xs = [randn(&[2, 3, h, w], 29)];
        check(
            &format!("resize_bilinear {h}x{w} -> 16x16"),
            &xs,
            |x| vec![ops::resize_bilinear(&x[0], 16, 16).unwrap()],
            |_, dy| vec![Some(ops::resize_bilinear_backward(&dy[0], h, w).unwrap())],
        );
    }
}

#[test]
fn timestep_embedding() {
    let xs = [Tensor::from_vec(vec![1.5f64, 7.25, 40.0], &[3]).unwrap()];
    for (dim, flip, shift) in [(16, true, 0.0), (9, false, 1.0)] {
        check(
            "timestep_embedding",
            &xs,
            |x| vec![ops::timestep_embedding(&x[0], dim, flip, shift).unwrap()],
            |x, dy| {
                vec![Some(
                    ops::timestep_embedding_backward(&x[0], dim, flip, shift, &dy[0]).unwrap(),
                )]
            },
        );
    }
}

#[test]
fn embedding() {
    let ids = [3usize, 0, 3, 5];
    let xs = [randn(&[6, 4], 30)];
    check(
        "embedding",
        &xs,
        |x| vec![ops::embedding(&x[0], &ids).unwrap()],
        |x, dy| {
            vec![Some(
                ops::embedding_backward(x[0].shape(), &ids, &dy[0]).unwrap(),
            )]
        },
    );
}

#[test]
fn concat_split_permute() {
    let xs = [randn(&[2, 3, 4], 31), randn(&[2, 5, 4], 32)];
    check(
        "concat",
        &xs,
        |x| vec![ops::concat(&[&x[0], &x[1]], 1).unwrap()],
        |_, dy| {
            ops::split(&dy[0], 1, &[3, 5])
                .unwrap()
                .into_iter()
                .map(Some)
                .collect()
        },
    );
    let x = [randn(&[2, 8, 3], 33)];
    check(
        "split",
        &x,
        |x| ops::split(&x[0], 1, &[2, 6]).unwrap(),
        |_, dy| vec![Some(ops::concat(&[&dy[0], &dy[1]], 1).unwrap())],
    );
    let perm = [2, 0, 3, 1];
    let x = [randn(&[2, 3, 4, 5], 34)];
    check(
        "permute",
        &x,
        |x| vec![ops::permute(&x[0], &perm).unwrap()],
        |_, dy| {
            vec![Some(
                ops::permute(&dy[0], &ops::inverse_permutation(&perm)).unwrap(),
            )]
        },
    );
}

#[test]
fn elementwise_and_broadcasts() {
    let xs = [randn(&[3, 4], 35), randn(&[3, 4], 36)];
    check(
        "mul",
        &xs,
        |x| vec![ops::mul(&x[0], &x[1]).unwrap()],
        |x, dy| {
            let (a, b) = ops::mul_backward(&x[0], &x[1], &dy[0]).unwrap();
            vec![Some(a), Some(b)]
        },
    );
    check(
        "add, sub, scale",
        &xs,
        |x| {
            vec![
                ops::add(&x[0], &x[1]).unwrap(),
                ops::sub(&x[0], &x[1]).unwrap(),
                ops::scale(&x[0], -2.5).unwrap(),
            ]
        },
        |_, dy| {
            let da = ops::add(
                &ops::add(&dy[0], &dy[1]).unwrap(),
                &ops::scale(&dy[2], -2.5).unwrap(),
            )
            .unwrap();
            let db = ops::sub(&dy[0], &dy[1]).unwrap();
            vec![Some(da), Some(db)]
        },
    );
    let xs = [randn(&[2, 3, 2, 2], 37), randn(&[2, 3], 38)];
    check(
        "add_channels",
        &xs,
        |x| vec![ops::add_channels(&x[0], &x[1]).unwrap()],
        |x, dy| {
            vec![
                Some(dy[0].clone()),
                Some(ops::add_channels_backward(&dy[0], x[1].shape()).unwrap()),
            ]
        },
    );
    let xs = [
        randn(&[2, 3, 4], 39),
        randn(&[2, 4], 40),
        randn(&[2, 4], 41),
    ];
    check(
        "modulate",
        &xs,
        |x| vec![ops::modulate(&x[0], &x[1], &x[2]).unwrap()],
        |x, dy| {
            let (dx, dsh, dsc) = ops::modulate_backward(&x[0], &x[2], &dy[0]).unwrap();
            vec![Some(dx), Some(dsh), Some(dsc)]
        },
    );
}

#[test]
fn reductions() {
    let xs = [randn(&[3, 4, 5], 42)];
    check(
        "mean_axis",
        &xs,
        |x| vec![ops::mean_axis(&x[0], 1).unwrap()],
        |x, dy| {
            vec![Some(
                ops::mean_axis_backward(&dy[0], x[0].shape(), 1).unwrap(),
            )]
        },
    );
    check(
        "mean",
        &xs,
        |x| vec![ops::mean(&x[0]).unwrap()],
        |x, dy| {
            let g = dy[0].to_vec::<f64>().unwrap()[0] / x[0].numel() as f64;
            vec![Some(
                Tensor::from_vec(vec![g; x[0].numel()], x[0].shape()).unwrap(),
            )]
        },
    );
}

#[test]
fn cross_entropy() {
    let xs = [randn(&[4, 5], 43)];
    let targets = [1usize, 4, 0, 1];
    check(
        "cross_entropy",
        &xs,
        |x| vec![ops::cross_entropy(&x[0], &targets).unwrap()],
        |x, dy| {
            let d = dy[0].to_vec::<f64>().unwrap()[0];
            vec![Some(
                ops::cross_entropy_backward(&x[0], &targets, d).unwrap(),
            )]
        },
    );
}

#[test]
fn attention_causal() {
    let xs = [
        randn(&[1, 2, 6, 4], 44),
        randn(&[1, 2, 6, 4], 45),
        randn(&[1, 2, 6, 3], 46),
    ];
    check(
        "causal attention",
        &xs,
        |x| vec![ops::attention_causal(&x[0], &x[1], &x[2], 0.5).unwrap()],
        |x, dy| {
            let g = ops::attention_causal_backward(&x[0], &x[1], &x[2], 0.5, &dy[0]).unwrap();
            vec![Some(g.dq), g.dk, g.dv]
        },
    );
}

#[test]
fn pad2d() {
    // Asymmetric, as the VAE's downsampler pads (right and bottom only), and all four sides.
    for p in [
        ops::Pad2d {
            left: 0,
            right: 1,
            top: 0,
            bottom: 1,
        },
        ops::Pad2d {
            left: 2,
            right: 1,
            top: 3,
            bottom: 0,
        },
    ] {
        let xs = [randn(&[2, 3, 4, 5], 47)];
        check(
            "pad2d",
            &xs,
            |x| vec![ops::pad2d(&x[0], p).unwrap()],
            |_, dy| vec![Some(ops::pad2d_backward(&dy[0], p).unwrap())],
        );
    }
    // The values themselves: zeros around an unchanged copy.
    let x = Tensor::from_vec(vec![1.0f64, 2.0, 3.0, 4.0], &[1, 2, 2]).unwrap();
    let p = ops::Pad2d {
        left: 1,
        right: 0,
        top: 0,
        bottom: 1,
    };
    let y = ops::pad2d(&x, p).unwrap();
    assert_eq!(y.shape(), &[1, 3, 3]);
    assert_eq!(vals(&y), [0.0, 1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 0.0, 0.0]);
}
