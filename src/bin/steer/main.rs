//! `steer`: the command line. `steer --help` lists the commands; each has its own `--help`.

mod classify;
mod collect;
mod device;
mod eval;
mod forward;
mod generate;
mod shapes;
mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "steer",
    version,
    about = "Learn-to-Steer: make text-to-image diffusion models obey spatial words"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relation classifier on attention maps (logits, and optionally the gradient to the maps).
    Classify(classify::ClassifyArgs),
    /// Make the classifier's training data: dual inversion of a manifest's images, maps recorded, PSNR-filtered shards.
    Collect(collect::CollectArgs),
    /// ShapesWorld's benchmark: generate a fixed prompt set unsteered and steered, score position accuracy with the detector.
    Eval(eval::EvalArgs),
    /// Evaluate one model component on tensors from a safetensors file (check weights against PyTorch).
    Forward(forward::ForwardArgs),
    /// Generate an image from a prompt (DDIM, classifier-free guidance).
    Generate(generate::GenerateArgs),
    /// ShapesWorld: draw datasets of two coloured shapes in a known relation.
    Shapes(shapes::ShapesArgs),
    /// Train the relation classifier on collected shards (AdamW, LR on plateau, early stopping, resumable).
    Train(train::TrainArgs),
    /// Report the build (kernels embedded or not), CPU threads and whether a GPU is usable.
    Info {
        /// CUDA device ordinal to probe.
        #[arg(long, default_value_t = 0)]
        device: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    // Denoising runs many UNet passes: reuse their freed activations without page faults.
    steer::keep_freed_memory();
    let result = match cli.command {
        Command::Classify(args) => classify::run(&args),
        Command::Collect(args) => collect::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Forward(args) => forward::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Shapes(args) => shapes::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Info { device } => info(device),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn info(device: usize) -> steer::Result<()> {
    println!("steer {}", env!("CARGO_PKG_VERSION"));
    println!("cpu threads:    {}", rayon::current_num_threads());
    let kernels = steer::cuda::kernels_built();
    println!(
        "cuda kernels:   {}",
        if kernels {
            "embedded (PTX, compute_80)"
        } else {
            "not built (no nvcc at build time)"
        }
    );
    match steer::cuda::CudaDevice::new(device) {
        Ok(_) => println!("cuda device {device}: ready"),
        Err(e) => println!("cuda device {device}: unavailable: {e}"),
    }
    Ok(())
}
