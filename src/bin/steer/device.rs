//! `--device cpu|cuda[:N]`: where a command runs its model.

use std::str::FromStr;

use steer::cuda::CudaDevice;
use steer::weights::Placement;
use steer::{Error, Result};

/// Where a command runs: the CPU backend (f32) or a GPU (bf16 weights and activations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl Device {
    /// Where model weights and inputs go: f32 on the host, or bf16 on the opened GPU (a clear
    /// error when there is none).
    pub fn placement(self) -> Result<Placement> {
        match self {
            Device::Cpu => Ok(Placement::default()),
            Device::Cuda(n) => Ok(Placement::cuda(&CudaDevice::new(n)?)),
        }
    }
}

/// The error for a feature that has no GPU path yet.
pub fn cpu_only(what: &str) -> Error {
    Error::Invalid(format!(
        "{what} runs on the CPU only so far; use --device cpu"
    ))
}
