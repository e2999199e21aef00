//! From per-layer attention maps to the classifier's input (SPEC section 3): each layer's maps are
//! bilinearly resized to 16x16 (align_corners = false) and renormalised to sum 1 (divide by
//! sum + 1e-8), then grouped by resolution, smallest first, keeping call order within a
//! resolution. As in the reference code, resizing and renormalising happen only when the maps
//! come in several resolutions or their one resolution is not 16x16.

use crate::ops::{self, float_dispatch};
use crate::{Error, Float, Result, Tensor};

/// The classifier's map size.
pub const MAP_SIZE: usize = 16;
const RENORM_EPS: f64 = 1e-8;

/// One layer's maps at native resolution: (B, words, heads, h * w).
pub struct NativeMaps<'a> {
    pub maps: &'a Tensor,
    pub height: usize,
    pub width: usize,
}

/// How the layers' maps were assembled, for the backward.
#[derive(Clone, Debug)]
pub struct Assembly {
    /// Layer indices (call order) in assembly order.
    order: Vec<usize>,
    /// (heads, height, width) per layer, in call order.
    layers: Vec<(usize, usize, usize)>,
    resized: bool,
}

impl Assembly {
    /// Total maps per word (N).
    pub fn maps_per_word(&self) -> usize {
        self.layers.iter().map(|l| l.0).sum()
    }
}

/// m / (sum(m) + 1e-8) over each trailing 16x16 map.
fn renormalise(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "renormalise";
    let n = MAP_SIZE * MAP_SIZE;
    crate::cuda::kernel_dispatch!([F32] x, m => crate::cuda::maps::renormalise(m, x, n, RENORM_EPS));
    float_dispatch!(OP, x.dtype(), T => {
        let mut v = x.slice::<T>(OP)?.to_vec();
        for m in v.chunks_mut(n) {
            let inv = T::ONE / (m.iter().copied().sum::<T>() + T::of(RENORM_EPS));
            m.iter_mut().for_each(|e| *e *= inv);
        }
        Tensor::from_vec(v, x.shape())
    })
}

/// Gradient of `sum(renormalise(m) * dy)`: dy / (S + eps) - sum(dy * m) / (S + eps)^2.
fn renormalise_backward(m: &Tensor, dy: &Tensor) -> Result<Tensor> {
    const OP: &str = "renormalise_backward";
    let n = MAP_SIZE * MAP_SIZE;
    crate::ops::same_shape(OP, m, dy)?;
    crate::cuda::kernel_dispatch!([F32] m, g => crate::cuda::maps::renormalise_backward(g, m, dy, n, RENORM_EPS));
    float_dispatch!(OP, m.dtype(), T => {
        let (mv, g) = (m.slice::<T>(OP)?, dy.slice::<T>(OP)?);
        let mut dx = vec![T::ZERO; mv.len()];
        for ((o, mc), gc) in dx.chunks_mut(n).zip(mv.chunks(n)).zip(g.chunks(n)) {
            let s = mc.iter().copied().sum::<T>() + T::of(RENORM_EPS);
            let dot: T = mc.iter().zip(gc).map(|(&a, &b)| a * b).sum();
            for (o, &gv) in o.iter_mut().zip(gc) {
                *o = gv / s - dot / (s * s);
            }
        }
        Tensor::from_vec(dx, m.shape())
    })
}

/// (B, words, heads, h*w) -> (B, words, heads, 16, 16), resized and renormalised if `resize`.
fn layer_to_16(l: &NativeMaps, resize: bool) -> Result<Tensor> {
    let s = l.maps.shape();
    let m = l.maps.reshape(&[s[0], s[1], s[2], l.height, l.width])?;
    if !resize {
        return Ok(m);
    }
    renormalise(&ops::resize_bilinear(&m, MAP_SIZE, MAP_SIZE)?)
}

/// Assemble the classifier's input (B, words, N, 16, 16) from the layers' maps in call order.
pub fn assemble(layers: &[NativeMaps]) -> Result<(Tensor, Assembly)> {
    let Some(first) = layers.first() else {
        return Err(Error::Invalid(
            "capture: no attention maps were captured".into(),
        ));
    };
    for l in layers {
        let s = l.maps.shape();
        if s.len() != 4
            || s[0] != first.maps.shape()[0]
            || s[1] != first.maps.shape()[1]
            || s[3] != l.height * l.width
        {
            return Err(Error::shape(
                "capture",
                format!("layer maps {s:?} at {}x{}", l.height, l.width),
            ));
        }
    }
    let mut sizes: Vec<(usize, usize)> = layers.iter().map(|l| (l.height, l.width)).collect();
    sizes.sort_unstable();
    sizes.dedup();
    let resized = sizes.len() > 1 || sizes[0] != (MAP_SIZE, MAP_SIZE);
    let mut order: Vec<usize> = (0..layers.len()).collect();
    // Stable: within one resolution, call order.
    order.sort_by_key(|&i| layers[i].height * layers[i].width);
    let parts: Vec<Tensor> = order
        .iter()
        .map(|&i| layer_to_16(&layers[i], resized))
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = parts.iter().collect();
    let maps = ops::concat(&refs, 2)?;
    let assembly = Assembly {
        order,
        layers: layers
            .iter()
            .map(|l| (l.maps.shape()[2], l.height, l.width))
            .collect(),
        resized,
    };
    Ok((maps, assembly))
}

