//! `steer shapes`: ShapesWorld's data.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args)]
pub struct ShapesArgs {
    #[command(subcommand)]
    command: ShapesCommand,
}

#[derive(Subcommand)]
enum ShapesCommand {
    /// Draw a dataset: images.u8 and scenes.jsonl (and with --png, PNGs and a collect manifest).
    Render {
        /// Output folder (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// How many images.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Image i is a function of the seed and i alone.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Also write img/NNNNNN.png and name them in scenes.jsonl (a `steer collect` manifest).
        #[arg(long)]
        png: bool,
    },
}

pub fn run(args: &ShapesArgs) -> steer::Result<()> {
    match &args.command {
        ShapesCommand::Render {
            out,
            count,
            seed,
            png,
        } => {
            let bar = ProgressBar::new(*count as u64).with_style(
                ProgressStyle::with_template("render {bar:40} {pos}/{len} {eta}")
                    .expect("valid template"),
            );
            steer::shapes::dataset::render_dataset(out, *count, *seed, *png, |_| bar.inc(1))?;
            bar.finish_and_clear();
            println!("{count} images in {}", out.display());
            Ok(())
        }
    }
}
