//! Where a kernel's buffers live: [`Memory`] is implemented by the GPU (`Arc<CudaDevice>`: device
//! allocations, launches on its stream) and by [`Emulated`] (host vectors, launches through the
//! host emulation of the same kernels). Each op's host code (buffer sizes, launch plans, argument
//! order) is written once against this trait, so the code CI runs under emulation is the code
//! that launches on the GPU.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::bf16;

use super::launch::KernelCall;
use super::{driver_err, CudaDevice, DeviceBuffer, DeviceData};
use crate::error::{Error, Result};
use crate::tensor::Storage;
use crate::{Element, Tensor};

/// An element type kernels read and write.
pub(crate) trait Elem: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static {}
impl Elem for f32 {}
impl Elem for i32 {}
impl Elem for bf16 {}

/// An element type a [`Tensor`] can hold on either side.
pub(crate) trait TensorElem: Elem + Element {
    fn device(s: CudaSlice<Self>) -> DeviceData;
}
impl TensorElem for f32 {
    fn device(s: CudaSlice<Self>) -> DeviceData {
        DeviceData::F32(s)
    }
}
impl TensorElem for bf16 {
    fn device(s: CudaSlice<Self>) -> DeviceData {
        DeviceData::BF16(s)
    }
}

pub(crate) trait Memory {
    type Buf<T: Elem>;
    /// `n` zeros (at least one element, so that every buffer has an address).
    fn zeros<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    fn upload<T: Elem>(&self, v: &[T]) -> Result<Self::Buf<T>>;
    /// The buffer's contents (waits for the work queued before it).
    fn download<T: Elem>(&self, b: &Self::Buf<T>) -> Result<Vec<T>>;
    /// The buffer's address, for a kernel that only reads it.
    fn addr<T: Elem>(&self, b: &Self::Buf<T>) -> u64;
    /// The buffer's address, for a kernel that writes it.
    fn addr_mut<T: Elem>(&self, b: &mut Self::Buf<T>) -> u64;
    /// The address of a tensor's data, which must be of dtype `T` and live in this memory.
    fn tensor_addr<T: TensorElem>(&self, op: &'static str, t: &Tensor) -> Result<u64>;
    /// A buffer as a tensor of `shape` (its length must match).
    fn tensor<T: TensorElem>(&self, b: Self::Buf<T>, shape: &[usize]) -> Result<Tensor>;
    fn launch(&self, call: &KernelCall) -> Result<()>;
}

/// The address of an optional bf16 operand (a bias, a norm's affine parameter); 0 for none.
pub(crate) fn optional_bf16_addr<M: Memory>(
    m: &M,
    op: &'static str,
    t: Option<&Tensor>,
) -> Result<u64> {
    t.map_or(Ok(0), |t| m.tensor_addr::<bf16>(op, t))
}

fn expect_dtype<T: TensorElem>(op: &'static str, t: &Tensor) -> Result<()> {
    if t.dtype() == T::DTYPE {
        Ok(())
    } else {
        Err(Error::DType {
            op,
            got: t.dtype(),
            expected: crate::tensor::dtype_name(T::DTYPE),
        })
    }
}

/// Error unless a buffer of `len` elements holds exactly a tensor of `shape`.
fn expect_len(len: usize, shape: &[usize]) -> Result<()> {
    let n: usize = shape.iter().product();
    if len == n {
        Ok(())
    } else {
        Err(Error::shape(
            "kernel output",
            format!("{len} elements for shape {shape:?}"),
        ))
    }
}

/// Host memory and the host emulation of the kernels: no GPU needed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Emulated;

impl Memory for Emulated {
    type Buf<T: Elem> = Vec<T>;
    fn zeros<T: Elem>(&self, n: usize) -> Result<Vec<T>> {
        Ok(vec![T::default(); n.max(1)])
    }
    fn upload<T: Elem>(&self, v: &[T]) -> Result<Vec<T>> {
        Ok(v.to_vec())
    }
    fn download<T: Elem>(&self, b: &Vec<T>) -> Result<Vec<T>> {
        Ok(b.clone())
    }
    fn addr<T: Elem>(&self, b: &Vec<T>) -> u64 {
        b.as_ptr() as u64
    }
    fn addr_mut<T: Elem>(&self, b: &mut Vec<T>) -> u64 {
        b.as_mut_ptr() as u64
    }
    fn tensor_addr<T: TensorElem>(&self, op: &'static str, t: &Tensor) -> Result<u64> {
        Ok(t.slice::<T>(op)?.as_ptr() as u64)
    }
    fn tensor<T: TensorElem>(&self, b: Vec<T>, shape: &[usize]) -> Result<Tensor> {
        expect_len(b.len(), shape)?;
        Tensor::from_host(T::wrap(b), shape)
    }
    fn launch(&self, call: &KernelCall) -> Result<()> {
        call.launch_emulated()
    }
}

impl Memory for Arc<CudaDevice> {
    type Buf<T: Elem> = CudaSlice<T>;
    fn zeros<T: Elem>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(driver_err("allocating GPU memory"))
    }
    fn upload<T: Elem>(&self, v: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(v)
            .map_err(driver_err("upload to the GPU"))
    }
    fn download<T: Elem>(&self, b: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(b)
            .map_err(driver_err("download from the GPU"))
    }
    fn addr<T: Elem>(&self, b: &CudaSlice<T>) -> u64 {
        // Everything runs on the one stream, so the guard's event bookkeeping has nothing to do.
        b.device_ptr(&self.stream).0
    }
    fn addr_mut<T: Elem>(&self, b: &mut CudaSlice<T>) -> u64 {
        b.device_ptr_mut(&self.stream).0
    }
    fn tensor_addr<T: TensorElem>(&self, op: &'static str, t: &Tensor) -> Result<u64> {
        expect_dtype::<T>(op, t)?;
        let Storage::Cuda(buf) = t.storage() else {
            return Err(Error::Device {
                op,
                msg: "an operand is on the host; the others are on the GPU".into(),
            });
        };
        if buf.device.ordinal() != self.ordinal() {
            return Err(Error::Device {
                op,
                msg: "operands live on different CUDA devices".into(),
            });
        }
        Ok(match &*buf.data {
            DeviceData::F32(s) => s.device_ptr(&self.stream).0,
            DeviceData::BF16(s) => s.device_ptr(&self.stream).0,
            DeviceData::F16(s) => s.device_ptr(&self.stream).0,
        })
    }
    fn tensor<T: TensorElem>(&self, b: CudaSlice<T>, shape: &[usize]) -> Result<Tensor> {
        expect_len(b.len(), shape)?;
        Ok(Tensor::from_storage(
            Storage::Cuda(DeviceBuffer {
                device: self.clone(),
                data: Arc::new(T::device(b)),
            }),
            shape,
        ))
    }
    fn launch(&self, call: &KernelCall) -> Result<()> {
        call.launch_gpu(self)
    }
}
