//! Decoder-only causal language models, BLIP-2 stage 2's frozen LMs (Li et al. 2023, §3.3):
//! OPT (`opt.rs`, transformers' modeling_opt.py) and the Llama family (`llama.rs`,
//! modeling_llama.py; Qwen2 and SmolLM2 share it), under transformers' tensor names, plus
//! llama.cpp's GGUF files (`gguf.rs`).
//!
//! Unlike candle-transformers' LMs these take **input embeddings** (BLIP-2 prepends projected
//! query outputs to the text embeddings), return hidden states at **every** position (the
//! caption loss needs them all), and let the gradient flow back to the embeddings: they are
//! frozen (plain tensors, never variables) but differentiable, built from compositions and our
//! own fused ops with a backward (DESIGN.md §2, "Trap"). One code path serves training and
//! generation: a [`KvCache`] holds each layer's keys and values so that a generated token costs
//! one position.

pub mod config;
pub mod gguf;
pub mod llama;
pub mod opt;

use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

pub use config::{LlamaConfig, LmConfig, OptConfig};
pub use llama::Llama;
pub use opt::Opt;

use crate::nn::mask;
use crate::nn::ops::softmax_last;

/// Keys and values of every layer for the positions seen so far (`[B, kv_heads, T, head_dim]`),
/// and the attention-mask rows over those positions.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    mask: Vec<Vec<u32>>,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self {
            layers: vec![None; layers],
            mask: Vec::new(),
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps rows `rows` (in that order, repeats allowed): beam search's reordering.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        let idx = Tensor::new(rows, &Device::Cpu)?;
        for (k, v) in self.layers.iter_mut().flatten() {
            let i = idx.to_device(k.device())?;
            *k = k.index_select(&i, 0)?;
            *v = v.index_select(&i, 0)?;
        }
        let mut mask = Vec::with_capacity(rows.len());
        for &r in rows {
            let row = self.mask.get(r as usize).ok_or_else(|| {
                candle_core::Error::Msg(format!("cache has no row {r} ({} rows)", self.mask.len()))
            })?;
            mask.push(row.clone());
        }
        self.mask = mask;
        Ok(())
    }

    /// Appends this layer's new keys and values; returns all of them.
    fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[layer];
        let kv = match slot.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        *slot = Some(kv.clone());
        Ok(kv)
    }
}

/// What every layer of one forward call shares: the additive causal mask over cached + new
/// positions, and each new position's index (cumulative count of real tokens − 1, as
/// transformers derives `position_ids` from the attention mask in `generate`; `None` for a
/// padding position, which nothing reads).
pub(crate) struct StepContext {
    pub mask: Tensor,
    pub positions: Vec<Vec<Option<u32>>>,
}

impl StepContext {
    /// Extends the cache's mask rows by `new_mask` (one row per sequence, one entry per new
    /// position) and builds the context; errors when the batch differs from the cache's or the
    /// sequence outgrows `max_positions`.
    pub fn new(
        cache: &mut KvCache,
        new_mask: &[Vec<u32>],
        max_positions: usize,
        device: &Device,
    ) -> Result<Self> {
        let past = cache.len();
        if past > 0 && new_mask.len() != cache.mask.len() {
            candle_core::bail!(
                "batch of {} sequences, the cache holds {}",
                new_mask.len(),
                cache.mask.len()
            );
        }
        if cache.mask.is_empty() {
            cache.mask = vec![Vec::new(); new_mask.len()];
        }
        for (row, new) in cache.mask.iter_mut().zip(new_mask) {
            row.extend_from_slice(new);
        }
        let total = cache.len();
        if total > max_positions {
            candle_core::bail!(
                "sequence of {total} positions exceeds the model's max_position_embeddings \
                 ({max_positions})"
            );
        }
        let positions = cache
            .mask
            .iter()
            .map(|row| {
                let mut seen = 0u32;
                let mut out = Vec::with_capacity(total - past);
                for (j, &m) in row.iter().enumerate() {
                    seen += u32::from(m != 0);
                    if j >= past {
                        out.push((m != 0).then(|| seen - 1));
                    }
                }
                out
            })
            .collect();
        Ok(Self {
            mask: mask::causal(&cache.mask, past, device)?,
            positions,
        })
    }
}

/// Scaled dot-product attention with grouped-query heads: `q` `[B, H, Tq, d]`, `k` and `v`
/// `[B, Hkv, Tk, d]` (query head h reads key/value head h / (H / Hkv), transformers'
/// `repeat_kv`, without copying the keys: the query heads of a group share one matmul), `mask`
/// `[B, 1, Tq, Tk]` additive. Returns `[B, Tq, H·d]`. In a bfloat16 LM the two products run in
/// bfloat16 and the scores are scaled, masked and normalised in float32 (as transformers
/// upcasts its attention softmax).
pub(crate) fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let rep = h / hkv;
    let q = q.contiguous()?.reshape((b, hkv, rep * tq, d))?;
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?
        .reshape((b, hkv, rep, tq, tk))?
        .broadcast_add(&mask.unsqueeze(1)?)?;
    softmax_last(&scores)?
        .to_dtype(v.dtype())?
        .reshape((b, hkv, rep * tq, tk))?
        .matmul(&v.contiguous()?)?
        .reshape((b, h, tq, d))?
        .transpose(1, 2)?
        .reshape((b, tq, h * d))
}

