//! Scaled-dot-product attention with optional capture of attention maps: the probabilities of
//! selected key columns (a prompt word's tokens), averaged over each word's columns, per batch
//! entry, head and query. Self, cross and joint attention are all this op (joint attention is
//! attention over concatenated token streams).
//!
//! Nothing the size of the full attention matrix is kept: query rows are processed in blocks,
//! and the backward recomputes the probabilities. The backward takes an optional gradient on the
//! captured maps and injects it into dP on the captured columns, so the gradient of a loss on the
//! maps flows to the queries and keys without any hook.

use std::ops::Range;

use rayon::prelude::*;

use super::activation::{softmax_row, softmax_row_backward};
use super::linalg::{gemm, Layout};
use super::{expect_rank, float_dispatch, same_dtype};
use crate::{Error, Float, Result, Tensor};

/// Which maps to capture.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capture {
    /// For each word, the key columns (token indices) whose probabilities are averaged.
    pub words: Vec<Vec<usize>>,
    /// `None`: the maps are the attention probabilities themselves (SD2.1: softmax over all 77
    /// text tokens). `Some(cols)`: the maps are a softmax of the same logits over these key
    /// columns only (FLUX: the text columns of the joint attention); the words' indices must lie
    /// inside `cols`.
    pub softmax_cols: Option<Range<usize>>,
}

pub struct AttentionOutput {
    /// (B, H, Lq, Dv)
    pub out: Tensor,
    /// (B, words, H, Lq), present when a capture was asked for.
    pub maps: Option<Tensor>,
}

pub struct AttentionGrads {
    pub dq: Tensor,
    /// Present when asked for (`kv_grads`); cross-attention from frozen text needs only `dq`.
    pub dk: Option<Tensor>,
    pub dv: Option<Tensor>,
}

/// Query rows processed together: bounds the logits block to ROWS x Lk.
const ROWS: usize = 128;

#[derive(Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
}

pub(crate) fn dims(op: &'static str, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    expect_rank(op, "q", q, 4)?;
    expect_rank(op, "k", k, 4)?;
    expect_rank(op, "v", v, 4)?;
    same_dtype(op, q, k)?;
    same_dtype(op, q, v)?;
    let (qs, ks, vs) = (q.shape(), k.shape(), v.shape());
    if qs[..2] != ks[..2] || ks[..3] != vs[..3] || qs[3] != ks[3] {
        return Err(Error::shape(
            op,
            format!(
                "q {qs:?}, k {ks:?}, v {vs:?} must be (B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, Dv)"
            ),
        ));
    }
    Ok(Dims {
        b: qs[0],
        h: qs[1],
        lq: qs[2],
        lk: ks[2],
        d: qs[3],
        dv: vs[3],
    })
}

pub(crate) fn check_capture(op: &'static str, c: &Capture, lk: usize) -> Result<()> {
    let cols = c.softmax_cols.clone().unwrap_or(0..lk);
    if cols.end > lk || cols.is_empty() {
        return Err(Error::Invalid(format!(
            "{op}: capture columns {cols:?} outside the {lk} keys"
        )));
    }
    for (w, word) in c.words.iter().enumerate() {
        if word.is_empty() {
            return Err(Error::Invalid(format!(
                "{op}: capture word {w} has no token indices"
            )));
        }
        if let Some(&j) = word.iter().find(|j| !cols.contains(j)) {
            return Err(Error::Invalid(format!(
                "{op}: capture word {w} token index {j} is outside the captured columns {cols:?}"
            )));
        }
    }
    Ok(())
}

/// Logits of the block of query rows starting at `r0`: s = q_rows @ k^T * scale, (rows, Lk);
/// with `causal`, keys after the query's own position are masked out (-inf).
#[allow(clippy::too_many_arguments)]
fn logits<T: Float>(
    q_rows: &[T],
    k: &[T],
    r0: usize,
    rows: usize,
    dm: &Dims,
    scale: T,
    causal: bool,
    s: &mut [T],
) {
    gemm(rows, dm.lk, dm.d, q_rows, Layout::N, k, Layout::T, s, false);
    s.iter_mut().for_each(|x| *x *= scale);
    if causal {
        for (i, row) in s.chunks_mut(dm.lk).enumerate() {
            row[(r0 + i + 1).min(dm.lk)..].fill(T::NEG_INFINITY);
        }
    }
}

