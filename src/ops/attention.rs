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
//! f32), and its normalisation is applied to the output rows, not the probabilities.
//!
//! Without a capture or a mask, over more than KEY_CHUNK keys, the forward goes FlashAttention's
//! way (`forward_block_online`): the keys a chunk at a time under a running row maximum, so a
//! block's logits stay in L2; it returns the rows' log-sum-exps, from which
//! [`attention_backward_saved`] also goes a chunk at a time, without recomputing the softmax's
//! statistics. At SD2.1's 64x64 self-attention this took the forward from 1.38x to 1.07x
//! PyTorch's flash attention, and chunking the backward saves a sixth of it.

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
    /// (B, H, Lq): each query's log-sum-exp of its scaled logits, present when the CPU forward
    /// ran key-chunked (no capture, no mask, more than KEY_CHUNK keys). With `out` it lets
    /// [`attention_backward_saved`] skip the softmax's recomputation passes.
    pub lse: Option<Tensor>,
}

pub struct AttentionGrads {
    pub dq: Tensor,
    /// Present when asked for (`kv_grads`); cross-attention from frozen text needs only `dq`.
    pub dk: Option<Tensor>,
    pub dv: Option<Tensor>,
}

/// Query rows processed together: bounds the logits block to ROWS x Lk.
const ROWS: usize = 128;

/// Output columns per GEMM of `key_major_gemm`: at most 48, the most for which the GEMM reads
/// its left operand unpacked; 48 = 8 of its 6-column micro-tiles.
const PRODUCT_COLUMNS: usize = 48;

/// Keys per chunk of the online-softmax forward (`forward_block_online`).
const KEY_CHUNK: usize = 512;

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

/// s = a b^T, key-major: `a` (rows, width) row-major (a block's queries, or its output
/// gradient), `b` (keys, width) row-major (keys, or values; keys = s.len() / rows). The block's
/// raw logits (the softmax applies the scale), or dP = dO V^T.
fn key_major_product<T: Float>(a: &[T], b: &[T], width: usize, s: &mut [T]) {
    let rows = a.len() / width.max(1);
    gemm_strided_with(
        rows,
        s.len() / rows.max(1),
        width,
        Strided::rows(a, width),
        by_columns(b, width),
        by_columns_mut(s, rows),
        false,
        false,
    );
}

