//! A hand-crafted steering loss, the baseline the learned classifier is measured against: the
//! centroids of the two words' head- and layer-averaged maps must stand in the requested
//! relation by a margin (in the spirit of layout guidance and of the prototype in
//! SHAPESWORLD.md).
//!
//! Attend-and-Excite's own loss (raise each word's peak attention) says nothing about where an
//! object goes, so it cannot steer a relation; this centroid hinge is the hand-crafted spatial
//! loss of the same family.

use super::prompt::Relation;
use super::refine::{MapLoss, MapLossEval};
use crate::{Error, Result, Tensor};

pub struct CentroidLoss {
    /// The class order of `SteeringTarget::class` (a classifier's, so both losses share targets).
    pub classes: Vec<Relation>,
    /// How far apart the centroids must be along the relation's axis, as a fraction of the
    /// image's side.
    pub margin: f64,
}

impl CentroidLoss {
    pub fn new(classes: Vec<Relation>) -> Self {
        CentroidLoss {
            classes,
            margin: 0.1,
        }
    }
}

/// A (S, S) map's weight and its centroid ((x, y) in [0, 1], pixel centres).
fn centroid(map: &[f64], s: usize) -> (f64, (f64, f64)) {
    let total: f64 = map.iter().sum();
    let (mut cx, mut cy) = (0.0, 0.0);
    for (i, &m) in map.iter().enumerate() {
        cx += m * ((i % s) as f64 + 0.5) / s as f64;
        cy += m * ((i / s) as f64 + 0.5) / s as f64;
    }
    (total, (cx / total, cy / total))
}

impl MapLoss for CentroidLoss {
    fn loss_and_grad(&self, maps: &Tensor, _step: usize, class: usize) -> Result<MapLossEval> {
        let shape = maps.shape().to_vec();
        if shape.len() != 5 || shape[0] != 1 || shape[1] != 2 || shape[3] != shape[4] {
            return Err(Error::shape(
                "centroid loss",
                format!("maps {shape:?} must be (1, 2, N, S, S)"),
            ));
        }
        let relation = *self.classes.get(class).ok_or_else(|| {
            Error::Invalid(format!(
                "centroid loss: class {class} of {}",
                self.classes.len()
            ))
        })?;
        let (n, s) = (shape[2], shape[3]);
        let v = maps.to_vec::<f64>()?;
        // Each word's mean map over layers and heads, and its centroid.
        let mean: Vec<Vec<f64>> = (0..2)
            .map(|w| {
                (0..s * s)
                    .map(|p| (0..n).map(|k| v[(w * n + k) * s * s + p]).sum::<f64>() / n as f64)
                    .collect()
            })
            .collect();
        let (ta, ca) = centroid(&mean[0], s);
        let (tb, cb) = centroid(&mean[1], s);
        // d = subject - object along the axis; the relation wants sign * d >= margin.
        let (axis, sign) = match relation {
            Relation::LeftOf => (0, -1.0),
            Relation::RightOf => (0, 1.0),
            Relation::Above => (1, -1.0),
            Relation::Below => (1, 1.0),
        };
        let pick = |c: (f64, f64)| if axis == 0 { c.0 } else { c.1 };
        let d = pick(ca) - pick(cb);
        let loss = (self.margin - sign * d).max(0.0);
        let mut grad = vec![0f64; v.len()];
        if loss > 0.0 {
            // d loss / d c_subject = -sign, d loss / d c_object = +sign along the axis;
            // d c / d mean(p) = (coord(p) - c) / total; d mean / d map_k = 1 / n.
            for (w, (total, c, dc)) in [(ta, ca, -sign), (tb, cb, sign)].into_iter().enumerate() {
                for p in 0..s * s {
                    let coord = if axis == 0 { p % s } else { p / s } as f64 + 0.5;
                    let g = dc * (coord / s as f64 - pick(c)) / total / n as f64;
                    for k in 0..n {
                        grad[(w * n + k) * s * s + p] = g;
                    }
                }
            }
        }
        let grad = Tensor::from_vec(grad, &shape)?.to_dtype(maps.dtype())?;
        Ok(MapLossEval {
            loss,
            probs: Vec::new(),
            grad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn gradient_matches_finite_differences() {
        let (n, s) = (3, 6);
        let maps = Tensor::rand_uniform(&[1, 2, n, s, s], 0.05, 1.0, DType::F64, 5);
        for (class, relation) in Relation::ALL.iter().enumerate() {
            // A margin the random maps (centroids near the middle) cannot meet: the hinge is on.
            let loss = CentroidLoss {
                classes: Relation::ALL.to_vec(),
                margin: 0.3,
            };
            let eval = loss.loss_and_grad(&maps, 0, class).unwrap();
            assert!(eval.loss > 0.0, "{relation}");
            let g = eval.grad.to_vec::<f64>().unwrap();
            let base = maps.to_vec::<f64>().unwrap();
            for i in [0, 7, 40, 2 * n * s * s - 1] {
                let h = 1e-6;
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[i] += delta;
                    let m = Tensor::from_vec(v, maps.shape()).unwrap();
                    loss.loss_and_grad(&m, 0, class).unwrap().loss
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                // Central differences of a smooth function in f64: error ~1e-10.
                assert!(
                    (fd - g[i]).abs() < 1e-8,
                    "{relation} [{i}]: fd {fd} vs {}",
                    g[i]
                );
            }
        }
    }

    #[test]
    fn satisfied_relation_has_zero_loss() {
        // Subject all in the left column, object all in the right one.
        let s = 4;
        let mut v = vec![0f64; 2 * s * s];
        for y in 0..s {
            v[y * s] = 1.0;
            v[s * s + y * s + s - 1] = 1.0;
        }
        let maps = Tensor::from_vec(v, &[1, 2, 1, s, s]).unwrap();
        let loss = CentroidLoss::new(Relation::ALL.to_vec());
        let left = Relation::ALL
            .iter()
            .position(|&r| r == Relation::LeftOf)
            .unwrap();
        let right = Relation::ALL
            .iter()
            .position(|&r| r == Relation::RightOf)
            .unwrap();
        assert_eq!(loss.loss_and_grad(&maps, 0, left).unwrap().loss, 0.0);
        // Centroids 0.125 and 0.875: "right of" misses by 0.75 + 0.1.
        let miss = loss.loss_and_grad(&maps, 0, right).unwrap().loss;
        assert!((miss - 0.85).abs() < 1e-12, "{miss}");
    }
}
