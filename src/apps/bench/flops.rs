//! Floating-point operations of the benchmark workloads, counted from their shapes: matrix
//! products only (2 per multiply-add), as `torch.utils.flop_counter.FlopCounterMode` counts them
//! (tools/bench.sh prints PyTorch's count beside ours). A training step counts 3× the forward
//! products of what is trained (the forward, the input gradient and the weight gradient), 2× for
//! a product whose input needs no gradient (the patch embedding of the pixels) and 1× for a
//! frozen tower. Element-wise work, norms and softmax are left out, as PyTorch leaves them out.

/// Self-attention of `t` tokens of width `d`: the q, k, v and output projections and the two
/// score products (q·kᵀ and p·v).
fn self_attention(t: f64, d: f64) -> f64 {
    2.0 * t * 4.0 * d * d + 4.0 * t * t * d
}

/// Cross-attention of `tq` tokens of width `d` to `tk` encoder tokens of width `e`.
fn cross_attention(tq: f64, tk: f64, d: f64, e: f64) -> f64 {
    2.0 * tq * 2.0 * d * d + 2.0 * tk * 2.0 * e * d + 4.0 * tq * tk * d
}

/// The two-layer feed-forward block of `t` tokens, width `d`, inner size `m`.
fn mlp(t: f64, d: f64, m: f64) -> f64 {
    4.0 * t * d * m
}

/// A CLIP-style encoder of `layers` layers over `t` tokens.
fn encoder(layers: usize, t: f64, d: f64, m: f64) -> f64 {
    layers as f64 * (self_attention(t, d) + mlp(t, d, m))
}

/// The shapes of a CLIP tower pair.
#[derive(Clone, Copy, Debug)]
pub struct ClipShape {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_width: usize,
    pub vision_layers: usize,
    pub vision_mlp: usize,
    pub text_width: usize,
    pub text_layers: usize,
    pub text_mlp: usize,
    pub context_length: usize,
    pub projection_dim: usize,
}

impl ClipShape {
    fn grid(&self) -> f64 {
        let g = (self.image_size / self.patch_size) as f64;
        g * g
    }

    /// The patch embedding of one image.
    fn patch_embed(&self) -> f64 {
        let p = self.patch_size as f64;
        2.0 * self.grid() * 3.0 * p * p * self.vision_width as f64
    }

    /// One image's vision encoder after the patch embedding, `layers` of its layers.
    fn vision_layers(&self, layers: usize) -> f64 {
        let d = self.vision_width as f64;
        encoder(layers, self.grid() + 1.0, d, self.vision_mlp as f64)
    }

    /// One image through the vision tower to its pooled output (no projection).
    pub fn image_forward(&self) -> f64 {
        self.patch_embed() + self.vision_layers(self.vision_layers)
    }

    /// One caption through the text tower to its pooled output (no projection).
    fn text_forward(&self) -> f64 {
        let d = self.text_width as f64;
        encoder(
            self.text_layers,
            self.context_length as f64,
            d,
            self.text_mlp as f64,
        )
    }
}

/// One contrastive training step of `batch` pairs (InfoNCE or SigLIP: both form the `batch²`
/// logits): forward, backward, no gradient for the pixels.
pub fn clip_train_step(s: &ClipShape, batch: usize) -> f64 {
    let b = batch as f64;
    let p = s.projection_dim as f64;
    let projections = 2.0 * (s.vision_width + s.text_width) as f64 * p;
    let per_pair = s.vision_layers(s.vision_layers) + s.text_forward() + projections;
    let logits = 2.0 * b * b * p;
    3.0 * (b * per_pair + logits) + 2.0 * b * s.patch_embed()
}

/// A convolution's products: `k`×`k` over `cin` channels into `cout`, at `side`² output pixels.
fn conv(cin: usize, cout: usize, k: usize, side: usize) -> f64 {
    2.0 * (cin * cout * k * k * side * side) as f64
}

