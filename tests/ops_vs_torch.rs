//! Every forward op of the CPU op set against PyTorch's (and diffusers') own results, stored in
//! tests/fixtures/ops.safetensors by tests/reference/ops_fixtures.py (see tests/reference/README.md
//! to regenerate). No Python is needed here: the fixture is committed.
//!
//! Each case runs twice: in f64 against PyTorch's float64 result (`<case>.y`), and in f32, on the
//! same inputs rounded to f32, against PyTorch's float32 result (`<case>.y_f32`). The measure is
//! `Tensor::rel_error`: max |ours - torch| / max |torch|.
//!
//! Tolerances, unless a case states its own:
//! - f64: 1e-10. Both sides compute the same formula in double precision and differ only in
//!   summation order and in the last bits of libm-quality transcendentals (1 ulp, 1e-16): the
//!   expected error is 1e-15 to 1e-14. 1e-10 leaves room for that, yet any real difference in
//!   the math (a wrong eps, an f32 intermediate, an off-by-one pixel) shows at 1e-7 or far above.
//! - f32: 1e-5. Both sides round every step to f32 (eps 6e-8) and sum up to a few hundred terms in
//!   different orders, with vectorised exp/erf/tanh approximations of a few ulps: expected errors
//!   of 1e-7 to 1e-6.
//!
//! Run with `--nocapture` to see the measured errors.

use std::ops::Range;
use std::sync::OnceLock;

use steer::ops::{self, Activation, Capture, Conv2dParams};
use steer::safetensors_io::SafetensorsFile;
use steer::{DType, Tensor};

const TOL_F64: f64 = 1e-10;
const TOL_F32: f64 = 1e-5;

fn fixture() -> &'static SafetensorsFile {
    static FILE: OnceLock<SafetensorsFile> = OnceLock::new();
    FILE.get_or_init(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ops.safetensors"
        );
        SafetensorsFile::open(path).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// A stored tensor, in its stored dtype.
fn stored(name: &str) -> Tensor {
    fixture().tensor(name).unwrap_or_else(|e| panic!("{e}"))
}

/// A stored float input converted to `dtype` (f64 inputs rounded to nearest for f32, as torch's
/// `.float()` does).
fn input(case: &str, role: &str, dtype: DType) -> Tensor {
    let t = stored(&format!("{case}.{role}"));
    assert_eq!(t.dtype(), DType::F64, "{case}.{role} is stored in f64");
    t.to_dtype(dtype).unwrap()
}

/// A stored int64 input as indices.
fn indices(name: &str) -> Vec<usize> {
    let t = stored(name);
    assert_eq!(t.dtype(), DType::I64, "{name} is stored in int64");
    t.to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| usize::try_from(i).unwrap())
        .collect()
}

/// Compare `got` with `<case>.<role>` (f64) or `<case>.<role>_f32` (f32); returns the error.
fn check(case: &str, role: &str, got: &Tensor, tol: f64) -> f64 {
    let name = match got.dtype() {
        DType::F64 => format!("{case}.{role}"),
        DType::F32 => format!("{case}.{role}_f32"),
        other => panic!("{case}: op returned dtype {other:?}"),
    };
    let reference = stored(&name);
    assert_eq!(got.shape(), reference.shape(), "{name}: shape");
    let err = got.rel_error(&reference).unwrap();
    println!(
        "{name:<28} {:?}  rel error {err:.2e}  (tol {tol:.0e})",
        got.dtype()
    );
    assert!(
        err.is_finite() && err <= tol,
        "{name}: rel error {err:.3e} > tolerance {tol:.1e}"
    );
    err
}

/// Run `f` in f64 and in f32 and compare its output with `<case>.y` / `<case>.y_f32`.
fn both(case: &str, tol64: f64, tol32: f64, f: impl Fn(DType) -> Tensor) {
    for (dtype, tol) in [(DType::F64, tol64), (DType::F32, tol32)] {
        let y = f(dtype);
        assert_eq!(y.dtype(), dtype, "{case}: output dtype");
        check(case, "y", &y, tol);
    }
}

