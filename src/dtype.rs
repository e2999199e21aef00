//! Element types: `DType` tags storage; `Element` moves values in and out of host storage;
//! `Float` is what the CPU kernels compute in (f32 for models, f64 for gradient checks).

use half::{bf16, f16};
use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{Add, AddAssign, Div, DivAssign, Mul, MulAssign, Neg, Sub, SubAssign};

use crate::tensor::HostData;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    /// Integer data (token ids, timesteps, indices): stored and moved, never computed on.
    I64,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// A type that host storage can hold.
pub trait Element: Copy + Send + Sync + Debug + bytemuck::Pod + 'static {
    const DTYPE: DType;
    fn slice(data: &HostData) -> Option<&[Self]>;
    fn slice_mut(data: &mut HostData) -> Option<&mut [Self]>;
    fn wrap(v: Vec<Self>) -> HostData;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            fn slice(data: &HostData) -> Option<&[Self]> {
                match data {
                    HostData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(data: &mut HostData) -> Option<&mut [Self]> {
                match data {
                    HostData::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn wrap(v: Vec<Self>) -> HostData {
                HostData::$variant(v)
            }
            #[allow(clippy::redundant_closure_call)]
            fn to_f64(self) -> f64 {
                ($to)(self)
            }
            #[allow(clippy::redundant_closure_call)]
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
        }
    };
}

element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, |x: f64| x, |v: f64| v);
element!(bf16, BF16, |x: bf16| x.to_f64(), bf16::from_f64);
element!(f16, F16, |x: f16| x.to_f64(), f16::from_f64);
element!(i64, I64, |x: i64| x as f64, |v: f64| v as i64);

/// The real numbers the CPU kernels compute in. Implemented for f32 (models) and f64 (gradient
/// checks, where finite differences need the extra digits).
pub trait Float:
    Element
    + PartialOrd
    + Default
    + Sum
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn of(v: f64) -> Self {
        Self::from_f64(v)
    }
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn abs(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn is_finite(self) -> bool;
    /// Softmax of `scale * row`, in place (f32: vectorised, `ops::simd`).
    fn softmax_scaled(row: &mut [Self], scale: Self);
    /// exp of each element, in place (f32: vectorised, `ops::simd`).
    fn exp_in_place(xs: &mut [Self]);
}

macro_rules! float {
    ($t:ty, $erf:path, $softmax:path, $exp_slice:expr) => {
        impl Float for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            fn max(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            fn softmax_scaled(row: &mut [Self], scale: Self) {
                $softmax(row, scale)
            }
            fn exp_in_place(xs: &mut [Self]) {
                $exp_slice(xs)
            }
        }
    };
}

float!(
    f32,
    libm::erff,
    crate::ops::simd::softmax_f32,
    crate::ops::simd::exp_f32
);
float!(
    f64,
    libm::erf,
    crate::ops::softmax_row_generic,
    |xs: &mut [f64]| { xs.iter_mut().for_each(|x| *x = x.exp()) }
);
