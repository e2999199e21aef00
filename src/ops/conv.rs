//! 2-D convolution (NCHW, square stride and symmetric zero padding, any kernel size) and its
//! gradients. Covers every convolution in SD2.1's UNet and VAE: 3x3 pad 1, 1x1, and 3x3 stride 2
//! (downsampling; diffusers pads 1 on every side there). The routes:
//! - f32, stride 1, a kernel of more than one tap, an output of 64x64 or more in rows of 16s,
//!   on a CPU with AVX2 + FMA: the direct kernel of `conv_direct`, for the forward and for the
//!   input gradient alone (as the convolution of dy with the kernel turned);
//! - other large planes, stride 1: shifted GEMMs in column tiles ([`Shifted`]); with weight
//!   gradients (training), the shifted GEMMs over the whole plane at every size;
//! - small planes and strided convolutions: im2col and one GEMM, a channel group at a time.

use rayon::prelude::*;

use super::conv_direct::DirectConv;
use super::linalg::{gemm_strided, gemm_strided_with, Strided, StridedMut};
use super::{expect_rank, float_dispatch, same_dtype};
use crate::{DType, Error, Float, Result, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: 1,
            padding: 0,
        }
    }
}

/// Every size of one convolution.
#[derive(Clone, Copy)]
struct Geometry {
    batch: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn new(op: &'static str, x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Self> {
        expect_rank(op, "x", x, 4)?;
        expect_rank(op, "weight", w, 4)?;
        same_dtype(op, x, w)?;
        let (xs, ws) = (x.shape(), w.shape());
        if xs[1] != ws[1] {
            return Err(Error::shape(
                op,
                format!(
                    "x {xs:?} has {} channels, weight {ws:?} expects {}",
                    xs[1], ws[1]
                ),
            ));
        }
        if p.stride == 0 {
            return Err(Error::Invalid(format!("{op}: stride must be >= 1")));
        }
        let (hp, wp) = (xs[2] + 2 * p.padding, xs[3] + 2 * p.padding);
        if hp < ws[2] || wp < ws[3] {
            return Err(Error::shape(
                op,
                format!("kernel {ws:?} larger than padded input {xs:?}"),
            ));
        }
        Ok(Geometry {
            batch: xs[0],
            cin: xs[1],
            h: xs[2],
            w: xs[3],
            cout: ws[0],
            kh: ws[2],
            kw: ws[3],
            ho: (hp - ws[2]) / p.stride + 1,
            wo: (wp - ws[3]) / p.stride + 1,
            stride: p.stride,
            pad: p.padding,
        })
    }
    /// Rows of the im2col matrix.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    fn out_shape(&self) -> [usize; 4] {
        [self.batch, self.cout, self.ho, self.wo]
    }
    /// Input coordinate for output coordinate `o` and kernel offset `k`, if inside the image.
    #[inline]
    fn src(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.pad)
            .filter(|&i| i < size)
    }
}

/// im2col a group of input channels at a time, so its buffer stays a few MB and is reused
/// across groups: whole, it would be a fresh 50-100 MB allocation (page faults and zeroing)
/// every call at 32x32 with 1280 or more channels. The GEMMs accumulate over the groups.
struct ChannelGroups {
    g: Geometry,
    /// Channels per group.
    size: usize,
}

/// Elements of an im2col buffer: 8 MB of f32.
const COL_ELEMS: usize = 1 << 21;

impl ChannelGroups {
    fn new(g: &Geometry) -> Self {
        let per_channel = (g.kh * g.kw * g.ho * g.wo).max(1);
        ChannelGroups {
            g: *g,
            size: (COL_ELEMS / per_channel).clamp(1, g.cin.max(1)),
        }
    }