#[test]
fn fixture_records_its_provenance() {
    let meta = fixture().metadata().unwrap();
    let torch = meta
        .get("version.torch")
        .expect("fixture metadata names torch's version");
    println!(
        "ops.safetensors written by torch {torch}, {:?}",
        meta.get("generator")
    );
    assert!(
        torch.starts_with("2.15"),
        "fixtures were written with torch 2.15, not {torch}"
    );
}

// --- linear algebra and convolution ------------------------------------------------------------

#[test]
fn linear() {
    both("linear", TOL_F64, TOL_F32, |dt| {
        let (x, w, b) = (
            input("linear", "x", dt),
            input("linear", "w", dt),
            input("linear", "b", dt),
        );
        ops::linear(&x, &w, Some(&b)).unwrap()
    });
}

#[test]
fn matmul_batched() {
    both("matmul", TOL_F64, TOL_F32, |dt| {
        ops::matmul(&input("matmul", "a", dt), &input("matmul", "b", dt)).unwrap()
    });
}

fn conv(case: &str, stride: usize, padding: usize) {
    both(case, TOL_F64, TOL_F32, |dt| {
        let (x, w, b) = (
            input(case, "x", dt),
            input(case, "w", dt),
            input(case, "b", dt),
        );
        ops::conv2d(&x, &w, Some(&b), Conv2dParams { stride, padding }).unwrap()
    });
}

#[test]
fn conv2d_3x3_pad1() {
    conv("conv2d_3x3", 1, 1);
}

#[test]
fn conv2d_1x1() {
    conv("conv2d_1x1", 1, 0);
}

#[test]
fn conv2d_3x3_stride2() {
    conv("conv2d_s2", 2, 1);
}

// --- normalisation -----------------------------------------------------------------------------

#[test]
fn group_norm() {
    both("group_norm", TOL_F64, TOL_F32, |dt| {
        let x = input("group_norm", "x", dt);
        let (g, b) = (
            input("group_norm", "gamma", dt),
            input("group_norm", "beta", dt),
        );
        ops::group_norm(&x, 8, Some(&g), Some(&b), 1e-6).unwrap()
    });
}

#[test]
fn layer_norm_affine() {
    both("layer_norm", TOL_F64, TOL_F32, |dt| {
        let x = input("layer_norm", "x", dt);
        let (g, b) = (input("layer_norm", "g", dt), input("layer_norm", "b", dt));
        ops::layer_norm(&x, Some(&g), Some(&b), 1e-5).unwrap()
    });
}

#[test]
fn layer_norm_plain() {
    both("layer_norm_plain", TOL_F64, TOL_F32, |dt| {
        ops::layer_norm(&input("layer_norm_plain", "x", dt), None, None, 1e-6).unwrap()
    });
}

#[test]
fn rms_norm() {
    both("rms_norm", TOL_F64, TOL_F32, |dt| {
        let (x, w) = (input("rms_norm", "x", dt), input("rms_norm", "w", dt));
        ops::rms_norm(&x, Some(&w), 1e-6).unwrap()
    });
}

// --- activations and softmax -------------------------------------------------------------------

fn act(case: &str, a: Activation) {
    both(case, TOL_F64, TOL_F32, |dt| {
        ops::activation(&input(case, "x", dt), a).unwrap()
    });
}

#[test]
fn silu() {
    act("silu", Activation::Silu);
}

#[test]
fn gelu_exact() {
    // Both sides use an erf accurate to about 1 ulp in f64 (libm's here, Sleef's or the C
    // library's in torch), so the default f64 tolerance holds.
    act("gelu", Activation::Gelu);
}

#[test]
fn gelu_tanh() {
    act("gelu_tanh", Activation::GeluTanh);
}

#[test]
fn quick_gelu() {
    act("quick_gelu", Activation::QuickGelu);
}

#[test]
fn relu() {
    act("relu", Activation::Relu);
}

#[test]
fn leaky_relu() {
    act("leaky_relu", Activation::LeakyRelu(0.1));
}

#[test]
fn geglu() {
    both("geglu", TOL_F64, TOL_F32, |dt| {
        ops::geglu(&input("geglu", "x", dt)).unwrap()
    });
}

#[test]
fn softmax() {
    // One row has logits near 80: exp overflows f32 unless the row max is subtracted.
    both("softmax", TOL_F64, TOL_F32, |dt| {
        ops::softmax(&input("softmax", "x", dt)).unwrap()
    });
}

// --- attention with capture --------------------------------------------------------------------

