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
//! first level has 5 heads, which 2 threads would split 3 to 2. A block's logits are stored
//! key-major (see `by_columns`), so the GEMMs read K and V as stored; the softmax runs down the
//! keys with the scale folded in, its exponentials through `Float::exp_in_place` (vectorised for
//! f32).

use std::ops::Range;

use rayon::prelude::*;

use super::linalg::{gemm_strided_with, Strided, StridedMut};
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

/// A matrix stored by columns, `ld` apart: a key-major block (`ld` = rows), or the transpose of
/// a row-major (L, D) matrix (`ld` = D).
///
/// A block's (rows, Lk) matrices (logits, probabilities, their gradients) are stored key-major:
/// entry (query i, key j) at `j * rows + i`. Then every GEMM reads K and V as they are stored,
/// (Lk, D) row-major, without packing them: the GEMM packs an operand whose k-steps are not
/// contiguous, and in query-major order K, V, P and dS all were, 7 MB of packing per block of
/// 128 rows at 4096 keys (a sixth of the backward). The softmaxes run down the keys, the queries
/// side by side.
fn by_columns<T>(m: &[T], ld: usize) -> Strided<'_, T> {
    Strided::rows(m, ld).t()
}

/// [`by_columns`], writable.
fn by_columns_mut<T>(m: &mut [T], ld: usize) -> StridedMut<'_, T> {
    StridedMut {
        data: m,
        rs: 1,
        cs: ld,
    }
}

/// Raw logits of a block of query rows, key-major: s = q_rows @ k^T; the softmax applies the
/// scale.
fn logits<T: Float>(q_rows: &[T], kh: &[T], rows: usize, dm: &Dims, s: &mut [T]) {
    gemm_strided_with(
        rows,
        dm.lk,
        dm.d,
        Strided::rows(q_rows, dm.d),
        by_columns(kh, dm.d),
        by_columns_mut(s, rows),
        false,
        false,
    );
}

/// The key-major rows of `m` (rows queries a key) for keys `keys`, each with the first query
/// that sees its key (with `causal`, query r0 + i sees keys 0..=r0 + i).
fn visible<T>(
    m: &mut [T],
    rows: usize,
    keys: Range<usize>,
    r0: usize,
    causal: bool,
) -> impl Iterator<Item = (usize, &mut [T])> {
    m[keys.start * rows..keys.end * rows]
        .chunks_mut(rows.max(1))
        .zip(keys)
        .map(move |(kr, j)| {
            let first = if causal {
                j.saturating_sub(r0).min(rows)
            } else {
                0
            };
            (first, kr)
        })
}

/// softmax(scale * logits) over keys `keys` for each query of a key-major (rows, Lk) block, in
/// place; a query's masked keys (`causal`) get probability 0. Vectorised across the queries,
/// with `Float::exp_in_place` on each key's row.
fn softmax_keys<T: Float>(
    m: &mut [T],
    rows: usize,
    keys: Range<usize>,
    scale: T,
    r0: usize,
    causal: bool,
) {
    let mut top = vec![T::NEG_INFINITY; rows];
    for (first, kr) in visible(m, rows, keys.clone(), r0, causal) {
        for (t, &x) in top[first..].iter_mut().zip(&kr[first..]) {
            *t = t.max(scale * x);
        }
    }
    let mut sum = vec![T::ZERO; rows];
    for (first, kr) in visible(m, rows, keys.clone(), r0, causal) {
        kr[..first].fill(T::NEG_INFINITY);
        for (x, &t) in kr[first..].iter_mut().zip(&top[first..]) {
            *x = scale * *x - t;
        }
        T::exp_in_place(kr);
        sum.iter_mut().zip(kr.iter()).for_each(|(s, &e)| *s += e);
    }
    sum.iter_mut().for_each(|s| *s = T::ONE / *s);
    for kr in m[keys.start * rows..keys.end * rows].chunks_mut(rows.max(1)) {
        kr.iter_mut().zip(&sum).for_each(|(p, &inv)| *p *= inv);
    }
}

/// The gradient of softmax(scale * x) over keys `keys` at x, from its key-major probabilities
/// `p` and the gradient `g` on them (in place): g <- scale * p * (g - sum_keys(g * p)).
fn softmax_keys_backward<T: Float>(
    p: &[T],
    g: &mut [T],
    rows: usize,
    keys: Range<usize>,
    scale: T,
) {
    let span = keys.start * rows..keys.end * rows;
    let (p, g) = (&p[span.clone()], &mut g[span]);
    let mut dot = vec![T::ZERO; rows];
    for (pr, gr) in p.chunks(rows.max(1)).zip(g.chunks(rows.max(1))) {
        for ((d, &pi), &gi) in dot.iter_mut().zip(pr).zip(gr) {
            *d += pi * gi;
        }
    }
    for (pr, gr) in p.chunks(rows.max(1)).zip(g.chunks_mut(rows.max(1))) {
        for ((gi, &pi), &d) in gr.iter_mut().zip(pr).zip(&dot) {
            *gi = scale * pi * (*gi - d);
        }
    }
}

