//! Samplers: DDIM (epsilon and v-prediction) and its inversions.

pub mod ddim;
pub mod inversion;
pub use ddim::{DdimConfig, DdimScheduler, Prediction};
pub use inversion::{ddim_invert, Inversion};
