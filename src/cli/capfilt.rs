//! `vlalign capfilt --captioner DIR --filter DIR --data MANIFEST --out DIR [--threshold T]
//! [--top-p P] [--seed S] [--json]`: BLIP's CapFilt over a manifest (`apps::capfilt`).

use std::path::PathBuf;

use anyhow::{bail, Result};
use vlalign::apps::capfilt::{capfilt, CapfiltOptions};
use vlalign::infer::Pipeline;

use super::device::DeviceOpt;

#[derive(clap::Args)]
pub struct Args {
    /// Q-Former directory with an ITG head: writes one synthetic caption per image.
    #[arg(long)]
    captioner: PathBuf,
    /// Q-Former directory whose ITM head keeps the pairs that match (may be the captioner).
    #[arg(long)]
    filter: PathBuf,
    /// Manifest (.jsonl/.csv/.tsv) of image–caption pairs to clean.
    #[arg(long)]
    data: PathBuf,
    /// New directory for manifest.jsonl (the kept pairs) and capfilt.json (the report).
    #[arg(long)]
    out: PathBuf,
    /// Keep a pair when its ITM match probability is at least this.
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Nucleus mass of the sampled captions (BLIP: 0.9).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Most tokens of a synthetic caption.
    #[arg(long, default_value_t = 30)]
    max_len: usize,
    /// Fewest tokens of a synthetic caption.
    #[arg(long, default_value_t = 3)]
    min_len: usize,
    /// Seeds the sampling (image k of the manifest draws from its own stream).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Leave the synthetic captions out: filter the original captions only.
    #[arg(long)]
    no_synthetic: bool,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceOpt,
}

pub fn run(a: Args) -> Result<()> {
    if !(0.0..=1.0).contains(&a.threshold) {
        bail!("--threshold {} must be between 0 and 1", a.threshold);
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p {} must be in (0, 1]", a.top_p);
    }
    if a.max_len == 0 || a.max_len > 512 || a.min_len > a.max_len {
        bail!("--max-len must be 1 to 512 and --min-len at most --max-len");
    }
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some())? {
        bail!(
            "{} exists and is not empty; choose another --out (capfilt never overwrites)",
            a.out.display()
        );
    }
    let device = a.device.resolve()?;
    let captioner = Pipeline::load(&a.captioner, &device)?.into_qformer("--captioner")?;
    let filter = Pipeline::load(&a.filter, &device)?.into_qformer("--filter")?;
    let entries = vlalign::data::manifest::read(&a.data)?;
    let opts = CapfiltOptions {
        threshold: a.threshold,
        top_p: a.top_p,
        max_len: a.max_len,
        min_len: a.min_len,
        seed: a.seed,
        synthetic: !a.no_synthetic,
    };
    let r = capfilt(&captioner, &filter, &entries, &a.out, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} images, {} pairs: kept {} original and {} synthetic captions (ITM >= {}) in {}",
            r.images,
            r.pairs,
            r.kept_original,
            r.kept_synthetic,
            r.threshold,
            r.manifest.display()
        );
        if let Some(s) = &r.score {
            println!(
                "against the noisy flags: precision {:.3}, recall {:.3}, noisy pairs removed {:.3} ({} clean, {} noisy)",
                s.precision, s.recall, s.noisy_removed, s.clean_pairs, s.noisy_pairs
            );
        }
        if !r.skipped.is_empty() {
            println!(
                "skipped {} unreadable image(s), e.g. {}",
                r.skipped.len(),
                r.skipped[0]
            );
        }
    }
    Ok(())
}
