//! Layers with their weights: each loads itself by the checkpoint's tensor names, runs its op
//! forward, and runs the backward to its input (the denoiser is frozen, so steering needs input
//! gradients only; training code calls the ops' weight-gradient forms directly).

use crate::ops::{self, Conv2dParams};
use crate::weights::WeightsView;
use crate::{Result, Tensor};

/// torch.nn.Linear: `weight` (out, in), optional `bias` (out).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(
        w: &WeightsView,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        Ok(Linear {
            weight: w.get("weight", &[out_features, in_features])?,
            bias: if bias {
                Some(w.get("bias", &[out_features])?)
            } else {
                None
            },
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::linear_backward(x, &self.weight, dy, false)?.dx)
    }
}

/// torch.nn.Conv2d with a square kernel, stride and symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub params: Conv2dParams,
}

impl Conv2d {
    pub fn load(
        w: &WeightsView,
        cin: usize,
        cout: usize,
        kernel: usize,
        params: Conv2dParams,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: w.get("weight", &[cout, cin, kernel, kernel])?,
            bias: Some(w.get("bias", &[cout])?),
            params,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, self.bias.as_ref(), self.params)
    }
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::conv2d_backward(x, &self.weight, dy, self.params, false)?.dx)
    }
}

/// torch.nn.GroupNorm (affine).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(w: &WeightsView, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(GroupNorm {
            weight: w.get("weight", &[channels])?,
            bias: w.get("bias", &[channels])?,
            groups,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::group_norm(
            x,
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
        )
    }
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm_backward(x, self.groups, Some(&self.weight), false, self.eps, dy)?.dx)
    }
}

/// torch.nn.LayerNorm over the last dimension (affine).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &WeightsView, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.get("weight", &[dim])?,
            bias: w.get("bias", &[dim])?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, Some(&self.weight), Some(&self.bias), self.eps)
    }
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        Ok(ops::layer_norm_backward(x, Some(&self.weight), false, self.eps, dy)?.dx)
    }
}
