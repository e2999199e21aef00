//! DDIM sampling with classifier-free guidance (epsilon and v-prediction) and DDIM inversion
//! (plain and fixed-point) on the tiny SD2.1 fixture, against diffusers' pipeline and a PyTorch
//! re-implementation of the reference's inversion (tests/reference/sd21_fixtures.py).
//!
//! Tolerance: relative error 1e-4 on latents (f32 on both sides; the fixture's own f32-vs-f64
//! error is 3e-6 for sampling and 2e-5 for fixed-point inversion, which iterates the UNet 15 times).

use steer::models::unet::UNet2DConditionModel;
use steer::safetensors_io::SafetensorsFile;
use steer::sched::{ddim_invert, DdimScheduler};
use steer::{ops, DType, Tensor};

const REFERENCE: &str = "tests/fixtures/tiny-sd21-reference.safetensors";

fn reference(name: &str) -> Tensor {
    SafetensorsFile::open(REFERENCE)
        .unwrap()
        .tensor(name)
        .unwrap()
}

fn f32(t: Tensor) -> Tensor {
    t.to_dtype(DType::F32).unwrap()
}

/// Guidance-7.5 sampling with the fixture's conditional text and the empty prompt's.
fn sample(dir: &str, prefix: &str) {
    let unet = UNet2DConditionModel::from_dir(format!("{dir}/unet")).unwrap();
    let sched = DdimScheduler::from_dir(format!("{dir}/scheduler")).unwrap();
    let cond = f32(reference("unet.encoder_hidden_states"));
    let uncond = f32(reference("text.uncond_hidden_state"));
    let context = ops::concat(&[&uncond, &cond], 0).unwrap();
    let steps = 3;
    let ts = sched.timesteps(steps).unwrap();
    let expect_ts: Vec<usize> = reference(&format!("{prefix}.timesteps"))
        .to_vec::<i64>()
        .unwrap()
        .iter()
        .map(|&t| t as usize)
        .collect();
    assert_eq!(ts, expect_ts);
    let mut z = f32(reference(&format!("{prefix}.init_latents")));
    for (i, &t) in ts.iter().enumerate() {
        let input = ops::concat(&[&z, &z], 0).unwrap();
        let out = unet
            .forward(&input, t as f64, &context, None, false)
            .unwrap()
            .out;
        let halves = ops::split(&out, 0, &[1, 1]).unwrap();
        let guided = ops::add(
            &halves[0],
            &ops::scale(&ops::sub(&halves[1], &halves[0]).unwrap(), 7.5).unwrap(),
        )
        .unwrap();
        z = sched.step(&guided, t, &z, steps).unwrap();
        let err = z
            .rel_error(&reference(&format!("{prefix}.latents_step{i}")))
            .unwrap();
        println!("{prefix} step {i} relative error {err:e}");
        assert!(err < 1e-4, "{prefix} step {i}: relative error {err:e}");
    }
}

#[test]
fn ddim_epsilon_matches_diffusers_pipeline() {
    sample("tests/fixtures/tiny-sd21", "ddim");
}

#[test]
fn ddim_v_prediction_matches_diffusers_pipeline() {
    sample("tests/fixtures/tiny-sd21-v", "ddim_v");
}

#[test]
fn ddim_inversion_plain_and_fixed_point_match_reference() {
    let dir = "tests/fixtures/tiny-sd21";
    let unet = UNet2DConditionModel::from_dir(format!("{dir}/unet")).unwrap();
    let sched = DdimScheduler::from_dir(format!("{dir}/scheduler")).unwrap();
    let cond = f32(reference("unet.encoder_hidden_states"));
    let z0 = f32(reference("inv.z0"));
    for (iters, name) in [(1, "plain"), (5, "fixed_point")] {
        let inv = ddim_invert(&sched, &z0, 3, iters, |z, t| {
            Ok(unet.forward(z, t as f64, &cond, None, false)?.out)
        })
        .unwrap();
        let ts: Vec<i64> = inv.timesteps.iter().map(|&t| t as i64).collect();
        assert_eq!(ts, reference("inv.timesteps").to_vec::<i64>().unwrap());
        for (t, z) in inv.timesteps.iter().zip(&inv.latents) {
            let err = z
                .rel_error(&reference(&format!("inv.{name}_z{t}")))
                .unwrap();
            println!("{name} inversion t={t} relative error {err:e}");
            assert!(
                err < 1e-4,
                "{name} inversion at t={t}: relative error {err:e}"
            );
        }
    }
}
