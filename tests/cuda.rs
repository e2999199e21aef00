//! The CUDA backend against the CPU reference.
//!
//! Without a GPU only the no-GPU contract runs: opening a device is an error value, never a
//! panic. The `gpu_*` tests are reported as ignored unless the build sets `STEER_REQUIRE_GPU=1`
//! (`STEER_REQUIRE_GPU=1 cargo test --release --test cuda`, which build.rs turns into the cfg
//! `steer_require_gpu`); then they run and fail without a GPU, so a GPU machine whose driver is
//! broken cannot pass them by skipping.

use std::panic::catch_unwind;
use std::sync::Arc;

use steer::cuda::{kernels_built, CudaDevice};
use steer::{ops, DType, Error, Tensor};

#[test]
fn no_gpu_open_device_is_an_error_not_a_panic() {
    let opened = catch_unwind(|| CudaDevice::new(0)).expect("CudaDevice::new panicked");
    // SAFETY: only tries to open the driver library.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    eprintln!(
        "driver library present: {driver}; kernels built: {}",
        kernels_built()
    );
    if !driver {
        match opened {
            Err(Error::NoGpu(msg)) => assert!(msg.contains("libcuda"), "{msg}"),
            other => panic!("expected Error::NoGpu without a driver, got {other:?}"),
        }
    }
}

fn device() -> Arc<CudaDevice> {
    CudaDevice::new(0).unwrap_or_else(|e| panic!("the GPU tests need a GPU: {e}"))
}

#[test]
#[cfg_attr(
    not(steer_require_gpu),
    ignore = "needs a GPU: set STEER_REQUIRE_GPU=1"
)]
fn gpu_upload_download_round_trip_is_exact() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let host = Tensor::randn(&[3, 7, 11], dtype, 5);
        let back = host.to_cuda(&dev).unwrap().to_host().unwrap();
        assert_eq!(back.dtype(), dtype);
        assert_eq!(back.shape(), host.shape());
        assert_eq!(
            back.host("test").unwrap().as_bytes(),
            host.host("test").unwrap().as_bytes()
        );
    }
    assert!(Tensor::randn(&[4], DType::F64, 0).to_cuda(&dev).is_err());
}

/// Tolerance 0: the kernel rounds after the multiply and after the subtract, as the CPU does.
#[test]
#[cfg_attr(
    not(steer_require_gpu),
    ignore = "needs a GPU: set STEER_REQUIRE_GPU=1"
)]
fn gpu_latent_update_matches_cpu_bit_for_bit() {
    let dev = device();
    // Sizes around the block size, and past the grid cap (4096 blocks of 256) for the grid-stride
    // loop.
    for (i, &n) in [1usize, 255, 257, 4 * 64 * 64, 4096 * 256 + 3]
        .iter()
        .enumerate()
    {
        let z0 = Tensor::randn(&[n], DType::F32, 10 + i as u64);
        let g = Tensor::randn(&[n], DType::F32, 20 + i as u64);
        let mut cpu = z0.clone();
        assert!(ops::latent_update(&mut cpu, &g, 0.37).unwrap());
        let mut gpu = z0.to_cuda(&dev).unwrap();
        assert!(ops::latent_update(&mut gpu, &g.to_cuda(&dev).unwrap(), 0.37).unwrap());
        let gpu = gpu.to_host().unwrap();
        assert_eq!(gpu.rel_error(&cpu).unwrap(), 0.0, "n = {n}");
        assert_eq!(
            gpu.host("test").unwrap().as_bytes(),
            cpu.host("test").unwrap().as_bytes()
        );
    }
}

#[test]
#[cfg_attr(
    not(steer_require_gpu),
    ignore = "needs a GPU: set STEER_REQUIRE_GPU=1"
)]
fn gpu_latent_update_skips_non_finite_gradient() {
    let dev = device();
    for bad in [f32::NAN, f32::INFINITY] {
        let z0 = Tensor::randn(&[5000], DType::F32, 1);
        let mut g: Vec<f32> = Tensor::randn(&[5000], DType::F32, 2).to_vec().unwrap();
        g[4999] = bad;
        let g = Tensor::from_vec(g, &[5000]).unwrap().to_cuda(&dev).unwrap();
        let mut z = z0.to_cuda(&dev).unwrap();
        assert!(!ops::latent_update(&mut z, &g, 0.5).unwrap());
        assert_eq!(z.to_vec::<f32>().unwrap(), z0.to_vec::<f32>().unwrap());
    }
}

#[test]
#[cfg_attr(
    not(steer_require_gpu),
    ignore = "needs a GPU: set STEER_REQUIRE_GPU=1"
)]
fn gpu_latent_update_rejects_mixed_devices_and_dtypes() {
    let dev = device();
    let mut z = Tensor::randn(&[8], DType::F32, 1).to_cuda(&dev).unwrap();
    let msg = ops::latent_update(&mut z, &Tensor::randn(&[8], DType::F32, 2), 0.1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("latent_update") && msg.contains("same device"),
        "{msg}"
    );
    let mut zb = Tensor::randn(&[8], DType::BF16, 1).to_cuda(&dev).unwrap();
    let gb = Tensor::randn(&[8], DType::BF16, 2).to_cuda(&dev).unwrap();
    let msg = ops::latent_update(&mut zb, &gb, 0.1)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("latent_update") && msg.contains("BF16"),
        "{msg}"
    );
}
