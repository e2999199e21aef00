//! Scaled-dot-product attention with optional capture of attention maps: the probabilities of
//! selected key columns (a prompt word's tokens), averaged over each word's columns, per batch
//! entry, head and query. Self, cross and joint attention are all this op (joint attention is
//! attention over concatenated token streams).
//!
//! Nothing the size of the full attention matrix is kept: query rows are processed in blocks,
//! and the backward recomputes the probabilities. The backward takes an optional gradient on the
//! captured maps and injects it into dP on the captured columns, so the gradient of a loss on the
//! maps flows to the queries and keys without any hook.
//!
//! On the CPU the work is shared out as (head, block of query rows) tasks, not whole heads: SD2.1's
//! first level has 5 heads, which 2 threads would split 3 to 2. The softmax is `Float`'s
//! (vectorised for f32), applied to the raw logits with the scale folded in.

use std::ops::Range;

use rayon::prelude::*;

use super::activation::softmax_row_backward_in_place;
use super::linalg::{gemm_with, Layout};
use super::shape::transpose_batched;
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

/// Raw logits of a block of query rows: s = q_rows @ kt, (rows, Lk), from the keys transposed,
/// kt (D, Lk); the softmax applies the scale.
fn logits<T: Float>(q_rows: &[T], kt: &[T], rows: usize, dm: &Dims, s: &mut [T]) {
    gemm_with(
        rows,
        dm.lk,
        dm.d,
        q_rows,
        Layout::N,
        kt,
        Layout::N,
        s,
        false,
        Some(false),
    );
}

/// softmax(scale * row) over the keys query `r` sees (with `causal`, keys 0..=r), in place; the
/// masked keys get probability 0.
fn softmax_visible<T: Float>(row: &mut [T], r: usize, scale: T, causal: bool) {
    let seen = if causal {
        (r + 1).min(row.len())
    } else {
        row.len()
    };
    let (seen, masked) = row.split_at_mut(seen);
    T::softmax_scaled(seen, scale);
    masked.fill(T::ZERO);
}

/// The probabilities of a block of query rows (the first at row `r0`), in `s` (rows, Lk):
/// softmax(scale * q_rows kt) over the keys each row sees. With `cols` (a capture over its own
/// columns, FLUX), also each row's softmax(scale * logits[cols]) in `sub` (rows, cols.len()).
/// The forward and the backward's recomputation share it.
#[allow(clippy::too_many_arguments)]
fn probabilities<T: Float>(
    q_rows: &[T],
    kt: &[T],
    r0: usize,
    dm: &Dims,
    scale: T,
    causal: bool,
    cols: Option<&Range<usize>>,
    s: &mut [T],
    sub: &mut [T],
) {
    let (lk, rows) = (dm.lk.max(1), s.len() / dm.lk.max(1));
    logits(q_rows, kt, rows, dm, s);
    if let Some(cols) = cols {
        for (row, out) in s.chunks(lk).zip(sub.chunks_mut(cols.len().max(1))) {
            out.copy_from_slice(&row[cols.clone()]);
            T::softmax_scaled(out, scale);
        }
    }
    s.chunks_mut(lk)
        .enumerate()
        .for_each(|(i, row)| softmax_visible(row, r0 + i, scale, causal));
}

/// A word's map value: the mean of its columns' probabilities (`probs` starts at column `c0`).
fn word_mean<T: Float>(word: &[usize], probs: &[T], c0: usize) -> T {
    word.iter().map(|&j| probs[j - c0]).sum::<T>() / T::of(word.len() as f64)
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
        let blocks = dm.lq.div_ceil(ROWS);
        // K transposed per head, (D, Lk): the GEMMs then pack it with contiguous copies, not
        // strided gathers (a fifth of the time at 4096 keys, repeated for every row block).
        let kt = transpose_batched(kv, dm.lk, dm.d);
        // One task a (head, block of query rows): its output rows and its maps (words, rows).
        let done: Vec<(Vec<T>, Vec<T>)> = (0..dm.b * dm.h * blocks)
            .into_par_iter()
            .map(|t| {
                let (bh, r0) = (t / blocks, t % blocks * ROWS);
                let rows = ROWS.min(dm.lq - r0);
                let kth = &kt[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d];
                let vh = &vv[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv];
                let qb = &qv[(bh * dm.lq + r0) * dm.d..(bh * dm.lq + r0 + rows) * dm.d];
                forward_block(qb, kth, vh, r0, rows, &dm, T::of(scale), capture, causal)
            })
            .collect();
        let mut out = vec![T::ZERO; dm.b * dm.h * dm.lq * dm.dv];
        let mut m = vec![T::ZERO; dm.b * nw * dm.h * dm.lq];
        for (t, (o, bm)) in done.iter().enumerate() {
            let (bh, r0) = (t / blocks, t % blocks * ROWS);
            let rows = o.len() / dm.dv.max(1);
            let at = (bh * dm.lq + r0) * dm.dv;
            out[at..at + o.len()].copy_from_slice(o);
            let (b, h) = (bh / dm.h, bh % dm.h);
            for (w, wm) in bm.chunks(rows.max(1)).enumerate() {
                let at = ((b * nw + w) * dm.h + h) * dm.lq + r0;
                m[at..at + wm.len()].copy_from_slice(wm);
            }
        }
        let out = Tensor::from_vec(out, &[dm.b, dm.h, dm.lq, dm.dv])?;
        let maps = match capture {
            None => None,
            Some(_) => Some(Tensor::from_vec(m, &[dm.b, nw, dm.h, dm.lq])?),
        };
        Ok(AttentionOutput { out, maps })
    })
}

