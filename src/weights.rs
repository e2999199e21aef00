//! Model weights: safetensors files of one model component (a diffusers folder such as `unet/`),
//! memory-mapped, looked up by the checkpoint's own tensor names and converted to f32 on load.
//! Every lookup checks the shape and names the file and tensor when something is off.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use crate::cuda::CudaDevice;
use crate::safetensors_io::SafetensorsFile;
use crate::{DType, Error, Result, Tensor};

pub struct Weights {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
    placement: Placement,
}

/// Where and in which dtype a model's weights live: f32 on the host (the CPU backend, the
/// default), or bf16 on a GPU (the CUDA backend), or bf16 on the host (for the kernels' host
/// emulation, `steer::cuda::emulated`).
#[derive(Clone, Debug)]
pub struct Placement {
    pub dtype: DType,
    pub device: Option<Arc<CudaDevice>>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            dtype: DType::F32,
            device: None,
        }
    }
}

impl Placement {
    /// bf16 on `device` (the CUDA backend's precision).
    pub fn cuda(device: &Arc<CudaDevice>) -> Self {
        Placement {
            dtype: DType::BF16,
            device: Some(device.clone()),
        }
    }

    /// `t` converted to this dtype and moved to this device.
    pub fn place(&self, t: &Tensor) -> Result<Tensor> {
        t.to_place(self.dtype, self.device.as_ref())
    }
}

impl Weights {
    /// The weights of the component in `dir` whose file stem is `stem` (`diffusion_pytorch_model`
    /// or `model`): `stem.safetensors`, a sharded `stem.safetensors.index.json`, or a variant such
    /// as `stem.fp16.safetensors`, in that order of preference.
    pub fn from_dir(dir: impl AsRef<Path>, stem: &str) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            shard_paths(&index)?
        } else {
            let mut variants: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(&dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    name.starts_with(&format!("{stem}.")) && name.ends_with(".safetensors")
                })
                .collect();
            variants.sort();
            if variants.is_empty() {
                return Err(Error::format(
                    &dir,
                    format!(
                        "no weights: expected {stem}.safetensors (or a sharded or fp16 variant)"
                    ),
                ));
            }
            variants.truncate(1);
            variants
        };
        Self::from_files(dir, &paths)
    }

    /// The weights in one safetensors file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_files(dir, &[path.to_path_buf()])
    }

    fn from_files(dir: PathBuf, paths: &[PathBuf]) -> Result<Self> {
        let files: Vec<SafetensorsFile> = paths
            .iter()
            .map(SafetensorsFile::open)
            .collect::<Result<_>>()?;
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                index.insert(name, i);
            }
        }
        Ok(Weights {
            dir,
            files,
            index,
            placement: Placement::default(),
        })
    }

    /// The same weights, read in `placement`'s dtype onto its device.
    pub fn placed(mut self, placement: Placement) -> Self {
        self.placement = placement;
        self
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name` in the placement's dtype and device (f32 on the host by default), which
    /// must have shape `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            return Err(Error::format(
                &self.dir,
                format!("missing tensor `{name}` (expected shape {shape:?})"),
            ));
        };
        let t = self.files[i].tensor_as(name, shape, self.placement.dtype)?;
        self.placement.place(&t)
    }

    /// A view that prefixes every name with `prefix.`.
    pub fn pp(&self, prefix: impl Into<String>) -> WeightsView<'_> {
        WeightsView {
            weights: self,
            prefix: prefix.into(),
        }
    }

    pub fn root(&self) -> WeightsView<'_> {
        WeightsView {
            weights: self,
            prefix: String::new(),
        }
    }
}

/// A JSON config file (a diffusers `config.json`, `scheduler_config.json`, ...) parsed into `T`;
/// errors name the file and `what` it should have been.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("invalid {what} config: {e}")))
}

fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::format(index, format!("invalid JSON: {e}")))?;
    let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::format(index, "no `weight_map` object"));
    };
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    let dir = index.parent().unwrap_or(Path::new("."));
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Names under a prefix, as the model code walks the checkpoint's tree
/// (`w.pp("down_blocks").pp(0).get("resnets.0.conv1.weight", ..)`).
#[derive(Clone)]
pub struct WeightsView<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl WeightsView<'_> {
    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        WeightsView {
            weights: self.weights,
            prefix: self.full(&name.to_string()),
        }
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&self.full(name), shape)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&self.full(name))
    }
}
