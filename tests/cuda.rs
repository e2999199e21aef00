//! The CUDA backend against the CPU reference, on a real GPU: the kernel checks of
//! tests/kernel_cases (which CI runs under emulation) plus what only hardware has.
//!
//! Without a GPU only the no-GPU contract runs: opening a device is an error value, never a
//! panic. The `gpu_*` tests are reported as ignored unless the build sets `STEER_REQUIRE_GPU=1`
//! (`STEER_REQUIRE_GPU=1 cargo test --release --test cuda`, which build.rs turns into the cfg
//! `steer_require_gpu`); then they run and fail without a GPU, so a GPU machine whose driver is
//! broken cannot pass them by skipping.

use std::panic::catch_unwind;
use std::sync::Arc;

mod kernel_cases;

use kernel_cases::Target;
use steer::cuda::{kernels_built, CudaDevice};
use steer::weights::Placement;
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

/// The GPU as a kernel_cases target: inputs uploaded, ops dispatching on their storage.
fn gpu() -> Target {
    let dev = device();
    let place = dev.clone();
    Target {
        name: "gpu",
        place: Box::new(move |x| x.to_cuda(&place).expect("upload")),
        emulate: false,
        placement: Placement::cuda(&dev),
    }
}

macro_rules! gpu_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        #[cfg_attr(not(steer_require_gpu), ignore = "needs a GPU: set STEER_REQUIRE_GPU=1")]
        fn $name() {
            kernel_cases::$name(&gpu());
        }
    )*};
}

gpu_tests!(
    attention_forward_matches_cpu,
    attention_backward_matches_cpu,
    attention_map_gradient_alone_matches_cpu,
    attention_rejects_bad_input,
    attention_variants_match_cpu,
    latent_update_matches_cpu_bit_for_bit,
    latent_update_skips_non_finite_gradient,
    pointwise_ops_match_cpu,
    data_movement_matches_cpu,
    casts_match_cpu,
    flux_ops_match_cpu,
    maps_match_cpu,
    norms_match_cpu,
    linear_and_conv_match_cpu,
    unet_forward_matches_diffusers_in_bf16,
    backward_ops_match_cpu,
    unet_steering_pass_matches_diffusers_in_bf16,
    classifier_matches_pytorch_in_bf16,
    text_encoder_and_vae_match_pytorch_in_bf16,
    sampling_matches_diffusers_in_bf16,
);

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
