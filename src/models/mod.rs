//! The models, written against the op set and named like the diffusers classes and checkpoint
//! tensors they load, so a reader can hold the two side by side.

pub mod attention;
pub mod autoencoder;
pub mod clip_text;
pub mod resnet;
pub mod unet;
