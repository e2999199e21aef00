//! Learn-to-Steer proper: which attention maps the classifier reads and how they are assembled.

pub mod capture;
pub mod centroid;
pub mod classifier;
pub mod params;
pub mod prompt;
pub mod refine;
pub mod unet_maps;
