//! The training tasks: one per objective family, each a [`crate::train::task::Task`] run by the
//! one trainer loop.

pub mod blip2;
pub mod clip;
mod clip_dp;
pub mod finetune;
pub mod qformer;