/// One image through CLIP's ModifiedResNet (open_clip modified_resnet.py) of `layers` blocks a
/// stage and width `width` at `image_size`²: (the stem's first convolution, which reads the
/// pixels; everything after it, attention pooling into `out` included).
fn resnet_forward(image_size: usize, layers: [usize; 4], width: usize, out: usize) -> (f64, f64) {
    let side = image_size.div_ceil(2);
    let first = conv(3, width / 2, 3, side);
    let mut rest = conv(width / 2, width / 2, 3, side) + conv(width / 2, width, 3, side);
    let (mut side, mut inplanes) = (side / 2, width);
    for (s, &blocks) in layers.iter().enumerate() {
        let planes = width << s;
        let stride = if s == 0 { 1 } else { 2 };
        for b in 0..blocks {
            let (cin, st) = if b == 0 {
                (inplanes, stride)
            } else {
                (4 * planes, 1)
            };
            rest += conv(cin, planes, 1, side) + conv(planes, planes, 3, side);
            side /= st;
            rest += conv(planes, 4 * planes, 1, side);
            if b == 0 && (stride > 1 || inplanes != 4 * planes) {
                rest += conv(inplanes, 4 * planes, 1, side);
            }
        }
        inplanes = 4 * planes;
    }
    // Attention pooling: the mean token's query, keys and values of all n tokens, its scores
    // and weighted values, the output projection.
    let (e, n) = ((32 * width) as f64, (side * side + 1) as f64);
    rest += 2.0 * e * e + 2.0 * 2.0 * n * e * e + 2.0 * 2.0 * n * e + 2.0 * e * out as f64;
    (first, rest)
}

/// One contrastive training step of `batch` pairs for a CLIP whose image tower is a
/// ModifiedResNet (`layers`, `width`; `s` gives the image size and the text tower): forward,
/// backward, no gradient for the pixels. Attention pooling is the image projection.
pub fn resnet_clip_train_step(
    s: &ClipShape,
    layers: [usize; 4],
    width: usize,
    batch: usize,
) -> f64 {
    let b = batch as f64;
    let p = s.projection_dim as f64;
    let (first, rest) = resnet_forward(s.image_size, layers, width, s.projection_dim);
    let per_pair = rest + s.text_forward() + 2.0 * s.text_width as f64 * p;
    3.0 * (b * per_pair + 2.0 * b * b * p) + 2.0 * b * first
}

/// Embedding `batch` images with the vision tower (forward only, pooled output).
pub fn image_embed(s: &ClipShape, batch: usize) -> f64 {
    batch as f64 * s.image_forward()
}

/// The shapes of a BLIP-2 stage-1 step.
#[derive(Clone, Copy, Debug)]
pub struct QformerShape {
    /// The frozen vision tower and how many of its final layers are left out.
    pub vision: ClipShape,
    pub vision_drop_layers: usize,
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    /// Learned queries, ITC width, caption tokens, vocabulary (with [DEC]).
    pub queries: usize,
    pub embed_dim: usize,
    pub text_len: usize,
    pub vocab: usize,
}

