//! Losses, each a pure function of features (DESIGN.md §1): testable without a model.

pub mod contrastive;
pub mod distill;
pub mod itc;
pub mod itg;
pub mod itm;
pub mod lm;
pub mod ops;
