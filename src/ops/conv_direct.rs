//! f32 stride-1 convolution read straight from the zero-padded input, 16 lanes at a time with
//! AVX-512F or 8 with AVX2 + FMA (detected at run time): the convolutions on planes of 64x64 and
//! more (SD2.1's UNet at its first level, the VAE) and their input gradients. The GEMM route
//! (`conv::Shifted::tiled`) packs both operands for each of the kh*kw tap GEMMs of every tile
//! (3.7 MB of weights a tile at 320 channels), and a tile's (256, Cout) accumulator spills out of
//! L2 at 640 channels; here the weights are packed once a call and the input is never copied
//! beyond its padding.
//!
//! Computes y[o, oy, ox] += sum over (c, t) of w(o, c, t) * xp[c, oy + t / kw, ox + t % kw], with
//! xp the input padded to (Cin, Hp, Wp) and the output width a multiple of 16.
//!
//! Micro-tile: 6 output channels x one strip of output columns of one row: 64 columns in 24 zmm
//! accumulators (AVX-512, width a multiple of 64), 32 in 12 zmm (multiple of 32), else 16 in 12
//! ymm (AVX2). A step of the reduction (one input channel, one tap) is one unaligned load of the
//! shifted input row a register, six weight broadcasts from the packed copy ([o / 6][c][tap][o %
//! 6]: one cache line serves 2.7 steps) and one FMA per accumulator: BLIS's 6x16 shape and its
//! AVX-512 widening, FMA-bound from L1. The accumulators start at zero and the output is added
//! at the end, so its loads wait on nothing.
//!
//! Launch shape: bands of whole output rows in parallel (up to 4 a thread, of at least 32 strips
//! of 16 columns each where the plane has that many). In a band, the reduction goes REDUCTION
//! steps (input channels x taps) at a time; for each such block the output channels go in chunks
//! whose packed weights for the block (~512 KB) stay in L2, and every strip of the band takes the
//! chunk's tiles in turn, so the strip's input (128 channels x 3 rows x 66 floats at 3x3 and 64
//! columns, ~100 KB) stays in L2 next to them.
//!
//! FLOPs: 2*Cout*Cin*kh*kw*Ho*Wo. Bytes: the weights packed once (Cout*Cin*kh*kw*4 read and
//! written), then read once a band; the padded input once a band and chunk; the output read
//! and written once a reduction block.

use rayon::prelude::*;

/// Output channels a micro-tile.
const ROWS: usize = 6;
/// Output columns of an AVX2 micro-tile: two ymm registers.
const COLS: usize = 16;
/// Reduction steps (input channels x taps) a block: 128 channels at 3x3. Measured on a Zen 5
/// (AVX-512, 1 MB L2 a core) at 320 channels and 64x64: blocks of 576-1152 steps and chunks of
/// 512 KB took 0.9x the time of 288 and 256 KB; on an AVX2 machine 16-2880 steps were within
/// noise of each other.
const REDUCTION: usize = 1152;
/// Bytes of packed weights a chunk of output channels takes for one reduction block (half of
/// a 1 MB L2).
const CHUNK_BYTES: usize = 512 << 10;
/// Strips a band takes at least, where the plane has that many per thread.
const BAND_STRIPS: usize = 32;

/// The convolution's sizes as the direct path needs them.
pub(super) struct DirectConv {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    /// The padded input's plane.
    pub hp: usize,
    pub wp: usize,
    /// The output's plane.
    pub ho: usize,
    pub wo: usize,
}

impl DirectConv {
    /// Output columns a micro-tile takes: 64 or 32 (four or two zmm registers a row) where the
    /// CPU has AVX-512 and the width allows, else COLS.
    fn strip(&self) -> usize {
        if super::simd::wide_lanes_available() {
            if let Some(&s) = [64, 32].iter().find(|&&s| self.wo.is_multiple_of(s)) {
                return s;
            }
        }
        COLS
    }

    /// Whether this CPU and these sizes take the direct path.
    pub fn available(&self) -> bool {
        self.wo.is_multiple_of(COLS)
            && self.wo > 0
            && self.cout > 0
            && self.cin > 0
            && self.kh * self.kw > 0
            && super::simd::lanes_available()
    }

    /// The weights as the micro-kernel reads them, [o / 6][c][tap][o % 6] (zero past Cout),
    /// from `w` stored as torch does, (Cout, Cin, kh, kw); or with `flipped`, from the weights of
    /// the convolution this one is the input gradient of, (Cin, Cout, kh, kw), turned 180
    /// degrees: weight (o, c, tap) is w[c, o, kh*kw - 1 - tap]. Either way a tile reads
    /// contiguous runs.
    pub fn pack(&self, w: &[f32], flipped: bool) -> Vec<f32> {
        let taps = self.kh * self.kw;
        let k = self.cin * taps;
        assert_eq!(w.len(), self.cout * k, "conv_direct::pack: weights' length");
        let mut packed = vec![0.0f32; self.cout.div_ceil(ROWS) * k * ROWS];
        packed
            .par_chunks_mut(k * ROWS)
            .enumerate()
            .for_each(|(t, tile)| {
                for r in 0..ROWS.min(self.cout - t * ROWS) {
                    let o = t * ROWS + r;
                    if !flipped {
                        let steps = tile.chunks_exact_mut(ROWS);
                        for (step, &v) in steps.zip(&w[o * k..(o + 1) * k]) {
                            step[r] = v;
                        }
                        continue;
                    }
                    for c in 0..self.cin {
                        let src = &w[(c * self.cout + o) * taps..][..taps];
                        let steps = tile[c * taps * ROWS..].chunks_exact_mut(ROWS);
                        for (step, &v) in steps.zip(src.iter().rev()) {
                            step[r] = v;
                        }
                    }
                }
            });
        packed
    }