/// dst += m^T x: `m` (rows, keys) key-major (P or dS), `x` (rows, width) row-major (the block's
/// output gradient or queries), `dst` (keys, width) row-major from its first key (dV or dK). As
/// dst^T = x^T m, so that the GEMM writes it column-major and reads both as stored.
fn add_key_major_transposed<T: Float>(m: &[T], x: &[T], width: usize, dst: &mut [T]) {
    let rows = x.len() / width.max(1);
    gemm_strided_with(
        width,
        m.len() / rows.max(1),
        rows,
        by_columns(x, width),
        by_columns(m, rows),
        by_columns_mut(dst, width),
        true,
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

/// exp(scale * logits - row max) over keys `keys` for each query of a key-major (rows, Lk) block,
/// in place, unnormalised; a query's masked keys (`causal`) get 0. Returns each query's
/// 1 / sum of its exponentials, so that a caller scales what it reads of the block (the output's
/// rows, the captured columns) instead of making a pass over all of it. Vectorised across the
/// queries, with `Float::exp_in_place` on each key's row.
fn exp_keys<T: Float>(
    m: &mut [T],
    rows: usize,
    keys: Range<usize>,
    scale: T,
    r0: usize,
    causal: bool,
) -> Vec<T> {
    let mut top = vec![T::NEG_INFINITY; rows];
    for (first, kr) in visible(m, rows, keys.clone(), r0, causal) {
        for (t, &x) in top[first..].iter_mut().zip(&kr[first..]) {
            *t = t.max(scale * x);
        }
    }
    let mut sum = vec![T::ZERO; rows];
    for (first, kr) in visible(m, rows, keys, r0, causal) {
        kr[..first].fill(T::NEG_INFINITY);
        for (x, &t) in kr[first..].iter_mut().zip(&top[first..]) {
            *x = scale * *x - t;
        }
        T::exp_in_place(kr);
        sum.iter_mut().zip(kr.iter()).for_each(|(s, &e)| *s += e);
    }
    sum.iter_mut().for_each(|s| *s = T::ONE / *s);
    sum
}

/// Each key-major row of `m` (a key's `rows` queries) times the queries' factors `by`.
fn scale_queries<T: Float>(m: &mut [T], by: &[T]) {
    for kr in m.chunks_mut(by.len().max(1)) {
        kr.iter_mut().zip(by).for_each(|(p, &f)| *p *= f);
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

/// The exponentials of a block of query rows (the first at row `r0`), key-major in `s`:
/// exp(scale * q_rows k^T - row max) over the keys each row sees, unnormalised ([`exp_keys`]);
/// returns each row's 1 / sum. With `cols` (a capture over its own columns, FLUX), also the
/// softmax of the same logits over `cols` alone in `sub` (key-major, rows a key, normalised). The
/// forward and the backward's recomputation share it.
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
) -> Vec<T> {
    let rows = s.len() / dm.lk.max(1);
    key_major_product(q_rows, kh, dm.d, s);
    if let Some(cols) = cols {
        sub.copy_from_slice(&s[cols.start * rows..cols.end * rows]);
        let inv = exp_keys(sub, rows, 0..cols.len(), scale, 0, false);
        scale_queries(sub, &inv);
    }
    exp_keys(s, rows, 0..dm.lk, scale, r0, causal)
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
    attention_backward_impl(q, k, v, scale, dout, None, None, true, true)
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
        let vt = transposed_heads(vv, dm.b * dm.h, dm.lk, dm.dv);
        // One task a (head, block of query rows): its output rows, its maps (words, rows) and
        // (online) its rows' log-sum-exps. The logits' room (a chunk of keys online, else all of
        // them) is reused from task to task (not zeroed: the GEMM overwrites it).
        let online = capture.is_none() && !causal && dm.lk > KEY_CHUNK;
        let keys = if online { KEY_CHUNK } else { dm.lk };
        let done: Vec<(Vec<T>, Vec<T>, Vec<T>)> = (0..dm.b * dm.h * blocks)
            .into_par_iter()
            .map_init(
                || vec![T::ZERO; ROWS.min(dm.lq) * keys],
                |s, t| {
                    let (bh, r0) = (t / blocks, t % blocks * ROWS);
                    let rows = ROWS.min(dm.lq - r0);
                    let kh = &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d];
                    let qb = &qv[(bh * dm.lq + r0) * dm.d..(bh * dm.lq + r0 + rows) * dm.d];
                    let scale = T::of(scale);
                    if online {
                        let (o, lse) = forward_block_online(qb, kh, &vt[bh], rows, &dm, scale, s);
                        return (o, Vec::new(), lse);
                    }
                    let (o, maps) =
                        forward_block(qb, kh, &vt[bh], r0, rows, &dm, scale, capture, causal, s);
                    (o, maps, Vec::new())
                },
            )
            .collect();
        let mut out = super::zeros::<T>(dm.b * dm.h * dm.lq * dm.dv);
        let mut m = super::zeros::<T>(dm.b * nw * dm.h * dm.lq);
        let mut lse = super::zeros::<T>(if online { dm.b * dm.h * dm.lq } else { 0 });
        for (t, (o, bm, bl)) in done.iter().enumerate() {
            let (bh, r0) = (t / blocks, t % blocks * ROWS);
            let rows = o.len() / dm.dv.max(1);
            let at = (bh * dm.lq + r0) * dm.dv;
            out[at..at + o.len()].copy_from_slice(o);
            if online {
                lse[bh * dm.lq + r0..][..bl.len()].copy_from_slice(bl);
            }
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
        let lse = online.then(|| Tensor::from_vec(lse, &[dm.b, dm.h, dm.lq])).transpose()?;
        Ok(AttentionOutput { out, maps, lse })
    })
}

/// Each head's (L, D) matrix of `x` (B*H heads) transposed, (D, L) row-major: the right operand
/// of [`key_major_gemm`] (values in the forward, keys for dQ), which the GEMM reads with unit
/// stride down the keys as it is; stored (L, D), stride D down the keys, it would repack it, 1 MB
/// at 4096 keys, for every block of query rows.
fn transposed_heads<T: Float>(x: &[T], bh: usize, l: usize, d: usize) -> Vec<Vec<T>> {
    (0..bh)
        .into_par_iter()
        .map(|h| {
            let xh = &x[h * l * d..(h + 1) * l * d];
            let mut t = vec![T::ZERO; l * d];
            for (j, row) in xh.chunks(d.max(1)).enumerate() {
                for (c, &e) in row.iter().enumerate() {
                    t[c * l + j] = e;
                }
            }
            t
        })
        .collect()
}

/// acc (+)= m x: `m` (rows, keys), key-major, times x (keys, n) given transposed (`xt`: row c is
/// x's column c, rows `ld` apart), into `acc` column-major ((n, rows) row-major). The GEMMs run
/// PRODUCT_COLUMNS columns at a time, so that they read both operands as stored and pack neither
/// (the GEMM packs a left operand shared by more than 48 output columns, and transposes a
/// row-major product, which packs both).
fn key_major_gemm<T: Float>(
    m: &[T],
    rows: usize,
    xt: &[T],
    ld: usize,
    n: usize,
    acc: &mut [T],
    accumulate: bool,
) {
    let keys = m.len() / rows.max(1);
    for c0 in (0..n).step_by(PRODUCT_COLUMNS) {
        gemm_strided_with(
            rows,
            PRODUCT_COLUMNS.min(n - c0),
            keys,
            by_columns(m, rows),
            Strided::rows(&xt[c0 * ld..], ld).t(),
            by_columns_mut(&mut acc[c0 * rows..], rows),
            accumulate,
            false,
        );
    }
}

/// A column-major (n, rows) block as row-major (rows, n), each row times its factor in `by`
/// (none: 1).
fn rows_from_columns<T: Float>(col_major: &[T], rows: usize, by: Option<&[T]>) -> Vec<T> {
    let n = col_major.len() / rows.max(1);
    let mut out = vec![T::ZERO; rows * n];
    for (r, o) in out.chunks_mut(n.max(1)).enumerate() {
        let f = by.map_or(T::ONE, |b| b[r]);
        for (c, x) in o.iter_mut().enumerate() {
            *x = col_major[c * rows + r] * f;
        }
    }
    out
}

/// `m` (rows, Lk), key-major, times x (Lk, n) given transposed ((n, Lk) row-major): the (rows, n)
/// product, row-major, each row times its factor in `by` ([`key_major_gemm`]).
fn key_major_times<T: Float>(m: &[T], rows: usize, xt: &[T], n: usize, by: Option<&[T]>) -> Vec<T> {
    let mut col_major = vec![T::ZERO; rows * n];
    key_major_gemm(m, rows, xt, m.len() / rows.max(1), n, &mut col_major, false);
    rows_from_columns(&col_major, rows, by)
}

/// One block of `rows` query rows of one head without capture or mask, FlashAttention's way: the
/// keys a chunk of KEY_CHUNK at a time, each chunk's logits and exponentials (in `s`, rows x
/// KEY_CHUNK: 256 KB, in L2) taken into the output before the next, under a running row maximum
/// that rescales the output and the row sums when it grows. The whole row's logits (2 MB at 4096
/// keys) would go through L3 four times: the GEMM's write, the max, the exponentials and P V.
#[allow(clippy::too_many_arguments)]
fn forward_block_online<T: Float>(
    qb: &[T],
    kh: &[T],
    vt: &[T],
    rows: usize,
    dm: &Dims,
    scale: T,
    s: &mut [T],
) -> (Vec<T>, Vec<T>) {
    let mut acc = vec![T::ZERO; rows * dm.dv];
    let mut top = vec![T::NEG_INFINITY; rows];
    let mut sum = vec![T::ZERO; rows];
    let mut rescale = vec![T::ZERO; rows];
    for k0 in (0..dm.lk).step_by(KEY_CHUNK) {
        let keys = KEY_CHUNK.min(dm.lk - k0);
        let s = &mut s[..rows * keys];
        key_major_product(qb, &kh[k0 * dm.d..], dm.d, s);
        // The new row maxima; the old terms are rescaled by exp(old - new) (0 on the first chunk).
        rescale.copy_from_slice(&top);
        for kr in s.chunks(rows) {
            for (t, &x) in top.iter_mut().zip(kr) {
                *t = t.max(scale * x);
            }
        }
        for (r, &t) in rescale.iter_mut().zip(&top) {
            *r -= t;
        }
        T::exp_in_place(&mut rescale);
        for (sm, &r) in sum.iter_mut().zip(&rescale) {
            *sm *= r;
        }
        for kr in s.chunks_mut(rows) {
            for (x, &t) in kr.iter_mut().zip(&top) {
                *x = scale * *x - t;
            }
            T::exp_in_place(kr);
            sum.iter_mut().zip(kr.iter()).for_each(|(sm, &e)| *sm += e);
        }
        if k0 > 0 {
            scale_queries(&mut acc, &rescale);
        }
        key_major_gemm(s, rows, &vt[k0..], dm.lk, dm.dv, &mut acc, k0 > 0);
    }
    let lse = top.iter().zip(&sum).map(|(&t, &sm)| t + sm.ln()).collect();
    sum.iter_mut().for_each(|x| *x = T::ONE / *x);
    (rows_from_columns(&acc, rows, Some(&sum)), lse)
}

/// One block of `rows` query rows (starting at row `r0`) of one head, from its queries, keys and
/// transposed values ([`transposed_heads`]): its output (rows, Dv) and, with a capture, its maps
/// (words, rows). `s`: room for the block's (rows, Lk) logits.
#[allow(clippy::too_many_arguments)]
fn forward_block<T: Float>(
    qb: &[T],
    kh: &[T],
    vt: &[T],
    r0: usize,
    rows: usize,
    dm: &Dims,
    scale: T,
    capture: Option<&Capture>,
    causal: bool,
    s: &mut [T],
) -> (Vec<T>, Vec<T>) {
    let cols = capture.and_then(|c| c.softmax_cols.as_ref());
    let ncols = cols.map_or(0, |c| c.len());
    let s = &mut s[..rows * dm.lk];
    let mut sub = vec![T::ZERO; rows * ncols];
    let inv = probabilities(qb, kh, r0, dm, scale, causal, cols, s, &mut sub);
    let maps = match (capture, cols) {
        (None, _) => Vec::new(),
        (Some(c), Some(cols)) => word_maps(&c.words, &sub, rows, cols.start),
        (Some(c), None) => {
            let mut m = word_maps(&c.words, s, rows, 0);
            scale_queries(&mut m, &inv);
            m
        }
    };
    (key_major_times(s, rows, vt, dm.dv, Some(&inv)), maps)
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
    attention_backward_impl(q, k, v, scale, dout, capture, None, kv_grads, false)
}

/// [`attention_backward`] without maps, from the forward's output `out` (B, H, Lq, Dv) and
/// log-sum-exps `lse` (B, H, Lq) ([`AttentionOutput::lse`]), FlashAttention's way: the keys a
/// chunk at a time, P = exp(scale * q k^T - lse) needs no row maximum or sum, and the softmax's
/// backward takes rowsum(dP * P) as rowsum(dout * out), so nothing the size of a full row of
/// keys is made or passed over. On a CUDA device the statistics are not used (the kernel
/// recomputes them).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward_saved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    out: &Tensor,
    lse: &Tensor,
    dout: &Tensor,
    kv_grads: bool,
) -> Result<AttentionGrads> {
    crate::cuda::kernel_dispatch!(q, m => crate::cuda::attention::attention_backward(
        m, q, k, v, scale, dout, None, kv_grads,
    ));
    attention_backward_impl(
        q,
        k,
        v,
        scale,
        dout,
        None,
        Some((out, lse)),
        kv_grads,
        false,
    )
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

/// One head's operands: (Lq, D) queries, (Lk, D) keys and the same transposed ((D, Lk), see
/// [`transposed_heads`]), (Lk, Dv) values, (Lq, Dv) output gradient, and the forward's (Lq, Dv)
/// output and (Lq) log-sum-exps when saved; `bh` = b * H + h.
struct Head<'a, T> {
    q: &'a [T],
    k: &'a [T],
    kt: &'a [T],
    v: &'a [T],
    dout: &'a [T],
    saved: Option<(&'a [T], &'a [T])>,
    bh: usize,
}

