//! `Tensor`: a shape, a dtype and contiguous row-major storage on the host or on a CUDA device.
//! Nothing clever: no strides, no views, no autograd. Ops live in `crate::ops`.

use std::sync::Arc;

use half::{bf16, f16};

use crate::cuda::DeviceBuffer;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// Host storage, one variant per dtype.
#[derive(Clone, Debug)]
pub enum HostData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I64(Vec<i64>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F64(_) => DType::F64,
            HostData::BF16(_) => DType::BF16,
            HostData::F16(_) => DType::F16,
            HostData::I64(_) => DType::I64,
        }
    }
    fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F64(v) => v.len(),
            HostData::BF16(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::I64(v) => v.len(),
        }
    }
    /// The raw little-endian bytes (for writing safetensors).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F64(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::I64(v) => bytemuck::cast_slice(v),
        }
    }
    /// The same values in another dtype (rounding to nearest for the half types).
    pub fn to_dtype(&self, dtype: DType) -> HostData {
        match dtype {
            DType::F32 => HostData::F32(self.convert()),
            DType::F64 => HostData::F64(self.convert()),
            DType::BF16 => HostData::BF16(self.convert()),
            DType::F16 => HostData::F16(self.convert()),
            DType::I64 => HostData::I64(self.convert()),
        }
    }
    fn convert<T: Element>(&self) -> Vec<T> {
        fn map<S: Element, T: Element>(v: &[S]) -> Vec<T> {
            v.iter().map(|x| T::from_f64(x.to_f64())).collect()
        }
        match self {
            HostData::F32(v) => map(v),
            HostData::F64(v) => map(v),
            HostData::BF16(v) => map(v),
            HostData::F16(v) => map(v),
            HostData::I64(v) => map(v),
        }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    Host(HostData),
    Cuda(DeviceBuffer),
}

