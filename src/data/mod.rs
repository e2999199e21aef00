//! Training data for the relation classifier: [`collect`] turns a manifest of images with a known
//! relation between two named objects into shards of attention maps by dual inversion
//! (SPEC section 5).

pub mod collect;
