//! steer-bench: steer's speed next to PyTorch's on the same machine.
//!
//! - `steer-bench ops`: fp32 GEMM and 3x3 convolution at SD2.1 UNet sizes (ops.rs);
//! - `steer-bench unet`: the full-size SD2.1 UNet, forward and forward + backward to the latent
//!   with map capture (unet.rs);
//! - `steer-bench attention`: the fused attention kernel on a GPU, against PyTorch on the same GPU
//!   (attention.rs).
//!
//! Each runs its PyTorch side with an embedded script from tests/reference/ (so the binary works
//! from any directory) and prints both with the ratio of our time to torch's; the CPU benchmarks
//! alternate the two sides' calls (common::PythonSide). Ours runs with freed memory kept in the
//! process (`steer::keep_freed_memory`), as the `steer` binary does. The Python interpreter, first found wins:
//!   1. `--python PATH`;
//!   2. `$STEER_REF_VENV/bin/python` when STEER_REF_VENV is set;
//!   3. `$HOME/.cache/steer/ref-venv/bin/python` when it exists (tests/reference/setup_venv.sh's
//!      default venv);
//!   4. `python3` on PATH.
//!
//! Without a Python that imports torch (or with `--no-torch`) they print our figures alone and
//! say why the baseline is missing.

mod attention;
mod common;
mod ops;
mod unet;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "steer-bench",
    version,
    about = "steer's speed next to PyTorch's on the same machine"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// fp32 GEMM and conv2d throughput at SD2.1 sizes, ours (CPU) next to PyTorch CPU.
    Ops(ops::OpsArgs),
    /// Full-size SD2.1 UNet (fp32, batch 1, 64x64 latent): forward, and forward + backward to the
    /// latent with map capture, ours (CPU) next to PyTorch CPU on the same weights and inputs.
    Unet(unet::UnetArgs),
    /// The fused attention kernel with map capture on a GPU (bf16, SD2.1 and FLUX sizes), next to
    /// PyTorch's SDPA and explicit-softmax attention on the same GPU.
    Attention(attention::AttentionArgs),
}

fn main() {
    let cli = Cli::parse();
    steer::keep_freed_memory();
    let result = match cli.cmd {
        Cmd::Ops(args) => ops::run(args),
        Cmd::Unet(args) => unet::run(args),
        Cmd::Attention(args) => attention::run(args),
    };
    if let Err(e) = result {
        eprintln!("steer-bench: {e}");
        std::process::exit(1);
    }
}