    /// Each group's geometry (its channel count as `cin`) and first channel.
    fn iter(&self) -> impl Iterator<Item = (Geometry, usize)> + '_ {
        (0..self.g.cin).step_by(self.size).map(|c0| {
            let cin = self.size.min(self.g.cin - c0);
            (Geometry { cin, ..self.g }, c0)
        })
    }

    /// The weights' columns of the group starting at channel `c0`: a (Cout, cin * kh * kw)
    /// matrix inside the (Cout, Cin * kh * kw) weights.
    fn weights<'a, T>(&self, w: &'a [T], c0: usize) -> Strided<'a, T> {
        Strided::rows(&w[c0 * self.g.kh * self.g.kw..], self.g.k())
    }

    fn buffer<T: Float>(&self) -> Vec<T> {
        vec![T::ZERO; self.size * self.g.kh * self.g.kw * self.g.ho * self.g.wo]
    }

    /// y (Cout, Ho*Wo) = conv(x) for one image (`accumulate`: y += conv(x)).
    fn forward<T: Float>(&self, x: &[T], w: &[T], y: &mut [T], accumulate: bool) {
        let (g, plane) = (&self.g, self.g.ho * self.g.wo);
        let mut col = self.buffer();
        for (gs, c0) in self.iter() {
            let col = &mut col[..gs.k() * plane];
            im2col(&gs, &x[c0 * g.h * g.w..(c0 + gs.cin) * g.h * g.w], col);
            let yc = StridedMut::rows(&mut *y, plane);
            let acc = accumulate || c0 > 0;
            gemm_strided(
                g.cout,
                plane,
                gs.k(),
                self.weights(w, c0),
                Strided::rows(col, plane),
                yc,
                acc,
            );
        }
    }

    /// dx (Cin, H*W) += the input gradient of one image, from dy (Cout, Ho*Wo); with `dw`,
    /// dw += the weight gradient.
    fn backward<T: Float>(
        &self,
        x: &[T],
        w: &[T],
        dy: &[T],
        dx: &mut [T],
        mut dw: Option<&mut [T]>,
    ) {
        let (g, plane) = (&self.g, self.g.ho * self.g.wo);
        let mut col = self.buffer();
        for (gs, c0) in self.iter() {
            let col = &mut col[..gs.k() * plane];
            let span = c0 * g.h * g.w..(c0 + gs.cin) * g.h * g.w;
            let dcol = StridedMut::rows(&mut *col, plane);
            gemm_strided(
                gs.k(),
                plane,
                g.cout,
                self.weights(w, c0).t(),
                Strided::rows(dy, plane),
                dcol,
                false,
            );
            col2im(&gs, col, &mut dx[span.clone()]);
            if let Some(dw) = dw.as_deref_mut() {
                im2col(&gs, &x[span], col);
                let dwg = StridedMut::rows(&mut dw[c0 * g.kh * g.kw..], g.k());
                gemm_strided(
                    g.cout,
                    gs.k(),
                    plane,
                    Strided::rows(dy, plane),
                    Strided::rows(col, plane).t(),
                    dwg,
                    true,
                );
            }
        }
    }
}

/// col[(c, i, j), (oy, ox)] = x[c, oy*s + i - p, ox*s + j - p] (zero outside).
fn im2col<T: Float>(g: &Geometry, x: &[T], col: &mut [T]) {
    let plane = g.ho * g.wo;
    col.par_chunks_mut(plane * g.kh * g.kw)
        .enumerate()
        .for_each(|(c, rows)| {
            let xc = &x[c * g.h * g.w..(c + 1) * g.h * g.w];
            for (r, row) in rows.chunks_mut(plane).enumerate() {
                let (i, j) = (r / g.kw, r % g.kw);
                for oy in 0..g.ho {
                    let dst = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    match g.src(oy, i, g.h) {
                        None => dst.fill(T::ZERO),
                        Some(iy) => {
                            for (ox, d) in dst.iter_mut().enumerate() {
                                *d = g.src(ox, j, g.w).map_or(T::ZERO, |ix| xc[iy * g.w + ix]);
                            }
                        }
                    }
                }
            }
        });
}

/// The adjoint of `im2col`: dx[c, y, x] += sum of the col entries that read it.
fn col2im<T: Float>(g: &Geometry, col: &[T], dx: &mut [T]) {
    let plane = g.ho * g.wo;
    dx.par_chunks_mut(g.h * g.w)
        .enumerate()
        .for_each(|(c, dxc)| {
            let rows = &col[c * plane * g.kh * g.kw..(c + 1) * plane * g.kh * g.kw];
            for (r, row) in rows.chunks(plane).enumerate() {
                let (i, j) = (r / g.kw, r % g.kw);
                for oy in 0..g.ho {
                    let Some(iy) = g.src(oy, i, g.h) else {
                        continue;
                    };
                    for ox in 0..g.wo {
                        if let Some(ix) = g.src(ox, j, g.w) {
                            dxc[iy * g.w + ix] += row[oy * g.wo + ox];
                        }
                    }
                }
            }
        });
}