/// One block of `rows` query rows (starting at row `r0`) of one head, from its queries, keys
/// transposed (D, Lk) and values: its output (rows, Dv) and, with a capture, its maps (words,
/// rows).
#[allow(clippy::too_many_arguments)]
fn forward_block<T: Float>(
    qb: &[T],
    kt: &[T],
    vh: &[T],
    r0: usize,
    rows: usize,
    dm: &Dims,
    scale: T,
    capture: Option<&Capture>,
    causal: bool,
) -> (Vec<T>, Vec<T>) {
    let cols = capture.and_then(|c| c.softmax_cols.as_ref());
    let ncols = cols.map_or(0, |c| c.len());
    let (mut s, mut sub) = (vec![T::ZERO; rows * dm.lk], vec![T::ZERO; rows * ncols]);
    probabilities(qb, kt, r0, dm, scale, causal, cols, &mut s, &mut sub);
    let nw = capture.map_or(0, |c| c.words.len());
    let mut maps = vec![T::ZERO; nw * rows];
    if let Some(c) = capture {
        for i in 0..rows {
            let (probs, c0) = match cols {
                Some(cols) => (&sub[i * ncols..(i + 1) * ncols], cols.start),
                None => (&s[i * dm.lk..(i + 1) * dm.lk], 0),
            };
            for (w, word) in c.words.iter().enumerate() {
                maps[w * rows + i] = word_mean(word, probs, c0);
            }
        }
    }
    let mut out = vec![T::ZERO; rows * dm.dv];
    gemm_with(
        rows,
        dm.dv,
        dm.lk,
        &s,
        Layout::N,
        vh,
        Layout::N,
        &mut out,
        false,
        Some(false),
    );
    (out, maps)
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

/// One head's operands: (Lq, D) queries, (Lk, D) keys and (D, Lk) transposed, (Dv, Lk) values
/// transposed, (Lq, Dv) output gradient; `bh` = b * H + h.
struct Head<'a, T> {
    q: &'a [T],
    k: &'a [T],
    kt: &'a [T],
    vt: &'a [T],
    dout: &'a [T],
    bh: usize,
}

/// A backward task's results: dQ of its rows, and its rows' share of dK and dV, transposed
/// ((D, Lk) and (Dv, Lk): the GEMMs then read P and dS without a strided gather); empty without
/// `kv_grads`.
struct BackwardPart<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

