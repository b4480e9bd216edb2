//! Zero-shot accuracy (CLIP §3.1.4): images are assigned the most similar class embedding
//! (`infer::zeroshot::class_embeddings`); top-k accuracy counts the classes that score higher.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};

/// Fraction of images whose label is among the `k` most similar classes, for each `k`.
pub fn topk_accuracy(
    images: &Tensor,
    classes: &Tensor,
    labels: &[usize],
    ks: &[usize],
) -> Result<Vec<f64>> {
    let n = images.dim(0)?;
    if n != labels.len() {
        return Err(Error::input(format!(
            "{n} image embeddings but {} labels",
            labels.len()
        )));
    }
    if n == 0 {
        return Ok(vec![f64::NAN; ks.len()]);
    }
    let sims = images.matmul(&classes.t()?)?.to_vec2::<f32>()?;
    let mut hits = vec![0usize; ks.len()];
    for (row, &label) in sims.iter().zip(labels) {
        // Rank of the true class: how many classes score strictly higher.
        let rank = row.iter().filter(|&&s| s > row[label]).count();
        for (h, &k) in hits.iter_mut().zip(ks) {
            *h += usize::from(rank < k);
        }
    }
    Ok(hits.iter().map(|&h| h as f64 / n as f64).collect())
}

/// Index of the best class per image.
pub fn predict(images: &Tensor, classes: &Tensor) -> Result<Vec<usize>> {
    Ok(images
        .matmul(&classes.t()?)?
        .argmax(D::Minus1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|i| i as usize)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn topk_counts_strictly_better_classes() {
        let dev = Device::Cpu;
        let img = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.6, 0.8]], &dev).unwrap();
        let cls = Tensor::new(&[[1f32, 0.0], [0.0, 1.0], [0.8, 0.6]], &dev).unwrap();
        // Image 2 (0.6, 0.8): scores 0.6, 0.8, 0.96 → label 0 ranks third.
        let acc = topk_accuracy(&img, &cls, &[0, 1, 0], &[1, 2, 3]).unwrap();
        assert_eq!(acc, vec![2.0 / 3.0, 2.0 / 3.0, 1.0]);
        assert_eq!(predict(&img, &cls).unwrap(), vec![0, 1, 2]);
    }
}
