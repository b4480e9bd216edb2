//! Additive self-attention masks, built in one place: padding masks for BERT-style encoders and
//! the three Q-Former masks of BLIP-2 stage 1 (Li et al. 2023, §3.2 and Fig. 2 right), which
//! share every weight and differ only here. The sequence is `[queries (Q); text (T)]`.
//!
//! - ITC, *uni-modal*: queries see only queries, text sees only text (LAVIS runs the two as
//!   separate passes; one pass under this mask computes the same thing).
//! - ITG, *multi-modal causal*: queries see only queries; text token i sees every query and the
//!   text tokens ≤ i (LAVIS `Qformer.py` `get_extended_attention_mask` with `is_decoder`,
//!   `has_query`).
//! - ITM, *bi-directional*: everything sees everything (HF `Blip2ForImageTextRetrieval` with
//!   `use_image_text_matching_head`).
//!
//! Padded text positions are blocked as keys in every mode.

use candle_core::{Device, Result, Tensor};

use super::attention::MASKED;

/// Which of BLIP-2's three stage-1 objectives the Q-Former pass serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QformerMode {
    /// Image–text contrastive: uni-modal.
    Itc,
    /// Image-grounded text generation: multi-modal causal.
    Itg,
    /// Image–text matching: bi-directional.
    Itm,
}

/// Whether position `i` may attend to position `j` in a `[Q queries; T text]` sequence, before
/// padding is applied.
pub fn allowed(mode: QformerMode, queries: usize, i: usize, j: usize) -> bool {
    let (qi, qj) = (i < queries, j < queries);
    match mode {
        QformerMode::Itm => true,
        QformerMode::Itc => qi == qj,
        QformerMode::Itg => {
            if qi {
                qj
            } else {
                qj || j <= i
            }
        }
    }
}

/// The additive mask `[B, 1, Q+T, Q+T]` for `mode`: 0 where attention is allowed, [`MASKED`]
/// where it is blocked by the mode or because key `j` is text padding (`text_mask[b][j-Q] == 0`).
pub fn qformer(
    mode: QformerMode,
    queries: usize,
    text_mask: &[Vec<u32>],
    device: &Device,
) -> Result<Tensor> {
    let b = text_mask.len();
    let t = text_mask.first().map_or(0, Vec::len);
    let l = queries + t;
    let mut v = vec![0f32; b * l * l];
    for (bi, row_mask) in text_mask.iter().enumerate() {
        if row_mask.len() != t {
            candle_core::bail!(
                "text mask row {bi} has {} entries, row 0 has {t}",
                row_mask.len()
            );
        }
        for i in 0..l {
            for j in 0..l {
                let pad = j >= queries && row_mask[j - queries] == 0;
                if pad || !allowed(mode, queries, i, j) {
                    v[(bi * l + i) * l + j] = MASKED;
                }
            }
        }
    }
    Tensor::from_vec(v, (b, 1, l, l), device)
}

/// The padding-only additive mask `[B, 1, 1, T]` of a BERT encoder (HF `BertModel`): key `j` is
/// blocked where `mask[b][j] == 0`.
pub fn padding(mask: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let t = mask.first().map_or(0, Vec::len);
    let mut v = Vec::with_capacity(b * t);
    for (bi, row) in mask.iter().enumerate() {
        if row.len() != t {
            candle_core::bail!("mask row {bi} has {} entries, row 0 has {t}", row.len());
        }
        v.extend(row.iter().map(|&m| if m == 0 { MASKED } else { 0.0 }));
    }
    Tensor::from_vec(v, (b, 1, 1, t), device)
}

