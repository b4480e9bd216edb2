//! Training: a config ([`config`]) is built into a run ([`build`]: the task and its data), which
//! one loop ([`trainer`]) trains — AdamW with weight-decay groups, warm-up + cosine schedule,
//! clipping, exact accumulation, checkpoints that resume bit-exactly. Each objective family is a
//! [`task::Task`] under [`tasks`]: CLIP pretraining, BLIP-2 stage 1.

mod adamw_fused;
pub mod build;
pub mod checkpoint;
pub mod config;
pub mod data_parallel;
pub mod distill;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod shards;
mod sumsq_fused;
pub mod task;
pub mod tasks;
pub mod tokenizer;
pub mod trainer;
