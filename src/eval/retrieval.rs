//! Image–text retrieval over matching pairs (pair i is image i and text i): recall@K both ways
//! and the mean rank of the true match (rank = 1 + candidates scored strictly higher).

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RetrievalMetrics {
    pub i2t_r1: f64,
    pub i2t_r5: f64,
    pub i2t_r10: f64,
    pub t2i_r1: f64,
    pub t2i_r5: f64,
    pub t2i_r10: f64,
    pub i2t_mean_rank: f64,
    pub t2i_mean_rank: f64,
}

fn ranks(sims: &[Vec<f32>]) -> Vec<usize> {
    sims.iter()
        .enumerate()
        .map(|(i, row)| 1 + row.iter().filter(|&&s| s > row[i]).count())
        .collect()
}

fn recall(ranks: &[usize], k: usize) -> f64 {
    ranks.iter().filter(|&&r| r <= k).count() as f64 / ranks.len() as f64
}

fn mean(ranks: &[usize]) -> f64 {
    ranks.iter().sum::<usize>() as f64 / ranks.len() as f64
}

/// `images` and `texts`: `[N, D]`, L2-normalised, row i of each a matching pair.
pub fn retrieval(images: &Tensor, texts: &Tensor) -> Result<RetrievalMetrics> {
    let n = images.dim(0)?;
    if n != texts.dim(0)? || n == 0 {
        return Err(Error::input(format!(
            "retrieval needs as many texts as images (got {n} images, {} texts)",
            texts.dim(0)?
        )));
    }
    let i2t = images.matmul(&texts.t()?)?.to_vec2::<f32>()?;
    Ok(from_similarity(&i2t))
}

/// Metrics from a square image × text score matrix (row i = image i; pair i on the diagonal).
pub fn from_similarity(i2t: &[Vec<f32>]) -> RetrievalMetrics {
    let n = i2t.len();
    let t2i: Vec<Vec<f32>> = (0..n)
        .map(|j| (0..n).map(|i| i2t[i][j]).collect())
        .collect();
    from_scores(i2t, &t2i)
}

/// Metrics from separate score matrices per direction: `i2t[i]` scores the texts for image i,
/// `t2i[j]` the images for text j (they differ once each direction is reranked on its own).
pub fn from_scores(i2t: &[Vec<f32>], t2i: &[Vec<f32>]) -> RetrievalMetrics {
    let (ri, rt) = (ranks(i2t), ranks(t2i));
    RetrievalMetrics {
        i2t_r1: recall(&ri, 1),
        i2t_r5: recall(&ri, 5),
        i2t_r10: recall(&ri, 10),
        t2i_r1: recall(&rt, 1),
        t2i_r5: recall(&rt, 5),
        t2i_r10: recall(&rt, 10),
        i2t_mean_rank: mean(&ri),
        t2i_mean_rank: mean(&rt),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn hand_checked_ranks() {
        let dev = Device::Cpu;
        // Image 0 matches text 0; image 1 prefers text 0 (rank 2 for its own).
        let img = Tensor::new(&[[1f32, 0.0], [0.8, 0.6]], &dev).unwrap();
        let txt = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &dev).unwrap();
        let m = retrieval(&img, &txt).unwrap();
        assert_eq!((m.i2t_r1, m.i2t_r5, m.i2t_mean_rank), (0.5, 1.0, 1.5));
        // Text 0: scores 1.0 vs 0.8 → rank 1; text 1: 0.0 vs 0.6 → rank 1.
        assert_eq!((m.t2i_r1, m.t2i_mean_rank), (1.0, 1.0));
    }
}
