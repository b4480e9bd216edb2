//! `vlalign bench --suite ann`: the image-search index at scale on synthetic embeddings —
//! HNSW build time, recall@10 against the exact top 10, and single-query throughput of the
//! exact scan and of the graph. The vectors are clustered (a mixture of Gaussians, then
//! normalised), as real embeddings are: uniform random directions have no neighbours worth
//! the name and understate every ANN method.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::Rng;
use rand_distr_free::normal;
use serde::Serialize;

use crate::error::Result;
use crate::infer::index::Index;

/// One measured (size, ef) setting.
#[derive(Clone, Debug, Serialize)]
pub struct AnnRow {
    pub vectors: usize,
    pub dim: usize,
    pub build_seconds: f64,
    pub ef: usize,
    pub recall_at_10: f64,
    pub exact_queries_per_s: f64,
    pub hnsw_queries_per_s: f64,
}

/// Box–Muller normal samples, without another dependency.
mod rand_distr_free {
    use rand::Rng;

    pub fn normal(rng: &mut impl Rng) -> f32 {
        let u1: f32 = rng.random_range(f32::EPSILON..1.0);
        let u2: f32 = rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// `n` normalised rows of width `dim` around `clusters` random centres (seeded).
fn clustered(n: usize, dim: usize, clusters: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = crate::rng::stream(seed, 0xA22, 0);
    let centres: Vec<Vec<f32>> = (0..clusters)
        .map(|_| (0..dim).map(|_| normal(&mut rng)).collect())
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.random_range(0..clusters)];
            let mut v: Vec<f32> = c.iter().map(|x| x + 0.6 * normal(&mut rng)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            v
        })
        .collect()
}

/// Measures each size in `sizes` (vectors of width `dim`, `queries` queries).
pub fn run(sizes: &[usize], dim: usize, queries: usize) -> Result<Vec<AnnRow>> {
    let mut out = Vec::new();
    for &n in sizes {
        let clusters = (n as f64).sqrt().round().max(1.0) as usize;
        // Queries from the collection's own distribution (the same centres), not in it.
        let mut rows = clustered(n + queries, dim, clusters, n as u64);
        let qs = rows.split_off(n);
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        let mut index = Index {
            model: PathBuf::from("<synthetic>"),
            paths: (0..n).map(|i| PathBuf::from(i.to_string())).collect(),
            embeddings: Tensor::from_vec(flat, (n, dim), &Device::Cpu)?,
            ann: None,
        };
        drop(rows);
        // Ground truth and the exact scan's speed, one query at a time as a server asks.
        let t0 = Instant::now();
        let truth: Vec<Vec<usize>> = qs
            .iter()
            .map(|q| {
                index
                    .search_exact(q, 10)
                    .map(|h| h.into_iter().map(|(i, _)| i).collect())
            })
            .collect::<Result<_>>()?;
        let exact_qps = queries as f64 / t0.elapsed().as_secs_f64();
        let t0 = Instant::now();
        index.build_ann()?;
        let build_seconds = t0.elapsed().as_secs_f64();
        for ef in [16, 64, 256] {
            let t0 = Instant::now();
            let mut hit = 0usize;
            for (q, want) in qs.iter().zip(&truth) {
                let got = index.search(q, 10, ef)?;
                hit += got.iter().filter(|(i, _)| want.contains(i)).count();
            }
            let hnsw_qps = queries as f64 / t0.elapsed().as_secs_f64();
            out.push(AnnRow {
                vectors: n,
                dim,
                build_seconds,
                ef,
                recall_at_10: hit as f64 / (10 * queries) as f64,
                exact_queries_per_s: exact_qps,
                hnsw_queries_per_s: hnsw_qps,
            });
        }
    }
    Ok(out)
}
