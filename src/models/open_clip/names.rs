//! open_clip's tensor names (model.py `CLIP`, transformer.py `VisionTransformer`,
//! `ResidualAttentionBlock`) and the transformers `CLIPModel` tensors each becomes — the map of
//! transformers' convert_clip_original_pytorch_to_hf.py, whose OpenAI names open_clip keeps:
//! the packed `attn.in_proj_{weight,bias}` splits into q, k, v (rows in that order), and the
//! `[in, out]` projection matrices `visual.proj` / `text_projection` transpose into Linear
//! weights.

use crate::io::weights::Take;

/// The tensors outside the blocks and norms: open_clip name, HF name, part.
const FIXED: [(&str, &str, Take); 9] = [
    ("logit_scale", "logit_scale", Take::Scalar),
    ("logit_bias", "logit_bias", Take::Scalar),
    ("text_projection", "text_projection.weight", Take::Transpose),
    ("visual.proj", "visual_projection.weight", Take::Transpose),
    (
        "token_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        Take::Whole,
    ),
    (
        "positional_embedding",
        "text_model.embeddings.position_embedding.weight",
        Take::Whole,
    ),
    (
        "visual.conv1.weight",
        "vision_model.embeddings.patch_embedding.weight",
        Take::Whole,
    ),
    (
        "visual.class_embedding",
        "vision_model.embeddings.class_embedding",
        Take::Whole,
    ),
    (
        "visual.positional_embedding",
        "vision_model.embeddings.position_embedding.weight",
        Take::Whole,
    ),
];

/// As [`to_hf`], for a CLIP whose image tower is a ModifiedResNet: its `visual.*` tensors keep
/// open_clip's names (the tower is built under them; transformers has no ResNet CLIP).
pub fn to_hf_resnet(stored: &str) -> Option<Vec<(String, Take)>> {
    if stored.starts_with("visual.") {
        return Some(vec![(stored.to_string(), Take::Whole)]);
    }
    to_hf(stored)
}

/// The HF tensors made from one stored open_clip tensor, or `None` for a name open_clip's CLIP
/// class (ViT image tower) does not have.
pub fn to_hf(stored: &str) -> Option<Vec<(String, Take)>> {
    if let Some((_, hf, take)) = FIXED.iter().find(|(oc, _, _)| *oc == stored) {
        return Some(vec![(hf.to_string(), *take)]);
    }
    let (tower, rest) = match stored.strip_prefix("visual.") {
        Some(rest) => ("vision_model", rest),
        None => ("text_model", stored),
    };
    // Norms outside the blocks.
    let norm = match (tower, rest.split_once('.')) {
        ("vision_model", Some(("ln_pre", p))) => Some(("pre_layrnorm", p)),
        ("vision_model", Some(("ln_post", p))) => Some(("post_layernorm", p)),
        ("text_model", Some(("ln_final", p))) => Some(("final_layer_norm", p)),
        _ => None,
    };
    if let Some((hf, param)) = norm {
        return matches!(param, "weight" | "bias")
            .then(|| vec![(format!("{tower}.{hf}.{param}"), Take::Whole)]);
    }
    // transformer.resblocks.{i}.{part}
    let block = rest.strip_prefix("transformer.resblocks.")?;
    let (index, part) = block.split_once('.')?;
    index.parse::<usize>().ok()?;
    let layer = format!("{tower}.encoder.layers.{index}");
    let whole = |hf: &str, param: &str| Some(vec![(format!("{layer}.{hf}.{param}"), Take::Whole)]);
    match part {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let param = if part.ends_with("weight") {
                "weight"
            } else {
                "bias"
            };
            Some(
                ["q_proj", "k_proj", "v_proj"]
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        (
                            format!("{layer}.self_attn.{p}.{param}"),
                            Take::Chunk { index: i, of: 3 },
                        )
                    })
                    .collect(),
            )
        }
        _ => {
            let (module, param) = part.rsplit_once('.')?;
            if !matches!(param, "weight" | "bias") {
                return None;
            }
            let hf = match module {
                "attn.out_proj" => "self_attn.out_proj",
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                _ => return None,
            };
            whole(hf, param)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of transformers' convert_clip_original_pytorch_to_hf.py, written out by hand.
    #[test]
    fn names_follow_the_transformers_conversion() {
        let hf = |s: &str| to_hf(s).unwrap();
        assert_eq!(
            hf("visual.transformer.resblocks.3.attn.in_proj_weight"),
            vec![
                (
                    "vision_model.encoder.layers.3.self_attn.q_proj.weight".into(),
                    Take::Chunk { index: 0, of: 3 }
                ),
                (
                    "vision_model.encoder.layers.3.self_attn.k_proj.weight".into(),
                    Take::Chunk { index: 1, of: 3 }
                ),
                (
                    "vision_model.encoder.layers.3.self_attn.v_proj.weight".into(),
                    Take::Chunk { index: 2, of: 3 }
                ),
            ]
        );
        assert_eq!(
            hf("transformer.resblocks.0.mlp.c_proj.bias"),
            vec![(
                "text_model.encoder.layers.0.mlp.fc2.bias".into(),
                Take::Whole
            )]
        );
        assert_eq!(
            hf("visual.ln_pre.weight")[0].0,
            "vision_model.pre_layrnorm.weight"
        );
        assert_eq!(hf("ln_final.bias")[0].0, "text_model.final_layer_norm.bias");
        assert_eq!(
            hf("visual.proj"),
            vec![("visual_projection.weight".into(), Take::Transpose)]
        );
        assert_eq!(
            hf("logit_scale"),
            vec![("logit_scale".into(), Take::Scalar)]
        );
        for unknown in [
            "visual.attnpool.q_proj.weight",
            "visual.transformer.resblocks.0.ls_1.gamma",
            "visual.transformer.resblocks.x.ln_1.weight",
            "text.token_embedding.weight",
            "attn_mask",
        ] {
            assert!(to_hf(unknown).is_none(), "{unknown}");
        }
    }
}
