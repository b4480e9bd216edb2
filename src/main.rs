//! The `vlalign` binary: parses arguments, calls the library, prints. Exit 0 on success, 1 on a
//! user error (one line naming the cause), 2 on bad arguments (clap).

mod cli;

use std::io::IsTerminal;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v3 enum order): -1 keeps freed memory
/// committed. A train step frees and reallocates the same large activation buffers every step;
/// returning them to the OS made the kernel zero fresh pages for ~20% of the step (perf).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Threads of candle's element-wise pool, unless the user sets `CANDLE_NUM_THREADS`. Its workers
/// spin between ops while gemm's rayon workers want the same cores: on 2 cores a Q-Former train
/// step ran 1.3× faster and a ViT-B/32 forward 1.1× faster with element-wise ops on the calling
/// thread (the Q-Former step parallelises over shards itself; DESIGN notes).
const CANDLE_ELEMENTWISE_THREADS: &str = "1";

fn main() {
    // SAFETY: sets a plain integer option before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", CANDLE_ELEMENTWISE_THREADS);
    }
    // candle asks for its matmul thread count on every matmul, and without RAYON_NUM_THREADS it
    // recounts the physical cores from /proc/cpuinfo each time (~5% of a decode run in perf).
    // Counted once here, with candle's own rule, it is the same number.
    // Ranks of one MPI job on one machine share its cores.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let local = vlalign::dist::launched_local_size().unwrap_or(1).max(1);
        let n = (candle_core::utils::get_num_threads() / local).max(1);
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let args = cli::Cli::parse();
    let filter = if args.verbose { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .init();
    if let Err(e) = cli::run(args) {
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
