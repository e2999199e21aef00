//! Host side of kernels/attention.cu: the capture tables, launch plans and buffers of the fused
//! attention forward and backward, written once for any [`Memory`] (the GPU or the emulation).
//! Same contract as the CPU reference in `ops::attention`: q, k, v (B, H, L, D), here in bf16;
//! maps (B, words, H, Lq) in f32. The backward recomputes the forward for O, the log-sum-exps and
//! the maps (`ops::attention_backward` takes no saved state), which costs one forward. The causal
//! forward (CLIP) is the same kernel with a mask; head dims past the fused kernel's take an
//! explicit path (two GEMMs around a row softmax) for the forward without capture.

use half::bf16;

use super::gemm::{gemm_bt, BLayout};
use super::launch::{Arg, KernelCall};
use super::memory::Memory;
use crate::error::{Error, Result};
use crate::ops::attention::{
    check_backward_shapes, check_capture, check_causal, dims, AttentionGrads, AttentionOutput,
    Capture, Dims,
};
use crate::Tensor;

const MODULE: &str = "attention";
// Tile sizes: must match ATT_* in kernels/attention.cu.
const THREADS: u32 = 128;
const BQ: usize = 64;
const BK: usize = 64;
const BKQ: usize = 32;
const BKB: usize = 64;
const BQB: usize = 32;
const PAD: usize = 8;
const DMAX: usize = 128;

/// The capture as the kernels read it: the distinct captured columns, and for each word the
/// positions of its columns in that list (CSR: `word_off[w]..word_off[w + 1]` into `word_pos`).
struct Tables<M: Memory> {
    n_words: i32,
    ncap: i32,
    map_cols: (i32, i32),
    word_off: M::Buf<i32>,
    word_pos: M::Buf<i32>,
    cap_cols: M::Buf<i32>,
}

impl<M: Memory> Tables<M> {
    fn new(m: &M, capture: Option<&Capture>, lk: usize) -> Result<Self> {
        let Some(c) = capture else {
            return Ok(Tables {
                n_words: 0,
                ncap: 0,
                map_cols: (0, 0),
                word_off: m.zeros(1)?,
                word_pos: m.zeros(1)?,
                cap_cols: m.zeros(1)?,
            });
        };
        let mut cols: Vec<i32> = c.words.iter().flatten().map(|&j| j as i32).collect();
        cols.sort_unstable();
        cols.dedup();
        let mut word_off = vec![0i32];
        let mut word_pos = Vec::new();
        for word in &c.words {
            word_pos.extend(word.iter().map(|&j| {
                cols.binary_search(&(j as i32))
                    .expect("every word's column is in the list") as i32
            }));
            word_off.push(word_pos.len() as i32);
        }
        let range = c.softmax_cols.clone().unwrap_or(0..lk);
        Ok(Tables {
            n_words: c.words.len() as i32,
            ncap: cols.len() as i32,
            map_cols: (range.start as i32, range.end as i32),
            word_off: m.upload(&word_off)?,
            word_pos: m.upload(&word_pos)?,
            cap_cols: m.upload(&cols)?,
        })
    }
}

/// What the forward leaves for the backward (and returns).
struct Forward<M: Memory> {
    out: M::Buf<bf16>,
    lse: M::Buf<f32>,
    lse_map: M::Buf<f32>,
    maps: M::Buf<f32>,
}

fn round16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// The fused kernels' head-dim limit.
fn require_fused(op: &'static str, dm: &Dims) -> Result<()> {
    if fits_fused(dm) {
        return Ok(());
    }
    Err(Error::shape(
        op,
        format!(
            "head dims {} and {}: the fused kernel takes at most {DMAX} (wider heads run \
             without capture, causal mask or backward)",
            dm.d, dm.dv
        ),
    ))
}

