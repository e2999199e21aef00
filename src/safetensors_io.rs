//! Reading and writing named tensors as safetensors, memory-mapped. Used for fixtures, for
//! `steer forward`'s inputs and outputs, and (later) for model weights.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{HostData, Tensor};

/// A memory-mapped safetensors file; tensors are copied out on request.
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    mmap: memmap2::Mmap,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only; a concurrent writer could change the bytes under us,
        // which safetensors' own parser then reports as corrupt rather than causing UB in our code.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
        Ok(SafetensorsFile { path, mmap })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated in open")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .parsed()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.parsed().tensor(name).is_ok()
    }

    /// The file's `__metadata__` string map, if any.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| Error::format(&self.path, format!("bad header: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// One tensor by name, in its stored dtype, or an error naming the file and the tensor.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.parsed();
        let view = st
            .tensor(name)
            .map_err(|_| Error::format(&self.path, format!("missing tensor `{name}`")))?;
        let bytes = view.data();
        let data = match view.dtype() {
            StDtype::F32 => HostData::F32(bytemuck::pod_collect_to_vec(bytes)),
            StDtype::F64 => HostData::F64(bytemuck::pod_collect_to_vec(bytes)),
            StDtype::BF16 => HostData::BF16(bytemuck::pod_collect_to_vec(bytes)),
            StDtype::F16 => HostData::F16(bytemuck::pod_collect_to_vec(bytes)),
            StDtype::I64 => HostData::I64(bytemuck::pod_collect_to_vec(bytes)),
            StDtype::I32 => HostData::I64(
                bytemuck::pod_collect_to_vec::<u8, i32>(bytes)
                    .into_iter()
                    .map(i64::from)
                    .collect(),
            ),
            other => {
                return Err(Error::format(
                    &self.path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        Tensor::from_host(data, view.shape())
    }

    /// A tensor converted to `dtype`, checked against an expected shape.
    pub fn tensor_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.shape() != shape {
            return Err(Error::format(
                &self.path,
                format!(
                    "tensor `{name}` has shape {:?}, expected {shape:?}",
                    t.shape()
                ),
            ));
        }
        t.to_dtype(dtype)
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
        DType::I64 => StDtype::I64,
    }
}

/// Write named tensors (host or device) to `path` atomically: a temporary file in the same
/// folder, then a rename, so a crash never leaves a half-written file under the final name.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(&str, &Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let host: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((*n, t.to_host()?)))
        .collect::<Result<_>>()?;
    let views: Vec<(&str, TensorView<'_>)> = host
        .iter()
        .map(|(n, t)| {
            let h = t.host("save")?;
            let v = TensorView::new(st_dtype(t.dtype()), t.shape().to_vec(), h.as_bytes())
                .map_err(|e| Error::format(path, format!("tensor `{n}`: {e}")))?;
            Ok((*n, v))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::format(path, format!("serialising: {e}")))?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
