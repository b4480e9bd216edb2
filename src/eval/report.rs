//! Evaluating a model on an image–caption set: zero-shot over the classes of single-object
//! images (when the set records objects, as shapes manifests do) and retrieval over all pairs.

use std::path::Path;

use serde::Serialize;

use super::retrieval::{retrieval, RetrievalMetrics};
use super::zeroshot::topk_accuracy;
use crate::data::image::{load_rgb, RgbImage};
use crate::data::manifest;
use crate::error::{Error, Result};
use crate::infer::zeroshot::class_embeddings;
use crate::infer::Embedder;

/// Images with captions and, for single-object images, their class.
pub struct EvalSet {
    pub images: Vec<RgbImage>,
    pub captions: Vec<String>,
    pub classes: Vec<Option<String>>,
    /// Entries that could not be read, with the reason.
    pub skipped: Vec<String>,
}

impl EvalSet {
    /// Reads a manifest; unreadable images are skipped and listed.
    pub fn from_manifest(path: &Path) -> Result<Self> {
        let entries = manifest::read(path)?;
        let mut set = EvalSet {
            images: Vec::new(),
            captions: Vec::new(),
            classes: Vec::new(),
            skipped: Vec::new(),
        };
        for e in entries {
            match load_rgb(&e.image) {
                Ok(img) => {
                    set.images.push(img);
                    set.captions.push(e.caption);
                    set.classes.push(match e.objects.as_deref() {
                        Some([one]) => Some(one.class_name()),
                        _ => None,
                    });
                }
                Err(err) => set.skipped.push(err.to_string()),
            }
        }
        if set.images.is_empty() {
            return Err(Error::input(format!(
                "{}: no readable images",
                path.display()
            )));
        }
        Ok(set)
    }

    /// Sorted distinct classes of the single-object images.
    pub fn class_names(&self) -> Vec<String> {
        let mut c: Vec<String> = self.classes.iter().flatten().cloned().collect();
        c.sort();
        c.dedup();
        c
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub n_images: usize,
    pub n_skipped: usize,
    pub classes: Vec<String>,
    pub templates: Vec<String>,
    /// Single-object images scored for zero-shot.
    pub n_zeroshot: usize,
    pub zeroshot_top1: Option<f64>,
    pub zeroshot_top5: Option<f64>,
    #[serde(flatten)]
    pub retrieval: RetrievalMetrics,
}

/// Zero-shot accuracy of the single-object images over `classes`, and retrieval over all pairs.
pub fn evaluate(
    e: &dyn Embedder,
    set: &EvalSet,
    classes: &[String],
    templates: &[String],
) -> Result<EvalReport> {
    let img = e.embed_images(&set.images)?;
    let txt = e.embed_texts(&set.captions)?;
    let retrieval = retrieval(&img, &txt)?;
    let (mut top1, mut top5, mut n_zs) = (None, None, 0);
    let labelled: Vec<(usize, usize)> = set
        .classes
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            c.as_ref()
                .and_then(|c| classes.iter().position(|k| k == c))
                .map(|l| (i, l))
        })
        .collect();
    if !labelled.is_empty() && !classes.is_empty() {
        let cls = class_embeddings(e, classes, templates)?;
        let idx: Vec<u32> = labelled.iter().map(|&(i, _)| i as u32).collect();
        let idx = candle_core::Tensor::new(idx.as_slice(), img.device())?;
        let labels: Vec<usize> = labelled.iter().map(|&(_, l)| l).collect();
        let acc = topk_accuracy(&img.index_select(&idx, 0)?, &cls, &labels, &[1, 5])?;
        (top1, top5, n_zs) = (Some(acc[0]), Some(acc[1]), labels.len());
    }
    Ok(EvalReport {
        n_images: set.images.len(),
        n_skipped: set.skipped.len(),
        classes: classes.to_vec(),
        templates: templates.to_vec(),
        n_zeroshot: n_zs,
        zeroshot_top1: top1,
        zeroshot_top5: top5,
        retrieval,
    })
}