/// Checks what the kernels support beyond the CPU op's own checks (the head-dim limit of the
/// fused kernels is `require_fused`'s).
fn check(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    capture: Option<&Capture>,
) -> Result<Dims> {
    let dm = dims(op, q, k, v)?;
    if let Some(c) = capture {
        check_capture(op, c, dm.lk)?;
    }
    if dm.b * dm.h * dm.lq * dm.lk * dm.d * dm.dv == 0 {
        return Err(Error::shape(op, "an empty dimension".to_string()));
    }
    if dm.lq.max(dm.lk) > i32::MAX as usize {
        return Err(Error::shape(
            op,
            format!("{} queries, {} keys: at most 2^31 - 1", dm.lq, dm.lk),
        ));
    }
    if dm.b * dm.h > 65535 {
        return Err(Error::shape(
            op,
            format!("{} (batch, head) pairs: at most 65535", dm.b * dm.h),
        ));
    }
    Ok(dm)
}

fn fits_fused(dm: &Dims) -> bool {
    dm.d <= DMAX && dm.dv <= DMAX
}

fn grid(rows: usize, per_block: usize, dm: &Dims) -> [u32; 3] {
    [rows.div_ceil(per_block) as u32, (dm.b * dm.h) as u32, 1]
}

#[allow(clippy::too_many_arguments)]
fn forward<M: Memory>(
    m: &M,
    q: u64,
    k: u64,
    v: u64,
    dm: &Dims,
    scale: f64,
    causal: bool,
    t: &Tables<M>,
) -> Result<Forward<M>> {
    let rows = dm.b * dm.h * dm.lq;
    let mut f = Forward {
        out: m.zeros(rows * dm.dv)?,
        lse: m.zeros(rows)?,
        lse_map: m.zeros(if t.n_words > 0 { rows } else { 1 })?,
        maps: m.zeros(t.n_words as usize * rows)?,
    };
    // The shared arrays of attention_forward: the Q tile, and two K and two V tiles.
    let (ldq, ldv) = (round16(dm.d) + PAD, round16(dm.dv) + PAD);
    let smem = 2 * (BQ * ldq + 2 * BK * ldq + 2 * BK * ldv);
    let call = KernelCall {
        module: MODULE,
        name: "attention_forward",
        grid: grid(dm.lq, BQ, dm),
        block: [THREADS, 1, 1],
        smem: smem as u32,
        args: vec![
            Arg::Ptr(q),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(m.addr_mut(&mut f.out)),
            Arg::Ptr(m.addr_mut(&mut f.lse)),
            Arg::I32(dm.lq as i32),
            Arg::I32(dm.lk as i32),
            Arg::I32(dm.d as i32),
            Arg::I32(dm.dv as i32),
            Arg::F32(scale as f32),
            Arg::I32(causal as i32),
            Arg::I32(dm.h as i32),
            Arg::I32(t.n_words),
            Arg::Ptr(m.addr(&t.word_off)),
            Arg::Ptr(m.addr(&t.word_pos)),
            Arg::Ptr(m.addr(&t.cap_cols)),
            Arg::I32(t.map_cols.0),
            Arg::I32(t.map_cols.1),
            Arg::Ptr(m.addr_mut(&mut f.lse_map)),
            Arg::Ptr(m.addr_mut(&mut f.maps)),
        ],
    };
    m.launch(&call)?;
    Ok(f)
}

/// softmax(q k^T * scale) v with optional capture (or with a causal mask: `Lq == Lk`, no
/// capture), on `m`: `ops::attention`'s contract with bf16 q, k, v (and output) and f32 maps.
/// Head dims past the fused kernel's run the explicit path (no capture, no mask).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<M: Memory>(
    m: &M,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    capture: Option<&Capture>,
    causal: bool,
) -> Result<AttentionOutput> {
    const OP: &str = "attention (CUDA kernel)";
    let dm = check(OP, q, k, v, capture)?;
    let explicit = capture.is_none() && !causal && !fits_fused(&dm);
    if !explicit {
        require_fused(OP, &dm)?;
    }
    if causal {
        check_causal(OP, &dm, true)?;
        if capture.is_some() {
            return Err(Error::Invalid(format!(
                "{OP}: a causal mask with map capture has no kernel"
            )));
        }
    }
    let (qa, ka, va) = (
        m.tensor_addr::<bf16>(OP, q)?,
        m.tensor_addr::<bf16>(OP, k)?,
        m.tensor_addr::<bf16>(OP, v)?,
    );
    if explicit {
        let out = explicit_forward(m, qa, ka, va, &dm, scale)?;
        return Ok(AttentionOutput {
            out: m.tensor(out, &[dm.b, dm.h, dm.lq, dm.dv])?,
            maps: None,
            lse: None,
        });
    }
    let t = Tables::new(m, capture, dm.lk)?;
    let f = forward(m, qa, ka, va, &dm, scale, causal, &t)?;
    let maps = match capture {
        Some(c) => Some(m.tensor(f.maps, &[dm.b, c.words.len(), dm.h, dm.lq])?),
        None => None,
    };
    Ok(AttentionOutput {
        out: m.tensor(f.out, &[dm.b, dm.h, dm.lq, dm.dv])?,
        maps,
        lse: None,
    })
}