/// A backward task's results: dQ of its rows, and its rows' share of dK (Lk, D) and dV (Lk, Dv);
/// empty without `kv_grads`.
struct BackwardPart<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

impl<T: Float> BackwardPart<T> {
    /// Zeros for `rows` query rows.
    fn zeros(rows: usize, dm: &Dims, kv_grads: bool) -> Self {
        BackwardPart {
            dq: vec![T::ZERO; rows * dm.d],
            dk: vec![T::ZERO; if kv_grads { dm.lk * dm.d } else { 0 }],
            dv: vec![T::ZERO; if kv_grads { dm.lk * dm.dv } else { 0 }],
        }
    }
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
    let mut part = BackwardPart::zeros(rr.len(), dm, kv_grads);
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
        let inv = probabilities(qb, hd.k, r0, dm, scale, causal, cols, s, sub);
        scale_queries(s, &inv);
        let dor = &hd.dout[r0 * dm.dv..(r0 + rows) * dm.dv];
        if kv_grads {
            add_key_major_transposed(s, dor, dm.dv, &mut part.dv);
        }
        // dP = dO V^T; the maps' gradient joins it on the words' columns (maps over all keys)
        // or goes through their own softmax (maps over `cols`); then dS, overwriting dP.
        key_major_product(dor, hd.v, dm.dv, dp);
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
        let at = (r0 - rr.start) * dm.d;
        part.dq[at..at + rows * dm.d]
            .copy_from_slice(&key_major_times(dp, rows, hd.kt, dm.d, None));
        if kv_grads {
            add_key_major_transposed(dp, qb, dm.d, &mut part.dk);
        }
    }
    part
}

