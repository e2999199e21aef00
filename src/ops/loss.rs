//! Cross-entropy: the steering loss (classifier logits against the requested relation) and the
//! classifier's training loss.

use super::activation::softmax_row;
use super::{expect_rank, float_dispatch};
use crate::{Error, Float, Result, Tensor};

fn check(op: &'static str, logits: &Tensor, targets: &[usize]) -> Result<(usize, usize)> {
    expect_rank(op, "logits", logits, 2)?;
    let (b, c) = (logits.shape()[0], logits.shape()[1]);
    if targets.len() != b || b == 0 {
        return Err(Error::shape(
            op,
            format!("logits {:?} with {} targets", logits.shape(), targets.len()),
        ));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t >= c) {
        return Err(Error::Invalid(format!(
            "{op}: target class {bad} out of range for {c} classes"
        )));
    }
    Ok((b, c))
}

/// Mean over the batch of `-log softmax(logits)[target]` (torch's `F.cross_entropy`), as a
/// scalar tensor. `logits`: (B, C).
pub fn cross_entropy(logits: &Tensor, targets: &[usize]) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let (b, c) = check(OP, logits, targets)?;
    float_dispatch!(OP, logits.dtype(), T => {
        let lv = logits.slice::<T>(OP)?;
        let total: T = lv.chunks(c).zip(targets).map(|(row, &t)| {
            // log-sum-exp with the max subtracted.
            let m = row.iter().copied().fold(T::NEG_INFINITY, T::max);
            let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<T>().ln();
            lse - row[t]
        }).sum();
        Tensor::from_vec(vec![total / T::of(b as f64)], &[])
    })
}

/// Gradient of `dloss * cross_entropy(logits, targets)` with respect to `logits`:
/// `dloss * (softmax(logits) - onehot(target)) / B`.
pub fn cross_entropy_backward(logits: &Tensor, targets: &[usize], dloss: f64) -> Result<Tensor> {
    const OP: &str = "cross_entropy_backward";
    let (b, c) = check(OP, logits, targets)?;
    float_dispatch!(OP, logits.dtype(), T => {
        let mut g = logits.slice::<T>(OP)?.to_vec();
        let k = T::of(dloss / b as f64);
        for (row, &t) in g.chunks_mut(c).zip(targets) {
            softmax_row(row);
            row[t] -= T::ONE;
            row.iter_mut().for_each(|v| *v *= k);
        }
        Tensor::from_vec(g, logits.shape())
    })
}
