//! `vlalign bench [--suite default|vit-b32|serve|ann|lm|kernels|comm] [--batch N] [--json]`

use anyhow::{bail, Result};

use super::device::DeviceOpt;

/// Which workloads are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// The table of tools/bench.sh: clip-tiny train step (InfoNCE and SigLIP, batch 64),
    /// clip-tiny-rn train step (a ResNet image tower, batch 64), Q-Former stage-1 step
    /// (qformer-tiny, batch 32), ViT-B/32 image embedding (batch 8), the data loader; ms, GFLOP/s against the measured matmul peak, peak memory. PyTorch twins:
    /// tools/reference/bench_torch.py and bench_qformer_torch.py.
    Default,
    /// ViT-B/32 CLIP training (AdamW, text context 77) and image embedding at --batch: the GPU
    /// workload of tools/device-check.sh.
    VitB32,
    /// `vlalign serve` over loopback: requests/s and p50/p99 latency at 1, 8 and 32 clients,
    /// batching on and off, one text or one image (--image) per request, on --model.
    Serve,
    /// The image-search index on synthetic clustered embeddings (--sizes, --dim): HNSW build
    /// time, recall@10 against the exact top 10, queries/s of the exact scan and of the graph.
    Ann,
    /// Greedy generation from a decoder LM (--lm: a directory or .gguf) with the KV cache:
    /// tokens/s at batch 1 and 8, and the LM's share of a BLIP-2 stage-2 training step, as the
    /// twin tools/reference/bench_lm_torch.py.
    Lm,
    /// No timing: the fused kernels (LayerNorm, softmax, GELUs, bias) against candle's
    /// compositions on --device, values and gradients (relative max differences).
    Kernels,
    /// The gradient all-reduce of data-parallel training at growing buffer sizes: over the
    /// ranks of `mpirun -np N vlalign bench --suite comm` (a `--features mpi` build), else over
    /// two thread ranks of this process. Median ms and bus bandwidth per size.
    Comm,
}