/// Stride-1 convolution of a large plane without an im2col buffer: the output is kh*kw
/// accumulated GEMMs (K = Cin) of the weights' (i, j) tap with the zero-padded input shifted by
/// (i, j). Computed on "wide" rows of the padded width Wp, whose last kw-1 columns are discarded:
/// then every shifted view is a plain strided matrix (channel stride Hp*Wp, column stride 1).
/// Same FLOPs as im2col, none of its Cin*kh*kw*Ho*Wo buffer (1.2 GB for a 512 px VAE conv).
/// Small planes take im2col (`Shifted::takes`): there the buffer is small, and one GEMM reads
/// the weights as they are stored. f32 on planes of DIRECT_PLANE or more takes `conv_direct`
/// instead where the CPU has AVX2: these GEMMs repack the weights for every tile and tap.
///
/// Output columns per parallel tile of `Shifted::tiled`.
const TILE: usize = 256;

struct Shifted {
    hp: usize,
    wp: usize,
    /// Columns the GEMMs compute: (Ho - 1) * Wp + Wo, so no shifted view reads past the plane.
    cols: usize,
}

impl Shifted {
    fn new(g: &Geometry) -> Self {
        let (hp, wp) = (g.h + 2 * g.pad, g.w + 2 * g.pad);
        Shifted {
            hp,
            wp,
            cols: (g.ho - 1) * wp + g.wo,
        }
    }

    /// Whether a convolution takes the tiled path: stride 1 and at least 8 tiles to share out.
    fn takes(g: &Geometry) -> bool {
        g.stride == 1 && Shifted::new(g).cols >= 8 * TILE
    }

    /// Columns per tile: about TILE, so that the tiles come in a multiple of the thread count
    /// (17 tiles of 256 on two threads left one idle for a tenth of a 64x64 convolution), and a
    /// multiple of 16, the GEMM micro-kernel's rows.
    fn tile(&self) -> usize {
        let threads = rayon::current_num_threads().max(1);
        let tiles = self.cols.div_ceil(TILE).next_multiple_of(threads);
        self.cols.div_ceil(tiles).next_multiple_of(16)
    }

