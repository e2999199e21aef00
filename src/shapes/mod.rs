//! ShapesWorld: a synthetic world of two coloured shapes in a known relation, small enough that
//! the crate trains and ships a text-to-image model of it, and a detector that scores generated
//! images by GenEval's position rule. It lets steering run, and be measured, on any machine.

pub mod dataset;
pub mod detect;
pub mod eval;
pub mod geneval;
pub mod model;
pub mod world;
