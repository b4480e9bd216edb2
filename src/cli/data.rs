//! `vlalign data shapes --out DIR --n N --seed S [--objects K] [--caption-noise F]`

use std::path::PathBuf;

use anyhow::{bail, Result};
use vlalign::data::shapes::{self, PairSet, ShapesConfig};
use vlalign::data::shapes_files::write_shapes_dir;

/// Which colour–shape pairs may appear.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Pairs {
    /// Every pair.
    All,
    /// The training pairs.
    Seen,
    /// Only the held-out pairs (never in training captions).
    HeldOut,
}

/// The most images one `data shapes` call writes.
const MAX_IMAGES: usize = 10_000_000;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generate the synthetic shapes image–caption set: DIR/images/*.png and DIR/manifest.jsonl
    /// ({"image", "caption", "objects": [{"color", "shape", "size", "position"}]} per line).
    Shapes(ShapesArgs),
}

#[derive(clap::Args)]
pub struct ShapesArgs {
    #[arg(long)]
    out: PathBuf,
    /// Number of images.
    #[arg(long, default_value_t = 1000)]
    n: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Exactly this many objects per image (default: 1 to 3).
    #[arg(long)]
    objects: Option<usize>,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    /// Which colour–shape pairs may appear.
    #[arg(long, value_enum, default_value_t = Pairs::All)]
    pairs: Pairs,
    /// Fraction of images whose caption is another scene's (false of the image); the manifest
    /// marks them `"noisy": true`, so that filters (`vlalign capfilt`) can be scored.
    #[arg(long, default_value_t = 0.0)]
    caption_noise: f32,
    /// Relative frequency of each object count (e.g. `6,1,1` for 1, 2, 3 objects, as
    /// configs/clip-tiny.toml trains); default uniform.
    #[arg(long, value_delimiter = ',')]
    object_weights: Vec<f32>,
    /// Consecutive images differ only in their shapes (the training stream's hard negatives,
    /// `data.shapes_twins`).
    #[arg(long)]
    twins: bool,
}

pub fn run(c: Command) -> Result<()> {
    let Command::Shapes(a) = c;
    let pairs = match a.pairs {
        Pairs::All => PairSet::All,
        Pairs::Seen => PairSet::Seen,
        Pairs::HeldOut => PairSet::HeldOut,
    };
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if let Some(k) = a.objects {
        if !(1..=5).contains(&k) {
            bail!("--objects must be between 1 and 5 (there are 5 positions)");
        }
    }
    if !(16..=1024).contains(&a.image_size) {
        bail!("--image-size must be between 16 and 1024");
    }
    if !(0.0..=1.0).contains(&a.caption_noise) {
        bail!(
            "--caption-noise {} must be between 0 and 1",
            a.caption_noise
        );
    }
    let counts = a.objects.map_or(3, |_| 1);
    if !a.object_weights.is_empty()
        && (a.object_weights.len() != counts
            || a.object_weights
                .iter()
                .any(|w| !(w.is_finite() && *w >= 0.0))
            || a.object_weights.iter().sum::<f32>() <= 0.0)
    {
        bail!("--object-weights needs {counts} non-negative weights (one per object count), not all zero");
    }
    if a.n > MAX_IMAGES {
        bail!("--n {}: at most {MAX_IMAGES} images", a.n);
    }
    let manifest = a.out.join("manifest.jsonl");
    if manifest.exists() {
        bail!(
            "{} exists; choose another --out (data shapes never overwrites a data set)",
            manifest.display()
        );
    }
    let cfg = ShapesConfig {
        image_size: a.image_size,
        min_objects: a.objects.unwrap_or(1),
        max_objects: a.objects.unwrap_or(3),
        pairs,
        twins: a.twins,
        object_weights: a.object_weights,
        caption_noise: a.caption_noise,
    };
    // Generated and written one at a time: memory stays flat for any --n.
    let samples = (0..a.n as u64).map(|i| shapes::generate(&cfg, a.seed, i));
    let m = write_shapes_dir(&a.out, samples)?;
    eprintln!("wrote {} images and {}", a.n, m.display());
    Ok(())
}
