//! The SD2.1 UNet against diffusers on a tiny random-weight model with SD2.1's block structure
//! (tests/reference/sd21_fixtures.py writes the model and the references): the forward output,
//! the captured maps (SPEC section 3) and the gradient of a loss on the maps with respect to the
//! latent (torch autograd).
//!
//! Tolerances (issue 3): relative error (max abs difference / max abs reference) at most 1e-4 on
//! outputs and maps and 1e-3 on gradients. Both sides compute in f32 from the same fp16-rounded
//! weights; the differences are summation order only.

use steer::models::unet::UNet2DConditionModel;
use steer::safetensors_io::SafetensorsFile;
use steer::steering::unet_maps::unet_with_maps;
use steer::{DType, Tensor};

const MODEL: &str = "tests/fixtures/tiny-sd21/unet";
const REFERENCE: &str = "tests/fixtures/tiny-sd21-reference.safetensors";

fn reference(name: &str) -> Tensor {
    SafetensorsFile::open(REFERENCE)
        .unwrap()
        .tensor(name)
        .unwrap()
}

fn indices(name: &str) -> Vec<usize> {
    reference(name)
        .to_vec::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect()
}

fn f32(t: Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

#[test]
fn unet_forward_maps_and_latent_gradient_match_diffusers() {
    let unet = UNet2DConditionModel::from_dir(MODEL).unwrap();
    let sample = f32(reference("unet.sample"));
    let context = f32(reference("unet.encoder_hidden_states"));
    let t = reference("unet.timestep").to_vec::<f64>().unwrap()[0];

    let words = vec![
        indices("maps.capture_tokens_0"),
        indices("maps.capture_tokens_1"),
    ];
    let o = unet_with_maps(&unet, &sample, t, &context, &words, true).unwrap();
    let err = o.out.rel_error(&reference("unet.out")).unwrap();
    println!("unet.out relative error {err:e}");
    assert!(err < 1e-4, "unet output relative error {err:e}");

    let expect = reference("maps.maps");
    let err = o
        .maps
        .reshape(expect.shape())
        .unwrap()
        .rel_error(&expect)
        .unwrap();
    println!(
        "maps relative error {err:e} ({} maps per word)",
        o.maps_per_word()
    );
    assert!(err < 1e-4, "maps relative error {err:e}");

    let cot = f32(reference("maps.cotangent"))
        .reshape(o.maps.shape())
        .unwrap();
    let grad = o.sample_grad(&unet, &cot).unwrap();
    let err = grad.rel_error(&reference("maps.sample_grad")).unwrap();
    println!("sample_grad relative error {err:e}");
    assert!(err < 1e-3, "gradient relative error {err:e}");
}

#[test]
fn unet_bad_inputs_are_errors() {
    assert!(UNet2DConditionModel::from_dir("tests/fixtures/no-such-model/unet").is_err());
    let unet = UNet2DConditionModel::from_dir(MODEL).unwrap();
    let context = Tensor::zeros(&[1, 77, 32], DType::F32);
    let wrong = Tensor::zeros(&[1, 3, 16, 16], DType::F32);
    let e = unet
        .forward(&wrong, 1.0, &context, None, false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sample") && e.contains("[1, 3, 16, 16]"), "{e}");
    let odd = Tensor::zeros(&[1, 4, 12, 12], DType::F32);
    assert!(unet.forward(&odd, 1.0, &context, None, false).is_err());
}
