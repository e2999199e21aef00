//! ShapesWorld's scenes: two flat coloured sprites on a white background in a known relation,
//! deterministic from a seed, with their boxes and a caption ("a red circle to the left of a blue
//! square").
//!
//! Each colour always comes with one shape (SHAPESWORLD.md: binding colour to shape is a different
//! failure from the spatial one, and the one a tiny model learns last), so a detector needs only
//! the colour and a model only has to learn three sprites and where to put them.

use crate::rng::Rng;
use crate::shapes::geneval::{relations, BBox};
use crate::steering::prompt::Relation;

/// The side of every ShapesWorld image, in pixels.
pub const IMAGE_SIZE: usize = 32;

/// The background colour.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

/// One of the world's objects: a fixed colour and shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectKind {
    /// The phrase that names it in captions ("red circle").
    pub name: &'static str,
    pub shape: Shape,
    pub rgb: [u8; 3],
}

/// The world's objects. The colours are far apart in RGB so that a nearest-colour detector can
/// tell them apart even in a generated image's washed-out shades.
pub const OBJECTS: [ObjectKind; 3] = [
    ObjectKind {
        name: "red circle",
        shape: Shape::Circle,
        rgb: [220, 30, 30],
    },
    ObjectKind {
        name: "green triangle",
        shape: Shape::Triangle,
        rgb: [30, 170, 50],
    },
    ObjectKind {
        name: "blue square",
        shape: Shape::Square,
        rgb: [30, 60, 220],
    },
];

/// The object kind a caption phrase names ("red circle"), if any.
pub fn object_by_name(name: &str) -> Option<usize> {
    OBJECTS.iter().position(|o| o.name == name)
}

/// One object in a scene: kind (index into [`OBJECTS`]), centre and radius in pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placed {
    pub kind: usize,
    pub cx: f64,
    pub cy: f64,
    pub radius: f64,
}

impl Placed {
    /// Whether the pixel whose centre is (x, y) belongs to the sprite.
    fn covers(&self, x: f64, y: f64) -> bool {
        let (dx, dy, r) = (x - self.cx, y - self.cy, self.radius);
        match OBJECTS[self.kind].shape {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            // Half-side 0.85 r: about the circle's area.
            Shape::Square => dx.abs() <= 0.85 * r && dy.abs() <= 0.85 * r,
            // Apex (0, -r), base corners (+-r, r): inside when below both slanted edges and
            // above the base.
            Shape::Triangle => dy <= r && 2.0 * dx.abs() <= dy + r,
        }
    }
}

/// Two objects, the first (subject) in `relation` to the second (object).
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub objects: [Placed; 2],
    pub relation: Relation,
}

impl Scene {
    /// A random scene: two different objects whose boxes do not touch and stand in exactly one
    /// relation under GenEval's rule, the drawn one (so no scene is diagonal or ambiguous).
    pub fn sample(rng: &mut Rng) -> Scene {
        let n = OBJECTS.len();
        let a = rng.below(n);
        let b = (a + 1 + rng.below(n - 1)) % n;
        let relation = Relation::ALL[rng.below(Relation::ALL.len())];
        let size = IMAGE_SIZE as f64;
        loop {
            let mut place = |kind| {
                let radius = size * (0.15 + 0.05 * rng.uniform());
                let span = size - 2.0 * radius - 2.0;
                Placed {
                    kind,
                    cx: radius + 1.0 + span * rng.uniform(),
                    cy: radius + 1.0 + span * rng.uniform(),
                    radius,
                }
            };
            let scene = Scene {
                objects: [place(a), place(b)],
                relation,
            };
            let [ba, bb] = scene.boxes();
            let gap = BBox {
                x0: ba.x0 - 1.0,
                y0: ba.y0 - 1.0,
                x1: ba.x1 + 1.0,
                y1: ba.y1 + 1.0,
            };
            if !gap.overlaps(&bb) && relations(&ba, &bb) == [relation] {
                return scene;
            }
        }
    }

