//! GenEval's "position" rule (SPEC section 7): which relations two detected boxes stand in.

use crate::steering::prompt::Relation;

/// GenEval's `POSITION_THRESHOLD`: each box's size is shrunk by this fraction before the
/// centres' offset counts.
const POSITION_THRESHOLD: f64 = 0.1;

/// An axis-aligned box in pixels: `x0 <= x < x1`, `y0 <= y < y1`, y pointing down.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl BBox {
    pub fn centre(&self) -> (f64, f64) {
        ((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0)
    }

    pub fn size(&self) -> (f64, f64) {
        (self.x1 - self.x0, self.y1 - self.y0)
    }

    pub fn area(&self) -> f64 {
        let (w, h) = self.size();
        w.max(0.0) * h.max(0.0)
    }

    /// Whether the two boxes share any area.
    pub fn overlaps(&self, other: &BBox) -> bool {
        self.x0 < other.x1 && other.x0 < self.x1 && self.y0 < other.y1 && other.y0 < self.y1
    }
}

/// Every relation in which `a` stands to `b` under GenEval's rule (none when the boxes are too
/// close to call). Up to two hold at once, such as "above" and "to the left of" on a diagonal.
pub fn relations(a: &BBox, b: &BBox) -> Vec<Relation> {
    let (ca, cb) = (a.centre(), b.centre());
    let (sa, sb) = (a.size(), b.size());
    let offset = [ca.0 - cb.0, ca.1 - cb.1];
    let dims = [sa.0 + sb.0, sa.1 + sb.1];
    let revised: Vec<f64> = (0..2)
        .map(|i| (offset[i].abs() - POSITION_THRESHOLD * dims[i]).max(0.0) * offset[i].signum())
        .collect();
    if revised.iter().all(|r| r.abs() < 1e-3) {
        return Vec::new();
    }
    let norm = offset[0].hypot(offset[1]);
    let (dx, dy) = (revised[0] / norm, revised[1] / norm);
    let mut out = Vec::new();
    if dx < -0.5 {
        out.push(Relation::LeftOf);
    }
    if dx > 0.5 {
        out.push(Relation::RightOf);
    }
    if dy < -0.5 {
        out.push(Relation::Above);
    }
    if dy > 0.5 {
        out.push(Relation::Below);
    }
    out
}

/// GenEval's verdict: does `a` stand in `relation` to `b`?
pub fn judge(relation: Relation, a: &BBox, b: &BBox) -> bool {
    relations(a, b).contains(&relation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(cx: f64, cy: f64, s: f64) -> BBox {
        BBox {
            x0: cx - s / 2.0,
            y0: cy - s / 2.0,
            x1: cx + s / 2.0,
            y1: cy + s / 2.0,
        }
    }

    #[test]
    fn clear_cases() {
        let a = square(5.0, 16.0, 6.0);
        let b = square(25.0, 16.0, 6.0);
        assert_eq!(relations(&a, &b), vec![Relation::LeftOf]);
        assert_eq!(relations(&b, &a), vec![Relation::RightOf]);
        let c = square(16.0, 4.0, 6.0);
        let d = square(16.0, 28.0, 6.0);
        assert_eq!(relations(&c, &d), vec![Relation::Above]);
        assert!(judge(Relation::Below, &d, &c));
    }

    #[test]
    fn threshold_and_diagonal() {
        // Offset 2 px against a shrink of 0.1 * (10 + 10) = 2 px: nothing left to call.
        let a = square(10.0, 10.0, 10.0);
        let b = square(12.0, 10.0, 10.0);
        assert!(relations(&a, &b).is_empty());
        // A 45-degree diagonal: revised / |offset| = (10 - 0.6) / 14.14 = 0.66 on both axes.
        let c = square(5.0, 5.0, 3.0);
        let d = square(15.0, 15.0, 3.0);
        assert_eq!(relations(&c, &d), vec![Relation::LeftOf, Relation::Above]);
        // Mostly horizontal: dx = -(20 - 0.6) / 20.2 = -0.96, dy = -(3 - 0.6) / 20.2 = -0.12.
        let e = square(25.0, 8.0, 3.0);
        let f = square(5.0, 5.0, 3.0);
        assert_eq!(relations(&f, &e), vec![Relation::LeftOf]);
    }
}