/// Gradients of `sum(out * dout) + sum(maps * dmaps)`: `ops::attention_backward`'s contract with
/// bf16 q, k, v, dout (and gradients) and f32 dmaps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward<M: Memory>(
    m: &M,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    dout: &Tensor,
    capture: Option<(&Capture, &Tensor)>,
    kv_grads: bool,
) -> Result<AttentionGrads> {
    const OP: &str = "attention_backward (CUDA kernel)";
    let dm = check(OP, q, k, v, capture.map(|(c, _)| c))?;
    require_fused(OP, &dm)?;
    check_backward_shapes(OP, &dm, dout, capture)?;
    let dmaps = match capture {
        Some((_, g)) => m.tensor_addr::<f32>(OP, g)?,
        None => 0,
    };
    let t = Tables::new(m, capture.map(|(c, _)| c), dm.lk)?;
    let (qa, ka, va) = (
        m.tensor_addr::<bf16>(OP, q)?,
        m.tensor_addr::<bf16>(OP, k)?,
        m.tensor_addr::<bf16>(OP, v)?,
    );
    let doa = m.tensor_addr::<bf16>(OP, dout)?;
    let f = forward(m, qa, ka, va, &dm, scale, false, &t)?;

    let rows = dm.b * dm.h * dm.lq;
    let capture_rows = if t.n_words > 0 { rows } else { 1 };
    let mut delta = m.zeros::<f32>(rows)?;
    let mut delta_map = m.zeros::<f32>(capture_rows)?;
    let mut gcap = m.zeros::<f32>(capture_rows * t.ncap.max(1) as usize)?;
    m.launch(&KernelCall {
        module: MODULE,
        name: "attention_backward_prep",
        grid: grid(dm.lq, THREADS as usize, &dm),
        block: [THREADS, 1, 1],
        smem: 0,
        args: vec![
            Arg::Ptr(m.addr(&f.out)),
            Arg::Ptr(doa),
            Arg::I32(dm.lq as i32),
            Arg::I32(dm.dv as i32),
            Arg::I32(dm.h as i32),
            Arg::I32(t.n_words),
            Arg::Ptr(m.addr(&t.word_off)),
            Arg::Ptr(m.addr(&t.word_pos)),
            Arg::I32(t.ncap),
            Arg::Ptr(m.addr(&f.maps)),
            Arg::Ptr(dmaps),
            Arg::Ptr(m.addr_mut(&mut delta)),
            Arg::Ptr(m.addr_mut(&mut delta_map)),
            Arg::Ptr(m.addr_mut(&mut gcap)),
        ],
    })?;

    // The arguments dq and dk/dv share, in the kernels' order, before their outputs.
    let common = [
        Arg::Ptr(qa),
        Arg::Ptr(ka),
        Arg::Ptr(va),
        Arg::Ptr(doa),
        Arg::Ptr(m.addr(&f.lse)),
        Arg::Ptr(m.addr(&f.lse_map)),
        Arg::Ptr(m.addr(&delta)),
        Arg::Ptr(m.addr(&delta_map)),
        Arg::Ptr(m.addr(&gcap)),
        Arg::Ptr(m.addr(&t.cap_cols)),
        Arg::I32(t.ncap),
        Arg::I32(t.map_cols.0),
        Arg::I32(t.map_cols.1),
        Arg::I32(dm.lq as i32),
        Arg::I32(dm.lk as i32),
        Arg::I32(dm.d as i32),
        Arg::I32(dm.dv as i32),
        Arg::F32(scale as f32),
    ];
    let (ldq, ldv) = (round16(dm.d) + PAD, round16(dm.dv) + PAD);

    let mut dq = m.zeros::<bf16>(rows * dm.d)?;
    let mut args = common.to_vec();
    args.push(Arg::Ptr(m.addr_mut(&mut dq)));
    m.launch(&KernelCall {
        module: MODULE,
        name: "attention_backward_dq",
        grid: grid(dm.lq, BQ, &dm),
        block: [THREADS, 1, 1],
        // colcap; the Q and dO tiles; a K and a V tile.
        smem: (4 * BKQ + 2 * (BQ * ldq + BQ * ldv + BKQ * ldq + BKQ * ldv)) as u32,
        args,
    })?;

    let (dk, dv) = if kv_grads {
        let krows = dm.b * dm.h * dm.lk;
        let mut dk = m.zeros::<bf16>(krows * dm.d)?;
        let mut dv = m.zeros::<bf16>(krows * dm.dv)?;
        let mut args = common.to_vec();
        args.push(Arg::Ptr(m.addr_mut(&mut dk)));
        args.push(Arg::Ptr(m.addr_mut(&mut dv)));
        m.launch(&KernelCall {
            module: MODULE,
            name: "attention_backward_dkdv",
            grid: grid(dm.lk, BKB, &dm),
            block: [THREADS, 1, 1],
            // Row statistics; the K and V tiles; a Q and a dO tile.
            smem: (4 * 4 * BQB + 2 * (BKB * ldq + BKB * ldv + BQB * ldq + BQB * ldv)) as u32,
            args,
        })?;
        (
            Some(m.tensor(dk, k.shape())?),
            Some(m.tensor(dv, v.shape())?),
        )
    } else {
        (None, None)
    };
    Ok(AttentionGrads {
        dq: m.tensor(dq, q.shape())?,
        dk,
        dv,
    })
}

