//! Shapes samples as sets and as files: the per-class evaluation sets (every class of a
//! [`PairSet`], a fixed number of single-object images each) and the `images/*.png` +
//! `manifest.jsonl` directory that `vlalign data shapes` writes and `vlalign eval` reads.

use std::borrow::Borrow;
use std::path::{Path, PathBuf};

use super::image::save_png;
use super::manifest::{Entry, JsonlWriter};
use super::shapes::{self, PairSet, ShapesSample};
use crate::error::{Error, Result};

/// `per_class` single-object images of every class of `pairs`, class by class, from the stream
/// `seed` (sample k·per_class + i is image i of class k).
pub fn class_set(size: usize, pairs: PairSet, per_class: usize, seed: u64) -> Vec<ShapesSample> {
    let mut out = Vec::new();
    for (k, class) in shapes::classes(pairs).iter().enumerate() {
        let (c, s) = shapes::class_indices(class).expect("class names parse");
        for i in 0..per_class {
            out.push(shapes::generate_class(
                size,
                seed,
                (k * per_class + i) as u64,
                c,
                s,
            ));
        }
    }
    out
}

/// Writes samples as `dir/images/NNNNNN.png` plus `dir/manifest.jsonl` (with each sample's
/// objects), one at a time (a stream of any length), and returns the manifest's path.
pub fn write_shapes_dir<S: Borrow<ShapesSample>>(
    dir: &Path,
    samples: impl IntoIterator<Item = S>,
) -> Result<PathBuf> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let m = dir.join("manifest.jsonl");
    let mut w = JsonlWriter::create(&m, dir)?;
    for (i, s) in samples.into_iter().enumerate() {
        let s = s.borrow();
        let p = images.join(format!("{:06}.png", i + 1));
        save_png(&p, &s.image)?;
        w.write(&Entry {
            image: p,
            caption: s.caption.clone(),
            objects: Some(s.objects.clone()),
            noisy: s.noisy.then_some(true),
        })?;
    }
    w.finish()?;
    Ok(m)
}
