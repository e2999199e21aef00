//! Training the relation classifier (SPEC section 5): AdamW (lr 1e-4 SD / 5e-5 FLUX, weight decay
//! 0.05), ReduceLROnPlateau on the validation loss (factor 0.5, patience 5), early stopping
//! (patience 10), batch 64, cross-entropy.
//!
//! [`optim`] holds the optimiser, the scheduler and early stopping, each resumable: its state is
//! a list of named tensors ([`optim::AdamW::state_tensors`], ...) that [`save_tensors`] writes
//! atomically, next to the model's weights if wanted, and [`load_tensors`] reads back.

pub mod optim;
pub mod trainer;

use std::collections::HashMap;
use std::path::Path;

pub use optim::{
    AdamW, AdamWConfig, EarlyStopping, NamedTensors, PlateauConfig, PlateauMode, ReduceLROnPlateau,
    ThresholdMode, Update,
};

use crate::error::Result;
use crate::safetensors_io::{self, SafetensorsFile};
use crate::tensor::Tensor;

/// Write named tensors (e.g. the concatenation of a model's weights and the optimiser's,
/// scheduler's and early stopping's `state_tensors()`) to one safetensors file, atomically.
pub fn save_tensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors_io::save(path, &refs, metadata)
}

/// Every tensor of a safetensors file, sorted by name (what the `from_state` constructors take).
pub fn load_tensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let file = SafetensorsFile::open(path)?;
    file.names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n)?;
            Ok((n, t))
        })
        .collect()
}
