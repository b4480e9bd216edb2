//! CapFilt (BLIP, Li et al. 2022, §3.3 "CapFilt"): a captioner writes one synthetic caption per
//! image (nucleus sampling), and a filter keeps an original or synthetic caption only where its
//! ITM head says the pair matches. Both are Q-Former directories here (ITG for the captioner,
//! ITM for the filter; they may be the same one). The output is a new manifest of the kept
//! pairs; where the input marks its noisy pairs (`vlalign data shapes --caption-noise`), the
//! report scores the filter on them.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::data::image::{load_rgb, RgbImage};
use crate::data::manifest::{Entry, JsonlWriter};
use crate::error::{Error, Result};
use crate::infer::QformerPipeline;

/// How captions are sampled and filtered.
#[derive(Clone, Debug)]
pub struct CapfiltOptions {
    /// A pair is kept when its ITM match probability is at least this.
    pub threshold: f32,
    /// Nucleus mass of the sampled captions (BLIP: 0.9).
    pub top_p: f32,
    /// Most tokens of a synthetic caption.
    pub max_len: usize,
    /// Fewest tokens of a synthetic caption (BLIP: 5).
    pub min_len: usize,
    /// Seeds the sampling: image k of the manifest draws from stream k.
    pub seed: u64,
    /// Write synthetic captions (BLIP's "Cap"); false filters the originals only.
    pub synthetic: bool,
}

impl Default for CapfiltOptions {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            top_p: 0.9,
            max_len: 30,
            min_len: 3,
            seed: 0,
            synthetic: true,
        }
    }
}

/// The filter scored against the manifest's `noisy` flags (original captions only).
#[derive(Clone, Debug, Serialize)]
pub struct FilterScore {
    /// Kept original pairs that are clean / kept original pairs.
    pub precision: f64,
    /// Kept clean pairs / clean pairs.
    pub recall: f64,
    /// Dropped noisy pairs / noisy pairs.
    pub noisy_removed: f64,
    pub clean_pairs: usize,
    pub noisy_pairs: usize,
}

/// What `vlalign capfilt` did.
#[derive(Clone, Debug, Serialize)]
pub struct CapfiltReport {
    pub manifest: PathBuf,
    pub images: usize,
    pub pairs: usize,
    pub kept_original: usize,
    pub kept_synthetic: usize,
    /// Images that could not be read, with why (their pairs are left out).
    pub skipped: Vec<String>,
    pub threshold: f32,
    /// Present when the input marks noisy pairs.
    pub score: Option<FilterScore>,
}

/// Images per batch of captioning and filtering.
const CHUNK: usize = 64;

