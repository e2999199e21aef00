//! The shipped ShapesWorld model: a pixel-space pipeline (no VAE) embedded in the binary, loaded
//! from the cache folder it is written to, and `steer generate` with no `--model`.

use std::path::PathBuf;
use std::process::Command;

use steer::pipelines::{GenerateRequest, StableDiffusion};
use steer::shapes::model::shipped_model_dir;
use steer::{DType, Tensor};

const PROMPT: &str = "a red circle to the left of a blue square";

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-shapes-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn shipped_pipeline_is_pixel_space_and_generates() {
    let pipe = StableDiffusion::from_dir(shipped_model_dir().unwrap()).unwrap();
    assert!(pipe.is_pixel_space());
    assert!(pipe.vae.is_none());
    assert_eq!(pipe.vae_scale_factor(), 1);
    assert_eq!(pipe.default_size(), 32);
    assert_eq!(pipe.unet.config.in_channels, 3);

    let cond = pipe.encode_prompt(PROMPT).unwrap();
    let uncond = pipe.encode_prompt("").unwrap();
    let size = pipe.default_size();
    let req = GenerateRequest {
        cond: &cond,
        uncond: Some(&uncond),
        guidance: 7.5,
        steps: 4,
        init_latents: Tensor::randn(&[1, 3, size, size], DType::F32, 0),
        record_maps: None,
    };
    let out = pipe.generate(&req, None, |_| {}).unwrap();
    let image = pipe.decode(&out.latents).unwrap();
    assert_eq!(image.shape(), &[1, 3, 32, 32]);
    let v = image.to_vec::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()), "non-finite pixels");
    // Decoding and encoding are the identity in pixel space.
    assert_eq!(v, out.latents.to_vec::<f32>().unwrap());
    assert_eq!(
        pipe.encode_image(&image).unwrap().to_vec::<f32>().unwrap(),
        v
    );
    // An image with the wrong channel count is refused, naming the shapes.
    let gray = Tensor::zeros(&[1, 1, 32, 32], DType::F32);
    let err = pipe.encode_image(&gray).unwrap_err().to_string();
    assert!(err.contains("(B, 3, H, W)"), "{err}");
}

#[test]
fn generate_without_model_uses_the_shipped_one() {
    let out = scratch("x.png");
    let _ = std::fs::remove_file(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_steer"))
        .args([
            "generate",
            PROMPT,
            "--steps",
            "5",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "steer generate failed: {stderr}");
    assert!(stderr.contains("shipped ShapesWorld model"), "{stderr}");
    let image = steer::image::load_png(&out).unwrap();
    assert_eq!(image.shape(), &[1, 3, 32, 32]);
}

/// A copy of the tiny SD2.1 fixture without its vae/ folder, with `vae` in model_index.json
/// replaced by `vae` (a JSON value, or `None` to remove the key).
fn tiny_without_vae(name: &str, vae: Option<serde_json::Value>) -> PathBuf {
    fn copy(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let dir = scratch(name);
    let _ = std::fs::remove_dir_all(&dir);
    copy(std::path::Path::new("tests/fixtures/tiny-sd21"), &dir);
    std::fs::remove_dir_all(dir.join("vae")).unwrap();
    let index = dir.join("model_index.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let obj = json.as_object_mut().unwrap();
    match vae {
        Some(v) => obj.insert("vae".into(), v),
        None => obj.remove("vae"),
    };
    std::fs::write(&index, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    dir
}

#[test]
fn a_missing_vae_is_pixel_space_only_when_the_index_names_none() {
    // The index names a VAE but vae/ is gone: the VAE loader's error, naming the folder.
    let named = tiny_without_vae("named", None);
    std::fs::copy(
        "tests/fixtures/tiny-sd21/model_index.json",
        named.join("model_index.json"),
    )
    .unwrap();
    let err = StableDiffusion::from_dir(&named).err().unwrap().to_string();
    assert!(err.contains("vae"), "{err}");
    // No VAE named (null, [null, null], key absent) and no vae/: pixel space, which a UNet
    // with 4 channels cannot be.
    for (name, vae) in [
        ("null", Some(serde_json::Value::Null)),
        ("nulls", Some(serde_json::json!([null, null]))),
        ("absent", None),
    ] {
        let dir = tiny_without_vae(name, vae);
        let err = StableDiffusion::from_dir(&dir).err().unwrap().to_string();
        assert!(
            err.contains("pixel-space") && err.contains("4 input"),
            "{name}: {err}"
        );
    }
}
