//! `vlalign bench [--json]`

use anyhow::Result;

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Timed iterations of each workload (after 2 untimed).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// End with one JSON object: {"train_step_ms", "vit_b32_batch8_ms", ...} (medians).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    let r = vlalign::apps::bench::run(a.iters.max(1), &a.device.resolve()?)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("threads: {}", r.threads);
        println!(
            "clip-tiny train step (batch 64, fwd+bwd+AdamW): median {:.1} ms",
            r.train_step_ms
        );
        println!(
            "ViT-B/32 image embedding (batch 8, 224²):       median {:.1} ms",
            r.vit_b32_batch8_ms
        );
    }
    Ok(())
}