/// The gradient on each layer's native maps (call order) from the gradient on the assembled maps.
/// `layers` must be the same native maps `assemble` was given (the renormalisation's backward
/// reads them).
pub fn assemble_backward(
    layers: &[NativeMaps],
    a: &Assembly,
    dmaps: &Tensor,
) -> Result<Vec<Tensor>> {
    let heads: Vec<usize> = a.order.iter().map(|&i| a.layers[i].0).collect();
    // The gradient takes the maps' place and dtype (f32 on a GPU when the model runs there).
    let dmaps = match layers.first() {
        Some(l) => dmaps.to_like(l.maps)?,
        None => dmaps.clone(),
    };
    let parts = ops::split(&dmaps, 2, &heads)?;
    let mut out: Vec<Option<Tensor>> = (0..layers.len()).map(|_| None).collect();
    for (&i, g) in a.order.iter().zip(parts) {
        let (_, h, w) = a.layers[i];
        let native = layers[i].maps;
        let g = if a.resized {
            let m = native.reshape(&[
                native.shape()[0],
                native.shape()[1],
                native.shape()[2],
                h,
                w,
            ])?;
            let resized = ops::resize_bilinear(&m, MAP_SIZE, MAP_SIZE)?;
            ops::resize_bilinear_backward(&renormalise_backward(&resized, &g)?, h, w)?
        } else {
            g
        };
        out[i] = Some(g.reshape(native.shape())?);
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every layer is in the order"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    /// Analytic case: renormalised maps sum to 1 (up to eps) and keep their shape.
    #[test]
    fn renormalised_maps_sum_to_one() {
        let m = Tensor::rand_uniform(&[1, 2, 3, 8 * 8], 0.0, 1.0, DType::F64, 1);
        let n = Tensor::rand_uniform(&[1, 2, 5, 32 * 32], 0.0, 1.0, DType::F64, 2);
        let layers = [
            NativeMaps {
                maps: &m,
                height: 8,
                width: 8,
            },
            NativeMaps {
                maps: &n,
                height: 32,
                width: 32,
            },
        ];
        let (maps, a) = assemble(&layers).unwrap();
        assert_eq!(maps.shape(), &[1, 2, 8, 16, 16]);
        assert_eq!(a.maps_per_word(), 8);
        for s in maps.to_vec::<f64>().unwrap().chunks(256) {
            assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-6);
        }
    }

    /// The backward against central differences (f64; tolerance as in tests/gradients.rs).
    #[test]
    fn assemble_backward_matches_finite_differences() {
        let m = Tensor::rand_uniform(&[1, 2, 2, 4 * 4], 0.1, 1.0, DType::F64, 3);
        let n = Tensor::rand_uniform(&[1, 2, 1, 32 * 32], 0.1, 1.0, DType::F64, 4);
        let dy = Tensor::randn(&[1, 2, 3, 16, 16], DType::F64, 5);
        let loss = |m: &Tensor, n: &Tensor| {
            let layers = [
                NativeMaps {
                    maps: m,
                    height: 4,
                    width: 4,
                },
                NativeMaps {
                    maps: n,
                    height: 32,
                    width: 32,
                },
            ];
            let (y, _) = assemble(&layers).unwrap();
            y.to_vec::<f64>()
                .unwrap()
                .iter()
                .zip(dy.to_vec::<f64>().unwrap())
                .map(|(a, b)| a * b)
                .sum::<f64>()
        };
        let layers = [
            NativeMaps {
                maps: &m,
                height: 4,
                width: 4,
            },
            NativeMaps {
                maps: &n,
                height: 32,
                width: 32,
            },
        ];
        let (_, a) = assemble(&layers).unwrap();
        let g = assemble_backward(&layers, &a, &dy).unwrap();
        for (which, t) in [(0usize, &m), (1, &n)] {
            let gv = g[which].to_vec::<f64>().unwrap();
            let scale = gv.iter().fold(1.0f64, |s, v| s.max(v.abs()));
            let v = t.to_vec::<f64>().unwrap();
            for j in (0..v.len()).step_by(v.len() / 16) {
                let eval = |d: f64| {
                    let mut w = v.clone();
                    w[j] += d;
                    let p = Tensor::from_vec(w, t.shape()).unwrap();
                    if which == 0 {
                        loss(&p, &n)
                    } else {
                        loss(&m, &p)
                    }
                };
                let fd = (eval(1e-6) - eval(-1e-6)) / 2e-6;
                assert!(
                    (fd - gv[j]).abs() <= 1e-6 * scale,
                    "layer {which} entry {j}: fd {fd} vs {}",
                    gv[j]
                );
            }
        }
    }
}
