//! An image-search index: the L2-normalised CLIP embeddings of a collection of image files,
//! with their paths, searched exactly (a matrix product and a top-k). On disk a directory,
//! written atomically: `index.json` (format, model, dim, the paths) and `embeddings.safetensors`
//! (one `[N, dim]` float32 tensor). Building again over an existing index embeds only the new
//! paths. Large collections add an approximate HNSW graph (`ann`), saved beside.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::ann::{Ann, AnnMeta};
use super::clip::{ClipPipeline, BATCH};
use crate::data::image::load_rgb;
use crate::error::{Error, Result};
use crate::nn::ops::ensure_finite;

const FORMAT: &str = "vlalign-index-1";
const META: &str = "index.json";
const EMBEDDINGS: &str = "embeddings.safetensors";

#[derive(Serialize, Deserialize)]
struct Meta {
    format: String,
    /// The model directory the embeddings come from.
    model: PathBuf,
    dim: usize,
    paths: Vec<PathBuf>,
    /// The approximate graph saved beside the embeddings, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ann: Option<AnnMeta>,
}

/// A loaded index.
pub struct Index {
    pub model: PathBuf,
    pub paths: Vec<PathBuf>,
    /// `[N, dim]`, rows L2-normalised.
    pub embeddings: Tensor,
    /// An HNSW graph over the same rows for approximate search (`index build --approx`).
    pub ann: Option<Ann>,
}

/// What a build did.
pub struct Built {
    pub index: Index,
    pub added: usize,
    /// Files that could not be read or decoded, with why (left out, not fatal).
    pub skipped: Vec<(PathBuf, String)>,
}

impl Index {
    pub fn dim(&self) -> usize {
        self.embeddings.dims().get(1).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Reads an index directory, checking that its parts agree and its embeddings are finite.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let meta_path = dir.join(META);
        if !meta_path.is_file() {
            return Err(Error::input(format!(
                "{} is not an index (no {META}); make one with `vlalign index build`",
                dir.display()
            )));
        }
        let meta: Meta = crate::io::read_json(&meta_path)?;
        if meta.format != FORMAT {
            return Err(Error::config(
                &meta_path,
                format!("format {:?}; this vlalign reads {FORMAT:?}", meta.format),
            ));
        }
        let emb_path = dir.join(EMBEDDINGS);
        let bad = |m: String| Error::weights(&emb_path, m);
        let mut tensors =
            candle_core::safetensors::load(&emb_path, device).map_err(|e| bad(e.to_string()))?;
        let embeddings = tensors
            .remove("embeddings")
            .ok_or_else(|| bad("no `embeddings` tensor".into()))?
            .to_dtype(DType::F32)?;
        if embeddings.dims() != [meta.paths.len(), meta.dim] {
            return Err(bad(format!(
                "embeddings {:?}, but {META} lists {} paths of dim {}",
                embeddings.dims(),
                meta.paths.len(),
                meta.dim
            )));
        }
        ensure_finite(&embeddings, &format!("{}", emb_path.display()))?;
        let ann = match &meta.ann {
            Some(a) => Some(Ann::load(dir, a, meta.paths.len())?),
            None => None,
        };
        Ok(Self {
            model: meta.model,
            paths: meta.paths,
            embeddings,
            ann,
        })
    }

    /// Builds (or rebuilds, after entries were added) the approximate graph over every row.
    pub fn build_ann(&mut self) -> Result<()> {
        let rows: Vec<Vec<f32>> = self.embeddings.to_vec2()?;
        self.ann = Some(Ann::build(&rows));
        Ok(())
    }

