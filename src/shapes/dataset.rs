//! A ShapesWorld dataset on disk, as `steer shapes render` writes it:
//!
//! - `images.u8`: the images back to back, each `32 x 32 x 3` RGB bytes, row-major (numpy:
//!   `np.fromfile(path, np.uint8).reshape(-1, 32, 32, 3)`);
//! - `scenes.jsonl`: one line per image, in order, with the subject, the true relation, the object,
//!   both boxes `[x0, y0, x1, y1]` and the caption;
//! - with `png`: `img/{index:06}.png` too, and the lines name them under `image`, so that
//!   `scenes.jsonl` is a `steer collect` manifest as it stands.
//!
//! Image `i` is a function of the seed and `i` alone ([`Scene::for_index`]).

use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::json;

use crate::image::{from_rgb8, save_png};
use crate::shapes::world::{Scene, IMAGE_SIZE};
use crate::{Error, Result};

/// Write `count` scenes drawn with `seed` to `dir` (created if needed); `progress` is called
/// after each image.
pub fn render_dataset(
    dir: &Path,
    count: usize,
    seed: u64,
    png: bool,
    mut progress: impl FnMut(usize),
) -> Result<()> {
    let img_dir = dir.join("img");
    std::fs::create_dir_all(if png { &img_dir } else { dir }).map_err(|e| Error::io(dir, e))?;
    let open = |name: &str| -> Result<BufWriter<std::fs::File>> {
        let path = dir.join(name);
        Ok(BufWriter::new(
            std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?,
        ))
    };
    let mut images = open("images.u8")?;
    let mut scenes = open("scenes.jsonl")?;
    for i in 0..count {
        let scene = Scene::for_index(seed, i);
        let rgb = scene.render();
        images
            .write_all(&rgb)
            .map_err(|e| Error::io(dir.join("images.u8"), e))?;
        let mut line = json!({
            "index": i,
            "subject": scene.subject(),
            "relation": scene.relation.name(),
            "object": scene.object(),
            "boxes": scene.boxes().map(|b| [b.x0, b.y0, b.x1, b.y1]),
            "caption": scene.caption(),
        });
        if png {
            let name = format!("img/{i:06}.png");
            save_png(&from_rgb8(&rgb, IMAGE_SIZE, IMAGE_SIZE)?, dir.join(&name))?;
            line["image"] = json!(name);
        }
        writeln!(scenes, "{line}").map_err(|e| Error::io(dir.join("scenes.jsonl"), e))?;
        progress(i);
    }
    images
        .flush()
        .map_err(|e| Error::io(dir.join("images.u8"), e))?;
    scenes
        .flush()
        .map_err(|e| Error::io(dir.join("scenes.jsonl"), e))
}