/// [`backward_rows`] from saved statistics (`hd.saved`, see [`attention_backward_saved`]):
/// for each block of ROWS query rows, the keys a chunk of KEY_CHUNK at a time, each chunk's
/// probabilities and their gradient (rows x KEY_CHUNK each, in L2) used up before the next.
fn backward_rows_saved<T: Float>(
    hd: &Head<T>,
    (out, lse): (&[T], &[T]),
    rr: Range<usize>,
    dm: &Dims,
    scale: T,
    kv_grads: bool,
) -> BackwardPart<T> {
    let mut part = BackwardPart::zeros(rr.len(), dm, kv_grads);
    let (block, chunk) = (ROWS.min(rr.len()), KEY_CHUNK.min(dm.lk));
    let (mut p, mut dp) = (vec![T::ZERO; block * chunk], vec![T::ZERO; block * chunk]);
    let mut dq = vec![T::ZERO; block * dm.d];
    for r0 in rr.clone().step_by(ROWS) {
        let rows = ROWS.min(rr.end - r0);
        let qb = &hd.q[r0 * dm.d..(r0 + rows) * dm.d];
        let dor = &hd.dout[r0 * dm.dv..(r0 + rows) * dm.dv];
        let lse = &lse[r0..r0 + rows];
        // rowsum(dP * P) = dout . out, row by row.
        let delta: Vec<T> = dor
            .chunks(dm.dv.max(1))
            .zip(out[r0 * dm.dv..(r0 + rows) * dm.dv].chunks(dm.dv.max(1)))
            .map(|(g, o)| g.iter().zip(o).fold(T::ZERO, |a, (&x, &y)| a + x * y))
            .collect();
        let dq = &mut dq[..rows * dm.d];
        for k0 in (0..dm.lk).step_by(KEY_CHUNK) {
            let keys = KEY_CHUNK.min(dm.lk - k0);
            let (p, dp) = (&mut p[..rows * keys], &mut dp[..rows * keys]);
            // P = exp(scale * q k^T - lse), key-major.
            key_major_product(qb, &hd.k[k0 * dm.d..], dm.d, p);
            for kr in p.chunks_mut(rows) {
                for (x, &l) in kr.iter_mut().zip(lse) {
                    *x = scale * *x - l;
                }
                T::exp_in_place(kr);
            }
            if kv_grads {
                add_key_major_transposed(p, dor, dm.dv, &mut part.dv[k0 * dm.dv..]);
            }
            // dP = dO V^T, then dS = scale * P * (dP - rowsum(dP * P)), overwriting dP.
            key_major_product(dor, &hd.v[k0 * dm.dv..], dm.dv, dp);
            for (pr, gr) in p.chunks(rows).zip(dp.chunks_mut(rows)) {
                for ((g, &pi), &dl) in gr.iter_mut().zip(pr).zip(&delta) {
                    *g = scale * pi * (*g - dl);
                }
            }
            key_major_gemm(dp, rows, &hd.kt[k0..], dm.lk, dm.d, dq, k0 > 0);
            if kv_grads {
                add_key_major_transposed(dp, qb, dm.d, &mut part.dk[k0 * dm.d..]);
            }
        }
        let at = (r0 - rr.start) * dm.d;
        part.dq[at..at + rows * dm.d].copy_from_slice(&rows_from_columns(dq, rows, None));
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
    saved: Option<(&Tensor, &Tensor)>,
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
    if let Some((out, lse)) = saved {
        same_dtype(OP, q, out)?;
        same_dtype(OP, q, lse)?;
        if out.shape() != dout.shape() || lse.shape() != [dm.b, dm.h, dm.lq] {
            return Err(Error::shape(
                OP,
                format!(
                    "saved out {:?} and lse {:?}, expected {:?} and {:?}",
                    out.shape(),
                    lse.shape(),
                    dout.shape(),
                    [dm.b, dm.h, dm.lq]
                ),
            ));
        }
    }
    float_dispatch!(OP, q.dtype(), T => {
        let (qv, kv, vv) = (q.slice::<T>(OP)?, k.slice::<T>(OP)?, v.slice::<T>(OP)?);
        let dov = dout.slice::<T>(OP)?;
        let dmv = capture.map(|(_, g)| g.slice::<T>(OP)).transpose()?;
        let sv = match saved {
            Some((o, l)) => Some((o.slice::<T>(OP)?, l.slice::<T>(OP)?)),
            None => None,
        };
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
        let kt = transposed_heads(kv, dm.b * dm.h, dm.lk, dm.d);
        let done: Vec<BackwardPart<T>> = (0..dm.b * dm.h * split)
            .into_par_iter()
            .map(|t| {
                let bh = t / split;
                let r0 = (t % split * task_rows).min(dm.lq);
                let head = Head {
                    q: &qv[bh * dm.lq * dm.d..(bh + 1) * dm.lq * dm.d],
                    k: &kv[bh * dm.lk * dm.d..(bh + 1) * dm.lk * dm.d],
                    kt: &kt[bh],
                    v: &vv[bh * dm.lk * dm.dv..(bh + 1) * dm.lk * dm.dv],
                    dout: &dov[bh * dm.lq * dm.dv..(bh + 1) * dm.lq * dm.dv],
                    saved: sv.map(|(o, l)| {
                        (
                            &o[bh * dm.lq * dm.dv..(bh + 1) * dm.lq * dm.dv],
                            &l[bh * dm.lq..(bh + 1) * dm.lq],
                        )
                    }),
                    bh,
                };
                let maps = capture.zip(dmv).map(|((c, _), g)| (c, g));
                let rows = r0..(r0 + task_rows).min(dm.lq);
                match head.saved {
                    Some(st) => backward_rows_saved(&head, st, rows, &dm, T::of(scale), kv_grads),
                    None => backward_rows(&head, rows, &dm, T::of(scale), maps, kv_grads, causal),
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// The online (key-chunked) forward, and the two-pass one a capture takes, against attention
    /// written out as its definition, in f64: keys over three chunks (the last partial), two
    /// blocks of query rows (the last partial), and keys whose logits grow along the sequence, so
    /// that the running maximum rises from chunk to chunk and the rescaling is exercised. The
    /// captured maps too. Only summation order differs (1e-12).
    #[test]
    fn forwards_match_definition() {
        let (h, lq, lk, d) = (2, 130, 2 * KEY_CHUNK + 77, 8);
        let q = Tensor::randn(&[1, h, lq, d], DType::F64, 1);
        let grow: Vec<f64> = Tensor::randn(&[1, h, lk, d], DType::F64, 2)
            .to_vec::<f64>()
            .unwrap()
            .into_iter()
            .enumerate()
            .map(|(i, x)| x * (1.0 + 3.0 * ((i / d) % lk) as f64 / lk as f64))
            .collect();
        let k = Tensor::from_vec(grow, &[1, h, lk, d]).unwrap();
        let v = Tensor::randn(&[1, h, lk, d], DType::F64, 3);
        let scale = 0.7;
        let words = vec![vec![5], vec![600, lk - 1]];
        let capture = Capture {
            words: words.clone(),
            softmax_cols: None,
        };
        let online = attention(&q, &k, &v, scale, None).unwrap();
        assert!(
            online.lse.is_some(),
            "no capture, {lk} keys: the online forward"
        );
        let captured = attention(&q, &k, &v, scale, Some(&capture)).unwrap();
        let outs = [
            online.out.to_vec::<f64>().unwrap(),
            captured.out.to_vec::<f64>().unwrap(),
        ];
        let maps = captured.maps.unwrap().to_vec::<f64>().unwrap();
        let (qv, kv, vv) = (
            q.to_vec::<f64>().unwrap(),
            k.to_vec::<f64>().unwrap(),
            v.to_vec::<f64>().unwrap(),
        );
        let mut worst: f64 = 0.0;
        for hh in 0..h {
            for i in 0..lq {
                let qi = &qv[(hh * lq + i) * d..(hh * lq + i + 1) * d];
                let logits: Vec<f64> = (0..lk)
                    .map(|j| {
                        let kj = &kv[(hh * lk + j) * d..(hh * lk + j + 1) * d];
                        scale * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                    })
                    .collect();
                let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                let total: f64 = e.iter().sum();
                for c in 0..d {
                    let want: f64 = (0..lk)
                        .map(|j| e[j] / total * vv[(hh * lk + j) * d + c])
                        .sum();
                    let at = (hh * lq + i) * d + c;
                    for out in &outs {
                        worst = worst.max((out[at] - want).abs());
                    }
                }
                for (w, word) in words.iter().enumerate() {
                    let want = word.iter().map(|&j| e[j] / total).sum::<f64>() / word.len() as f64;
                    worst = worst.max((maps[(w * h + hh) * lq + i] - want).abs());
                }
            }
        }
        assert!(worst < 1e-12, "attention off its definition by {worst:e}");
    }

    /// The saved-statistics backward against central finite differences of sum(out * dout), in
    /// f64, at entries of q, k and v spread over all three key chunks (the last partial) and
    /// both blocks of query rows; and against the recomputing backward everywhere (only
    /// summation order differs between the two: 1e-12).
    #[test]
    fn saved_backward_matches_finite_differences() {
        let (h, lq, lk, d) = (2, 130, 2 * KEY_CHUNK + 77, 8);
        let shape = |l| [1, h, l, d];
        let q = Tensor::randn(&shape(lq), DType::F64, 1);
        let k = Tensor::randn(&shape(lk), DType::F64, 2);
        let v = Tensor::randn(&shape(lk), DType::F64, 3);
        let dout = Tensor::randn(&shape(lq), DType::F64, 4);
        let scale = 0.7;
        let fwd = attention(&q, &k, &v, scale, None).unwrap();
        let lse = fwd
            .lse
            .as_ref()
            .expect("a key-chunked forward saves its log-sum-exps");
        let g = attention_backward_saved(&q, &k, &v, scale, &fwd.out, lse, &dout, true).unwrap();
        let r = attention_backward(&q, &k, &v, scale, &dout, None, true).unwrap();
        let grads = [g.dq, g.dk.unwrap(), g.dv.unwrap()];
        let recomputed = [r.dq, r.dk.unwrap(), r.dv.unwrap()];
        for (a, b) in grads.iter().zip(&recomputed) {
            let (a, b) = (a.to_vec::<f64>().unwrap(), b.to_vec::<f64>().unwrap());
            let top = b.iter().fold(0f64, |m, x| m.max(x.abs()));
            let worst = a
                .iter()
                .zip(&b)
                .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                worst <= 1e-12 * top,
                "saved vs recomputed backward: {worst:e} of {top:e}"
            );
        }
        let loss = |x: &[Tensor; 3]| -> f64 {
            let o = attention(&x[0], &x[1], &x[2], scale, None).unwrap().out;
            let (o, w) = (o.to_vec::<f64>().unwrap(), dout.to_vec::<f64>().unwrap());
            o.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let inputs = [q, k, v];
        let eps = 1e-5;
        for (which, grad) in grads.iter().enumerate() {
            let grad = grad.to_vec::<f64>().unwrap();
            let n = grad.len();
            for at in [3, n / 2 + 5, n - 2] {
                let nudged = |by: f64| {
                    let mut x = inputs.clone();
                    let mut e = x[which].to_vec::<f64>().unwrap();
                    e[at] += by;
                    x[which] = Tensor::from_vec(e, x[which].shape()).unwrap();
                    loss(&x)
                };
                let fd = (nudged(eps) - nudged(-eps)) / (2.0 * eps);
                // Central differences in f64: truncation ~eps^2, rounding ~1e-16 / eps.
                assert!(
                    (fd - grad[at]).abs() <= 1e-7 * (1.0 + fd.abs()),
                    "input {which} entry {at}: backward {} vs finite difference {fd}",
                    grad[at]
                );
            }
        }
    }
}