/// Runs CapFilt over `entries` and writes `out/manifest.jsonl` (atomically; image paths absolute)
/// and `out/capfilt.json` (the report).
pub fn capfilt(
    captioner: &QformerPipeline,
    filter: &QformerPipeline,
    entries: &[Entry],
    out: &Path,
    opts: &CapfiltOptions,
) -> Result<CapfiltReport> {
    if entries.is_empty() {
        return Err(Error::input("capfilt: the manifest has no pairs"));
    }
    // Unique images in order of first appearance, each with its lines.
    let mut images: Vec<(PathBuf, Vec<usize>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let k = *index.entry(e.image.clone()).or_insert_with(|| {
            images.push((e.image.clone(), Vec::new()));
            images.len() - 1
        });
        images[k].1.push(i);
    }
    let same_model = captioner.dir == filter.dir;
    let mut kept: Vec<Entry> = Vec::new();
    let mut kept_lines = vec![false; entries.len()];
    let (mut kept_synthetic, mut skipped) = (0usize, Vec::new());
    for (c, chunk) in images.chunks(CHUNK).enumerate() {
        if c % 16 == 0 {
            tracing::info!("capfilt: {} of {} images", c * CHUNK, images.len());
        }
        // The images of this chunk that could be read, and their indices into `images`.
        let (mut loaded, mut imgs): (Vec<usize>, Vec<RgbImage>) = (Vec::new(), Vec::new());
        for (j, (path, _)) in chunk.iter().enumerate() {
            match load_rgb(path) {
                Ok(img) => {
                    loaded.push(c * CHUNK + j);
                    imgs.push(img);
                }
                Err(e) => skipped.push(e.to_string()),
            }
        }
        if loaded.is_empty() {
            continue;
        }
        let filt_embeds = filter.image_embeds(&imgs)?;
        let synthetic = if opts.synthetic {
            let cap_embeds = if same_model {
                filt_embeds.clone()
            } else {
                captioner.image_embeds(&imgs)?
            };
            let mut rngs: Vec<ChaCha8Rng> = loaded
                .iter()
                .map(|&k| crate::rng::stream(opts.seed, crate::rng::CAPFILT, k as u64))
                .collect();
            captioner.caption_sampled(
                &cap_embeds,
                opts.top_p,
                opts.max_len,
                opts.min_len,
                &mut rngs,
            )?
        } else {
            Vec::new()
        };
        // Every original caption of these images, then each image's synthetic one.
        let mut pairs: Vec<(usize, &str)> = Vec::new();
        for (row, &k) in loaded.iter().enumerate() {
            for &line in &images[k].1 {
                pairs.push((row, entries[line].caption.as_str()));
            }
        }
        for (row, s) in synthetic.iter().enumerate() {
            pairs.push((row, s.text.as_str()));
        }
        let probs = match_probs(filter, &filt_embeds, &pairs)?;
        let mut p = probs.iter();
        for &k in &loaded {
            for &line in &images[k].1 {
                if *p.next().expect("one probability per pair") >= opts.threshold {
                    kept_lines[line] = true;
                    kept.push(Entry {
                        image: absolute(&entries[line].image)?,
                        ..entries[line].clone()
                    });
                }
            }
        }
        for (&k, s) in loaded.iter().zip(&synthetic) {
            if *p.next().expect("one probability per pair") >= opts.threshold {
                let first = &entries[images[k].1[0]];
                kept_synthetic += 1;
                kept.push(Entry {
                    image: absolute(&first.image)?,
                    caption: s.text.clone(),
                    objects: first.objects.clone(),
                    noisy: None,
                });
            }
        }
    }
    let report = CapfiltReport {
        manifest: out.join("manifest.jsonl"),
        images: images.len(),
        pairs: entries.len(),
        kept_original: kept_lines.iter().filter(|&&k| k).count(),
        kept_synthetic,
        skipped,
        threshold: opts.threshold,
        score: score(entries, &kept_lines),
    };
    if kept.is_empty() {
        return Err(Error::input(format!(
            "capfilt: the filter kept no pair at threshold {} (of {} pairs); lower --threshold",
            opts.threshold,
            entries.len()
        )));
    }
    crate::io::write_dir_atomic(out, |tmp| {
        let mut w = JsonlWriter::create(&tmp.join("manifest.jsonl"), out)?;
        for e in &kept {
            w.write(e)?;
        }
        w.finish()?;
        crate::io::write_json(
            &tmp.join("capfilt.json"),
            &serde_json::to_value(&report).expect("report serialises"),
        )
    })?;
    Ok(report)
}

/// ITM match probabilities (softmax over the two ITM classes, class 1) of `(image row, text)`
/// pairs.
fn match_probs(p: &QformerPipeline, embeds: &Tensor, pairs: &[(usize, &str)]) -> Result<Vec<f32>> {
    let idx = Tensor::new(
        pairs.iter().map(|&(i, _)| i as u32).collect::<Vec<_>>(),
        embeds.device(),
    )?;
    let texts: Vec<&str> = pairs.iter().map(|&(_, t)| t).collect();
    p.itm_probs(&embeds.index_select(&idx, 0)?, &texts)
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).map_err(|e| Error::io(p, e))
}

/// Precision and recall of the kept original pairs, when the manifest marks noisy ones.
fn score(entries: &[Entry], kept: &[bool]) -> Option<FilterScore> {
    if !entries.iter().any(|e| e.noisy == Some(true)) {
        return None;
    }
    let noisy = |i: usize| entries[i].noisy == Some(true);
    let n = entries.len();
    let clean_pairs = (0..n).filter(|&i| !noisy(i)).count();
    let noisy_pairs = n - clean_pairs;
    let kept_all = (0..n).filter(|&i| kept[i]).count();
    let kept_clean = (0..n).filter(|&i| kept[i] && !noisy(i)).count();
    let kept_noisy = kept_all - kept_clean;
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    Some(FilterScore {
        precision: ratio(kept_clean, kept_all),
        recall: ratio(kept_clean, clean_pairs),
        noisy_removed: ratio(noisy_pairs - kept_noisy, noisy_pairs),
        clean_pairs,
        noisy_pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(noisy: Option<bool>) -> Entry {
        Entry {
            image: "x.png".into(),
            caption: "a red circle".into(),
            objects: None,
            noisy,
        }
    }

    /// Hand-counted: 4 clean and 2 noisy pairs; 3 clean and 1 noisy kept.
    #[test]
    fn filter_score_counts_kept_pairs_against_the_noisy_flags() {
        let mut e = vec![entry(None); 4];
        e.extend([entry(Some(true)), entry(Some(true))]);
        let s = score(&e, &[true, true, false, true, true, false]).unwrap();
        assert_eq!((s.clean_pairs, s.noisy_pairs), (4, 2));
        assert!((s.precision - 0.75).abs() < 1e-12);
        assert!((s.recall - 0.75).abs() < 1e-12);
        assert!((s.noisy_removed - 0.5).abs() < 1e-12);
        assert!(score(&vec![entry(None); 3], &[true; 3]).is_none());
    }
}