/// Clones are cheap (the storage is shared) and copy-on-write: saving a layer's input for its
/// backward costs a reference count, not a copy.
#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Arc<Storage>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// A host tensor from a vector and a shape; the lengths must agree.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!("{} elements cannot have shape {shape:?}", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Host(T::wrap(data))),
        })
    }

    pub fn from_host(data: HostData, shape: &[usize]) -> Result<Self> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_host",
                format!("{} elements cannot have shape {shape:?}", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Host(data)),
        })
    }

    pub(crate) fn from_storage(storage: Storage, shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(storage),
        }
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let n = numel(shape);
        let data = match dtype {
            DType::F32 => HostData::F32(vec![0.0; n]),
            DType::F64 => HostData::F64(vec![0.0; n]),
            DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
            DType::F16 => HostData::F16(vec![f16::ZERO; n]),
            DType::I64 => HostData::I64(vec![0; n]),
        };
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Host(data)),
        }
    }

    /// Standard-normal values from a seeded generator (deterministic across platforms).
    pub fn randn(shape: &[usize], dtype: DType, seed: u64) -> Self {
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<f64> = (0..numel(shape)).map(|_| rng.normal()).collect();
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Host(HostData::F64(v).to_dtype(dtype))),
        }
    }

    /// Uniform values in [lo, hi) from a seeded generator.
    pub fn rand_uniform(shape: &[usize], lo: f64, hi: f64, dtype: DType, seed: u64) -> Self {
        let mut rng = crate::rng::Rng::new(seed);
        let v: Vec<f64> = (0..numel(shape))
            .map(|_| lo + (hi - lo) * rng.uniform())
            .collect();
        Tensor {
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Host(HostData::F64(v).to_dtype(dtype))),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        match &*self.storage {
            Storage::Host(h) => h.dtype(),
            Storage::Cuda(d) => d.dtype(),
        }
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn is_host(&self) -> bool {
        matches!(*self.storage, Storage::Host(_))
    }

    /// The host data, or an error naming `op` when the tensor lives on a device.
    pub fn host(&self, op: &'static str) -> Result<&HostData> {
        match &*self.storage {
            Storage::Host(h) => Ok(h),
            Storage::Cuda(_) => Err(Error::Device {
                op,
                msg: "tensor is on a CUDA device; this op runs on the host (call .to_host())"
                    .into(),
            }),
        }
    }

    /// Borrow the host elements as `T`; errors when the dtype or device differ.
    pub fn slice<T: Element>(&self, op: &'static str) -> Result<&[T]> {
        let h = self.host(op)?;
        T::slice(h).ok_or(Error::DType {
            op,
            got: h.dtype(),
            expected: dtype_name(T::DTYPE),
        })
    }

    pub fn slice_mut<T: Element>(&mut self, op: &'static str) -> Result<&mut [T]> {
        // Copy-on-write: only a shared buffer is copied.
        match Arc::make_mut(&mut self.storage) {
            Storage::Host(h) => {
                let got = h.dtype();
                T::slice_mut(h).ok_or(Error::DType {
                    op,
                    got,
                    expected: dtype_name(T::DTYPE),
                })
            }
            Storage::Cuda(_) => Err(Error::Device {
                op,
                msg: "tensor is on a CUDA device (call .to_host())".into(),
            }),
        }
    }

    /// All elements converted to `T` (any host dtype; copies).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        match &*self.storage {
            Storage::Host(h) => Ok(h.convert()),
            Storage::Cuda(d) => Ok(d.to_host()?.convert()),
        }
    }

    /// Convert a host tensor's dtype (rounding to nearest for the half types).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let h = self.host("to_dtype")?;
        let data = if h.dtype() == dtype {
            h.clone()
        } else {
            h.to_dtype(dtype)
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage: Arc::new(Storage::Host(data)),
        })
    }

    /// Same data, new shape with the same number of elements. (Its backward is a reshape back.)
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!(
                    "cannot reshape {:?} ({} elements) to {shape:?}",
                    self.shape,
                    self.numel()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage.clone(),
        })
    }

    /// Copy to a CUDA device.
    pub fn to_cuda(&self, dev: &std::sync::Arc<crate::cuda::CudaDevice>) -> Result<Tensor> {
        let storage = match &*self.storage {
            Storage::Host(h) => Arc::new(Storage::Cuda(dev.upload(h)?)),
            Storage::Cuda(_) => self.storage.clone(),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage,
        })
    }

    /// This tensor in `other`'s dtype and on its device (a no-op when they already agree).
    pub fn to_like(&self, other: &Tensor) -> Result<Tensor> {
        self.to_place(other.dtype(), other.cuda_device())
    }

    /// This tensor on `other`'s device, in its own dtype.
    pub fn to_device_of(&self, other: &Tensor) -> Result<Tensor> {
        self.to_place(self.dtype(), other.cuda_device())
    }

    /// This tensor in `dtype` on `device` (the host for `None`). Dtype conversions run on the
    /// host, except bf16 <-> f32 on a GPU that keeps the tensor (a kernel there; its emulation
    /// inside `cuda::emulated::run`).
    pub(crate) fn to_place(
        &self,
        dtype: DType,
        device: Option<&std::sync::Arc<crate::cuda::CudaDevice>>,
    ) -> Result<Tensor> {
        let same_place = match (self.cuda_device(), device) {
            (None, None) => true,
            (Some(a), Some(b)) => a.ordinal() == b.ordinal(),
            _ => false,
        };
        if same_place && self.dtype() == dtype {
            return Ok(self.clone());
        }
        let floats = [DType::BF16, DType::F32];
        if same_place && floats.contains(&self.dtype()) && floats.contains(&dtype) {
            match device {
                Some(dev) => return crate::cuda::elementwise::cast(dev, self, dtype),
                // The same kernel's emulation (identical rounding), so CI tests it.
                None if crate::cuda::emulated::active() => {
                    return crate::cuda::elementwise::cast(&crate::cuda::Emulated, self, dtype)
                }
                None => {}
            }
        }
        let host = self.to_host()?;
        // No copy when only the device changes.
        let host = if host.dtype() == dtype {
            host
        } else {
            host.to_dtype(dtype)?
        };
        match device {
            Some(dev) => host.to_cuda(dev),
            None => Ok(host),
        }
    }

    /// The GPU the tensor lives on, or `None` for a host tensor.
    pub fn cuda_device(&self) -> Option<&std::sync::Arc<crate::cuda::CudaDevice>> {
        match &*self.storage {
            Storage::Cuda(buf) => Some(buf.device()),
            Storage::Host(_) => None,
        }
    }

    /// Copy to the host (a no-op clone for host tensors).
    pub fn to_host(&self) -> Result<Tensor> {
        match &*self.storage {
            Storage::Host(_) => Ok(self.clone()),
            Storage::Cuda(d) => Ok(Tensor {
                shape: self.shape.clone(),
                storage: Arc::new(Storage::Host(d.to_host()?)),
            }),
        }
    }

    /// Largest absolute elementwise difference relative to the largest magnitude of `reference`.
    /// The error measure every numerical test and report in this crate uses.
    pub fn rel_error(&self, reference: &Tensor) -> Result<f64> {
        if self.shape != reference.shape {
            return Err(Error::shape(
                "rel_error",
                format!("{:?} vs reference {:?}", self.shape, reference.shape),
            ));
        }
        let a: Vec<f64> = self.to_vec()?;
        let b: Vec<f64> = reference.to_vec()?;
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-30);
        let diff = a
            .iter()
            .zip(&b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        Ok(diff / scale)
    }
}

/// Row-major element strides of `shape`.
pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::I64 => "i64",
    }
}
