//! diffusers' `Attention` (to_q, to_k, to_v, to_out.0): multi-head attention over token sequences
//! (B, L, C), self or cross, with optional map capture. Shared by the UNet's transformer blocks and
//! the VAE's mid-block attention.

use crate::nn::Linear;
use crate::ops::{self, Capture};
use crate::weights::WeightsView;
use crate::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
}

/// What the backward needs: the inputs, and q, k, v split into heads; and the output by heads
/// with its log-sum-exps when the forward saved them (`ops::attention_backward_saved`).
pub struct AttentionSaved {
    x: Tensor,
    context: Option<Tensor>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    merged: Tensor,
    capture: Option<Capture>,
    out_lse: Option<(Tensor, Tensor)>,
}

/// (B, L, heads * d) -> (B, heads, L, d).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let s = x.shape();
    let (b, l, c) = (s[0], s[1], s[2]);
    ops::permute(&x.reshape(&[b, l, heads, c / heads])?, &[0, 2, 1, 3])
}

/// (B, heads, L, d) -> (B, L, heads * d).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    let (b, h, l, d) = (s[0], s[1], s[2], s[3]);
    ops::permute(x, &[0, 2, 1, 3])?.reshape(&[b, l, h * d])
}

impl Attention {
    /// `query_dim` is the input width, `context_dim` the keys' (the text width for cross
    /// attention), `bias` whether q/k/v projections have biases (the VAE's do, the UNet's don't).
    pub fn load(
        w: &WeightsView,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::load(&w.pp("to_q"), query_dim, inner, bias)?,
            to_k: Linear::load(&w.pp("to_k"), context_dim, inner, bias)?,
            to_v: Linear::load(&w.pp("to_v"), context_dim, inner, bias)?,
            to_out: Linear::load(&w.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `x`: (B, Lq, C); `context`: (B, Lk, Cctx) for cross attention, `None` for self attention.
    /// Returns the output (B, Lq, C), the captured maps (B, words, heads, Lq) when asked, and
    /// what the backward needs.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        capture: Option<&Capture>,
    ) -> Result<(Tensor, Option<Tensor>, AttentionSaved)> {
        let ctx = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(ctx)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(ctx)?, self.heads)?;
        let o = ops::attention(&q, &k, &v, self.scale(), capture)?;
        let merged = merge_heads(&o.out)?;
        let y = self.to_out.forward(&merged)?;
        let saved = AttentionSaved {
            x: x.clone(),
            context: context.cloned(),
            q,
            k,
            v,
            merged,
            capture: capture.cloned(),
            out_lse: o.lse.map(|lse| (o.out, lse)),
        };
        Ok((y, o.maps, saved))
    }

    /// Gradient to `x` of `sum(y * dy) + sum(maps * dmaps)`. For cross attention the context is
    /// frozen text, so only the query path is differentiated.
    pub fn backward(
        &self,
        s: &AttentionSaved,
        dy: Option<&Tensor>,
        dmaps: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dout = match dy {
            Some(dy) => split_heads(&self.to_out.backward(&s.merged, dy)?, self.heads)?,
            None => Tensor::zeros(
                &[s.q.shape()[0], self.heads, s.q.shape()[2], s.v.shape()[3]],
                s.q.dtype(),
            )
            .to_like(&s.q)?,
        };
        // The maps' gradient comes from the host (where the maps are resized and classified).
        let dmaps = dmaps.map(|g| g.to_device_of(&s.q)).transpose()?;
        let cap = match (&s.capture, dmaps.as_ref()) {
            (Some(c), Some(g)) => Some((c, g)),
            _ => None,
        };
        let self_attn = s.context.is_none();
        // The forward saved out and lse only without a capture.
        let g = match &s.out_lse {
            Some((out, lse)) => ops::attention_backward_saved(
                &s.q,
                &s.k,
                &s.v,
                self.scale(),
                out,
                lse,
                &dout,
                self_attn,
            )?,
            None => ops::attention_backward(&s.q, &s.k, &s.v, self.scale(), &dout, cap, self_attn)?,
        };
        let mut dx = self.to_q.backward(&s.x, &merge_heads(&g.dq)?)?;
        if let (Some(dk), Some(dv)) = (g.dk, g.dv) {
            dx = ops::add(&dx, &self.to_k.backward(&s.x, &merge_heads(&dk)?)?)?;
            dx = ops::add(&dx, &self.to_v.backward(&s.x, &merge_heads(&dv)?)?)?;
        }
        Ok(dx)
    }
}
