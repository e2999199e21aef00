//! `Params`: named tensors in a fixed order — a trainable model's parameters, or their gradients
//! (a gradient map has the same names in the same order as the parameters it belongs to).
//!
//! The order is the insertion order; for the relation classifier it is PyTorch's
//! `named_parameters()` order, so an optimizer that walks `iter()` visits parameters in the order
//! `torch.optim.AdamW(model.parameters())` does.

use std::collections::HashMap;

use crate::weights::Placement;
use crate::{ops, Error, Result, Tensor};

#[derive(Clone, Debug, Default)]
pub struct Params {
    names: Vec<String>,
    tensors: Vec<Tensor>,
    index: HashMap<String, usize>,
}

impl Params {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add `name` at the end, or replace its tensor (keeping its place) when it is already there.
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor) {
        let name = name.into();
        match self.index.get(&name) {
            Some(&i) => self.tensors[i] = t,
            None => {
                self.index.insert(name.clone(), self.names.len());
                self.names.push(name);
                self.tensors.push(t);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        self.index.get(name).map(|&i| &mut self.tensors[i])
    }

    /// The tensor `name`, or an error naming it.
    pub fn require(&self, name: &str) -> Result<&Tensor> {
        self.get(name)
            .ok_or_else(|| Error::Invalid(format!("no parameter `{name}`")))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// (name, tensor) in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.names.iter().map(String::as_str).zip(&self.tensors)
    }

    /// (name, tensor) in order, the tensors mutable (an optimizer's update).
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Tensor)> {
        self.names.iter().map(String::as_str).zip(&mut self.tensors)
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(Tensor::numel).sum()
    }

    /// Same names, order and shapes, all zeros (in each tensor's dtype).
    pub fn zeros_like(&self) -> Params {
        Params {
            names: self.names.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor::zeros(t.shape(), t.dtype()))
                .collect(),
            index: self.index.clone(),
        }
    }

    /// Every tensor converted to `placement`'s dtype and moved to its device.
    pub fn placed(&self, placement: &Placement) -> Result<Params> {
        Ok(Params {
            names: self.names.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| placement.place(t))
                .collect::<Result<_>>()?,
            index: self.index.clone(),
        })
    }

    /// True when `other` has the same names in the same order, with the same shapes.
    pub fn same_layout(&self, other: &Params) -> bool {
        self.names == other.names
            && self
                .tensors
                .iter()
                .zip(&other.tensors)
                .all(|(a, b)| a.shape() == b.shape())
    }

    /// `self[name] += t` for a name already present (shapes must agree): gradients of a weight
    /// used in several places add up.
    pub fn accumulate(&mut self, name: &str, t: &Tensor) -> Result<()> {
        let Some(&i) = self.index.get(name) else {
            return Err(Error::Invalid(format!(
                "gradient for unknown parameter `{name}`"
            )));
        };
        let cur = &self.tensors[i];
        if cur.shape() != t.shape() {
            return Err(Error::shape(
                "Params::accumulate",
                format!(
                    "`{name}`: gradient {:?} for a parameter of shape {:?}",
                    t.shape(),
                    cur.shape()
                ),
            ));
        }
        self.tensors[i] = ops::add(cur, t)?;
        Ok(())
    }

    /// True when every element of every tensor is finite.
    pub fn all_finite(&self) -> Result<bool> {
        for t in &self.tensors {
            if t.to_vec::<f64>()?.iter().any(|x| !x.is_finite()) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}
