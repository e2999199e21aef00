//! Every CUDA kernel, run on the host through its emulation (kernels/emu.h), against the CPU
//! backend: the same checks as the GPU runs in tests/cuda.rs (tests/kernel_cases). No GPU needed;
//! this is how CI tests the kernels on every run.

mod kernel_cases;

use kernel_cases::Target;
use steer::weights::Placement;
use steer::DType;

fn emulated() -> Target {
    Target {
        name: "emulated",
        place: Box::new(|x| x.clone()),
        emulate: true,
        placement: Placement {
            dtype: DType::BF16,
            device: None,
        },
    }
}

#[test]
fn attention_forward_matches_cpu() {
    kernel_cases::attention_forward_matches_cpu(&emulated());
}

#[test]
fn attention_backward_matches_cpu() {
    kernel_cases::attention_backward_matches_cpu(&emulated());
}

#[test]
fn attention_map_gradient_alone_matches_cpu() {
    kernel_cases::attention_map_gradient_alone_matches_cpu(&emulated());
}

#[test]
fn attention_rejects_bad_input() {
    kernel_cases::attention_rejects_bad_input(&emulated());
}

#[test]
fn attention_variants_match_cpu() {
    kernel_cases::attention_variants_match_cpu(&emulated());
}

#[test]
fn latent_update_matches_cpu_bit_for_bit() {
    kernel_cases::latent_update_matches_cpu_bit_for_bit(&emulated());
}

#[test]
fn latent_update_skips_non_finite_gradient() {
    kernel_cases::latent_update_skips_non_finite_gradient(&emulated());
}

#[test]
fn pointwise_ops_match_cpu() {
    kernel_cases::pointwise_ops_match_cpu(&emulated());
}

#[test]
fn data_movement_matches_cpu() {
    kernel_cases::data_movement_matches_cpu(&emulated());
}

#[test]
fn casts_match_cpu() {
    kernel_cases::casts_match_cpu(&emulated());
}

#[test]
fn flux_ops_match_cpu() {
    kernel_cases::flux_ops_match_cpu(&emulated());
}

#[test]
fn maps_match_cpu() {
    kernel_cases::maps_match_cpu(&emulated());
}

#[test]
fn norms_match_cpu() {
    kernel_cases::norms_match_cpu(&emulated());
}

#[test]
fn linear_and_conv_match_cpu() {
    kernel_cases::linear_and_conv_match_cpu(&emulated());
}

#[test]
fn unet_forward_matches_diffusers_in_bf16() {
    kernel_cases::unet_forward_matches_diffusers_in_bf16(&emulated());
}

#[test]
fn backward_ops_match_cpu() {
    kernel_cases::backward_ops_match_cpu(&emulated());
}

#[test]
fn unet_steering_pass_matches_diffusers_in_bf16() {
    kernel_cases::unet_steering_pass_matches_diffusers_in_bf16(&emulated());
}

#[test]
fn classifier_matches_pytorch_in_bf16() {
    kernel_cases::classifier_matches_pytorch_in_bf16(&emulated());
}

#[test]
fn text_encoder_and_vae_match_pytorch_in_bf16() {
    kernel_cases::text_encoder_and_vae_match_pytorch_in_bf16(&emulated());
}

#[test]
fn sampling_matches_diffusers_in_bf16() {
    kernel_cases::sampling_matches_diffusers_in_bf16(&emulated());
}