/// The additive causal mask `[B, 1, new, past + new]` of a decoder LM step: the `new` positions
/// follow `past` cached ones, and query `past + i` may attend key `j` when `j ≤ past + i` and
/// `mask[b][j] == 1` (`mask` rows cover all `past + new` positions; transformers'
/// `create_causal_mask` with a padding mask). A left-padded row's padding queries see nothing
/// and come out uniform, as in transformers' eager attention; nothing reads them.
pub fn causal(mask: &[Vec<u32>], past: usize, device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let total = mask.first().map_or(0, Vec::len);
    if total < past {
        candle_core::bail!("causal mask: {total} positions cannot follow {past} cached ones");
    }
    let new = total - past;
    let mut v = Vec::with_capacity(b * new * total);
    for (bi, row) in mask.iter().enumerate() {
        if row.len() != total {
            candle_core::bail!("mask row {bi} has {} entries, row 0 has {total}", row.len());
        }
        for i in 0..new {
            v.extend(row.iter().enumerate().map(|(j, &m)| {
                if j <= past + i && m != 0 {
                    0.0
                } else {
                    MASKED
                }
            }));
        }
    }
    Tensor::from_vec(v, (b, 1, new, total), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders a mask row by row: `1` allowed, `.` blocked.
    fn render(mode: QformerMode, q: usize, text: &[u32]) -> Vec<String> {
        let m = qformer(mode, q, &[text.to_vec()], &Device::Cpu).unwrap();
        let l = q + text.len();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        (0..l)
            .map(|i| {
                (0..l)
                    .map(|j| if v[i * l + j] == 0.0 { '1' } else { '.' })
                    .collect()
            })
            .collect()
    }

    // Two queries, three text tokens of which the last is padding. Rows are queries q0 q1, then
    // text t0 t1 t2(pad); columns in the same order. Derived by hand from the paper's Fig. 2.
    #[test]
    fn itc_is_unimodal() {
        assert_eq!(
            render(QformerMode::Itc, 2, &[1, 1, 0]),
            ["11...", "11...", "..11.", "..11.", "..11."]
        );
    }

    #[test]
    fn itg_is_multimodal_causal() {
        assert_eq!(
            render(QformerMode::Itg, 2, &[1, 1, 0]),
            ["11...", "11...", "111..", "1111.", "1111."]
        );
    }

    #[test]
    fn itm_is_bidirectional() {
        assert_eq!(
            render(QformerMode::Itm, 2, &[1, 1, 0]),
            ["1111.", "1111.", "1111.", "1111.", "1111."]
        );
    }

    #[test]
    fn without_padding_itg_text_rows_are_lower_triangular_after_the_queries() {
        let rows = render(QformerMode::Itg, 1, &[1, 1, 1]);
        assert_eq!(rows, ["1...", "11..", "111.", "1111"]);
    }

    #[test]
    fn padding_mask_blocks_only_padded_keys() {
        let m = padding(&[vec![1, 1, 0], vec![1, 0, 0]], &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[2, 1, 1, 3]);
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [0.0, 0.0, MASKED, 0.0, MASKED, MASKED]);
        assert!(qformer(QformerMode::Itm, 1, &[vec![1, 1], vec![1]], &Device::Cpu).is_err());
    }

    fn render_causal(mask: &[u32], past: usize) -> Vec<String> {
        let m = causal(&[mask.to_vec()], past, &Device::Cpu).unwrap();
        let t = mask.len();
        let v: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        v.chunks(t)
            .map(|r| {
                r.iter()
                    .map(|&x| if x == 0.0 { '1' } else { '.' })
                    .collect()
            })
            .collect()
    }

    // A left-padded row (pad, a, b, c): rows are queries, columns keys; derived by hand.
    #[test]
    fn causal_mask_is_lower_triangular_without_padded_keys() {
        assert_eq!(
            render_causal(&[0, 1, 1, 1], 0),
            ["....", ".1..", ".11.", ".111"]
        );
        // The same row after two cached positions: only the last two queries.
        assert_eq!(render_causal(&[0, 1, 1, 1], 2), [".11.", ".111"]);
        // Right padding: the padded query sees the real tokens, no real query sees it.
        assert_eq!(render_causal(&[1, 1, 0], 0), ["1..", "11.", "11."]);
        assert!(causal(&[vec![1, 1]], 3, &Device::Cpu).is_err());
    }
}