fn attention(case: &str, words: Vec<Vec<usize>>, softmax_cols: Option<Range<usize>>) {
    let scale = 8f64.powf(-0.5); // D = 8
    let capture = Capture {
        words,
        softmax_cols,
    };
    for (dt, tol) in [(DType::F64, TOL_F64), (DType::F32, TOL_F32)] {
        let (q, k, v) = (
            input(case, "q", dt),
            input(case, "k", dt),
            input(case, "v", dt),
        );
        let plain = ops::attention(&q, &k, &v, scale, None).unwrap();
        assert!(plain.maps.is_none(), "{case}: maps without a capture");
        check(case, "y", &plain.out, tol);
        let captured = ops::attention(&q, &k, &v, scale, Some(&capture)).unwrap();
        check(case, "y", &captured.out, tol);
        let maps = captured
            .maps
            .unwrap_or_else(|| panic!("{case}: capture returned no maps"));
        check(case, "maps", &maps, tol);
    }
}

#[test]
fn attention_cross_with_capture() {
    attention("attn_cross", vec![vec![1], vec![2, 3]], None);
}

#[test]
fn attention_self_with_capture() {
    attention("attn_self", vec![vec![1], vec![2, 3]], None);
}

#[test]
fn attention_joint_flux_capture_over_text_columns() {
    // Maps from a softmax over key columns 2..6 only; word indices are absolute key indices.
    attention("attn_flux", vec![vec![2], vec![3, 4]], Some(2..6));
}

// --- RoPE, resizing, timestep embedding --------------------------------------------------------

#[test]
fn rope_interleaved() {
    both("rope", TOL_F64, TOL_F32, |dt| {
        let (x, c, s) = (
            input("rope", "x", dt),
            input("rope", "cos", dt),
            input("rope", "sin", dt),
        );
        ops::rope(&x, &c, &s).unwrap()
    });
}

#[test]
fn upsample_nearest2x() {
    both("upsample_nearest2x", TOL_F64, TOL_F32, |dt| {
        ops::upsample_nearest2x(&input("upsample_nearest2x", "x", dt)).unwrap()
    });
}

fn resize(case: &str) {
    both(case, TOL_F64, TOL_F32, |dt| {
        ops::resize_bilinear(&input(case, "x", dt), 16, 16).unwrap()
    });
}

#[test]
fn resize_bilinear_up_8_to_16() {
    resize("resize_8to16");
}

#[test]
fn resize_bilinear_down_32_to_16() {
    resize("resize_32to16");
}

#[test]
fn resize_bilinear_5x7_to_16() {
    resize("resize_5x7to16");
}

/// f32 tolerance of the timestep embedding: the reference is diffusers' own function, which works
/// in f32. Its arguments t * freq reach 981 rad, where one f32 ulp is 6.1e-5; two f32
/// implementations that round the exponent, its exp and the product differently disagree by a
/// few ulps of the argument, and sin/cos pass an argument error through unchanged (slope <= 1).
const TOL_TIMESTEP_F32: f64 = 3e-4;

fn timestep(case: &str, dim: usize, flip_sin_to_cos: bool, shift: f64) {
    both(case, TOL_F64, TOL_TIMESTEP_F32, |dt| {
        ops::timestep_embedding(&input(case, "t", dt), dim, flip_sin_to_cos, shift).unwrap()
    });
}

#[test]
fn timestep_embedding_sd() {
    timestep("timestep_320", 320, true, 0.0);
}

#[test]
fn timestep_embedding_shifted() {
    timestep("timestep_256", 256, false, 1.0);
}

// --- embedding lookup and loss -----------------------------------------------------------------

#[test]
fn embedding() {
    let ids = indices("embedding.ids");
    both("embedding", TOL_F64, TOL_F32, |dt| {
        ops::embedding(&input("embedding", "weight", dt), &ids).unwrap()
    });
}

#[test]
fn cross_entropy_mean() {
    let targets = indices("cross_entropy.targets");
    both("cross_entropy", TOL_F64, TOL_F32, |dt| {
        let y = ops::cross_entropy(&input("cross_entropy", "logits", dt), &targets).unwrap();
        assert_eq!(y.shape(), &[] as &[usize], "cross_entropy returns a scalar");
        y
    });
}