#[derive(clap::Args)]
pub struct Args {
    /// Timed iterations of each workload (default: 20 in the default suite, else 10).
    #[arg(long)]
    iters: Option<usize>,
    /// Run only this row of the default suite, in this process, and print it as JSON (how the
    /// suite runs each row in a process of its own; `peak`: the matmul peak alone).
    #[arg(long, hide = true)]
    only: Option<String>,
    /// Untimed iterations before the timed ones (default suite; the others run 2).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// The workloads.
    #[arg(long, value_enum, default_value_t = Suite::Default)]
    suite: Suite,
    /// Batch size of the vit-b32 suite.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Arithmetic of the vit-b32 suite: "f32", or "bf16" (mixed precision, as
    /// `train.precision`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    precision: String,
    /// Gradient checkpointing in the vit-b32 suite's training step (as
    /// `train.grad_checkpointing`).
    #[arg(long)]
    grad_checkpointing: bool,
    /// The vit-b32 suite on CUDA: "off" turns off cudarc's event tracking (an event recorded
    /// and waited on per kernel argument, on the host) to measure what it costs. Safe here: the
    /// suite launches every kernel from one thread. Nothing on the CPU.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    cuda_events: String,
    /// Model directory of the serve suite.
    #[arg(long, default_value = "runs/demo/model")]
    model: std::path::PathBuf,
    /// Image sent by the serve suite's image workload, and the JPEG of the default suite's
    /// loader row.
    #[arg(long, default_value = "tests/fixtures/images/astronaut.jpg")]
    image: std::path::PathBuf,
    /// Requests per setting of the serve suite (spread over the clients).
    #[arg(long, default_value_t = 256)]
    requests: usize,
    /// Language model of the lm suite (a causal-LM directory or a .gguf file).
    #[arg(long, default_value = "target/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")]
    lm: std::path::PathBuf,
    /// Collection sizes of the ann suite.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    sizes: Vec<usize>,
    /// Embedding width of the ann suite (ViT-B/32 CLIP: 512).
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Queries per size of the ann suite.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// End with one JSON object (the default suite: {"threads", "matmul_peak_gflops", "rows":
    /// [{"name", "ms", "gflops", "peak_rss_mb", ...}]}).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    let iters = a
        .iters
        .unwrap_or(if a.suite == Suite::Default { 20 } else { 10 })
        .max(1);
    if a.cuda_events == "off" && a.suite != Suite::VitB32 {
        bail!("--cuda-events off applies to the vit-b32 suite only");
    }
    if a.suite == Suite::Comm {
        return comm(&a, iters);
    }
    let device = a.device.resolve()?;
    if a.cuda_events == "off" {
        // SAFETY: only the vit-b32 suite gets here (checked above), which launches every kernel
        // from this thread, and no tensor exists on the device yet.
        unsafe { vlalign::nn::device::disable_event_tracking(&device) };
    }
    if a.suite == Suite::Ann {
        if a.sizes.iter().any(|n| !(10..=10_000_000).contains(n))
            || !(2..=4096).contains(&a.dim)
            || !(1..=100_000).contains(&a.queries)
        {
            bail!("--sizes 10..=10000000 each, --dim 2..=4096, --queries 1..=100000");
        }
        let rows = vlalign::apps::ann_bench::run(&a.sizes, a.dim, a.queries)?;
        if a.json {
            println!("{}", serde_json::json!({"ann": rows}));
        } else {
            println!("| vectors | dim | HNSW build s | ef | recall@10 | exact queries/s | HNSW queries/s |");
            println!("|---|---|---|---|---|---|---|");
            for r in rows {
                println!(
                    "| {} | {} | {:.1} | {} | {:.3} | {:.0} | {:.0} |",
                    r.vectors,
                    r.dim,
                    r.build_seconds,
                    r.ef,
                    r.recall_at_10,
                    r.exact_queries_per_s,
                    r.hnsw_queries_per_s
                );
            }
        }
        return Ok(());
    }
    if a.suite == Suite::Serve {
        if !(1..=100_000).contains(&a.requests) {
            bail!("--requests must be between 1 and 100000");
        }
        let rows = vlalign::apps::serve_bench::run(&a.model, &a.image, a.requests)?;
        if a.json {
            println!("{}", serde_json::json!({"serve": rows}));
        } else {
            println!("| workload | batching | clients | requests/s | p50 ms | p99 ms |");
            println!("|---|---|---|---|---|---|");
            for r in rows {
                println!(
                    "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
                    r.workload,
                    if r.batching { "on" } else { "off" },
                    r.clients,
                    r.requests_per_s,
                    r.p50_ms,
                    r.p99_ms
                );
            }
        }
        return Ok(());
    }
    if a.suite == Suite::Lm {
        let r = vlalign::apps::lm_bench::run(&a.lm, iters, &device)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "{}: greedy, {}-token prompt + {} new tokens, KV cache",
                r.model, r.prompt_tokens, r.new_tokens
            );
            println!(
                "  batch 1: {:8.1} ms  {:6.1} tokens/s",
                r.batch1_ms, r.batch1_tokens_per_s
            );
            println!(
                "  batch 8: {:8.1} ms  {:6.1} tokens/s",
                r.batch8_ms, r.batch8_tokens_per_s
            );
            println!(
                "stage-2 training step (LM share: 8 x (8 queries + 24 tokens), 16 targets/row, \
                 backward to the projection)"
            );
            println!("  one graph:       {:8.1} ms", r.step_batch8_ms);
            println!("  two row shards:  {:8.1} ms", r.step_batch8_sharded_ms);
        }
        return Ok(());
    }
    if a.suite == Suite::Kernels {
        let mut r = vlalign::nn::fused::check_against_compositions(&device, (64, 77, 768))?;
        // AdamW's in-place passes (train/adamw_fused.rs: θ in the value column, the moments in
        // the gradient column) and the clip's sum of squares.
        r.extend(vlalign::train::optim::check_fused_optimizer(&device)?);
        if a.json {
            let rows: Vec<_> = r
                .iter()
                .map(|(op, v, g)| serde_json::json!({"op": op, "value": v, "grad": g}))
                .collect();
            println!("{}", serde_json::json!({"kernels": rows}));
        } else {
            for (op, v, g) in r {
                println!("{op:12} values {v:.2e}  gradients {g:.2e} (relative max differences)");
            }
            println!("(the adamw rows: values = the variables, gradients = the two moments)");
        }
        return Ok(());
    }
    if a.suite == Suite::VitB32 {
        if !(2..=65536).contains(&a.batch) {
            bail!("--batch must be between 2 and 65536");
        }
        let precision = match a.precision.as_str() {
            "bf16" => vlalign::train::config::Precision::Bf16,
            _ => vlalign::train::config::Precision::F32,
        };
        let mode = vlalign::apps::bench::StepMode {
            precision,
            grad_checkpointing: a.grad_checkpointing,
        };
        let r = vlalign::apps::bench::run_vit_b32(iters, a.batch, mode, &device)?;
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else {
            println!(
                "ViT-B/32 CLIP training (batch {}, fwd+bwd+AdamW): median {:.1} ms, {:.1} samples/s",
                r.batch, r.train_step_ms, r.train_samples_per_s
            );
            println!(
                "ViT-B/32 image embedding (batch {}):            median {:.1} ms, {:.1} images/s",
                r.batch, r.embed_ms, r.embed_images_per_s
            );
        }
        return Ok(());
    }
    if a.warmup > 1000 || iters > 100_000 {
        bail!("--warmup at most 1000, --iters at most 100000");
    }
    let settings = vlalign::apps::bench::Settings {
        warmup: a.warmup,
        iters,
    };
    if a.only.as_deref() == Some("peak") {
        let peak = vlalign::apps::bench::matmul_peak(10, &device)?;
        println!("{}", serde_json::json!({ "matmul_peak_gflops": peak }));
        return Ok(());
    }
    if let Some(name) = &a.only {
        let row = vlalign::apps::bench::run_row(name, settings, &a.image, &device)?;
        println!("{}", serde_json::to_string(&row)?);
        return Ok(());
    }
    let mut rows = Vec::new();
    for name in vlalign::apps::bench::ROWS {
        if name == "loader_jpeg" && !a.image.is_file() {
            eprintln!(
                "loader_jpeg left out: no JPEG at --image {}",
                a.image.display()
            );
            continue;
        }
        rows.push(row_in_child(name)?);
    }
    let r = vlalign::apps::bench::BenchReport {
        threads: candle_core::utils::get_num_threads(),
        warmup: settings.warmup,
        iters,
        matmul_peak_gflops: vlalign::apps::bench::matmul_peak(10, &device)?,
        rows,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "threads {}, float32 matmul peak {:.1} GFLOP/s; median of {} after {} warm-up",
        r.threads, r.matmul_peak_gflops, r.iters, r.warmup
    );
    println!("| workload | ms | samples/s | GFLOP/s | of peak | peak RSS MiB | RSS growth MiB |");
    println!("|---|---|---|---|---|---|---|");
    let opt = |v: Option<f64>, digits: usize| match v {
        Some(v) => format!("{v:.digits$}"),
        None => "-".to_string(),
    };
    for row in &r.rows {
        println!(
            "| {} | {:.1} | {:.1} | {} | {} | {} | {} |",
            row.what,
            row.ms,
            row.samples_per_s,
            opt(row.gflops, 1),
            match row.gflops {
                Some(g) => format!("{:.0}%", 100.0 * g / r.matmul_peak_gflops),
                None => "-".to_string(),
            },
            opt(row.peak_rss_mb, 0),
            opt(row.rss_growth_mb, 1),
        );
    }
    Ok(())
}

