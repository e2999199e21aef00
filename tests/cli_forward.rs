//! `steer forward` end to end, as a user runs it: inputs written to a safetensors file, the
//! binary run on the diffusers folder the fixture script saved, outputs compared with diffusers.
//! Tolerances as in sd21_unet.rs (1e-4 outputs and maps, 1e-3 gradients).

use std::path::PathBuf;
use std::process::Command;

use steer::safetensors_io::{save, SafetensorsFile};
use steer::Tensor;

const MODEL: &str = "tests/fixtures/tiny-sd21";
const REFERENCE: &str = "tests/fixtures/tiny-sd21-reference.safetensors";

fn reference(name: &str) -> Tensor {
    SafetensorsFile::open(REFERENCE)
        .unwrap()
        .tensor(name)
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn steer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_steer"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn forward_unet_with_maps_and_gradient() {
    let inputs = scratch("unet-in.safetensors");
    let out = scratch("unet-out.safetensors");
    let t = [
        ("sample", reference("unet.sample")),
        ("timestep", reference("unet.timestep")),
        (
            "encoder_hidden_states",
            reference("unet.encoder_hidden_states"),
        ),
        ("capture_tokens_0", reference("maps.capture_tokens_0")),
        ("capture_tokens_1", reference("maps.capture_tokens_1")),
        ("maps_cotangent", reference("maps.cotangent")),
    ];
    let named: Vec<(&str, &Tensor)> = t.iter().map(|(n, t)| (*n, t)).collect();
    save(&inputs, &named, None).unwrap();
    let o = steer(&[
        "forward",
        "--model",
        MODEL,
        "--component",
        "unet",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = SafetensorsFile::open(&out).unwrap();
    for (name, reference_name, tol) in [
        ("out", "unet.out", 1e-4),
        ("maps", "maps.maps", 1e-4),
        ("sample_grad", "maps.sample_grad", 1e-3),
    ] {
        let err = f
            .tensor(name)
            .unwrap()
            .rel_error(&reference(reference_name))
            .unwrap();
        assert!(err < tol, "{name}: relative error {err:e}");
    }
}

#[test]
fn forward_reports_bad_input_by_name() {
    let inputs = scratch("bad-in.safetensors");
    let sample = reference("unet.sample");
    save(&inputs, &[("sample", &sample)], None).unwrap();
    let out = scratch("bad-out.safetensors");
    let o = steer(&[
        "forward",
        "--model",
        MODEL,
        "--component",
        "unet",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("encoder_hidden_states"), "{err}");
    let o = steer(&[
        "forward",
        "--model",
        "tests/fixtures/nowhere",
        "--component",
        "unet",
        "--inputs",
        inputs.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nowhere"));
}

#[test]
fn forward_text_encoder_and_vae() {
    let cases = [
        (
            "text-encoder",
            vec![("input_ids", "text.input_ids")],
            vec![
                ("last_hidden_state", "text.last_hidden_state"),
                ("pooler_output", "text.pooler_output"),
            ],
        ),
        (
            "vae-decoder",
            vec![("latent", "vae.latent")],
            vec![("decoded", "vae.decoded")],
        ),
        (
            "vae-encoder",
            vec![("image", "vae.image")],
            vec![("encoded_mean", "vae.encoded_mean")],
        ),
    ];
    for (component, ins, outs) in cases {
        let inputs = scratch(&format!("{component}-in.safetensors"));
        let out = scratch(&format!("{component}-out.safetensors"));
        let t: Vec<(&str, Tensor)> = ins.iter().map(|(n, r)| (*n, reference(r))).collect();
        let named: Vec<(&str, &Tensor)> = t.iter().map(|(n, t)| (*n, t)).collect();
        save(&inputs, &named, None).unwrap();
        let o = steer(&[
            "forward",
            "--model",
            MODEL,
            "--component",
            component,
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            o.status.success(),
            "{component}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let f = SafetensorsFile::open(&out).unwrap();
        for (name, r) in outs {
            let err = f.tensor(name).unwrap().rel_error(&reference(r)).unwrap();
            assert!(err < 1e-4, "{component} {name}: relative error {err:e}");
        }
    }
}

/// A 3-step DDIM generation from the fixture's noise, through tokenizer, text encoder, UNet with
/// guidance 7.5 and the VAE, matches diffusers' pipeline latents; the PNG is written.
#[test]
fn generate_matches_diffusers_pipeline() {
    let noise = scratch("noise.safetensors");
    save(
        &noise,
        &[("latents", &reference("ddim.init_latents"))],
        None,
    )
    .unwrap();
    let (png, latents) = (scratch("gen.png"), scratch("gen-latents.safetensors"));
    let o = steer(&[
        "generate",
        "--model",
        MODEL,
        "a photo of a dog to the left of a teddy bear",
        "--steps",
        "3",
        "--noise",
        noise.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
        "--save-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let z = SafetensorsFile::open(&latents)
        .unwrap()
        .tensor("latents")
        .unwrap();
    let err = z.rel_error(&reference("ddim.final_latents")).unwrap();
    assert!(err < 1e-4, "final latents relative error {err:e}");
    let img = steer::image::load_png(&png).unwrap();
    assert_eq!(img.shape(), &[1, 3, 32, 32]);
}