/// The backward over query rows `rr` of one head, a block of ROWS at a time. `maps`: the capture
/// and the maps' gradient (B, words, H, Lq).
fn backward_rows<T: Float>(
    hd: &Head<T>,
    rr: Range<usize>,
    dm: &Dims,
    scale: T,
    maps: Option<(&Capture, &[T])>,
    kv_grads: bool,
    causal: bool,
) -> BackwardPart<T> {
    let mut part = BackwardPart {
        dq: vec![T::ZERO; rr.len() * dm.d],
        dk: vec![T::ZERO; if kv_grads { dm.lk * dm.d } else { 0 }],
        dv: vec![T::ZERO; if kv_grads { dm.lk * dm.dv } else { 0 }],
    };
    let lk = dm.lk.max(1);
    let block = ROWS.min(rr.len());
    let (mut s, mut dp) = (vec![T::ZERO; block * dm.lk], vec![T::ZERO; block * dm.lk]);
    let cols = maps.and_then(|(c, _)| c.softmax_cols.as_ref());
    let ncols = cols.map_or(0, |c| c.len());
    let (mut sub, mut gsub) = (vec![T::ZERO; block * ncols], vec![T::ZERO; ncols]);
    let (b, h) = (hd.bh / dm.h, hd.bh % dm.h);
    for r0 in rr.clone().step_by(ROWS) {
        let rows = ROWS.min(rr.end - r0);
        let (s, dp) = (&mut s[..rows * dm.lk], &mut dp[..rows * dm.lk]);
        let qb = &hd.q[r0 * dm.d..(r0 + rows) * dm.d];
        probabilities(qb, hd.kt, r0, dm, scale, causal, cols, s, &mut sub);
        let dor = &hd.dout[r0 * dm.dv..(r0 + rows) * dm.dv];
        if kv_grads {
            gemm_with(
                dm.dv,
                dm.lk,
                rows,
                dor,
                Layout::T,
                s,
                Layout::N,
                &mut part.dv,
                true,
                Some(false),
            );
        }
        // dP = dO V^T; the maps' gradient joins it on the words' columns (maps over all keys)
        // or goes through their own softmax (maps over `cols`); then dS, overwriting dP.
        gemm_with(
            rows,
            dm.lk,
            dm.dv,
            dor,
            Layout::N,
            hd.vt,
            Layout::N,
            dp,
            false,
            Some(false),
        );
        for (i, (p, g)) in s.chunks(lk).zip(dp.chunks_mut(lk)).enumerate() {
            let Some((c, dmaps)) = maps else {
                softmax_row_backward_in_place(p, g, scale);
                continue;
            };
            let nw = c.words.len();
            let word_grad = |w: usize| {
                dmaps[((b * nw + w) * dm.h + h) * dm.lq + r0 + i] / T::of(c.words[w].len() as f64)
            };
            match cols {
                None => {
                    for (w, word) in c.words.iter().enumerate() {
                        let gw = word_grad(w);
                        word.iter().for_each(|&j| g[j] += gw);
                    }
                    softmax_row_backward_in_place(p, g, scale);
                }
                Some(cols) => {
                    softmax_row_backward_in_place(p, g, scale);
                    gsub.fill(T::ZERO);
                    for (w, word) in c.words.iter().enumerate() {
                        let gw = word_grad(w);
                        word.iter().for_each(|&j| gsub[j - cols.start] += gw);
                    }
                    softmax_row_backward_in_place(
                        &sub[i * ncols..(i + 1) * ncols],
                        &mut gsub,
                        scale,
                    );
                    g[cols.clone()]
                        .iter_mut()
                        .zip(&gsub)
                        .for_each(|(a, &b)| *a += b);
                }
            }
        }
        let dq = &mut part.dq[(r0 - rr.start) * dm.d..(r0 - rr.start + rows) * dm.d];
        gemm_with(
            rows,
            dm.d,
            dm.lk,
            dp,
            Layout::N,
            hd.k,
            Layout::N,
            dq,
            false,
            Some(false),
        );
        if kv_grads {
            gemm_with(
                dm.d,
                dm.lk,
                rows,
                qb,
                Layout::T,
                dp,
                Layout::N,
                &mut part.dk,
                true,
                Some(false),
            );
        }
    }
    part
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
        let blocks = dm.lq.div_ceil(ROWS);
        // A task takes a run of row blocks of one head. dK and dV sum over all of a head's rows,
        // so each task returns partial sums: enough tasks to share out over the threads (about 4
        // a thread), no more, so the partials stay few. Without them, one task a block.
        let split = if kv_grads {
            (4 * rayon::current_num_threads()).div_ceil(dm.b * dm.h).min(blocks).max(1)
        } else {
            blocks.max(1)
        };
        let task_rows = blocks.div_ceil(split) * ROWS;
        let (kt, vt) = (transpose_batched(kv, dm.lk, dm.d), transpose_batched(vv, dm.lk, dm.dv));
        let done: Vec<BackwardPart<T>> = (0..dm.b * dm.h * split)
            .into_par_iter()
            .map(|t| {
                let bh = t / split;
                let r0 = (t % split * task_rows).min(dm.lq);
                let head = Head {
                    q: &qv[bh * dm.lq * dm.d..(bh + 1) * dm.lq * dm.d],
                    k: &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d],
                    kt: &kt[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d],
                    vt: &vt[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv],
                    dout: &dov[bh * dm.lq * dm.dv..(bh + 1) * dm.lq * dm.dv],
                    bh,
                };
                let maps = capture.zip(dmv).map(|((c, _), g)| (c, g));
                let rows = r0..(r0 + task_rows).min(dm.lq);
                backward_rows(&head, rows, &dm, T::of(scale), maps, kv_grads, causal)
            })
            .collect();
        let mut dq = vec![T::ZERO; qv.len()];
        // Per head: the tasks' dK^T and dV^T summed.
        let (mut dkt, mut dvt) = if kv_grads {
            (vec![T::ZERO; kv.len()], vec![T::ZERO; vv.len()])
        } else {
            (Vec::new(), Vec::new())
        };
        for (t, part) in done.iter().enumerate() {
            let bh = t / split;
            let at = (bh * dm.lq + (t % split * task_rows).min(dm.lq)) * dm.d;
            dq[at..at + part.dq.len()].copy_from_slice(&part.dq);
            if kv_grads {
                let add = |dst: &mut [T], src: &[T]| dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
                add(&mut dkt[bh * part.dk.len()..(bh + 1) * part.dk.len()], &part.dk);
                add(&mut dvt[bh * part.dv.len()..(bh + 1) * part.dv.len()], &part.dv);
            }
        }
        let (dk, dv) = (transpose_batched(&dkt, dm.d, dm.lk), transpose_batched(&dvt, dm.dv, dm.lk));
        Ok(AttentionGrads {
            dq: Tensor::from_vec(dq, q.shape())?,
            dk: if kv_grads { Some(Tensor::from_vec(dk, k.shape())?) } else { None },
            dv: if kv_grads { Some(Tensor::from_vec(dv, v.shape())?) } else { None },
        })
    })
}