/// Splits `[B, T, heads·d]` into `[B, heads, T, d]`.
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, w) = x.dims3()?;
    x.reshape((b, t, heads, w / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// A projection `[out, in]` with or without a bias (the families differ per projection).
pub(crate) fn proj(
    vb: candle_nn::VarBuilder,
    i: usize,
    o: usize,
    bias: bool,
) -> Result<crate::nn::Linear> {
    if bias {
        crate::nn::linear(i, o, vb)
    } else {
        crate::nn::linear_no_bias(i, o, vb)
    }
}

/// The token embeddings and the LM head of a decoder (one matrix when the head is tied).
#[derive(Clone, Debug)]
pub(crate) struct TokenIo {
    embed_tokens: candle_nn::Embedding,
    lm_head: crate::nn::Linear,
}

impl TokenIo {
    /// `emb` `[vocab, width]`; an untied head is read as `{head}.weight` `[vocab, width]`.
    pub fn new(emb: Tensor, tied: bool, head: candle_nn::VarBuilder) -> Result<Self> {
        let (vocab, width) = emb.dims2()?;
        let lm_head = if tied {
            crate::nn::Linear::new(emb.clone(), None)
        } else {
            crate::nn::linear_no_bias(width, vocab, head)?
        };
        Ok(Self {
            embed_tokens: candle_nn::Embedding::new(emb, width),
            lm_head,
        })
    }
}

/// A frozen decoder LM of any supported family.
#[derive(Clone, Debug)]
pub enum CausalLm {
    Opt(Opt),
    Llama(Llama),
}

impl CausalLm {
    /// Builds the model under transformers' names (`model.*`, `lm_head.*`) from `vb`.
    pub fn new(vb: candle_nn::VarBuilder, cfg: &LmConfig) -> Result<Self> {
        Ok(match cfg {
            LmConfig::Opt(c) => CausalLm::Opt(Opt::new(vb, c)?),
            LmConfig::Llama(c) => CausalLm::Llama(Llama::new(vb, c)?),
        })
    }

    /// Loads an LM model directory (`config.json` + `model.safetensors`, transformers' layout) or
    /// a directory holding one `.gguf` file (llama.cpp's layout, dequantised to float32).
    pub fn load(dir: &Path, device: &Device) -> crate::error::Result<(Self, LmConfig)> {
        Self::load_as(dir, DType::F32, device)
    }

    /// [`CausalLm::load`] with the weights stored in `dtype`. `BF16` halves the frozen LM's
    /// memory, and its layers' products run in bfloat16 while the residual stream, the norms,
    /// the attention softmax, the embeddings handed out and the logits stay float32 (BLIP-2
    /// stage 2 in mixed precision; LAVIS keeps its frozen OPT in float16 likewise).
    pub fn load_as(
        dir: &Path,
        dtype: DType,
        device: &Device,
    ) -> crate::error::Result<(Self, LmConfig)> {
        if let Some(file) = gguf::find(dir)? {
            return gguf::load(&file, dtype, device);
        }
        let md = crate::models::ModelDir::open(dir)?;
        let cfg = md.lm("loading a language model")?.clone();
        let w = md.weights()?;
        // A tied head is the embedding matrix; older checkpoints store it twice.
        let ignored: &[&str] = if cfg.tied() { &["lm_head.weight"] } else { &[] };
        let lm = w.build(dtype, device, ignored, |vb| Self::new(vb, &cfg))?;
        Ok((lm, cfg))
    }

    fn parts(&self) -> (&TokenIo, usize) {
        match self {
            CausalLm::Opt(m) => (&m.io, m.layers.len()),
            CausalLm::Llama(m) => (&m.io, m.layers.len()),
        }
    }

    pub fn layers(&self) -> usize {
        self.parts().1
    }

    /// Token embeddings `[B, T, embed_width]` of `ids` `[B, T]` (u32), float32 whatever the
    /// weights' type.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        use candle_nn::Module;
        self.parts()
            .0
            .embed_tokens
            .forward(ids)?
            .to_dtype(DType::F32)
    }

    /// Final hidden states `[B, T, W]` of `embeds` `[B, T, embed_width]` that follow the
    /// `cache`'s positions; `mask` holds each row's 0/1 attention mask over the `T` new positions.
    /// The cache gains the new keys and values.
    pub fn forward(
        &self,
        embeds: &Tensor,
        mask: &[Vec<u32>],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        match self {
            CausalLm::Opt(m) => m.forward(embeds, mask, cache),
            CausalLm::Llama(m) => m.forward(embeds, mask, cache),
        }
    }

    /// Root mean square of the token-embedding matrix: the scale of the inputs the LM was trained
    /// on.
    pub fn embedding_rms(&self) -> Result<f32> {
        crate::nn::host::f32_of(
            &self
                .parts()
                .0
                .embed_tokens
                .embeddings()
                .to_dtype(DType::F32)?
                .sqr()?
                .mean_all()?
                .sqrt()?,
        )
    }

    /// Vocabulary logits of hidden states `[..., W]` (the LM head), float32: the product runs
    /// in the weights' type (no float32 copy of a bfloat16 head).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        use candle_nn::Module;
        let head = &self.parts().0.lm_head;
        head.forward(&hidden.to_dtype(head.weight().dtype())?)?
            .to_dtype(DType::F32)
    }

    /// An empty cache for this model.
    pub fn cache(&self) -> KvCache {
        KvCache::new(self.layers())
    }
}

impl LmConfig {
    /// Whether the LM head is the token-embedding matrix.
    pub fn tied(&self) -> bool {
        match self {
            LmConfig::Opt(c) => c.tie_word_embeddings,
            LmConfig::Llama(c) => c.tie_word_embeddings,
        }
    }
}
