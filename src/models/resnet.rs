//! diffusers' `ResnetBlock2D` (resnet_time_scale_shift "default", SiLU), shared by the UNet
//! (with a time embedding) and the VAE (without).

use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::ops::{self, Activation, Conv2dParams};
use crate::weights::WeightsView;
use crate::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

/// The block's input and the pre-activation tensors; the SiLU outputs are recomputed.
pub struct ResnetSaved {
    x: Tensor,
    n1: Tensor,
    h1: Tensor,
    n2: Tensor,
}

const SAME: Conv2dParams = Conv2dParams {
    stride: 1,
    padding: 1,
};

impl ResnetBlock2D {
    /// `temb_channels`: the time embedding's width, or `None` (VAE).
    pub fn load(
        w: &WeightsView,
        cin: usize,
        cout: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        output_scale_factor: f64,
    ) -> Result<Self> {
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&w.pp("norm1"), cin, groups, eps)?,
            conv1: Conv2d::load(&w.pp("conv1"), cin, cout, 3, SAME)?,
            time_emb_proj: temb_channels
                .map(|t| Linear::load(&w.pp("time_emb_proj"), t, cout, true))
                .transpose()?,
            norm2: GroupNorm::load(&w.pp("norm2"), cout, groups, eps)?,
            conv2: Conv2d::load(&w.pp("conv2"), cout, cout, 3, SAME)?,
            conv_shortcut: if cin != cout {
                Some(Conv2d::load(
                    &w.pp("conv_shortcut"),
                    cin,
                    cout,
                    1,
                    Conv2dParams::default(),
                )?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `x`: (B, Cin, H, W); `temb`: (B, T) when the block has a time projection.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, ResnetSaved)> {
        let n1 = self.norm1.forward(x)?;
        let mut h1 = self
            .conv1
            .forward(&ops::activation(&n1, Activation::Silu)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&ops::activation(t, Activation::Silu)?)?;
            h1 = ops::add_channels(&h1, &t)?;
        }
        let n2 = self.norm2.forward(&h1)?;
        let h2 = self
            .conv2
            .forward(&ops::activation(&n2, Activation::Silu)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let mut y = ops::add(&shortcut, &h2)?;
        if self.output_scale_factor != 1.0 {
            y = ops::scale(&y, 1.0 / self.output_scale_factor)?;
        }
        Ok((
            y,
            ResnetSaved {
                x: x.clone(),
                n1,
                h1,
                n2,
            },
        ))
    }

    /// Gradient to `x` of `sum(y * dy)` (the time embedding does not depend on the latent).
    pub fn backward(&self, s: &ResnetSaved, dy: &Tensor) -> Result<Tensor> {
        let dy = if self.output_scale_factor != 1.0 {
            ops::scale(dy, 1.0 / self.output_scale_factor)?
        } else {
            dy.clone()
        };
        let s2 = ops::activation(&s.n2, Activation::Silu)?;
        let dn2 =
            ops::activation_backward(&s.n2, &self.conv2.backward(&s2, &dy)?, Activation::Silu)?;
        let dh1 = self.norm2.backward(&s.h1, &dn2)?;
        let s1 = ops::activation(&s.n1, Activation::Silu)?;
        let dn1 =
            ops::activation_backward(&s.n1, &self.conv1.backward(&s1, &dh1)?, Activation::Silu)?;
        let dx = self.norm1.backward(&s.x, &dn1)?;
        let dshort = match &self.conv_shortcut {
            Some(c) => c.backward(&s.x, &dy)?,
            None => dy,
        };
        ops::add(&dx, &dshort)
    }
}
