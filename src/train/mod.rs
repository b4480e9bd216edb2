//! Training: one loop over a [`task::Task`] (CLIP now; the Q-Former and distillation later),
//! AdamW with weight-decay groups, warm-up + cosine schedule, clipping, accumulation,
//! checkpoints that resume bit-exactly.

pub mod checkpoint;
pub mod clip_task;
pub mod optim;
pub mod plot;
pub mod qformer_task;
pub mod schedule;
pub mod setup;
pub mod task;
pub mod trainer;
