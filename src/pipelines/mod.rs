//! Pipelines: a model's components loaded together and run as diffusers' pipelines run them.

pub mod stable_diffusion;
pub use stable_diffusion::{GenerateOutput, GenerateRequest, StableDiffusion};
