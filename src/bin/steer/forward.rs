//! `steer forward`: evaluate one model component on tensors read from a safetensors file and
//! write its outputs to another, so a user can check their weights against PyTorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use steer::models::autoencoder::AutoencoderKL;
use steer::models::clip_text::CLIPTextModel;
use steer::models::unet::UNet2DConditionModel;
use steer::safetensors_io::{self, SafetensorsFile};
use steer::steering::unet_maps::unet_with_maps;
use steer::weights::Placement;
use steer::{DType, Error, Result, Tensor};

use crate::device::Device;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Component {
    Unet,
    TextEncoder,
    VaeDecoder,
    VaeEncoder,
}

impl Component {
    fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::VaeDecoder | Component::VaeEncoder => "vae",
        }
    }
}

#[derive(Args)]
pub struct ForwardArgs {
    /// A diffusers pipeline folder (with unet/, text_encoder/, vae/, ...) or one component's folder.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub component: Component,
    /// Inputs, named as the diffusers forward() arguments: unet: sample, timestep,
    /// encoder_hidden_states (+ capture_tokens_0, capture_tokens_1, maps_cotangent);
    /// text-encoder: input_ids; vae-decoder: latent; vae-encoder: image.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs: unet: out (+ maps, sample_grad); text-encoder:
    /// last_hidden_state, pooler_output; vae-decoder: decoded; vae-encoder: encoded_mean.
    #[arg(long)]
    pub out: PathBuf,
    /// cpu (f32), or cuda / cuda:N (bf16 weights and activations on that GPU). Outputs are
    /// written as f32 either way.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
}

/// The component's folder: `model/<component>` or `model` itself when it holds a config.json.
fn component_dir(model: &Path, c: Component) -> Result<PathBuf> {
    let sub = model.join(c.folder());
    if sub.is_dir() {
        return Ok(sub);
    }
    if model.join("config.json").is_file() {
        return Ok(model.to_path_buf());
    }
    Err(Error::format(
        model,
        format!("no `{}` folder (and no config.json) here", c.folder()),
    ))
}

fn input(file: &SafetensorsFile, name: &str) -> Result<Tensor> {
    if !file.contains(name) {
        return Err(Error::format(
            file.path(),
            format!("missing input tensor `{name}`"),
        ));
    }
    file.tensor(name)?.to_dtype(DType::F32)
}

fn indices(file: &SafetensorsFile, name: &str) -> Result<Vec<usize>> {
    let t = file.tensor(name)?;
    let v = t.to_vec::<i64>()?;
    if t.dtype() != DType::I64 || v.iter().any(|&i| i < 0) {
        return Err(Error::format(
            file.path(),
            format!("`{name}` must hold non-negative int64 token indices"),
        ));
    }
    Ok(v.into_iter().map(|i| i as usize).collect())
}

pub fn run(args: &ForwardArgs) -> Result<()> {
    let dir = component_dir(&args.model, args.component)?;
    let inputs = SafetensorsFile::open(&args.inputs)?;
    let placement = args.device.placement()?;
    let outputs = match args.component {
        Component::Unet => unet(&dir, &inputs, &placement)?,
        Component::TextEncoder => {
            let model = CLIPTextModel::from_dir_placed(&dir, placement)?;
            let ids = inputs.tensor("input_ids")?;
            if ids.dtype() != DType::I64 {
                return Err(Error::format(inputs.path(), "`input_ids` must be int64"));
            }
            let o = model.forward_tensor(&ids)?;
            vec![
                ("last_hidden_state".into(), o.last_hidden_state),
                ("pooler_output".into(), o.pooler_output),
            ]
        }
        Component::VaeDecoder => {
            let vae = AutoencoderKL::from_dir_placed(&dir, placement)?;
            vec![("decoded".into(), vae.decode(&input(&inputs, "latent")?)?)]
        }
        Component::VaeEncoder => {
            let vae = AutoencoderKL::from_dir_placed(&dir, placement)?;
            vec![(
                "encoded_mean".into(),
                vae.encode(&input(&inputs, "image")?)?,
            )]
        }
    };
    let outputs: Vec<(String, Tensor)> = outputs
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_host()?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let named: Vec<(&str, &Tensor)> = outputs.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let meta = HashMap::from([("component".to_string(), args.component.folder().to_string())]);
    safetensors_io::save(&args.out, &named, Some(meta))?;
    for (n, t) in &outputs {
        eprintln!("wrote {n} {:?}", t.shape());
    }
    Ok(())
}

fn unet(
    dir: &Path,
    inputs: &SafetensorsFile,
    placement: &Placement,
) -> Result<Vec<(String, Tensor)>> {
    let unet = UNet2DConditionModel::from_dir_placed(dir, placement.clone())?;
    let sample = placement.place(&input(inputs, "sample")?)?;
    let context = placement.place(&input(inputs, "encoder_hidden_states")?)?;
    let ts = input(inputs, "timestep")?.to_vec::<f64>()?;
    let Some(&t) = ts.first() else {
        return Err(Error::format(inputs.path(), "`timestep` is empty"));
    };
    if ts.iter().any(|&x| x != t) {
        return Err(Error::format(
            inputs.path(),
            "`timestep` must be the same for every batch entry",
        ));
    }
    if !(inputs.contains("capture_tokens_0") && inputs.contains("capture_tokens_1")) {
        let out = unet.forward(&sample, t, &context, None, false)?.out;
        return Ok(vec![("out".into(), out)]);
    }
    let words = vec![
        indices(inputs, "capture_tokens_0")?,
        indices(inputs, "capture_tokens_1")?,
    ];
    let want_grad = inputs.contains("maps_cotangent");
    let o = unet_with_maps(&unet, &sample, t, &context, &words, want_grad)?;
    // Batch 1 is reported as (2, N, 16, 16), as the classifier reads one sample's maps.
    let squeeze = |m: &Tensor| {
        if m.shape()[0] == 1 {
            m.reshape(&m.shape()[1..])
        } else {
            Ok(m.clone())
        }
    };
    let mut outs = vec![
        ("out".to_string(), o.out.clone()),
        ("maps".to_string(), squeeze(&o.maps)?),
    ];
    if want_grad {
        let cot = input(inputs, "maps_cotangent")?;
        if cot.numel() != o.maps.numel() {
            return Err(Error::format(
                inputs.path(),
                format!(
                    "`maps_cotangent` {:?} does not match the maps {:?}",
                    cot.shape(),
                    squeeze(&o.maps)?.shape()
                ),
            ));
        }
        outs.push((
            "sample_grad".into(),
            o.sample_grad(&unet, &cot.reshape(o.maps.shape())?)?,
        ));
    }
    Ok(outs)
}