/// The probabilities the maps read, for one row of logits `s` whose full softmax is `p`.
fn map_probs<T: Float>(c: &Capture, s: &[T], p: &[T], buf: &mut Vec<T>) -> Range<usize> {
    match &c.softmax_cols {
        None => {
            buf.clear();
            buf.extend_from_slice(p);
            0..p.len()
        }
        Some(cols) => {
            buf.clear();
            buf.extend_from_slice(&s[cols.clone()]);
            softmax_row(buf);
            cols.clone()
        }
    }
}

/// softmax(q k^T * scale) v, with optional capture. Host tensors (f32, f64) run on the CPU;
/// bf16 tensors on a CUDA device run the fused kernel (kernels/attention.cu), whose maps are f32
/// (head dims past 128 without capture: the explicit path of src/cuda/attention.rs).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    capture: Option<&Capture>,
) -> Result<AttentionOutput> {
    crate::cuda::kernel_dispatch!(q, m => crate::cuda::attention::attention(m, q, k, v, scale, capture, false));
    attention_impl(q, k, v, scale, capture, false)
}

/// Attention in which query `i` sees keys `0..=i` only (CLIP's text encoder); `Lq == Lk`.
pub fn attention_causal(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    crate::cuda::kernel_dispatch!(q, m => Ok(crate::cuda::attention::attention(m, q, k, v, scale, None, true)?.out));
    Ok(attention_impl(q, k, v, scale, None, true)?.out)
}

/// Gradients of `sum(attention_causal(q, k, v, scale) * dout)`.
pub fn attention_causal_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dout: &Tensor,
) -> Result<AttentionGrads> {
    attention_backward_impl(q, k, v, scale, dout, None, true, true)
}

pub(crate) fn check_causal(op: &'static str, dm: &Dims, causal: bool) -> Result<()> {
    if causal && dm.lq != dm.lk {
        return Err(Error::shape(
            op,
            format!(
                "causal attention needs Lq == Lk, got {} and {}",
                dm.lq, dm.lk
            ),
        ));
    }
    Ok(())
}

fn attention_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    capture: Option<&Capture>,
    causal: bool,
) -> Result<AttentionOutput> {
    const OP: &str = "attention";
    let dm = dims(OP, q, k, v)?;
    check_causal(OP, &dm, causal)?;
    if let Some(c) = capture {
        check_capture(OP, c, dm.lk)?;
    }
    let nw = capture.map_or(0, |c| c.words.len());
    float_dispatch!(OP, q.dtype(), T => {
        let (qv, kv, vv) = (q.slice::<T>(OP)?, k.slice::<T>(OP)?, v.slice::<T>(OP)?);
        let mut out = vec![T::ZERO; dm.b * dm.h * dm.lq * dm.dv];
        // Per head: its maps as (words, Lq), scattered into (B, words, H, Lq) afterwards.
        let head_maps: Vec<Vec<T>> = out
            .par_chunks_mut((dm.lq * dm.dv).max(1))
            .enumerate()
            .map(|(bh, o)| {
                let kh = &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d];
                let vh = &vv[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv];
                let mut maps = vec![T::ZERO; nw * dm.lq];
                let mut s = vec![T::ZERO; ROWS * dm.lk];
                let mut buf = Vec::new();
                for r0 in (0..dm.lq).step_by(ROWS) {
                    let rows = ROWS.min(dm.lq - r0);
                    let qr = &qv[(bh * dm.lq + r0) * dm.d..];
                    let s = &mut s[..rows * dm.lk];
                    logits(qr, kh, r0, rows, &dm, T::of(scale), causal, s);
                    let mut p = s.to_vec();
                    for (i, (pr, sr)) in p.chunks_mut(dm.lk).zip(s.chunks(dm.lk)).enumerate() {
                        softmax_row(pr);
                        if let Some(c) = capture {
                            let cols = map_probs(c, sr, pr, &mut buf);
                            for (w, word) in c.words.iter().enumerate() {
                                let sum: T = word.iter().map(|&j| buf[j - cols.start]).sum();
                                maps[w * dm.lq + r0 + i] = sum / T::of(word.len() as f64);
                            }
                        }
                    }
                    gemm(rows, dm.dv, dm.lk, &p, Layout::N, vh, Layout::N,
                         &mut o[r0 * dm.dv..(r0 + rows) * dm.dv], false);
                }
                maps
            })
            .collect();
        let out = Tensor::from_vec(out, &[dm.b, dm.h, dm.lq, dm.dv])?;
        let maps = match capture {
            None => None,
            Some(_) => {
                let mut m = vec![T::ZERO; dm.b * nw * dm.h * dm.lq];
                for (bh, hm) in head_maps.iter().enumerate() {
                    let (b, h) = (bh / dm.h, bh % dm.h);
                    for w in 0..nw {
                        let dst = ((b * nw + w) * dm.h + h) * dm.lq;
                        m[dst..dst + dm.lq].copy_from_slice(&hm[w * dm.lq..(w + 1) * dm.lq]);
                    }
                }
                Some(Tensor::from_vec(m, &[dm.b, nw, dm.h, dm.lq])?)
            }
        };
        Ok(AttentionOutput { out, maps })
    })
}