    /// Writes the index into `dir` (atomically, replacing an older one).
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::io::write_dir_atomic(dir, |tmp| {
            let ann = match &self.ann {
                Some(a) => Some(a.save(tmp)?),
                None => None,
            };
            let meta = Meta {
                format: FORMAT.into(),
                model: self.model.clone(),
                dim: self.dim(),
                paths: self.paths.clone(),
                ann,
            };
            let value = serde_json::to_value(&meta).expect("index meta serialises");
            crate::io::write_json(&tmp.join(META), &value)?;
            let path = tmp.join(EMBEDDINGS);
            candle_core::safetensors::save(
                &std::collections::HashMap::from([(
                    "embeddings".to_string(),
                    self.embeddings.clone(),
                )]),
                &path,
            )
            .map_err(|e| Error::weights(&path, e.to_string()))
        })
    }

    /// Embeds `paths` with `p` (the model directory `model`) into a new index, or adds those
    /// not yet in `existing` (which must come from the same model). `progress` is called with
    /// the number of files done.
    pub fn build(
        p: &ClipPipeline,
        model: &Path,
        paths: &[PathBuf],
        existing: Option<Index>,
        mut progress: impl FnMut(usize),
    ) -> Result<Built> {
        let dim = p.model.config.projection_dim;
        let approx = existing.as_ref().is_some_and(|ix| ix.ann.is_some());
        let (mut all_paths, mut rows) = match existing {
            Some(ix) => {
                if ix.dim() != dim {
                    return Err(Error::input(format!(
                        "the index holds {}-wide embeddings (from {}); {} gives {dim}",
                        ix.dim(),
                        ix.model.display(),
                        model.display()
                    )));
                }
                (ix.paths, vec![ix.embeddings])
            }
            None => (Vec::new(), Vec::new()),
        };
        let known: HashSet<PathBuf> = all_paths.iter().cloned().collect();
        let new: Vec<&PathBuf> = paths.iter().filter(|q| !known.contains(*q)).collect();
        let mut skipped = Vec::new();
        let mut added = 0;
        for (i, chunk) in new.chunks(BATCH).enumerate() {
            let (mut images, mut loaded) = (Vec::with_capacity(chunk.len()), Vec::new());
            for path in chunk {
                match load_rgb(path) {
                    Ok(img) => {
                        images.push(img);
                        loaded.push((*path).clone());
                    }
                    Err(e) => {
                        tracing::warn!("skipped: {e}");
                        skipped.push(((*path).clone(), e.to_string()));
                    }
                }
            }
            if !images.is_empty() {
                rows.push(p.embed_rgb(&images)?);
                added += images.len();
                all_paths.extend(loaded);
            }
            progress((i * BATCH + chunk.len()).min(new.len()));
        }
        let embeddings = if rows.is_empty() {
            Tensor::zeros((0, dim), DType::F32, &p.device)?
        } else {
            Tensor::cat(&rows, 0)?
        };
        let mut index = Index {
            model: model.to_path_buf(),
            paths: all_paths,
            embeddings,
            ann: None,
        };
        if approx {
            index.build_ann()?;
        }
        Ok(Built {
            index,
            added,
            skipped,
        })
    }

    /// The `top` entries most similar to the normalised `query` (`[dim]`), best first, as
    /// (entry, cosine): through the approximate graph when the index has one (`ef` its
    /// candidate list), else exactly.
    pub fn search(&self, query: &[f32], top: usize, ef: usize) -> Result<Vec<(usize, f32)>> {
        match &self.ann {
            Some(ann) => {
                self.check_query(query)?;
                Ok(ann.search(query, top.min(self.len()), ef))
            }
            None => self.search_exact(query, top),
        }
    }

    fn check_query(&self, query: &[f32]) -> Result<()> {
        if query.len() != self.dim() {
            return Err(Error::input(format!(
                "query of dim {}; the index holds dim {}",
                query.len(),
                self.dim()
            )));
        }
        Ok(())
    }

    /// [`Index::search`] by a full scan: every cosine, the exact top-k.
    pub fn search_exact(&self, query: &[f32], top: usize) -> Result<Vec<(usize, f32)>> {
        self.check_query(query)?;
        if self.is_empty() {
            return Ok(Vec::new());
        }
        let q = Tensor::from_vec(query.to_vec(), (self.dim(), 1), self.embeddings.device())?;
        let scores: Vec<f32> = self.embeddings.matmul(&q)?.squeeze(1)?.to_vec1()?;
        Ok(super::rank::topk(&scores, top.min(scores.len()))
            .into_iter()
            .map(|i| (i, scores[i]))
            .collect())
    }
}