/// The probabilities of a block of query rows (the first at row `r0`), key-major in `s`:
/// softmax(scale * q_rows k^T) over the keys each row sees. With `cols` (a capture over its own
/// columns, FLUX), also the softmax of the same logits over `cols` alone in `sub` (key-major,
/// rows a key). The forward and the backward's recomputation share it.
#[allow(clippy::too_many_arguments)]
fn probabilities<T: Float>(
    q_rows: &[T],
    kh: &[T],
    r0: usize,
    dm: &Dims,
    scale: T,
    causal: bool,
    cols: Option<&Range<usize>>,
    s: &mut [T],
    sub: &mut [T],
) {
    let rows = s.len() / dm.lk.max(1);
    logits(q_rows, kh, rows, dm, s);
    if let Some(cols) = cols {
        sub.copy_from_slice(&s[cols.start * rows..cols.end * rows]);
        softmax_keys(sub, rows, 0..cols.len(), scale, 0, false);
    }
    softmax_keys(s, rows, 0..dm.lk, scale, r0, causal);
}

/// Each word's map over a block: the mean of its columns' probabilities, from key-major
/// probabilities `probs` whose first key is column `c0`; (words, rows).
fn word_maps<T: Float>(words: &[Vec<usize>], probs: &[T], rows: usize, c0: usize) -> Vec<T> {
    let mut maps = vec![T::ZERO; words.len() * rows];
    for (word, mw) in words.iter().zip(maps.chunks_mut(rows.max(1))) {
        for &j in word {
            let pj = &probs[(j - c0) * rows..(j - c0 + 1) * rows];
            mw.iter_mut().zip(pj).for_each(|(m, &p)| *m += p);
        }
        let inv = T::ONE / T::of(word.len() as f64);
        mw.iter_mut().for_each(|m| *m *= inv);
    }
    maps
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
        // One task a (head, block of query rows): its output rows and its maps (words, rows).
        let done: Vec<(Vec<T>, Vec<T>)> = (0..dm.b * dm.h * blocks)
            .into_par_iter()
            .map(|t| {
                let (bh, r0) = (t / blocks, t % blocks * ROWS);
                let rows = ROWS.min(dm.lq - r0);
                let kh = &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d];
                let vh = &vv[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv];
                let qb = &qv[(bh * dm.lq + r0) * dm.d..(bh * dm.lq + r0 + rows) * dm.d];
                forward_block(qb, kh, vh, r0, rows, &dm, T::of(scale), capture, causal)
            })
            .collect();
        let mut out = super::zeros::<T>(dm.b * dm.h * dm.lq * dm.dv);
        let mut m = super::zeros::<T>(dm.b * nw * dm.h * dm.lq);
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