    /// y (Cout, Ho*Wo) += the convolution of `xp` (Cin, Hp, Wp) by `packed` ([`Self::pack`]).
    /// Only when [`Self::available`].
    pub fn run(&self, xp: &[f32], packed: &[f32], y: &mut [f32]) {
        assert!(
            self.available(),
            "conv_direct::run without AVX2/FMA or a width of 16s"
        );
        let plane_in = self.hp * self.wp;
        let (plane_out, taps) = (self.ho * self.wo, self.kh * self.kw);
        let tiles = self.cout.div_ceil(ROWS);
        assert!(xp.len() >= self.cin * plane_in && y.len() >= self.cout * plane_out);
        assert!(packed.len() >= tiles * self.cin * taps * ROWS);
        assert!(self.hp >= self.ho + self.kh - 1 && self.wp >= self.wo + self.kw - 1);
        let offsets: Vec<usize> = (0..taps)
            .map(|t| (t / self.kw) * self.wp + t % self.kw)
            .collect();
        let cols = self.strip();
        let threads = rayon::current_num_threads().max(1);
        let bands = (plane_out / COLS / BAND_STRIPS).clamp(threads, 4 * threads);
        let band = self.ho.div_ceil(bands);
        let block = REDUCTION.div_ceil(taps).min(self.cin);
        let per_chunk = (CHUNK_BYTES / (block * taps * ROWS * 4)).max(1);
        let chunk = tiles.div_ceil(tiles.div_ceil(per_chunk));
        // Each band's rows of every output channel: disjoint slices, one list a band.
        let mut out_bands: Vec<Vec<&mut [f32]>> =
            (0..self.ho.div_ceil(band)).map(|_| vec![]).collect();
        for channel in y[..self.cout * plane_out].chunks_mut(plane_out) {
            for (b, rows) in channel.chunks_mut(band * self.wo).enumerate() {
                out_bands[b].push(rows);
            }
        }
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
        out_bands.par_iter_mut().enumerate().for_each(|(b, out)| {
            let oy0 = b * band;
            for c0 in (0..self.cin).step_by(block) {
                let cis = block.min(self.cin - c0);
                for t0 in (0..tiles).step_by(chunk) {
                    for at in (0..out[0].len()).step_by(cols) {
                        let (oy, ox) = (oy0 + at / self.wo, at % self.wo);
                        let x = &xp[c0 * plane_in + oy * self.wp + ox..];
                        for t in t0..tiles.min(t0 + chunk) {
                            let (o, rows) = (t * ROWS, ROWS.min(self.cout - t * ROWS));
                            let w = &packed[(t * self.cin + c0) * taps * ROWS..];
                            let mut c = [std::ptr::null_mut::<f32>(); ROWS];
                            for (r, p) in c.iter_mut().enumerate().take(rows) {
                                *p = out[o + r][at..at + cols].as_mut_ptr();
                            }
                            // SAFETY: `available` and `strip` checked the CPU. The input reads
                            // stay inside xp: the last channel's farthest is (cis-1)*plane_in +
                            // (kh-1)*wp + kw-1 + cols-1 past x, inside its plane by the asserts.
                            // The weight reads, cis*taps*ROWS from w, stay inside `packed`.
                            // c's rows are cols-long slices.
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                let args = (x, plane_in, &offsets[..], cis, w, c, rows);
                                match cols {
                                    64 => avx512::tile::<4>(args),
                                    32 => avx512::tile::<2>(args),
                                    _ => avx2::tile(args),
                                }
                            };
                        }
                    }
                }
            }
        });
    }
}

