//! The VAE (`AutoencoderKL`) against diffusers on the tiny SD2.1 fixture
//! (tests/reference/sd21_fixtures.py: random weights with SD2.1's block structure, stored in f16,
//! references computed by diffusers in f32), and its errors on bad input.

use std::path::{Path, PathBuf};

use steer::models::autoencoder::AutoencoderKL;
use steer::weights::Weights;
use steer::Tensor;

/// f32 against PyTorch f32: only summation order differs.
const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn vae_dir() -> PathBuf {
    fixtures().join("tiny-sd21/vae")
}

fn reference(name: &str, shape: &[usize]) -> Tensor {
    Weights::from_file(fixtures().join("tiny-sd21-reference.safetensors"))
        .unwrap()
        .get(name, shape)
        .unwrap()
}

#[test]
fn encode_matches_diffusers() {
    let vae = AutoencoderKL::from_dir(vae_dir()).unwrap();
    let image = reference("vae.image", &[1, 3, 32, 32]);
    let want = reference("vae.encoded_mean", &[1, 4, 16, 16]);
    let got = vae.encode(&image).unwrap();
    let err = got.rel_error(&want).unwrap();
    eprintln!("vae encode: relative error {err:e}");
    assert!(err <= TOL, "vae encode: relative error {err:e}");
}

#[test]
fn decode_matches_diffusers() {
    let vae = AutoencoderKL::from_dir(vae_dir()).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    let latent = reference("vae.latent", &[1, 4, 8, 8]);
    let want = reference("vae.decoded", &[1, 3, 16, 16]);
    let got = vae.decode(&latent).unwrap();
    let err = got.rel_error(&want).unwrap();
    eprintln!("vae decode: relative error {err:e}");
    assert!(err <= TOL, "vae decode: relative error {err:e}");
}

/// Checkpoints saved before diffusers 0.14 (many hub VAEs) name the mid-block
/// attention's projections query/key/value/proj_attn; they must load to the same model.
#[test]
fn legacy_attention_names_load() {
    let dir = scratch_copy("legacy-names");
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let name = name
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (name, t)
        })
        .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n.ends_with("attentions.0.proj_attn.weight")));
    safetensors::serialize_to_file(renamed, None, &path).unwrap();
    let legacy = AutoencoderKL::from_dir(&dir).unwrap();
    let current = AutoencoderKL::from_dir(vae_dir()).unwrap();
    let image = reference("vae.image", &[1, 3, 32, 32]);
    let latent = reference("vae.latent", &[1, 4, 8, 8]);
    let (a, b) = (
        legacy.encode(&image).unwrap(),
        current.encode(&image).unwrap(),
    );
    assert_eq!(a.rel_error(&b).unwrap(), 0.0);
    let (a, b) = (
        legacy.decode(&latent).unwrap(),
        current.decode(&latent).unwrap(),
    );
    assert_eq!(a.rel_error(&b).unwrap(), 0.0);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scratch copy of the fixture's vae/ folder that a test may break.
fn scratch_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-sd21-vae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(vae_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    match AutoencoderKL::from_dir(dir) {
        Ok(_) => panic!("{}: loaded a broken VAE", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_dir_names_the_file() {
    let dir = fixtures().join("no-such-pipeline/vae");
    let msg = load_error(&dir);
    assert!(msg.contains("no-such-pipeline/vae/config.json"), "{msg}");
}

#[test]
fn missing_weights_name_the_folder() {
    let dir = scratch_copy("no-weights");
    std::fs::remove_file(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let msg = load_error(&dir);
    assert!(
        msg.contains(&*dir.to_string_lossy())
            && msg.contains("diffusion_pytorch_model.safetensors"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    // Misspell one tensor's name in the safetensors header (same length, so every offset and
    // the header size stay valid): the loader must then report the expected name as missing.
    let dir = scratch_copy("missing-tensor");
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let gone = "decoder.up_blocks.0.upsamplers.0.conv.weight";
    let quoted = format!("\"{gone}\"");
    let at = bytes[8..8 + n]
        .windows(quoted.len())
        .position(|w| w == quoted.as_bytes())
        .expect("the fixture has the tensor");
    bytes[8 + at + quoted.len() - 2] = b'X';
    std::fs::write(&path, bytes).unwrap();
    let msg = load_error(&dir);
    assert!(
        msg.contains(gone) && msg.contains(&*dir.to_string_lossy()),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_config_is_refused_by_name() {
    let dir = scratch_copy("bad-config");
    let cfg_path = dir.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    for (key, value, expect) in [
        (
            "down_block_types",
            serde_json::json!(["AttnDownEncoderBlock2D", "DownEncoderBlock2D"]),
            "AttnDownEncoderBlock2D",
        ),
        ("act_fn", serde_json::json!("gelu"), "act_fn"),
        ("shift_factor", serde_json::json!(0.1159), "shift_factor"),
        ("norm_num_groups", serde_json::json!(3), "norm_num_groups"),
    ] {
        let mut cfg = original.clone();
        cfg[key] = value;
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        let msg = load_error(&dir);
        assert!(msg.contains(expect), "{key}: {msg}");
    }
    // A required key that is absent: serde names it, and the error names the file.
    let mut cfg = original.clone();
    cfg.as_object_mut().unwrap().remove("block_out_channels");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let msg = load_error(&dir);
    assert!(
        msg.contains("block_out_channels") && msg.contains("config.json"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_input_shape_is_an_error() {
    let vae = AutoencoderKL::from_dir(vae_dir()).unwrap();
    let msg = vae
        .encode(&Tensor::zeros(&[1, 4, 32, 32], steer::DType::F32))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("image"), "{msg}");
    let msg = vae
        .decode(&Tensor::zeros(&[1, 3, 8, 8], steer::DType::F32))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("latent"), "{msg}");
}
