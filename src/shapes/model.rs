//! The shipped ShapesWorld text-to-image model: a pixel-space diffusers folder (no `vae/`,
//! 32x32 images) that `scripts/shapesworld/train_base.py --export assets/shapesworld` writes, embedded
//! in the binary so that `steer generate` works with no download.
//!
//! [`shipped_model_dir`] writes the embedded files once into a cache folder named after a hash
//! of their bytes, so that a new model gets a new folder, and returns that folder, which
//! [`StableDiffusion::from_dir`](crate::pipelines::StableDiffusion::from_dir) loads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::hash::Fnv1a;
use crate::{Error, Result};

/// `(path inside the model folder, bytes)` for each listed file of `assets/shapesworld/`.
macro_rules! embed {
    ($($path:literal),* $(,)?) => {
        &[$((
            $path,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/shapesworld/", $path))
                as &[u8],
        )),*]
    };
}

/// Every file of the shipped model, relative to its folder, with its bytes. Adding a file to the
/// model is one line here.
pub const SHIPPED_FILES: &[(&str, &[u8])] = embed![
    "classifier.safetensors",
    "classifier-single.safetensors",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
];

/// FNV-1a (64 bits) over every shipped file's path, length and bytes: the cache folder's key.
pub fn shipped_model_hash() -> u64 {
    let mut h = Fnv1a::default();
    for (path, bytes) in SHIPPED_FILES {
        h.update(path.as_bytes())
            .update(&[0])
            .update(&(bytes.len() as u64).to_le_bytes())
            .update(bytes);
    }
    h.finish()
}

/// Where steer caches files: `$STEER_CACHE`, else `$XDG_CACHE_HOME/steer`, else
/// `$HOME/.cache/steer`, else `steer/` in the system's temporary folder.
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("STEER_CACHE") {
        return dir;
    }
    if let Some(dir) = var("XDG_CACHE_HOME").filter(|d| d.is_absolute()) {
        return dir.join("steer");
    }
    if let Some(home) = var("HOME") {
        return home.join(".cache").join("steer");
    }
    std::env::temp_dir().join("steer")
}

/// The shipped model as a diffusers folder on disk: `shapesworld-<hash>/` under [`cache_dir`],
/// written on first use and reused afterwards.
pub fn shipped_model_dir() -> Result<PathBuf> {
    materialise_into(&cache_dir())
}

/// The on-disk path of the shipped file `name` (e.g. `"classifier.safetensors"`), or `None` when
/// the shipped model has no such file or its folder cannot be written (in which case
/// [`shipped_model_dir`] reports why).
pub fn shipped_file(name: &str) -> Option<PathBuf> {
    if !SHIPPED_FILES.iter().any(|(path, _)| *path == name) {
        return None;
    }
    shipped_model_dir().ok().map(|dir| dir.join(name))
}

/// Write the shipped model under `root` (as [`shipped_model_dir`] does under the cache folder)
/// and return its folder. The files go to a temporary sibling folder that is then renamed into
/// place, so the folder is complete whenever it exists; when several processes race, the first
/// rename wins and the others use its folder. A folder whose files do not have the shipped
/// sizes (truncated, edited) is replaced.
pub fn materialise_into(root: &Path) -> Result<PathBuf> {
    let name = format!("shapesworld-{:016x}", shipped_model_hash());
    let dir = root.join(&name);
    if is_complete(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    // Unique among processes (pid) and among threads of this one (counter).
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let unique = format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = root.join(format!(".{name}.tmp-{unique}"));
    let written = write_files(&tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() && !is_complete(&dir) {
        // A damaged copy: move it aside, then delete it (another process may be doing the same).
        let stale = root.join(format!(".{name}.stale-{unique}"));
        if std::fs::rename(&dir, &stale).is_ok() {
            let _ = std::fs::remove_dir_all(&stale);
        }
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process renamed its copy into place first: use theirs.
            if is_complete(&dir) {
                Ok(dir)
            } else {
                Err(Error::io(&dir, e))
            }
        }
    }
}

/// Every shipped file is there with its shipped size.
fn is_complete(dir: &Path) -> bool {
    SHIPPED_FILES.iter().all(|(path, bytes)| {
        std::fs::metadata(dir.join(path))
            .is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
    })
}

fn write_files(dir: &Path) -> Result<()> {
    for (path, bytes) in SHIPPED_FILES {
        let file = dir.join(path);
        let parent = file.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        std::fs::write(&file, bytes).map_err(|e| Error::io(&file, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bytes(dir: &Path) {
        for (path, bytes) in SHIPPED_FILES {
            let got = std::fs::read(dir.join(path)).unwrap();
            assert!(got == *bytes, "{} differs from the embedded file", path);
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("steer-shapes-model-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn shipped_model_dir_is_written_once_and_reused() {
        let a = shipped_model_dir().unwrap();
        let b = shipped_model_dir().unwrap();
        assert_eq!(a, b);
        assert!(a
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("shapesworld-"));
        check_bytes(&a);
        assert!(a.join("model_index.json").is_file());
        assert!(!a.join("vae").exists(), "the shipped model is pixel space");
        assert_eq!(
            shipped_file("unet/config.json"),
            Some(a.join("unet/config.json"))
        );
        assert_eq!(shipped_file("no-such-file.safetensors"), None);
    }

    #[test]
    fn materialise_reuses_repairs_and_survives_a_race() {
        let root = scratch("race");
        let dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| materialise_into(&root).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(dirs.iter().all(|d| d == &dirs[0]));
        check_bytes(&dirs[0]);
        // No temporary folders are left behind.
        let entries: Vec<_> = std::fs::read_dir(&root).unwrap().collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        // A truncated file is noticed and the folder rewritten.
        let (first, _) = SHIPPED_FILES[0];
        std::fs::write(dirs[0].join(first), b"").unwrap();
        assert_eq!(materialise_into(&root).unwrap(), dirs[0]);
        check_bytes(&dirs[0]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn unwritable_cache_names_the_path() {
        let root = scratch("blocked");
        std::fs::write(&root, b"a file, not a folder").unwrap();
        let err = materialise_into(&root).unwrap_err().to_string();
        assert!(err.contains(&*root.to_string_lossy()), "{err}");
        std::fs::remove_file(&root).unwrap();
    }
}