/// One block of `rows` query rows (starting at row `r0`) of one head, from its queries, keys and
/// values: its output (rows, Dv) and, with a capture, its maps (words, rows).
#[allow(clippy::too_many_arguments)]
fn forward_block<T: Float>(
    qb: &[T],
    kh: &[T],
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
    probabilities(qb, kh, r0, dm, scale, causal, cols, &mut s, &mut sub);
    let maps = match (capture, cols) {
        (None, _) => Vec::new(),
        (Some(c), Some(cols)) => word_maps(&c.words, &sub, rows, cols.start),
        (Some(c), None) => word_maps(&c.words, &s, rows, 0),
    };
    let mut out = vec![T::ZERO; rows * dm.dv];
    gemm_strided_with(
        rows,
        dm.dv,
        dm.lk,
        by_columns(&s, rows),
        Strided::rows(vh, dm.dv),
        StridedMut::rows(&mut out, dm.dv),
        false,
        false,
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

/// One head's operands: (Lq, D) queries, (Lk, D) keys, (Lk, Dv) values, (Lq, Dv) output
/// gradient; `bh` = b * H + h.
struct Head<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    bh: usize,
}

/// A backward task's results: dQ of its rows, and its rows' share of dK (Lk, D) and dV (Lk, Dv);
/// empty without `kv_grads`.
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
    let block = ROWS.min(rr.len());
    let (mut s, mut dp) = (vec![T::ZERO; block * dm.lk], vec![T::ZERO; block * dm.lk]);
    let cols = maps.and_then(|(c, _)| c.softmax_cols.as_ref());
    let ncols = cols.map_or(0, |c| c.len());
    let (mut sub, mut gsub) = (vec![T::ZERO; block * ncols], vec![T::ZERO; block * ncols]);
    let (b, h) = (hd.bh / dm.h, hd.bh % dm.h);
    for r0 in rr.clone().step_by(ROWS) {
        let rows = ROWS.min(rr.end - r0);
        let (s, dp) = (&mut s[..rows * dm.lk], &mut dp[..rows * dm.lk]);
        let (sub, gsub) = (&mut sub[..rows * ncols], &mut gsub[..rows * ncols]);
        let qb = &hd.q[r0 * dm.d..(r0 + rows) * dm.d];
        probabilities(qb, hd.k, r0, dm, scale, causal, cols, s, sub);
        let dor = &hd.dout[r0 * dm.dv..(r0 + rows) * dm.dv];
        if kv_grads {
            // dV^T (Dv, Lk) += dO^T P, written as dV (Lk, Dv).
            gemm_strided_with(
                dm.dv,
                dm.lk,
                rows,
                by_columns(dor, dm.dv),
                by_columns(s, rows),
                by_columns_mut(&mut part.dv, dm.dv),
                true,
                false,
            );
        }
        // dP = dO V^T; the maps' gradient joins it on the words' columns (maps over all keys)
        // or goes through their own softmax (maps over `cols`); then dS, overwriting dP.
        gemm_strided_with(
            rows,
            dm.lk,
            dm.dv,
            Strided::rows(dor, dm.dv),
            by_columns(hd.v, dm.dv),
            by_columns_mut(dp, rows),
            false,
            false,
        );
        match maps {
            None => softmax_keys_backward(s, dp, rows, 0..dm.lk, scale),
            Some((c, dmaps)) => {
                // Each word's gradient spread over its columns, added to `g` (key-major, its
                // first key at column c0).
                let spread = |g: &mut [T], c0: usize| {
                    let nw = c.words.len();
                    for (w, word) in c.words.iter().enumerate() {
                        let at = ((b * nw + w) * dm.h + h) * dm.lq + r0;
                        let gw = &dmaps[at..at + rows];
                        let inv = T::ONE / T::of(word.len() as f64);
                        for &j in word {
                            let gj = &mut g[(j - c0) * rows..(j - c0 + 1) * rows];
                            gj.iter_mut().zip(gw).for_each(|(a, &d)| *a += d * inv);
                        }
                    }
                };
                match cols {
                    None => {
                        spread(dp, 0);
                        softmax_keys_backward(s, dp, rows, 0..dm.lk, scale);
                    }
                    Some(cols) => {
                        softmax_keys_backward(s, dp, rows, 0..dm.lk, scale);
                        gsub.fill(T::ZERO);
                        spread(gsub, cols.start);
                        softmax_keys_backward(sub, gsub, rows, 0..ncols, scale);
                        dp[cols.start * rows..cols.end * rows]
                            .iter_mut()
                            .zip(gsub.iter())
                            .for_each(|(a, &g)| *a += g);
                    }
                }
            }
        }
        let dq = &mut part.dq[(r0 - rr.start) * dm.d..(r0 - rr.start + rows) * dm.d];
        gemm_strided_with(
            rows,
            dm.d,
            dm.lk,
            by_columns(dp, rows),
            Strided::rows(hd.k, dm.d),
            StridedMut::rows(dq, dm.d),
            false,
            false,
        );
        if kv_grads {
            // dK^T (D, Lk) += Q^T dS, written as dK (Lk, D).
            gemm_strided_with(
                dm.d,
                dm.lk,
                rows,
                by_columns(qb, dm.d),
                by_columns(dp, rows),
                by_columns_mut(&mut part.dk, dm.d),
                true,
                false,
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
        let done: Vec<BackwardPart<T>> = (0..dm.b * dm.h * split)
            .into_par_iter()
            .map(|t| {
                let bh = t / split;
                let r0 = (t % split * task_rows).min(dm.lq);
                let head = Head {
                    q: &qv[bh * dm.lq * dm.d..(bh + 1) * dm.lq * dm.d],
                    k: &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d],
                    v: &vv[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv],
                    dout: &dov[bh * dm.lq * dm.dv..(bh + 1) * dm.lq * dm.dv],
                    bh,
                };
                let maps = capture.zip(dmv).map(|((c, _), g)| (c, g));
                let rows = r0..(r0 + task_rows).min(dm.lq);
                backward_rows(&head, rows, &dm, T::of(scale), maps, kv_grads, causal)
            })
            .collect();
        let mut dq = super::zeros::<T>(qv.len());
        // Per head: the tasks' dK and dV summed.
        let (mut dk, mut dv) = if kv_grads {
            (super::zeros::<T>(kv.len()), super::zeros::<T>(vv.len()))
        } else {
            (Vec::new(), Vec::new())
        };
        for (t, part) in done.iter().enumerate() {
            let bh = t / split;
            let at = (bh * dm.lq + (t % split * task_rows).min(dm.lq)) * dm.d;
            dq[at..at + part.dq.len()].copy_from_slice(&part.dq);
            if kv_grads {
                let add = |dst: &mut [T], src: &[T]| dst.iter_mut().zip(src).for_each(|(a, &b)| *a += b);
                add(&mut dk[bh * part.dk.len()..(bh + 1) * part.dk.len()], &part.dk);
                add(&mut dv[bh * part.dv.len()..(bh + 1) * part.dv.len()], &part.dv);
            }
        }
        Ok(AttentionGrads {
            dq: Tensor::from_vec(dq, q.shape())?,
            dk: if kv_grads { Some(Tensor::from_vec(dk, k.shape())?) } else { None },
            dv: if kv_grads { Some(Tensor::from_vec(dv, v.shape())?) } else { None },
        })
    })
}
