//! CUDA backend: a device (context, stream and the kernels that build.rs compiled to PTX) and
//! device buffers. cudarc loads the driver library at run time, so nothing links against CUDA:
//! a machine without a driver or GPU gets an [`Error::NoGpu`], never a panic.
//!
//! Device buffers are immutable once written: ops write their results to fresh buffers, so a
//! cloned [`DeviceBuffer`] (a shared handle, cheap to clone) never sees another tensor's update,
//! just as cloned host storage would not.

pub(crate) mod attention;
pub(crate) mod elementwise;
pub mod emulated;
pub(crate) mod gemm;
mod latent;
mod launch;
pub(crate) mod maps;
mod memory;
pub(crate) mod norm;
pub(crate) use latent::latent_update;
pub(crate) use memory::Emulated;

/// Where an op on `t` runs its kernel: the GPU holding `t`, the host emulation (a host tensor of
/// one of the kernel's `dtypes` inside [`emulated::run`]), or nowhere (the CPU backend). The
/// dtypes are the GPU path's: bf16 for activations; f32 maps, latents and their gradients, so f32
/// host work of other kinds stays on the CPU under emulation as it would beside a GPU.
pub(crate) enum Target<'a> {
    Gpu(&'a Arc<CudaDevice>),
    Emulated,
}

pub(crate) fn target<'a>(t: &'a Tensor, dtypes: &[DType]) -> Option<Target<'a>> {
    match t.cuda_device() {
        Some(dev) => Some(Target::Gpu(dev)),
        None if emulated::active() && dtypes.contains(&t.dtype()) => Some(Target::Emulated),
        None => None,
    }
}

/// The error for an op's feature that has no kernel yet.
pub(crate) fn no_kernel(op: &str, what: &str) -> Error {
    Error::Invalid(format!(
        "{op}: {what} have no CUDA kernel yet (they run on host tensors)"
    ))
}

/// In an op, after its checks: when `$t` has a kernel target, return `$call` run there, with `$m`
/// bound to that target's [`memory::Memory`]; otherwise fall through to the CPU code. The kernel
/// takes bf16 unless a list of dtypes comes first: `kernel_dispatch!([F32] x, m => ...)`.
macro_rules! kernel_dispatch {
    ([$($dtype:ident),+] $t:expr, $m:ident => $call:expr) => {
        match $crate::cuda::target($t, &[$($crate::DType::$dtype),+]) {
            Some($crate::cuda::Target::Gpu($m)) => return $call,
            Some($crate::cuda::Target::Emulated) => {
                let $m = &$crate::cuda::Emulated;
                return $call;
            }
            None => {}
        }
    };
    ($t:expr, $m:ident => $call:expr) => {
        $crate::cuda::kernel_dispatch!([BF16] $t, $m => $call)
    };
}
pub(crate) use kernel_dispatch;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::Ptx;
use half::{bf16, f16};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::HostData;
use crate::Tensor;

// `KERNELS`: (module name, PTX) for each kernels/*.cu; empty when built without nvcc.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// Whether this build embeds the CUDA kernels (build.rs found nvcc).
pub fn kernels_built() -> bool {
    !KERNELS.is_empty()
}

/// One GPU: its context, the stream every op runs on, and the loaded kernel modules.
#[derive(Debug)]
pub struct CudaDevice {
    stream: Arc<CudaStream>,
    modules: HashMap<&'static str, Arc<CudaModule>>,
}

/// Data on a device, of dtype f32, bf16 or f16. Clones share the allocation (see module docs).
#[derive(Clone, Debug)]
pub struct DeviceBuffer {
    device: Arc<CudaDevice>,
    data: Arc<DeviceData>,
}

#[derive(Debug)]
pub(crate) enum DeviceData {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<bf16>),
    F16(CudaSlice<f16>),
}

/// Maps a driver error to ours, naming what was being done.
fn driver_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

