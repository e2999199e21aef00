//! The SD2.1 UNet with map capture: one forward that returns the prediction and the classifier's
//! input maps, and the gradient of a loss on those maps with respect to the latent.

use super::capture::{assemble, assemble_backward, Assembly, NativeMaps};
use crate::models::unet::{LayerMaps, Tape, UNet2DConditionModel};
use crate::ops::Capture;
use crate::{Error, Result, Tensor};

pub struct UNetMaps {
    /// The UNet's prediction.
    pub out: Tensor,
    /// (B, words, N, 16, 16), assembled as SPEC section 3 orders them.
    pub maps: Tensor,
    layers: Vec<LayerMaps>,
    assembly: Assembly,
    tape: Option<Tape>,
}

/// Run the UNet capturing the maps of `words` (each a list of token indices into the 77-token
/// prompt). Keep the tape when the latent gradient will be asked for.
pub fn unet_with_maps(
    unet: &UNet2DConditionModel,
    sample: &Tensor,
    timestep: f64,
    context: &Tensor,
    words: &[Vec<usize>],
    keep_tape: bool,
) -> Result<UNetMaps> {
    let lk = context.shape().get(1).copied().unwrap_or(0);
    for (i, w) in words.iter().enumerate() {
        if let Some(&j) = w.iter().find(|&&j| j >= lk) {
            return Err(Error::Invalid(format!(
                "capture word {i}: token index {j} is outside the {lk} text tokens"
            )));
        }
    }
    let capture = Capture {
        words: words.to_vec(),
        softmax_cols: None,
    };
    let o = unet.forward(sample, timestep, context, Some(&capture), keep_tape)?;
    let native: Vec<NativeMaps> = o
        .maps
        .iter()
        .map(|m| NativeMaps {
            maps: &m.maps,
            height: m.height,
            width: m.width,
        })
        .collect();
    let (maps, assembly) = assemble(&native)?;
    Ok(UNetMaps {
        out: o.out,
        maps,
        layers: o.maps,
        assembly,
        tape: o.tape,
    })
}

impl UNetMaps {
    /// Maps per word (N): 195 for SD2.1.
    pub fn maps_per_word(&self) -> usize {
        self.assembly.maps_per_word()
    }

    /// The gradient of `sum(maps * dmaps)` with respect to the sample (`dmaps` shaped as `maps`).
    pub fn sample_grad(&self, unet: &UNet2DConditionModel, dmaps: &Tensor) -> Result<Tensor> {
        let Some(tape) = &self.tape else {
            return Err(Error::Invalid(
                "sample_grad needs the forward to keep its tape".into(),
            ));
        };
        if dmaps.shape() != self.maps.shape() {
            return Err(Error::shape(
                "sample_grad",
                format!("dmaps {:?} vs maps {:?}", dmaps.shape(), self.maps.shape()),
            ));
        }
        let native: Vec<NativeMaps> = self
            .layers
            .iter()
            .map(|m| NativeMaps {
                maps: &m.maps,
                height: m.height,
                width: m.width,
            })
            .collect();
        let dnative = assemble_backward(&native, &self.assembly, dmaps)?;
        let dmaps: Vec<Option<Tensor>> = dnative.into_iter().map(Some).collect();
        unet.backward_to_sample(tape, None, &dmaps)
    }
}
