//! Whole jobs built from the layers below: the demo (DESIGN.md §5), which trains and reports on
//! the built-in shapes data, and the benchmark of the reference workloads. The CLI calls these
//! and prints their reports.

pub mod ann_bench;
pub mod bench;
pub mod capfilt;
pub mod comm_bench;
pub mod demo;
pub mod lm_bench;
pub mod serve_bench;