/// A micro-tile's operands: the input at the strip's first column, the input's plane, the taps'
/// offsets in it, the reduction block's channels, its packed weights, the output rows (first
/// `rows` used).
#[cfg(target_arch = "x86_64")]
type TileArgs<'a> = (
    &'a [f32],
    usize,
    &'a [usize],
    usize,
    &'a [f32],
    [*mut f32; ROWS],
    usize,
);

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{COLS, ROWS};
    use std::arch::x86_64::*;

    /// c[r][0..16] += sum over (ci < cis, tap) of w[ci][tap][r] * x[ci * plane + offsets[tap]
    /// .. + 16], for the first `rows` rows of the tile.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile((x, plane, offsets, cis, w, c, rows): super::TileArgs) {
        let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
        let (x, mut w) = (x.as_ptr(), w.as_ptr());
        for ci in 0..cis {
            let xc = x.add(ci * plane);
            for &o in offsets {
                let a0 = _mm256_loadu_ps(xc.add(o));
                let a1 = _mm256_loadu_ps(xc.add(o + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*w.add(r));
                    acc[0] = _mm256_fmadd_ps(b, a0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(b, a1, acc[1]);
                }
                w = w.add(ROWS);
            }
        }
        for (acc, &c) in acc.iter().zip(&c).take(rows) {
            _mm256_storeu_ps(c, _mm256_add_ps(acc[0], _mm256_loadu_ps(c)));
            let c = c.add(COLS / 2);
            _mm256_storeu_ps(c, _mm256_add_ps(acc[1], _mm256_loadu_ps(c)));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::ROWS;
    use std::arch::x86_64::*;

    /// As `avx2::tile`, 16 lanes a register and V registers a row: c[r][0..16V] += sum over
    /// (ci < cis, tap) of w[ci][tap][r] * x[ci * plane + offsets[tap] .. + 16V].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile<const V: usize>(
        (x, plane, offsets, cis, w, c, rows): super::TileArgs,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
        let (x, mut w) = (x.as_ptr(), w.as_ptr());
        for ci in 0..cis {
            let xc = x.add(ci * plane);
            for &o in offsets {
                let mut a = [_mm512_setzero_ps(); V];
                for (v, a) in a.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(xc.add(o + 16 * v));
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let b = _mm512_set1_ps(*w.add(r));
                    for (acc, &a) in acc.iter_mut().zip(&a) {
                        *acc = _mm512_fmadd_ps(b, a, *acc);
                    }
                }
                w = w.add(ROWS);
            }
        }
        for (acc, &c) in acc.iter().zip(&c).take(rows) {
            for (v, acc) in acc.iter().enumerate() {
                let c = c.add(16 * v);
                _mm512_storeu_ps(c, _mm512_add_ps(*acc, _mm512_loadu_ps(c)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32).collect()
    }

    /// `run` against the convolution written out in f64 from the same f32 values, for
    /// each weight layout and each strip width this CPU has (64 and 32 columns with AVX-512, 16
    /// otherwise and at widths 16 and 48): a reduction of several blocks with a partial last one
    /// (133 channels x 9 taps against blocks of 128), a last tile of one row (13 channels), a
    /// non-square kernel, a padded plane wider than the kernel needs, and an output that already
    /// holds values.
    /// Tolerance: f32 summation of n terms errs by at most ~n * 2^-24 of the sum of their
    /// magnitudes; 2n * f32::EPSILON of it is that bound with room, while a wrong index errs by
    /// the order of the sum itself.
    #[test]
    fn run_matches_definition() {
        if !crate::ops::simd::lanes_available() {
            eprintln!("run_matches_definition: no AVX2/FMA here, the direct path is not built");
            return;
        }
        let mut rng = Rng::new(11);
        // (cin, cout, kh, kw, ho, wo, extra padded columns)
        for (cin, cout, kh, kw, ho, wo, extra) in [
            (133, 13, 3, 3, 3, 32, 0),
            (5, 7, 1, 1, 3, 16, 1),
            (3, 8, 5, 3, 4, 48, 3),
            (9, 7, 3, 3, 2, 64, 2),
            // More channel tiles (77) than a chunk holds at 32 channels x 3x3 (75): two chunks.
            (32, 462, 3, 3, 1, 16, 0),
        ] {
            for flipped in [false, true] {
                let (hp, wp) = (ho + kh - 1, wo + kw - 1 + extra);
                let d = DirectConv {
                    cin,
                    cout,
                    kh,
                    kw,
                    hp,
                    wp,
                    ho,
                    wo,
                };
                let taps = kh * kw;
                let xp = randn(&mut rng, cin * hp * wp);
                let w = randn(&mut rng, cout * cin * taps);
                let y0 = randn(&mut rng, cout * ho * wo);
                let weight = |o: usize, c: usize, t: usize| {
                    let i = if flipped {
                        (c * cout + o) * taps + taps - 1 - t
                    } else {
                        (o * cin + c) * taps + t
                    };
                    w[i] as f64
                };
                let mut y = y0.clone();
                d.run(&xp, &d.pack(&w, flipped), &mut y);
                let n = (cin * taps + 1) as f64;
                for o in 0..cout {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let at = (o * ho + oy) * wo + ox;
                            let (mut want, mut size) = (y0[at] as f64, (y0[at] as f64).abs());
                            for c in 0..cin {
                                for t in 0..taps {
                                    let xv = xp[c * hp * wp + (oy + t / kw) * wp + ox + t % kw];
                                    let term = weight(o, c, t) * xv as f64;
                                    want += term;
                                    size += term.abs();
                                }
                            }
                            let err = (y[at] as f64 - want).abs();
                            assert!(
                                err <= 2.0 * n * f32::EPSILON as f64 * size,
                                "cin {cin} cout {cout} {kh}x{kw} flipped {flipped} y[{o}, {oy}, \
                                 {ox}] = {}, want {want} (terms' magnitude {size})",
                                y[at]
                            );
                        }
                    }
                }
            }
        }
    }
}
