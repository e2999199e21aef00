//! One kernel launch, described once and run on either target: the GPU (through the driver) or
//! the host emulation of the same kernel source (kernels/emu.h). Arguments are values and 64-bit
//! addresses; an address is a device pointer on the GPU and a host pointer under emulation, so the
//! code that plans a launch (grid, shared memory, argument order) is shared by both.

use std::ffi::c_void;

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::PushKernelArg;

use super::{driver_err, CudaDevice};
use crate::error::{Error, Result};

/// An emulated launcher: `(grid[3], block[3], dynamic shared bytes, argument pointers) -> status`.
type EmuLaunch = unsafe extern "C" fn(*const u32, *const u32, u32, *mut *mut c_void) -> i32;

// `EMU_KERNELS`: (kernel name, emulated launcher) for every STEER_EMU_EXPORT in kernels/*.cu.
include!(concat!(env!("OUT_DIR"), "/emu_kernels.rs"));

/// Shared memory a block may use without opting in.
const DEFAULT_SMEM_LIMIT: u32 = 48 * 1024;

/// One kernel argument, as the kernel's parameter list declares it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A pointer parameter (device address on the GPU, host address under emulation).
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    U64(u64),
    Strides(Strides6),
}

/// kernels/elementwise.cu's `Strides6`: a shape of rank <= 6 (leading dims 1) and the element
/// strides of the destination and the source.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Strides6 {
    pub shape: [i64; 6],
    pub dst: [i64; 6],
    pub src: [i64; 6],
}

// SAFETY: plain old data with the C layout of the kernel's struct.
unsafe impl cudarc::driver::DeviceRepr for Strides6 {}

/// Threads a block of the 1-D grid-stride kernels.
const BLOCK_1D: u32 = 256;
/// Enough blocks to fill the largest GPU; the kernels' grid-stride loops cover the rest.
const MAX_BLOCKS_1D: usize = 4096;

/// The grid of a 1-D grid-stride kernel over `n` elements.
fn grid_1d(n: usize) -> [u32; 3] {
    [
        n.div_ceil(BLOCK_1D as usize).clamp(1, MAX_BLOCKS_1D) as u32,
        1,
        1,
    ]
}

/// A kernel launch: which kernel, its grid, block, dynamic shared memory and arguments.
#[derive(Clone, Debug)]
pub(crate) struct KernelCall {
    /// The kernels/<module>.cu file the kernel is in.
    pub module: &'static str,
    pub name: &'static str,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub smem: u32,
    pub args: Vec<Arg>,
}

impl KernelCall {
    /// A 1-D grid-stride kernel over `n` elements (BLOCK_1D threads a block).
    pub(crate) fn grid_stride(
        module: &'static str,
        name: &'static str,
        n: usize,
        args: Vec<Arg>,
    ) -> KernelCall {
        KernelCall {
            module,
            name,
            grid: grid_1d(n),
            block: [BLOCK_1D, 1, 1],
            smem: 0,
            args,
        }
    }

    /// One block of BLOCK_1D threads for each of `rows` rows (norm.cu, maps.cu: block reductions
    /// over a row).
    pub(crate) fn per_row(
        module: &'static str,
        name: &'static str,
        rows: usize,
        args: Vec<Arg>,
    ) -> KernelCall {
        KernelCall {
            module,
            name,
            grid: [rows as u32, 1, 1],
            block: [BLOCK_1D, 1, 1],
            smem: 0,
            args,
        }
    }

    /// Runs the call on the GPU, on the device's stream (asynchronously).
    pub(crate) fn launch_gpu(&self, dev: &CudaDevice) -> Result<()> {
        let err = driver_err(self.name);
        let func = dev.function(self.module, self.name)?;
        if self.smem > DEFAULT_SMEM_LIMIT {
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                self.smem as i32,
            )
            .map_err(&err)?;
        }
        let mut launch = dev.stream.launch_builder(&func);
        for arg in &self.args {
            match arg {
                Arg::Ptr(p) | Arg::U64(p) => launch.arg(p),
                Arg::I32(v) => launch.arg(v),
                Arg::I64(v) => launch.arg(v),
                Arg::F32(v) => launch.arg(v),
                Arg::Strides(v) => launch.arg(v),
            };
        }
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (self.grid[0], self.grid[1], self.grid[2]),
            block_dim: (self.block[0], self.block[1], self.block[2]),
            shared_mem_bytes: self.smem,
        };
        // SAFETY: each KernelCall is built next to its kernel's signature (same order and types;
        // pointers are 8-byte device addresses), and the planning code sizes every buffer and the
        // shared memory for the grid it launches.
        unsafe { launch.launch(cfg) }.map_err(&err)?;
        Ok(())
    }

    /// Runs the call through the host emulation, to completion, on the calling thread.
    pub(crate) fn launch_emulated(&self) -> Result<()> {
        let launcher = EMU_KERNELS
            .iter()
            .find(|(name, _)| *name == self.name)
            .map(|&(_, f)| f)
            .ok_or_else(|| {
                Error::Cuda(format!(
                    "kernel {} has no emulated launcher (STEER_EMU_EXPORT in kernels/{}.cu)",
                    self.name, self.module
                ))
            })?;
        let mut values: Vec<*mut c_void> = self
            .args
            .iter()
            .map(|arg| match arg {
                Arg::Ptr(p) | Arg::U64(p) => p as *const u64 as *mut c_void,
                Arg::I32(v) => v as *const i32 as *mut c_void,
                Arg::I64(v) => v as *const i64 as *mut c_void,
                Arg::F32(v) => v as *const f32 as *mut c_void,
                Arg::Strides(v) => v as *const Strides6 as *mut c_void,
            })
            .collect();
        // SAFETY: as for the GPU launch; the addresses are host pointers to live buffers of the
        // planned sizes, and the launcher only reads the argument values.
        let status = unsafe {
            launcher(
                self.grid.as_ptr(),
                self.block.as_ptr(),
                self.smem,
                values.as_mut_ptr(),
            )
        };
        match status {
            0 => Ok(()),
            1 => Err(Error::Cuda(format!(
                "{}: bad launch shape (grid {:?}, block {:?})",
                self.name, self.grid, self.block
            ))),
            2 => Err(Error::Cuda(format!(
                "{}: deadlock under emulation (a barrier or warp collective that some threads \
                 never reach)",
                self.name
            ))),
            _ => Err(Error::Cuda(format!(
                "{}: the emulation could not allocate fiber stacks",
                self.name
            ))),
        }
    }
}
