//! Host side of kernels/latent.cu, for any [`Memory`] (the GPU or the emulation).

use super::launch::{Arg, KernelCall};
use super::memory::Memory;
use crate::error::Result;
use crate::Tensor;

const OP: &str = "latent_update";

/// `z - lr * g` as a new tensor, or `None` when `g` holds a NaN or infinity (the kernel's flag).
/// z and g are f32 of the same shape in `m`. Waits for the kernel: the caller needs the flag.
pub(crate) fn latent_update<M: Memory>(
    m: &M,
    z: &Tensor,
    g: &Tensor,
    lr: f32,
) -> Result<Option<Tensor>> {
    let (za, ga) = (m.tensor_addr::<f32>(OP, z)?, m.tensor_addr::<f32>(OP, g)?);
    let n = z.numel();
    let mut out = m.zeros::<f32>(n)?;
    let mut flag = m.zeros::<i32>(1)?;
    if n > 0 {
        m.launch(&KernelCall::grid_stride(
            "latent",
            "latent_update",
            n,
            vec![
                Arg::Ptr(m.addr_mut(&mut out)),
                Arg::Ptr(za),
                Arg::Ptr(ga),
                Arg::F32(lr),
                Arg::U64(n as u64),
                Arg::Ptr(m.addr_mut(&mut flag)),
            ],
        ))?;
    }
    if m.download(&flag)?[0] != 0 {
        return Ok(None);
    }
    Ok(Some(m.tensor(out, z.shape())?))
}
