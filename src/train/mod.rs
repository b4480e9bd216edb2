//! Training: one loop over a [`task::Task`] (CLIP now; the Q-Former and distillation later),
//! AdamW with weight-decay groups, warm-up + cosine schedule, clipping, accumulation,
//! checkpoints that resume bit-exactly.

pub mod optim;
pub mod schedule;