/// Runs the default suite's row `name` in a process of its own (this binary, these arguments,
/// `--only name --json`), so that its peak memory is its own, and reads back its row.
fn row_in_child(name: &str) -> Result<vlalign::apps::bench::Row> {
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--json").collect();
    let out = std::process::Command::new(&exe)
        .args(&args)
        .args(["--only", name, "--json"])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("benchmark row {name} failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .map_err(|e| anyhow::anyhow!("benchmark row {name}: unreadable report {last:?}: {e}"))
}

/// Buffer sizes of the comm suite, in f32 values: 1 Ki to 64 Mi (4 KB to 256 MB).
const COMM_SIZES: [usize; 7] = [
    1 << 10,
    1 << 13,
    1 << 16,
    1 << 19,
    1 << 22,
    1 << 24,
    1 << 26,
];

fn comm(a: &Args, iters: usize) -> Result<()> {
    #[cfg(feature = "mpi")]
    let rows = if vlalign::dist::launched_size().is_some() {
        let mpi = vlalign::dist::mpi::MpiComm::init()?;
        let rows = vlalign::apps::comm_bench::run_on(&mpi, &COMM_SIZES, iters)?;
        if vlalign::dist::Comm::rank(&mpi) != 0 {
            return Ok(());
        }
        rows
    } else {
        vlalign::apps::comm_bench::run_threads(2, &COMM_SIZES, iters)?
    };
    #[cfg(not(feature = "mpi"))]
    let rows = vlalign::apps::comm_bench::run_threads(2, &COMM_SIZES, iters)?;
    if a.json {
        println!("{}", serde_json::json!({ "comm": rows }));
    } else {
        println!("| ranks | buffer | median ms | bus GB/s |");
        println!("|---|---|---|---|");
        for r in rows {
            let size = match r.bytes {
                b if b < 1 << 20 => format!("{} KiB", b >> 10),
                b => format!("{} MiB", b >> 20),
            };
            println!(
                "| {} | {size} | {:.3} | {:.2} |",
                r.ranks, r.median_ms, r.bus_gb_per_s
            );
        }
    }
    Ok(())
}