    /// The input, zero-padded to (Cin, Hp, Wp) (borrowed when there is no padding).
    fn padded<'a, T: Float>(&self, g: &Geometry, x: &'a [T]) -> std::borrow::Cow<'a, [T]> {
        if g.pad == 0 {
            return x.into();
        }
        let mut xp = super::zeros::<T>(g.cin * self.hp * self.wp);
        xp.par_chunks_mut(self.hp * self.wp)
            .enumerate()
            .for_each(|(c, dst)| {
                for y in 0..g.h {
                    let row = (y + g.pad) * self.wp + g.pad;
                    dst[row..row + g.w]
                        .copy_from_slice(&x[(c * g.h + y) * g.w..(c * g.h + y + 1) * g.w]);
                }
            });
        xp.into()
    }

    /// Tap (i, j) of the weights as a (Cout, Cin) matrix.
    fn tap<'a, T>(&self, g: &Geometry, w: &'a [T], i: usize, j: usize) -> Strided<'a, T> {
        Strided {
            data: &w[i * g.kw + j..],
            rs: g.cin * g.kh * g.kw,
            cs: g.kh * g.kw,
        }
    }

    /// The padded input shifted by (i, j), as a (Cin, cols) matrix.
    fn view<'a, T>(&self, xp: &'a [T], i: usize, j: usize) -> Strided<'a, T> {
        Strided::rows(&xp[i * self.wp + j..], self.hp * self.wp)
    }

    /// y (Cout, Ho*Wo) += conv(x) for one image, from the kernel as contiguous taps
    /// ([`contiguous_taps`]). Computed transposed, as (cols, Cout), in tiles of ~TILE columns run in
    /// parallel, so each tile's accumulator stays in cache across the kh*kw taps (over the whole
    /// plane, every tap re-reads a multi-MB accumulator).
    fn tiled<T: Float>(&self, g: &Geometry, x: &[T], taps: &[T], y: &mut [T]) {
        let xp = self.padded(g, x);
        let mut wide_t = super::zeros::<T>(self.cols * g.cout);
        let tile = self.tile();
        wide_t
            .par_chunks_mut(tile * g.cout)
            .enumerate()
            .for_each(|(t, ct)| {
                let (n0, rows) = (t * tile, ct.len() / g.cout);
                for i in 0..g.kh {
                    for j in 0..g.kw {
                        let view = self.view(&xp[n0..], i, j).t();
                        let c = StridedMut::rows(&mut *ct, g.cout);
                        let tap = Strided::rows(&taps[(i * g.kw + j) * g.cin * g.cout..], g.cout);
                        gemm_strided_with(rows, g.cout, g.cin, view, tap, c, true, false);
                    }
                }
            });
        y.par_chunks_mut(g.ho * g.wo)
            .enumerate()
            .for_each(|(o, yo)| {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        yo[oy * g.wo + ox] += wide_t[(oy * self.wp + ox) * g.cout + o];
                    }
                }
            });
    }

    /// dx (Cin, H*W) = conv's input gradient for one image; and dw += its weight gradient.
    fn backward<T: Float>(
        &self,
        g: &Geometry,
        x: &[T],
        w: &[T],
        dy: &[T],
        dx: &mut [T],
        dw: Option<&mut [T]>,
    ) {
        // dy on wide rows, the discarded columns zero so they contribute nothing.
        let mut dwide = super::zeros::<T>(g.cout * g.ho * self.wp);
        for (dw_o, dy_o) in dwide.chunks_mut(g.ho * self.wp).zip(dy.chunks(g.ho * g.wo)) {
            for oy in 0..g.ho {
                dw_o[oy * self.wp..oy * self.wp + g.wo]
                    .copy_from_slice(&dy_o[oy * g.wo..(oy + 1) * g.wo]);
            }
        }
        let dwide_m = || Strided::rows(&dwide[..], g.ho * self.wp);
        let mut dxp = super::zeros::<T>(g.cin * self.hp * self.wp);
        for i in 0..g.kh {
            for j in 0..g.kw {
                let tap_t = self.tap(g, w, i, j).t();
                let c = StridedMut::rows(&mut dxp[i * self.wp + j..], self.hp * self.wp);
                gemm_strided(g.cin, self.cols, g.cout, tap_t, dwide_m(), c, true);
            }
        }
        for (c, src) in dxp.chunks(self.hp * self.wp).enumerate() {
            for y in 0..g.h {
                let row = (y + g.pad) * self.wp + g.pad;
                dx[(c * g.h + y) * g.w..(c * g.h + y + 1) * g.w]
                    .copy_from_slice(&src[row..row + g.w]);
            }
        }
        if let Some(dw) = dw {
            let xp = self.padded(g, x);
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let view_t = self.view(&xp, i, j).t();
                    let c = StridedMut {
                        data: &mut dw[i * g.kw + j..],
                        rs: g.cin * g.kh * g.kw,
                        cs: g.kh * g.kw,
                    };
                    gemm_strided(g.cout, g.cin, self.cols, dwide_m(), view_t, c, true);
                }
            }
        }
    }
}

/// The kernel's taps as contiguous (Cin, Cout) matrices, tap (i, j) at index i * kw + j: the
/// tiled GEMMs then pack them with contiguous copies, not a gather at stride kh*kw for every
/// tile (a tenth of a 64x64 convolution's time). One pass over the weights a call.
fn contiguous_taps<T: Float>(g: &Geometry, w: &[T]) -> Vec<T> {
    gather_taps(g, w, false)
}

/// The taps of `w` (Cout, Cin, kh, kw), one contiguous matrix a tap, tap t at index t: as
/// (Cin, Cout) matrices of tap t, or with `flipped` as (Cout, Cin) matrices of tap
/// kh*kw - 1 - t (the kernel turned 180 degrees, channel roles swapped).
fn gather_taps<T: Float>(g: &Geometry, w: &[T], flipped: bool) -> Vec<T> {
    let taps = g.kh * g.kw;
    let (rows, cols) = if flipped {
        (g.cout, g.cin)
    } else {
        (g.cin, g.cout)
    };
    let mut out = super::zeros::<T>(taps * rows * cols);
    out.par_chunks_mut((rows * cols).max(1))
        .enumerate()
        .for_each(|(t, m)| {
            let src = if flipped { taps - 1 - t } else { t };
            for (r, row) in m.chunks_mut(cols.max(1)).enumerate() {
                for (c, v) in row.iter_mut().enumerate() {
                    let (o, i) = if flipped { (r, c) } else { (c, r) };
                    *v = w[(o * g.cin + i) * taps + src];
                }
            }
        });
    out
}

