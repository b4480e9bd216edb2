//! Approximate search for large indexes: an HNSW graph (Malkov & Yashunin 2018, "Efficient and
//! robust approximate nearest neighbor search using Hierarchical Navigable Small World graphs")
//! built by the `hnsw_rs` crate over an index's normalised embeddings, distance 1 − cosine.
//!
//! Saved beside the exact embeddings as `hnsw.hnsw.graph` / `hnsw.hnsw.data` (hnsw_rs's dump),
//! with a CRC-32 of each file in `index.json`: a file changed or cut after it was written is an
//! error on load, never a crash inside the graph reader.

use std::path::Path;

use hnsw_rs::anndists::dist::distances::Distance;
use hnsw_rs::prelude::{AnnT, Hnsw, HnswIo};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Neighbours kept per node and layer (hnswlib's default `M`).
const MAX_CONNECTIONS: usize = 16;
/// Candidate list while inserting (hnswlib's `ef_construction`).
const EF_CONSTRUCTION: usize = 200;
/// Layers of the graph (hnsw_rs's maximum).
const LAYERS: usize = 16;
/// The dump's base name: files `hnsw.hnsw.graph` and `hnsw.hnsw.data`.
const BASENAME: &str = "hnsw";
const FILES: [&str; 2] = ["hnsw.hnsw.graph", "hnsw.hnsw.data"];

/// 1 − cosine of two normalised rows, floored at 0 (rounding can push a self-match's dot product
/// just above 1; hnsw_rs's own dot distance asserts on that).
#[derive(Clone, Copy, Debug, Default)]
pub struct CosineDistance;

impl Distance<f32> for CosineDistance {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        // Eight partial sums so the compiler vectorises the loop.
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for k in 0..8 {
                acc[k] += x[k] * y[k];
            }
        }
        let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
        (1.0 - (acc.iter().sum::<f32>() + tail)).max(0.0)
    }
}

/// What `index.json` records of the graph.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AnnMeta {
    pub kind: String,
    pub max_connections: usize,
    pub ef_construction: usize,
    /// CRC-32 of `hnsw.hnsw.graph` and `hnsw.hnsw.data`.
    pub crc32: [u32; 2],
}

/// A built or loaded graph.
pub struct Ann {
    hnsw: Hnsw<'static, f32, CosineDistance>,
}

fn crc_of(path: &Path) -> Result<u32> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(crc32fast::hash(&bytes))
}

impl Ann {
    /// Builds the graph over `rows` (normalised, entry `i` = row `i`), on every core.
    pub fn build(rows: &[Vec<f32>]) -> Self {
        let hnsw = Hnsw::new(
            MAX_CONNECTIONS,
            rows.len().max(1),
            LAYERS,
            EF_CONSTRUCTION,
            CosineDistance,
        );
        let with_ids: Vec<(&Vec<f32>, usize)> = rows.iter().zip(0..).collect();
        hnsw.parallel_insert(&with_ids);
        let mut hnsw = hnsw;
        hnsw.set_searching_mode(true);
        Self { hnsw }
    }

    pub fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the graph's files into `dir`; returns what `index.json` records of them.
    pub fn save(&self, dir: &Path) -> Result<AnnMeta> {
        self.hnsw
            .file_dump(dir, BASENAME)
            .map_err(|e| Error::input(format!("cannot write the HNSW graph: {e}")))?;
        let crc = [crc_of(&dir.join(FILES[0]))?, crc_of(&dir.join(FILES[1]))?];
        Ok(AnnMeta {
            kind: "hnsw".into(),
            max_connections: MAX_CONNECTIONS,
            ef_construction: EF_CONSTRUCTION,
            crc32: crc,
        })
    }

    /// Reads the graph `save` wrote into `dir`, after checking its files against `meta` and
    /// that it holds `count` entries.
    pub fn load(dir: &Path, meta: &AnnMeta, count: usize) -> Result<Self> {
        for (file, want) in FILES.iter().zip(meta.crc32) {
            let path = dir.join(file);
            let got = crc_of(&path)?;
            if got != want {
                return Err(Error::weights(
                    &path,
                    format!("CRC-32 {got:08x}, index.json says {want:08x}: the file changed after it was written; rebuild the index"),
                ));
            }
        }
        // The reader borrows from its loader for the graph's lifetime: one per process.
        let io: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, BASENAME)));
        let hnsw: Hnsw<'static, f32, CosineDistance> = io
            .load_hnsw()
            .map_err(|e| Error::weights(dir.join(FILES[0]), format!("HNSW graph: {e}")))?;
        let ann = Self { hnsw };
        if ann.len() != count {
            return Err(Error::weights(
                dir.join(FILES[0]),
                format!("graph of {} entries for an index of {count}", ann.len()),
            ));
        }
        Ok(ann)
    }

    /// The `top` nearest entries to the normalised `query`, best first, as (entry, cosine);
    /// `ef` is the search's candidate list (recall against speed; at least `top`).
    pub fn search(&self, query: &[f32], top: usize, ef: usize) -> Vec<(usize, f32)> {
        self.hnsw
            .search(query, top, ef.max(top))
            .into_iter()
            .map(|n| (n.d_id, 1.0 - n.distance))
            .collect()
    }
}