    /// The scene of image `index` in a dataset drawn with `seed`: independent of every other
    /// index, so any part of a dataset can be redrawn alone.
    pub fn for_index(seed: u64, index: usize) -> Scene {
        let base = Rng::new(seed).next_u64();
        Scene::sample(&mut Rng::new(
            base ^ (index as u64).wrapping_mul(0x9E6C_63D0_676A_9A99),
        ))
    }

    /// The image, row-major `IMAGE_SIZE x IMAGE_SIZE x 3` RGB bytes (the second object drawn
    /// over the first; they never touch).
    pub fn render(&self) -> Vec<u8> {
        let mut img = BACKGROUND.repeat(IMAGE_SIZE * IMAGE_SIZE);
        for o in &self.objects {
            for y in 0..IMAGE_SIZE {
                for x in 0..IMAGE_SIZE {
                    if o.covers(x as f64 + 0.5, y as f64 + 0.5) {
                        let p = 3 * (y * IMAGE_SIZE + x);
                        img[p..p + 3].copy_from_slice(&OBJECTS[o.kind].rgb);
                    }
                }
            }
        }
        img
    }

    /// Each object's tight box around its drawn pixels.
    pub fn boxes(&self) -> [BBox; 2] {
        self.objects.map(|o| {
            let (mut x0, mut y0, mut x1, mut y1) = (IMAGE_SIZE, IMAGE_SIZE, 0, 0);
            for y in 0..IMAGE_SIZE {
                for x in 0..IMAGE_SIZE {
                    if o.covers(x as f64 + 0.5, y as f64 + 0.5) {
                        (x0, y0) = (x0.min(x), y0.min(y));
                        (x1, y1) = (x1.max(x + 1), y1.max(y + 1));
                    }
                }
            }
            BBox {
                x0: x0 as f64,
                y0: y0 as f64,
                x1: x1 as f64,
                y1: y1 as f64,
            }
        })
    }

    pub fn subject(&self) -> &'static str {
        OBJECTS[self.objects[0].kind].name
    }

    pub fn object(&self) -> &'static str {
        OBJECTS[self.objects[1].kind].name
    }

    /// The caption with the scene's own relation.
    pub fn caption(&self) -> String {
        caption(self.subject(), self.relation, self.object())
    }
}

/// "a red circle to the left of a blue square".
pub fn caption(subject: &str, relation: Relation, object: &str) -> String {
    format!("a {subject} {} a {object}", relation.name())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shapes::geneval::judge;

    #[test]
    fn scenes_are_deterministic_and_obey_their_relation() {
        let mut counts = [0usize; 4];
        for i in 0..400 {
            let s = Scene::for_index(7, i);
            assert_eq!(s, Scene::for_index(7, i));
            assert_ne!(s.objects[0].kind, s.objects[1].kind);
            let [a, b] = s.boxes();
            assert!(judge(s.relation, &a, &b), "scene {i}: {s:?}");
            assert!(!a.overlaps(&b));
            counts[Relation::ALL.iter().position(|&r| r == s.relation).unwrap()] += 1;
        }
        // Uniform over the four relations: 100 expected each, 3 sigma is about 26.
        assert!(
            counts.iter().all(|&c| (70..=130).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn render_paints_each_object_inside_its_box() {
        let s = Scene::for_index(3, 11);
        let img = s.render();
        let boxes = s.boxes();
        for (o, bx) in s.objects.iter().zip(boxes) {
            let rgb = OBJECTS[o.kind].rgb;
            let mut inside = 0;
            for y in 0..IMAGE_SIZE {
                for x in 0..IMAGE_SIZE {
                    let p = 3 * (y * IMAGE_SIZE + x);
                    if img[p..p + 3] == rgb {
                        let (fx, fy) = (x as f64, y as f64);
                        assert!(fx >= bx.x0 && fx < bx.x1 && fy >= bx.y0 && fy < bx.y1);
                        inside += 1;
                    }
                }
            }
            // A sprite of radius >= 4.8 px covers well over 40 pixels.
            assert!(inside > 40, "{inside} pixels");
        }
        assert_eq!(s.caption().split(' ').next(), Some("a"));
    }
}
