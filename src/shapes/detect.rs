//! ShapesWorld's detector: every pixel goes to its nearest palette colour (the background or an
//! object's), each object is its colour's largest 4-connected component, and GenEval's position
//! rule judges the two boxes.
//!
//! Generated colours are never pure (SHAPESWORLD.md: a pure-colour detector found nothing), hence
//! nearest colour rather than equality; a component must have `min_pixels` to count, so that
//! stray specks of a colour do not make an object "present". The colour no prompt named is
//! detected too: how often it is "present" is the control that tells smeared colours from objects.

use crate::shapes::geneval::{judge, BBox};
use crate::shapes::world::{BACKGROUND, OBJECTS};
use crate::steering::prompt::Relation;
use crate::{Error, Result};

/// One detected object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    pub bbox: BBox,
    /// Pixels in its component.
    pub pixels: usize,
}

#[derive(Clone, Debug)]
pub struct Detector {
    /// The smallest component that counts as an object. A drawn sprite has 70 to 150 pixels.
    pub min_pixels: usize,
}

impl Default for Detector {
    fn default() -> Self {
        Detector { min_pixels: 12 }
    }
}

/// What the detector says about one image made for "subject relation object".
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub subject: Option<Detection>,
    pub object: Option<Detection>,
    /// Both found and GenEval's rule agrees with the relation.
    pub correct: bool,
    /// Some object kind that the prompt does not name was found.
    pub unnamed_present: bool,
}

impl Verdict {
    pub fn both_present(&self) -> bool {
        self.subject.is_some() && self.object.is_some()
    }
}

impl Detector {
    /// The largest component of each object kind's colour in row-major RGB bytes (`h * w * 3`),
    /// indexed as [`OBJECTS`]; `None` where it is missing or under `min_pixels`.
    pub fn detect(&self, rgb: &[u8], h: usize, w: usize) -> Result<Vec<Option<Detection>>> {
        if rgb.len() != h * w * 3 {
            return Err(Error::shape(
                "detect",
                format!("{} bytes for a {h}x{w} RGB image", rgb.len()),
            ));
        }
        let palette: Vec<[u8; 3]> = std::iter::once(BACKGROUND)
            .chain(OBJECTS.iter().map(|o| o.rgb))
            .collect();
        // Palette index of every pixel (0 background, k + 1 object kind k).
        let label: Vec<usize> = rgb
            .chunks_exact(3)
            .map(|px| {
                let dist = |c: &[u8; 3]| -> i32 {
                    (0..3).map(|i| (px[i] as i32 - c[i] as i32).pow(2)).sum()
                };
                (0..palette.len())
                    .min_by_key(|&k| dist(&palette[k]))
                    .expect("non-empty palette")
            })
            .collect();
        let mut best: Vec<Option<Detection>> = vec![None; OBJECTS.len()];
        let mut seen = vec![false; h * w];
        let mut stack = Vec::new();
        for start in 0..h * w {
            if seen[start] || label[start] == 0 {
                continue;
            }
            let colour = label[start];
            seen[start] = true;
            stack.push(start);
            let (mut x0, mut y0, mut x1, mut y1, mut pixels) = (w, h, 0, 0, 0);
            while let Some(p) = stack.pop() {
                let (x, y) = (p % w, p / w);
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
                pixels += 1;
                let mut visit = |q: usize| {
                    if !seen[q] && label[q] == colour {
                        seen[q] = true;
                        stack.push(q);
                    }
                };
                if x > 0 {
                    visit(p - 1);
                }
                if x + 1 < w {
                    visit(p + 1);
                }
                if y > 0 {
                    visit(p - w);
                }
                if y + 1 < h {
                    visit(p + w);
                }
            }
            let slot = &mut best[colour - 1];
            if pixels >= self.min_pixels && slot.is_none_or(|d| d.pixels < pixels) {
                *slot = Some(Detection {
                    bbox: BBox {
                        x0: x0 as f64,
                        y0: y0 as f64,
                        x1: x1 as f64,
                        y1: y1 as f64,
                    },
                    pixels,
                });
            }
        }
        Ok(best)
    }

    /// Score one image made for "subject relation object" (object kinds as [`OBJECTS`] indices).
    pub fn judge(
        &self,
        rgb: &[u8],
        h: usize,
        w: usize,
        subject: usize,
        relation: Relation,
        object: usize,
    ) -> Result<Verdict> {
        let found = self.detect(rgb, h, w)?;
        let (s, o) = (found[subject], found[object]);
        let correct = match (s, o) {
            (Some(a), Some(b)) => judge(relation, &a.bbox, &b.bbox),
            _ => false,
        };
        let unnamed_present = found
            .iter()
            .enumerate()
            .any(|(k, d)| k != subject && k != object && d.is_some());
        Ok(Verdict {
            subject: s,
            object: o,
            correct,
            unnamed_present,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::shapes::world::{Scene, IMAGE_SIZE};

    const S: usize = IMAGE_SIZE;

    #[test]
    fn finds_drawn_scenes_exactly() {
        let det = Detector::default();
        for i in 0..100 {
            let scene = Scene::for_index(11, i);
            let img = scene.render();
            let [a, b] = scene.boxes();
            let (ka, kb) = (scene.objects[0].kind, scene.objects[1].kind);
            let found = det.detect(&img, S, S).unwrap();
            assert_eq!(found[ka].unwrap().bbox, a, "scene {i}");
            assert_eq!(found[kb].unwrap().bbox, b, "scene {i}");
            let v = det.judge(&img, S, S, ka, scene.relation, kb).unwrap();
            assert!(v.correct && !v.unnamed_present, "scene {i}");
            // The inverse relation is wrong, and so is the swapped pair's.
            assert!(
                !det.judge(&img, S, S, ka, scene.relation.inverse(), kb)
                    .unwrap()
                    .correct
            );
            assert!(
                !det.judge(&img, S, S, kb, scene.relation, ka)
                    .unwrap()
                    .correct
            );
        }
    }

    #[test]
    fn survives_washed_out_colours_and_ignores_specks() {
        let det = Detector::default();
        let mut rng = Rng::new(3);
        let scene = Scene::for_index(5, 0);
        let mut img = scene.render();
        // Every channel moved by up to +-50: still nearest to its own palette colour.
        for v in img.iter_mut() {
            *v = (*v as f64 + 100.0 * (rng.uniform() - 0.5)).clamp(0.0, 255.0) as u8;
        }
        // A 3x3 speck of the third colour in a corner: under min_pixels.
        let third = (0..OBJECTS.len())
            .find(|k| scene.objects.iter().all(|o| o.kind != *k))
            .unwrap();
        for y in 0..3 {
            for x in 0..3 {
                img[3 * (y * S + x)..3 * (y * S + x) + 3].copy_from_slice(&OBJECTS[third].rgb);
            }
        }
        let [a, b] = scene.boxes();
        let (ka, kb) = (scene.objects[0].kind, scene.objects[1].kind);
        let v = det.judge(&img, S, S, ka, scene.relation, kb).unwrap();
        assert!(v.correct && !v.unnamed_present, "{v:?}");
        assert_eq!(v.subject.unwrap().bbox, a);
        assert_eq!(v.object.unwrap().bbox, b);
        // A blank image has nothing.
        let blank = BACKGROUND.repeat(S * S);
        let v = det.judge(&blank, S, S, ka, scene.relation, kb).unwrap();
        assert!(!v.both_present() && !v.correct);
        assert!(det.detect(&blank[1..], S, S).is_err());
    }
}