/// Gradients of `sum(out * dout) + sum(maps * dmaps)` with respect to q (and k, v when
/// `kv_grads`). `capture` pairs the forward's capture with the maps' gradient (B, words, H, Lq).
/// On a CUDA device: bf16 q, k, v, dout and f32 dmaps (see [`attention`]).
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dout: &Tensor,
    capture: Option<(&Capture, &Tensor)>,
    kv_grads: bool,
) -> Result<AttentionGrads> {
    crate::cuda::kernel_dispatch!(q, m => crate::cuda::attention::attention_backward(
        m, q, k, v, scale, dout, capture, kv_grads,
    ));
    attention_backward_impl(q, k, v, scale, dout, capture, kv_grads, false)
}

/// The shapes of the backward's extra inputs: `dout` like the output, the maps' gradient like the
/// maps, and a valid capture.
pub(crate) fn check_backward_shapes(
    op: &'static str,
    dm: &Dims,
    dout: &Tensor,
    capture: Option<(&Capture, &Tensor)>,
) -> Result<()> {
    let oshape = [dm.b, dm.h, dm.lq, dm.dv];
    if dout.shape() != oshape {
        return Err(Error::shape(
            op,
            format!("dout {:?}, expected {oshape:?}", dout.shape()),
        ));
    }
    if let Some((c, dmaps)) = capture {
        check_capture(op, c, dm.lk)?;
        let mshape = [dm.b, c.words.len(), dm.h, dm.lq];
        if dmaps.shape() != mshape {
            return Err(Error::shape(
                op,
                format!("dmaps {:?}, expected {mshape:?}", dmaps.shape()),
            ));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attention_backward_impl(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dout: &Tensor,
    capture: Option<(&Capture, &Tensor)>,
    kv_grads: bool,
    causal: bool,
) -> Result<AttentionGrads> {
    const OP: &str = "attention_backward";
    let dm = dims(OP, q, k, v)?;
    check_causal(OP, &dm, causal)?;
    same_dtype(OP, q, dout)?;
    check_backward_shapes(OP, &dm, dout, capture)?;
    if let Some((_, dmaps)) = capture {
        same_dtype(OP, q, dmaps)?;
    }
    float_dispatch!(OP, q.dtype(), T => {
        let (qv, kv, vv) = (q.slice::<T>(OP)?, k.slice::<T>(OP)?, v.slice::<T>(OP)?);
        let dov = dout.slice::<T>(OP)?;
        let dmv = capture.map(|(_, g)| g.slice::<T>(OP)).transpose()?;
        let nw = capture.map_or(0, |(c, _)| c.words.len());
        let scale_t = T::of(scale);
        let per_head: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..dm.b * dm.h)
            .into_par_iter()
            .map(|bh| {
                let (b, h) = (bh / dm.h, bh % dm.h);
                let qh = &qv[bh * dm.lq * dm.d..(bh + 1) * dm.lq * dm.d];
                let kh = &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d];
                let vh = &vv[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv];
                let doh = &dov[bh * dm.lq * dm.dv..(bh + 1) * dm.lq * dm.dv];
                let mut dq = vec![T::ZERO; dm.lq * dm.d];
                let (mut dk, mut dv) = if kv_grads {
                    (vec![T::ZERO; dm.lk * dm.d], vec![T::ZERO; dm.lk * dm.dv])
                } else {
                    (Vec::new(), Vec::new())
                };
                let mut s = vec![T::ZERO; ROWS * dm.lk];
                let mut dp = vec![T::ZERO; ROWS * dm.lk];
                let (mut buf, mut g, mut dsc) = (Vec::new(), Vec::new(), Vec::new());
                for r0 in (0..dm.lq).step_by(ROWS) {
                    let rows = ROWS.min(dm.lq - r0);
                    let (s, dp) = (&mut s[..rows * dm.lk], &mut dp[..rows * dm.lk]);
                    logits(&qh[r0 * dm.d..], kh, r0, rows, &dm, scale_t, causal, s);
                    let mut p = s.to_vec();
                    p.chunks_mut(dm.lk).for_each(softmax_row);
                    let dor = &doh[r0 * dm.dv..(r0 + rows) * dm.dv];
                    if kv_grads {
                        gemm(dm.lk, dm.dv, rows, &p, Layout::T, dor, Layout::N, &mut dv, true);
                    }
                    // dP = dO V^T
                    gemm(rows, dm.lk, dm.dv, dor, Layout::N, vh, Layout::T, dp, false);
                    // dS = P * (dP - rowsum(dP * P)), then the maps' own path.
                    let mut ds = vec![T::ZERO; rows * dm.lk];
                    for i in 0..rows {
                        let row = i * dm.lk..(i + 1) * dm.lk;
                        softmax_row_backward(&p[row.clone()], &dp[row.clone()], &mut ds[row.clone()]);
                        let (Some((c, _)), Some(dmv)) = (capture, dmv) else { continue };
                        // G[j] = sum over words containing column j of dmaps / |word|.
                        let cols = map_probs(c, &s[row.clone()], &p[row.clone()], &mut buf);
                        g.clear();
                        g.resize(cols.len(), T::ZERO);
                        for (w, word) in c.words.iter().enumerate() {
                            let gw = dmv[((b * nw + w) * dm.h + h) * dm.lq + r0 + i]
                                / T::of(word.len() as f64);
                            word.iter().for_each(|&j| g[j - cols.start] += gw);
                        }
                        dsc.clear();
                        dsc.resize(cols.len(), T::ZERO);
                        softmax_row_backward(&buf, &g, &mut dsc);
                        let dsr = &mut ds[row.start + cols.start..row.start + cols.end];
                        dsr.iter_mut().zip(&dsc).for_each(|(a, &b)| *a += b);
                    }
                    ds.iter_mut().for_each(|x| *x *= scale_t);
                    gemm(rows, dm.d, dm.lk, &ds, Layout::N, kh, Layout::N,
                         &mut dq[r0 * dm.d..(r0 + rows) * dm.d], false);
                    if kv_grads {
                        gemm(dm.lk, dm.d, rows, &ds, Layout::T, &qh[r0 * dm.d..], Layout::N, &mut dk, true);
                    }
                }
                (dq, dk, dv)
            })
            .collect();
        let mut dq = Vec::with_capacity(qv.len());
        let (mut dk, mut dv) = (Vec::new(), Vec::new());
        for (a, b, c) in per_head {
            dq.extend(a);
            dk.extend(b);
            dv.extend(c);
        }
        Ok(AttentionGrads {
            dq: Tensor::from_vec(dq, q.shape())?,
            dk: if kv_grads { Some(Tensor::from_vec(dk, k.shape())?) } else { None },
            dv: if kv_grads { Some(Tensor::from_vec(dv, v.shape())?) } else { None },
        })
    })
}