/// Attention for head dims past the fused kernel's (the VAE's one 512-wide head), as PyTorch's math
/// path computes it: for each (batch, head), S = Q K^T (gemm_bt), P = softmax(scale S) in place
/// (softmax_rows), O = P V (gemm_bt reading V as the transpose of its (N, K) operand). S is one
/// Lq x Lk bf16 buffer, reused across heads; rounding S to bf16 costs about 2^-9 |S| scale of
/// each logit.
fn explicit_forward<M: Memory>(
    m: &M,
    q: u64,
    k: u64,
    v: u64,
    dm: &Dims,
    scale: f64,
) -> Result<M::Buf<bf16>> {
    const BF16: u64 = 2;
    let mut out = m.zeros::<bf16>(dm.b * dm.h * dm.lq * dm.dv)?;
    let mut s = m.zeros::<bf16>(dm.lq * dm.lk)?;
    let (oa, sa) = (m.addr_mut(&mut out), m.addr_mut(&mut s));
    for bh in 0..(dm.b * dm.h) as u64 {
        let (lq, lk, d, dv) = (dm.lq as u64, dm.lk as u64, dm.d as u64, dm.dv as u64);
        let (qh, kh, vh) = (
            q + bh * lq * d * BF16,
            k + bh * lk * d * BF16,
            v + bh * lk * dv * BF16,
        );
        gemm_bt(
            m,
            sa,
            qh,
            kh,
            BLayout::Rows { k: dm.d },
            0,
            (dm.lq, dm.lk, dm.d),
            0,
        )?;
        m.launch(&KernelCall::per_row(
            MODULE,
            "softmax_rows",
            dm.lq,
            vec![
                Arg::Ptr(sa),
                Arg::Ptr(sa),
                Arg::I64(dm.lk as i64),
                Arg::F32(scale as f32),
            ],
        ))?;
        let oh = oa + bh * lq * dv * BF16;
        let vt = BLayout::Transposed { inner: dm.dv };
        gemm_bt(m, oh, sa, vh, vt, 0, (dm.lq, dm.dv, dm.lk), 0)?;
    }
    Ok(out)
}
