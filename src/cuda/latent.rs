//! Launch of kernels/latent.cu.

use std::sync::Arc;

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{driver_err, DeviceBuffer, DeviceData};
use crate::error::{Error, Result};

const OP: &str = "latent_update";
const BLOCK: u32 = 256;
/// Enough blocks to fill the largest GPU; the kernel's grid-stride loop covers the rest.
const MAX_BLOCKS: u32 = 4096;

/// `z - lr * g` in a new buffer, or `None` when `g` holds a NaN or infinity (the kernel's flag).
/// Waits for the kernel: the caller needs the flag's answer.
pub(crate) fn latent_update(
    z: &DeviceBuffer,
    g: &DeviceBuffer,
    lr: f32,
) -> Result<Option<DeviceBuffer>> {
    z.same_device(OP, g)?;
    let (zs, gs) = (z.f32(OP)?, g.f32(OP)?);
    let n = zs.len();
    // The caller checks shapes; this check is what keeps the kernel inside g's allocation.
    if gs.len() != n {
        return Err(Error::shape(OP, format!("{n} vs {} elements", gs.len())));
    }
    let dev = &z.device;
    let stream = &dev.stream;
    let err = driver_err(OP);
    let func = dev.function("latent", "latent_update")?;
    let mut flag = stream.alloc_zeros::<u32>(1).map_err(&err)?;
    // SAFETY: the kernel writes every one of the n elements before anything reads them.
    let mut out = unsafe { stream.alloc::<f32>(n) }.map_err(&err)?;
    if n > 0 {
        let blocks = n.div_ceil(BLOCK as usize).min(MAX_BLOCKS as usize) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let n64 = n as u64;
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&mut out)
            .arg(zs)
            .arg(gs)
            .arg(&lr)
            .arg(&n64)
            .arg(&mut flag);
        // SAFETY: the arguments match the kernel's signature (float*, const float*,
        // const float*, float, unsigned long long, unsigned int*); out, z and g hold n f32s.
        unsafe { launch.launch(cfg) }.map_err(&err)?;
    }
    let nonfinite = stream.clone_dtoh(&flag).map_err(&err)?[0] != 0;
    Ok((!nonfinite).then(|| DeviceBuffer {
        device: dev.clone(),
        data: Arc::new(DeviceData::F32(out)),
    }))
}