/// One BLIP-2 stage-1 step of `batch` pairs as LAVIS runs it (`blip2_qformer.py`
/// `Blip2Qformer.forward`): the frozen tower; ITC's query pass (cross-attending to the image)
/// and text pass; both similarity products; ITM over 3·batch rows of queries + text, where only
/// query positions cross-attend; ITG with the query pass's keys and values cached, so only the
/// text positions run again, then the LM head. Every Q-Former product is trained (3×), the
/// tower's are not (1×).
pub fn qformer_train_step(s: &QformerShape, batch: usize) -> f64 {
    let b = batch as f64;
    let (d, m, q, l) = (
        s.hidden as f64,
        s.intermediate as f64,
        s.queries as f64,
        s.text_len as f64,
    );
    let tv = s.vision.grid() + 1.0;
    let e = s.vision.vision_width as f64;
    let n = s.layers as f64;
    let tower = s.vision.patch_embed()
        + s.vision
            .vision_layers(s.vision.vision_layers - s.vision_drop_layers);
    let e_dim = s.embed_dim as f64;
    let queries = n * (self_attention(q, d) + cross_attention(q, tv, d, e) + mlp(q, d, m))
        + 2.0 * q * d * e_dim;
    let text = n * (self_attention(l, d) + mlp(l, d, m)) + 2.0 * d * e_dim;
    let sims = 2.0 * (2.0 * b * b * q * e_dim);
    let itm = n * (self_attention(q + l, d) + cross_attention(q, tv, d, e) + mlp(q + l, d, m))
        + 2.0 * q * d * 2.0;
    let itg = n * (2.0 * l * 4.0 * d * d + 4.0 * l * (q + l) * d + mlp(l, d, m))
        + 2.0 * l * d * d
        + 2.0 * l * d * s.vocab as f64;
    b * tower + 3.0 * (b * (queries + text + itg) + 3.0 * b * itm + sims)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-layer tower small enough to count by hand.
    fn unit() -> ClipShape {
        ClipShape {
            image_size: 4,
            patch_size: 2,
            vision_width: 2,
            vision_layers: 1,
            vision_mlp: 4,
            text_width: 2,
            text_layers: 1,
            text_mlp: 4,
            context_length: 3,
            projection_dim: 2,
        }
    }

    #[test]
    fn counts_a_tiny_tower_by_hand() {
        // 4 patches of 3·2·2 = 12 values onto width 2: 2·4·12·2 = 192.
        // 5 tokens: projections 2·5·4·2·2 = 160, scores 4·25·2 = 200, MLP 4·5·2·4 = 160.
        assert_eq!(image_embed(&unit(), 1), 192.0 + 160.0 + 200.0 + 160.0);
        // Text (3 tokens): 2·3·4·4 = 96 + 4·9·2 = 72 + 4·3·2·4 = 96 = 264; projections
        // 2·(2 + 2)·2 = 16; logits of 2 pairs 2·2·2·2 = 16.
        let pair = 160.0 + 200.0 + 160.0 + 264.0 + 16.0;
        assert_eq!(
            clip_train_step(&unit(), 2),
            3.0 * (2.0 * pair + 16.0) + 2.0 * 2.0 * 192.0
        );
    }

    fn torch_count(row: &str) -> f64 {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/bench_flops.json"
        );
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v[row].as_f64().unwrap()
    }

    /// PyTorch's count (tools/reference/make_flop_fixtures.py) of the twins' iterations: the
    /// same products, except that torch's attention backward computes q·kᵀ once more
    /// (5 products where ours counts 4): 2·T²·d per layer and sequence.
    #[test]
    fn agrees_with_pytorchs_flop_counter() {
        let tiny = super::super::clip_shape(&super::super::clip_tiny_bench_spec());
        let recompute =
            |layers: usize, t: usize, d: usize| 64.0 * layers as f64 * 2.0 * (t * t * d) as f64;
        let ours = clip_train_step(&tiny, 64)
            + recompute(4, 65, 256) // vision: 8² patches + [CLS]
            + recompute(4, 32, 256); // text
        for row in ["clip_tiny_train", "siglip_train"] {
            let theirs = torch_count(row);
            assert!(
                (ours - theirs).abs() < 1e-4 * theirs,
                "{row}: {ours} vs {theirs}"
            );
        }
        // open_clip 3.3's attention pooling projects every token's query and output where ours
        // forms the mean token's only (its result), and attends with all 5 queries (counting 5
        // products backward for the 2 forward): per image 3·(8·E² + 8·E·out) for the
        // projections and 100·E + 250·E − 3·20·E for the attention more than ours, E = 512
        // channels, out = 128, 5 tokens (a 2² map and the mean).
        let rn = super::super::clip_tiny_rn_bench_spec();
        let (e, out) = (512.0, 128.0);
        let pool_extra = 64.0 * (24.0 * e * e + 24.0 * e * out + 290.0 * e);
        let ours = resnet_clip_train_step(&super::super::clip_shape(&rn), [1, 1, 1, 1], 16, 64)
            + pool_extra
            + recompute(2, 32, 64);
        let theirs = torch_count("clip_rn_train");
        assert!(
            (ours - theirs).abs() < 1e-6 * theirs,
            "clip_rn_train: {ours} vs {theirs}"
        );
        let b32 = super::super::clip_shape(&super::super::vit_b32_spec());
        assert_eq!(image_embed(&b32, 8), torch_count("vit_b32_embed"));
    }
}