impl CudaDevice {
    /// Opens the GPU at `ordinal` and loads every embedded kernel module.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        // SAFETY: only tries to open the driver library (libloading), calls nothing in it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "CUDA driver library (libcuda) not found: this machine has no NVIDIA driver".into(),
            ));
        }
        // cudarc panics where it cannot load a driver symbol; the check above should make that
        // unreachable, and catching it keeps the promise of an error value if it is not.
        let count = catch_unwind(CudaContext::device_count)
            .map_err(|_| Error::NoGpu("the CUDA driver library could not be loaded".into()))?
            .map_err(|e| Error::NoGpu(format!("the CUDA driver found no usable GPU: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoGpu(format!(
                "no CUDA device {ordinal} ({count} found)"
            )));
        }
        if !kernels_built() {
            return Err(Error::NoGpu(
                "steer was built without kernels (nvcc was not found at build time); rebuild \
                 with NVCC=/path/to/nvcc cargo build --release (see README)"
                    .into(),
            ));
        }
        let ctx = catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal)))
            .map_err(|_| Error::NoGpu("the CUDA driver library could not be loaded".into()))?
            .map_err(driver_err("creating a CUDA context"))?;
        let mut modules = HashMap::new();
        for &(name, ptx) in KERNELS {
            // CUDA_ERROR_UNSUPPORTED_PTX_VERSION here means a driver older than the nvcc.
            let module = ctx
                .load_module(Ptx::from_src(ptx))
                .map_err(|e| Error::Cuda(format!("loading kernel module {name}: {e}")))?;
            modules.insert(name, module);
        }
        Ok(Arc::new(CudaDevice {
            stream: ctx.default_stream(),
            modules,
        }))
    }

    /// Copies host data to the device (f32, bf16 or f16).
    pub fn upload(self: &Arc<Self>, host: &HostData) -> Result<DeviceBuffer> {
        let err = driver_err("upload to the GPU");
        let data = match host {
            HostData::F32(v) => DeviceData::F32(self.stream.clone_htod(v).map_err(err)?),
            HostData::BF16(v) => DeviceData::BF16(self.stream.clone_htod(v).map_err(err)?),
            HostData::F16(v) => DeviceData::F16(self.stream.clone_htod(v).map_err(err)?),
            HostData::F64(_) | HostData::I64(_) => {
                return Err(Error::DType {
                    op: "CudaDevice::upload",
                    got: host.dtype(),
                    expected: "f32, bf16 or f16 (convert with Tensor::to_dtype first)",
                })
            }
        };
        Ok(DeviceBuffer {
            device: self.clone(),
            data: Arc::new(data),
        })
    }

    /// Waits for every op queued on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_err("synchronizing the GPU"))
    }

    /// The GPU's index, as `CudaDevice::new` took it.
    pub fn ordinal(&self) -> usize {
        self.stream.context().ordinal()
    }

    /// The kernel `name` from the module built from `kernels/<module>.cu`.
    fn function(&self, module: &str, name: &str) -> Result<CudaFunction> {
        let m = self.modules.get(module).ok_or_else(|| {
            Error::Cuda(format!(
                "kernel module {module} is not in this build (kernels/{module}.cu)"
            ))
        })?;
        m.load_function(name).map_err(driver_err(name))
    }
}

impl DeviceBuffer {
    /// The GPU holding the data.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        match &*self.data {
            DeviceData::F32(_) => DType::F32,
            DeviceData::BF16(_) => DType::BF16,
            DeviceData::F16(_) => DType::F16,
        }
    }

    /// Copies the data back to the host (waits for the work queued before it).
    pub fn to_host(&self) -> Result<HostData> {
        let stream = &self.device.stream;
        let err = driver_err("download from the GPU");
        Ok(match &*self.data {
            DeviceData::F32(s) => HostData::F32(stream.clone_dtoh(s).map_err(err)?),
            DeviceData::BF16(s) => HostData::BF16(stream.clone_dtoh(s).map_err(err)?),
            DeviceData::F16(s) => HostData::F16(stream.clone_dtoh(s).map_err(err)?),
        })
    }
}