/// The input gradient of a stride-1 convolution is itself one: of dy, padded by kh-1-pad, with
/// the kernel turned 180 degrees and its channel roles swapped (weight (o, c, tap) of it is the
/// forward's (c, o, kh*kw-1-tap)). Its geometry, or None when that is not a plain convolution
/// (a non-square kernel, padding >= its size).
fn input_gradient_conv(g: &Geometry) -> Option<Geometry> {
    if g.stride != 1 || g.kh != g.kw || g.pad >= g.kh {
        return None;
    }
    Some(Geometry {
        batch: g.batch,
        cin: g.cout,
        h: g.ho,
        w: g.wo,
        cout: g.cin,
        kh: g.kh,
        kw: g.kw,
        ho: g.h,
        wo: g.w,
        stride: 1,
        pad: g.kh - 1 - g.pad,
    })
}

/// Output planes from which a convolution takes the f32 direct path: below it, packing the
/// weights costs too much next to the convolution (1280 channels at 16x16: 59 MB packed for 7.5
/// GFLOP), and im2col's GEMM does as well.
const DIRECT_PLANE: usize = 64 * 64;

/// The f32 direct path (`conv_direct`) of convolution `g` where it applies (f32, a kernel of
/// more than one tap, stride 1, an output plane of DIRECT_PLANE or more in rows of 16s, AVX2 +
/// FMA): its sizes and its weights packed from `w` (`flipped`: the weights of the convolution
/// `g` is the input gradient of; see [`DirectConv::pack`]).
fn direct_conv<T: Float>(g: &Geometry, w: &[T], flipped: bool) -> Option<(DirectConv, Vec<f32>)> {
    if T::DTYPE != DType::F32 || g.stride != 1 || g.kh * g.kw == 1 || g.ho * g.wo < DIRECT_PLANE {
        return None;
    }
    let sh = Shifted::new(g);
    let d = DirectConv {
        cin: g.cin,
        cout: g.cout,
        kh: g.kh,
        kw: g.kw,
        hp: sh.hp,
        wp: sh.wp,
        ho: g.ho,
        wo: g.wo,
    };
    if !d.available() {
        return None;
    }
    let packed = d.pack(bytemuck::cast_slice(w), flipped);
    Some((d, packed))
}

/// y (Cout, Ho*Wo) += the convolution `g` of one image `x` on the direct path.
fn run_direct<T: Float>(g: &Geometry, (d, packed): &(DirectConv, Vec<f32>), x: &[T], y: &mut [T]) {
    let xp = Shifted::new(g).padded(g, x);
    d.run(
        bytemuck::cast_slice(&xp),
        packed,
        bytemuck::cast_slice_mut(y),
    );
}

/// `x`: (B, Cin, H, W), `w`: (Cout, Cin, kh, kw), `b`: (Cout) -> (B, Cout, Ho, Wo), as
/// torch.nn.functional.conv2d with an integer stride and padding.
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, p: Conv2dParams) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let g = Geometry::new(OP, x, w, p)?;
    if let Some(b) = b {
        same_dtype(OP, x, b)?;
        if b.shape() != [g.cout] {
            return Err(Error::shape(
                OP,
                format!("bias {:?}, expected [{}]", b.shape(), g.cout),
            ));
        }
    }
    crate::cuda::kernel_dispatch!(x, m => crate::cuda::gemm::conv2d(m, x, w, b, p));
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, wv) = (x.slice::<T>(OP)?, w.slice::<T>(OP)?);
        let plane = g.ho * g.wo;
        let mut out = super::zeros::<T>(g.batch * g.cout * plane);
        let direct = direct_conv(&g, wv, false);
        let tiled = (direct.is_none() && Shifted::takes(&g))
            .then(|| (Shifted::new(&g), contiguous_taps(&g, wv)));
        let groups = ChannelGroups::new(&g);
        for n in 0..g.batch {
            let xn = &xv[n * g.cin * g.h * g.w..(n + 1) * g.cin * g.h * g.w];
            let yn = &mut out[n * g.cout * plane..(n + 1) * g.cout * plane];
            if let Some(b) = b {
                let bv = b.slice::<T>(OP)?;
                yn.par_chunks_mut(plane).zip(bv).for_each(|(r, &bi)| r.fill(bi));
            }
            if let Some(direct) = &direct {
                run_direct(&g, direct, xn, yn);
                continue;
            }
            if let Some((sh, taps)) = &tiled {
                sh.tiled(&g, xn, taps, yn);
                continue;
            }
            groups.forward(xn, wv, yn, b.is_some());
        }
        Tensor::from_vec(out, &g.out_shape())
    })
}

