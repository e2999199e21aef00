//! diffusers' `Transformer2DModel` with linear projection (SD2.1) and its `BasicTransformerBlock`s:
//! self attention, cross attention to the text (where the maps are captured), GEGLU feed-forward.

use crate::models::attention::{Attention, AttentionSaved};
use crate::nn::{GroupNorm, LayerNorm, Linear};
use crate::ops::{self, Capture};
use crate::weights::WeightsView;
use crate::{Result, Tensor};

#[derive(Clone, Debug)]
pub struct FeedForward {
    /// `ff.net.0.proj`: dim -> 2 * inner (GEGLU's value and gate halves).
    pub proj: Linear,
    /// `ff.net.2`: inner -> dim.
    pub out: Linear,
}

#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

pub struct BlockSaved {
    h0: Tensor,
    a1: AttentionSaved,
    h1: Tensor,
    a2: AttentionSaved,
    h2: Tensor,
    n3: Tensor,
    p: Tensor,
    g: Tensor,
}

impl BasicTransformerBlock {
    pub fn load(
        w: &WeightsView,
        dim: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
    ) -> Result<Self> {
        let inner = 4 * dim;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&w.pp("attn1"), dim, dim, heads, head_dim, false)?,
            norm2: LayerNorm::load(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(&w.pp("attn2"), dim, context_dim, heads, head_dim, false)?,
            norm3: LayerNorm::load(&w.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward {
                proj: Linear::load(&w.pp("ff.net.0.proj"), dim, 2 * inner, true)?,
                out: Linear::load(&w.pp("ff.net.2"), inner, dim, true)?,
            },
        })
    }

    pub fn forward(
        &self,
        h0: &Tensor,
        context: &Tensor,
        capture: Option<&Capture>,
    ) -> Result<(Tensor, Option<Tensor>, BlockSaved)> {
        let (a, _, a1) = self.attn1.forward(&self.norm1.forward(h0)?, None, None)?;
        let h1 = ops::add(h0, &a)?;
        let (a, maps, a2) =
            self.attn2
                .forward(&self.norm2.forward(&h1)?, Some(context), capture)?;
        let h2 = ops::add(&h1, &a)?;
        let n3 = self.norm3.forward(&h2)?;
        let p = self.ff.proj.forward(&n3)?;
        let g = ops::geglu(&p)?;
        let y = ops::add(&h2, &self.ff.out.forward(&g)?)?;
        Ok((
            y,
            maps,
            BlockSaved {
                h0: h0.clone(),
                a1,
                h1,
                a2,
                h2,
                n3,
                p,
                g,
            },
        ))
    }

    /// Gradient to the block's input; `dy` `None` means zero (only the maps carry gradient).
    pub fn backward(
        &self,
        s: &BlockSaved,
        dy: Option<&Tensor>,
        dmaps: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let mut dh2 = dy.cloned();
        if let Some(dy) = dy {
            let dg = self.ff.out.backward(&s.g, dy)?;
            let dn3 = self
                .ff
                .proj
                .backward(&s.n3, &ops::geglu_backward(&s.p, &dg)?)?;
            dh2 = Some(ops::add(dy, &self.norm3.backward(&s.h2, &dn3)?)?);
        }
        if dh2.is_none() && dmaps.is_none() {
            return Ok(None);
        }
        let da2 = self.attn2.backward(&s.a2, dh2.as_ref(), dmaps)?;
        let dn2 = self.norm2.backward(&s.h1, &da2)?;
        let dh1 = match dh2 {
            Some(d) => ops::add(&d, &dn2)?,
            None => dn2,
        };
        let da1 = self.attn1.backward(&s.a1, Some(&dh1), None)?;
        Ok(Some(ops::add(&dh1, &self.norm1.backward(&s.h0, &da1)?)?))
    }
}

/// `Transformer2DModel` (one transformer layer per block, as SD2.1).
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Linear,
}

pub struct TransformerSaved {
    x: Tensor,
    tokens_in: Tensor,
    blocks: Vec<BlockSaved>,
    tokens_out: Tensor,
}

/// (B, C, H, W) <-> (B, H*W, C).
fn to_tokens(x: &Tensor) -> Result<Tensor> {
    let s = x.shape();
    ops::permute(x, &[0, 2, 3, 1])?.reshape(&[s[0], s[2] * s[3], s[1]])
}

fn from_tokens(t: &Tensor, shape: &[usize]) -> Result<Tensor> {
    ops::permute(
        &t.reshape(&[shape[0], shape[2], shape[3], shape[1]])?,
        &[0, 3, 1, 2],
    )
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        w: &WeightsView,
        channels: usize,
        heads: usize,
        head_dim: usize,
        context_dim: usize,
        layers: usize,
        groups: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Transformer2DModel {
            norm: GroupNorm::load(&w.pp("norm"), channels, groups, 1e-6)?,
            proj_in: Linear::load(&w.pp("proj_in"), channels, inner, true)?,
            transformer_blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        &w.pp("transformer_blocks").pp(i),
                        inner,
                        heads,
                        head_dim,
                        context_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Linear::load(&w.pp("proj_out"), inner, channels, true)?,
        })
    }

    /// `x`: (B, C, H, W). Maps of every transformer block's cross attention, in order.
    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        capture: Option<&Capture>,
    ) -> Result<(Tensor, Vec<Tensor>, TransformerSaved)> {
        let tokens_in = to_tokens(&self.norm.forward(x)?)?;
        let mut h = self.proj_in.forward(&tokens_in)?;
        let (mut maps, mut blocks) = (Vec::new(), Vec::new());
        for b in &self.transformer_blocks {
            let (y, m, s) = b.forward(&h, context, capture)?;
            h = y;
            maps.extend(m);
            blocks.push(s);
        }
        let y = from_tokens(&self.proj_out.forward(&h)?, x.shape())?;
        Ok((
            ops::add(&y, x)?,
            maps,
            TransformerSaved {
                x: x.clone(),
                tokens_in,
                blocks,
                tokens_out: h,
            },
        ))
    }

    /// Gradient to `x`. `dmaps[i]` is the gradient on block i's maps, if any.
    pub fn backward(
        &self,
        s: &TransformerSaved,
        dy: Option<&Tensor>,
        dmaps: &[Option<Tensor>],
    ) -> Result<Option<Tensor>> {
        let mut dh = match dy {
            Some(dy) => Some(self.proj_out.backward(&s.tokens_out, &to_tokens(dy)?)?),
            None => None,
        };
        for (i, (b, bs)) in self
            .transformer_blocks
            .iter()
            .zip(&s.blocks)
            .enumerate()
            .rev()
        {
            dh = b.backward(bs, dh.as_ref(), dmaps.get(i).and_then(|m| m.as_ref()))?;
        }
        let Some(dh) = dh else { return Ok(dy.cloned()) };
        let dn = from_tokens(&self.proj_in.backward(&s.tokens_in, &dh)?, s.x.shape())?;
        let dx = self.norm.backward(&s.x, &dn)?;
        Ok(Some(match dy {
            Some(dy) => ops::add(&dx, dy)?,
            None => dx,
        }))
    }
}
