//! The latent update of the steering loop: `z <- z - lr * g`, skipped when the gradient is not
//! finite (a NaN or infinity would poison the latent for every later step).

use super::{float_dispatch, same_shape};
use crate::cuda::Target;
use crate::tensor::Storage;
use crate::{DType, Error, Float, Result, Tensor};

const OP: &str = "latent_update";

/// `z <- z - lr * g`. Returns `false`, leaving `z` untouched, when `g` holds a NaN or infinity;
/// `true` when `z` was updated. Host tensors (f32, f64) run on the CPU; when both live on a CUDA
/// device (f32) the update runs there (kernels/latent.cu), bit-identical to the CPU's result
/// (and under [`crate::cuda::emulated::run`], through that kernel's host emulation).
pub fn latent_update(z: &mut Tensor, g: &Tensor, lr: f64) -> Result<bool> {
    same_shape(OP, z, g)?;
    if !lr.is_finite() {
        return Err(Error::Invalid(format!(
            "{OP}: the step size must be finite, got {lr}"
        )));
    }
    // The kernel writes a new buffer; z adopts it only when g was finite.
    // Not kernel_dispatch: z is updated in place, and only when the kernel's flag allows.
    let on_kernel = match crate::cuda::target(z, &[DType::F32]) {
        Some(Target::Gpu(dev)) if !g.is_host() => {
            Some(crate::cuda::latent_update(&dev.clone(), z, g, lr as f32)?)
        }
        Some(Target::Emulated) if g.is_host() => Some(crate::cuda::latent_update(
            &crate::cuda::Emulated,
            z,
            g,
            lr as f32,
        )?),
        _ => None,
    };
    if let Some(result) = on_kernel {
        return Ok(result.map(|updated| *z = updated).is_some());
    }
    match (z.storage(), g.storage()) {
        (Storage::Host(_), Storage::Host(_)) => float_dispatch!(OP, z.dtype(), T => {
            let g = g.slice::<T>(OP)?;
            Ok(update(z.slice_mut::<T>(OP)?, g, T::of(lr)))
        }),
        _ => Err(Error::Device {
            op: OP,
            msg: format!(
                "z and g must be on the same device (z on the {}, g on the {})",
                place(z),
                place(g)
            ),
        }),
    }
}

fn place(t: &Tensor) -> &'static str {
    if t.is_host() {
        "host"
    } else {
        "GPU"
    }
}

/// The CPU reference: checks all of `g` first, so a bad gradient changes nothing.
fn update<T: Float>(z: &mut [T], g: &[T], lr: T) -> bool {
    if !g.iter().all(|x| x.is_finite()) {
        return false;
    }
    for (zi, &gi) in z.iter_mut().zip(g) {
        // Round the product, then the difference (no fused multiply-add): the CUDA kernel
        // rounds the same way, so both give the same bits.
        *zi -= lr * gi;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn updates_f32_and_f64() {
        for dtype in [DType::F32, DType::F64] {
            let z0 = Tensor::randn(&[2, 4, 8, 8], dtype, 1);
            let g = Tensor::randn(&[2, 4, 8, 8], dtype, 2);
            let mut z = z0.clone();
            assert!(latent_update(&mut z, &g, 0.25).unwrap());
            let (z0v, gv, zv) = (
                z0.to_vec::<f64>().unwrap(),
                g.to_vec::<f64>().unwrap(),
                z.to_vec::<f64>().unwrap(),
            );
            for i in 0..zv.len() {
                // 0.25 * g is exact in both dtypes, so one rounding of the difference remains.
                let expected = z0v[i] - 0.25 * gv[i];
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-15 } * expected.abs().max(1.0);
                assert!(
                    (zv[i] - expected).abs() <= tol,
                    "{dtype:?} [{i}]: {} vs {expected}",
                    zv[i]
                );
            }
        }
    }

    #[test]
    fn non_finite_gradient_leaves_z_untouched() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let z0 = Tensor::randn(&[3, 5], DType::F32, 3);
            let mut gv: Vec<f32> = Tensor::randn(&[3, 5], DType::F32, 4).to_vec().unwrap();
            gv[14] = bad; // the last element: the check must cover all of g
            let g = Tensor::from_vec(gv, &[3, 5]).unwrap();
            let mut z = z0.clone();
            assert!(!latent_update(&mut z, &g, 0.1).unwrap());
            assert_eq!(z.to_vec::<f32>().unwrap(), z0.to_vec::<f32>().unwrap());
        }
    }

    #[test]
    fn mismatches_are_errors_naming_the_op() {
        let mut z = Tensor::zeros(&[2, 3], DType::F32);
        let msg = latent_update(&mut z, &Tensor::zeros(&[3, 2], DType::F32), 1.0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("latent_update") && msg.contains("[2, 3]") && msg.contains("[3, 2]"));
        let msg = latent_update(&mut z, &Tensor::zeros(&[2, 3], DType::F64), 1.0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("latent_update"), "{msg}");
        let mut zh = Tensor::zeros(&[2, 3], DType::BF16);
        let msg = latent_update(&mut zh, &Tensor::zeros(&[2, 3], DType::BF16), 1.0)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("latent_update") && msg.contains("BF16"),
            "{msg}"
        );
        assert!(latent_update(&mut z, &Tensor::zeros(&[2, 3], DType::F32), f64::NAN).is_err());
    }
}