/// Gradients of `sum(conv2d(x, w, b) * dy)`.
pub struct Conv2dGrads {
    pub dx: Tensor,
    /// Present when asked for (`weight_grads`).
    pub dw: Option<Tensor>,
    pub db: Option<Tensor>,
}

pub fn conv2d_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    p: Conv2dParams,
    weight_grads: bool,
) -> Result<Conv2dGrads> {
    const OP: &str = "conv2d_backward";
    let g = Geometry::new(OP, x, w, p)?;
    same_dtype(OP, x, dy)?;
    if dy.shape() != g.out_shape() {
        return Err(Error::shape(
            OP,
            format!("dy {:?}, expected {:?}", dy.shape(), g.out_shape()),
        ));
    }
    if !weight_grads {
        crate::cuda::kernel_dispatch!(x, m => Ok(Conv2dGrads {
            dx: crate::cuda::gemm::conv2d_backward_input(m, x, w, dy, p)?,
            dw: None,
            db: None,
        }));
    } else if crate::cuda::target(x, &[crate::DType::BF16]).is_some() {
        return Err(crate::cuda::no_kernel(OP, "weight gradients"));
    }
    float_dispatch!(OP, x.dtype(), T => {
        let (xv, wv, dyv) = (x.slice::<T>(OP)?, w.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let (plane, img) = (g.ho * g.wo, g.cin * g.h * g.w);
        let mut dx = super::zeros::<T>(xv.len());
        let mut dw = super::zeros::<T>(if weight_grads { wv.len() } else { 0 });
        let mut db = super::zeros::<T>(if weight_grads { g.cout } else { 0 });
        // Training (weight gradients too) keeps the shifted whole-plane GEMMs for stride 1: no
        // im2col buffer at any plane size. The input gradient alone: a convolution of dy
        // (`input_gradient_conv`), direct in f32 where `direct_conv` applies, else tiled for a
        // large plane; of a small plane or a strided convolution, one GEMM into im2col's
        // layout, then its adjoint.
        let shifted = (weight_grads && g.stride == 1).then(|| Shifted::new(&g));
        let gt = (!weight_grads).then(|| input_gradient_conv(&g)).flatten();
        let direct = gt.and_then(|gt| direct_conv(&gt, wv, true).map(|d| (gt, d)));
        let transposed = gt
            .filter(|_| direct.is_none() && Shifted::takes(&g))
            .map(|gt| (Shifted::new(&gt), gt, gather_taps(&g, wv, true)));
        let groups = ChannelGroups::new(&g);
        for n in 0..g.batch {
            let dyn_ = &dyv[n * g.cout * plane..(n + 1) * g.cout * plane];
            let dxn = &mut dx[n * img..(n + 1) * img];
            if let Some((gt, direct)) = &direct {
                run_direct(gt, direct, dyn_, dxn);
                continue;
            }
            if let Some((sh, gt, taps)) = &transposed {
                sh.tiled(gt, dyn_, taps, dxn);
                continue;
            }
            if let Some(sh) = &shifted {
                let xn = &xv[n * img..(n + 1) * img];
                sh.backward(&g, xn, wv, dyn_, dxn, weight_grads.then_some(&mut dw[..]));
                if weight_grads {
                    for (d, r) in db.iter_mut().zip(dyn_.chunks(plane)) {
                        *d += r.iter().copied().sum::<T>();
                    }
                }
                continue;
            }
            let xn = &xv[n * img..(n + 1) * img];
            groups.backward(xn, wv, dyn_, dxn, weight_grads.then_some(&mut dw[..]));
            if weight_grads {
                for (d, r) in db.iter_mut().zip(dyn_.chunks(plane)) {
                    *d += r.iter().copied().sum::<T>();
                }
            }
        }
        let dx = Tensor::from_vec(dx, x.shape())?;
        if !weight_grads {
            return Ok(Conv2dGrads { dx, dw: None, db: None });
        }
        Ok(Conv2dGrads {
            dx,
            dw: Some(Tensor::from_vec(dw, w.shape())?),
            db: Some(Tensor::from_vec(db, &[g.cout])?),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// The column-tiled forward (planes of at least 8 tiles) against a direct convolution
    /// written out as its definition, in f64: only summation order differs (1e-12).
    #[test]
    fn tiled_forward_matches_direct_convolution() {
        let (cin, cout, h, w) = (3, 4, 50, 50);
        let x = Tensor::randn(&[1, cin, h, w], DType::F64, 1);
        let k = Tensor::randn(&[cout, cin, 3, 3], DType::F64, 2);
        let b = Tensor::randn(&[cout], DType::F64, 3);
        let p = Conv2dParams {
            stride: 1,
            padding: 1,
        };
        let g = Geometry::new("test", &x, &k, p).unwrap();
        assert!(Shifted::takes(&g), "takes the tiled path");
        let got = conv2d(&x, &k, Some(&b), p)
            .unwrap()
            .to_vec::<f64>()
            .unwrap();
        let (xv, kv, bv) = (
            x.to_vec::<f64>().unwrap(),
            k.to_vec::<f64>().unwrap(),
            b.to_vec::<f64>().unwrap(),
        );
        for o in 0..cout {
            for y in 0..h {
                for xx in 0..w {
                    let mut want = bv[o];
                    for c in 0..cin {
                        for i in 0..3 {
                            for j in 0..3 {
                                let (iy, ix) = (y + i, xx + j);
                                if (1..=h).contains(&iy) && (1..=w).contains(&ix) {
                                    want += kv[((o * cin + c) * 3 + i) * 3 + j]
                                        * xv[(c * h + iy - 1) * w + ix - 1];
                                }
                            }
                        }
                    }
                    let at = (o * h + y) * w + xx;
                    assert!(
                        (got[at] - want).abs() <= 1e-12 * want.abs().max(1.0),
                        "({o}, {y}, {xx}): {} vs {want}",
                        got[at]
                    );
                }
            }
        }
    }

    /// The input gradient of large planes (a tiled convolution of dy with the kernel turned)
    /// against its definition, dx[c, y, x] = sum over (o, i, j) of w[o, c, i, j] *
    /// dy[o, y + p - i, x + p - j], in f64 (1e-12: summation order only); 3x3 and 1x1 kernels,
    /// two images.
    #[test]
    fn tiled_input_gradient_matches_its_definition() {
        for (k, pad) in [(3, 1), (1, 0)] {
            let (batch, cin, cout, h, w) = (2, 3, 4, 50, 50);
            let x = Tensor::randn(&[batch, cin, h, w], DType::F64, 1);
            let wt = Tensor::randn(&[cout, cin, k, k], DType::F64, 2);
            let p = Conv2dParams {
                stride: 1,
                padding: pad,
            };
            let g = Geometry::new("test", &x, &wt, p).unwrap();
            assert!(Shifted::takes(&g), "takes the tiled path");
            let dy = Tensor::randn(&g.out_shape(), DType::F64, 3);
            let got = conv2d_backward(&x, &wt, &dy, p, false).unwrap().dx;
            let got = got.to_vec::<f64>().unwrap();
            let (wv, dyv) = (wt.to_vec::<f64>().unwrap(), dy.to_vec::<f64>().unwrap());
            for (n, c, y, xx) in (0..batch).flat_map(|n| {
                (0..cin)
                    .flat_map(move |c| (0..h).flat_map(move |y| (0..w).map(move |x| (n, c, y, x))))
            }) {
                let mut want = 0.0;
                for o in 0..cout {
                    for i in 0..k {
                        for j in 0..k {
                            let (oy, ox) = ((y + pad).wrapping_sub(i), (xx + pad).wrapping_sub(j));
                            if oy < g.ho && ox < g.wo {
                                want += wv[((o * cin + c) * k + i) * k + j]
                                    * dyv[((n * cout + o) * g.ho + oy) * g.wo + ox];
                            }
                        }
                    }
                }
                let at = ((n * cin + c) * h + y) * w + xx;
                assert!(
                    (got[at] - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "k {k}: ({n}, {c}, {y}, {xx}): {} vs {want}",
                    got[at]
                );
            }
        }
    }

    /// The f32 convolution and input gradient of a 64x64 plane (the direct path, where the CPU
    /// has AVX2 and FMA) against the same values in f64 (the tiled path, checked against the
    /// definition above): two images, a bias, channel counts that leave partial micro-tiles.
    /// Tolerance: f32 summation of n terms errs by at most ~n * 2^-24 of the sum of the terms'
    /// magnitudes (the same convolution of |x| and |w|, plus |b|); 2n * f32::EPSILON of it.
    #[test]
    fn f32_direct_path_matches_f64() {
        let (batch, cin, cout, h, w) = (2, 5, 7, 64, 64);
        let p = Conv2dParams {
            stride: 1,
            padding: 1,
        };
        let of = |t: &Tensor, dtype: DType| t.to_dtype(dtype).unwrap();
        let abs64 = |t: &Tensor| {
            let v = t.to_vec::<f64>().unwrap().iter().map(|v| v.abs()).collect();
            Tensor::from_vec(v, t.shape()).unwrap()
        };
        let x = Tensor::randn(&[batch, cin, h, w], DType::F32, 1);
        let k = Tensor::randn(&[cout, cin, 3, 3], DType::F32, 2);
        let b = Tensor::randn(&[cout], DType::F32, 3);
        let dy = Tensor::randn(&[batch, cout, h, w], DType::F32, 4);
        let g = Geometry::new("test", &x, &k, p).unwrap();
        let kv = k.slice::<f32>("test").unwrap();
        let gt = input_gradient_conv(&g).unwrap();
        for (g, flipped) in [(g, false), (gt, true)] {
            let direct = direct_conv(&g, kv, flipped).is_some();
            assert_eq!(
                direct,
                crate::ops::simd::lanes_available(),
                "direct ({flipped})"
            );
        }
        let [x64, k64, b64, dy64] = [&x, &k, &b, &dy].map(|t| of(t, DType::F64));
        let [xa, ka, ba, dya] = [&x64, &k64, &b64, &dy64].map(abs64);
        let cases = [
            (
                "forward",
                conv2d(&x, &k, Some(&b), p).unwrap(),
                conv2d(&x64, &k64, Some(&b64), p).unwrap(),
                conv2d(&xa, &ka, Some(&ba), p).unwrap(),
                cin * 9 + 1,
            ),
            (
                "input gradient",
                conv2d_backward(&x, &k, &dy, p, false).unwrap().dx,
                conv2d_backward(&x64, &k64, &dy64, p, false).unwrap().dx,
                conv2d_backward(&xa, &ka, &dya, p, false).unwrap().dx,
                cout * 9,
            ),
        ];
        for (name, got, want, size, n) in cases {
            let bound = 2.0 * n as f64 * f32::EPSILON as f64;
            let got = of(&got, DType::F64).to_vec::<f64>().unwrap();
            let (want, size) = (want.to_vec::<f64>().unwrap(), size.to_vec::<f64>().unwrap());
            for (i, ((g, w), s)) in got.iter().zip(&want).zip(&size).enumerate() {
                assert!(
                    (g - w).abs() <= bound * s,
                    "{name} [{i}]: {g} vs {w} (size {s})"
                );
            }
        }
    }

    /// im2col one channel at a time (as 32x32 planes with many channels run) against the whole
    /// im2col at once, forward, input and weight gradients, stride 1 and 2, in f64: the groups
    /// only split the GEMMs' sums (1e-12).
    #[test]
    fn im2col_channel_groups_match_the_whole() {
        for stride in [1, 2] {
            let x = Tensor::randn(&[1, 5, 9, 9], DType::F64, 1)
                .to_vec::<f64>()
                .unwrap();
            let w = Tensor::randn(&[4, 5, 3, 3], DType::F64, 2)
                .to_vec::<f64>()
                .unwrap();
            let xt = Tensor::from_vec(x.clone(), &[1, 5, 9, 9]).unwrap();
            let wt = Tensor::from_vec(w.clone(), &[4, 5, 3, 3]).unwrap();
            let p = Conv2dParams { stride, padding: 1 };
            let g = Geometry::new("test", &xt, &wt, p).unwrap();
            let dy = Tensor::randn(&g.out_shape(), DType::F64, 3)
                .to_vec::<f64>()
                .unwrap();
            let run = |size: usize| {
                let groups = ChannelGroups { g, size };
                let mut y = vec![0.0; 4 * g.ho * g.wo];
                groups.forward(&x, &w, &mut y, false);
                let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; w.len()]);
                groups.backward(&x, &w, &dy, &mut dx, Some(&mut dw));
                [y, dx, dw]
            };
            let (whole, ones, twos) = (run(5), run(1), run(2));
            for (name, part) in [("one", &ones), ("two", &twos)] {
                for (k, (a, b)) in whole.iter().zip(part.iter()).enumerate() {
                    for (u, v) in a.iter().zip(b) {
                        assert!(
                            (u - v).abs() <= 1e-12 * u.abs().max(1.0),
                            "{name} channel(s) a group, output {k}, stride {stride}: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }
}
