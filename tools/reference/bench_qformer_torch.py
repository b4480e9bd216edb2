"""The PyTorch twin of vlalign's BLIP-2 stage-1 (Q-Former) training step, for the speed benchmark:
qformer-tiny (hidden 128, 4 layers, 4 heads, intermediate 512, cross-attention in every layer,
8 queries, ITC width 64, exact GELU, LayerNorm eps 1e-12, 32 text positions, the shapes
vocabulary + [DEC] = 55 ids) on the frozen clip-tiny vision tower (64², patch 16, width 128,
quick_gelu) cut to its first 2 of 3 layers (vision_drop_layers = 1). One step over 32 random
images (3×64×64 in [-2, 2)) and 32 full-length captions (no padding): ITC + ITM + ITG, backward,
AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.05 on matrices other than embedding
tables and the queries), then the temperature clamped to [0.001, 0.5]. Prints one JSON line:
the median step time in ms, every timed step, the step's FLOPs counted by
torch.utils.flop_counter.FlopCounterMode (forward + backward; AdamW's element-wise work is not
counted) and the peak resident memory of the timed loop (VmHWM after resetting it).

It follows LAVIS's `Blip2Qformer.forward` (salesforce/LAVIS
lavis/models/blip2_models/blip2_qformer.py): one autograd graph per step with four Q-Former
passes — the queries alone cross-attending to the image (ITC image side), the text alone (ITC
text side, [CLS]), 3B query+text rows with a bidirectional mask (ITM: positives, a hard-negative
image per text, a hard-negative text per image, drawn with torch.multinomial from the softmax of
the ITC similarities with the positives masked out), and the decoder pass (ITG: [DEC] replaces
the first token; queries see queries, text sees every query and the text up to itself). The
Q-Former is transformers' `Blip2QFormerModel` and its text input `Blip2TextEmbeddings` (word +
position embeddings; the Q-Former's own `layernorm` normalises queries and text together, as
LAVIS's BertEmbeddings does); the vision tower is transformers' `CLIPVisionModel` (pre_layrnorm,
2 layers, its `last_hidden_state` before post_layernorm), then `ln_vision`, a new trained
LayerNorm (eps 1e-5). The ITG head is BERT's LM prediction head (dense, GELU, LayerNorm, decoder
tied to the word embeddings, own bias), written out here because the decoder must be tied.
Losses as vlalign's src/objectives: ITC symmetric cross-entropy of max-over-queries cosine / temp
with label smoothing 0.1; ITM plain cross-entropy, labels [1]*B + [0]*2B, logits = itm_head
averaged over the query outputs; ITG shifted cross-entropy with label smoothing 0.1, mean over the
predicted tokens.

How it differs from the Rust step (src/train/tasks/qformer):
- vlalign computes the same gradient with a gradient-cache two-pass scheme: pass 1 computes the
  ITC features without a graph, takes the ITC loss and its feature gradients, and draws the hard
  negatives; pass 2 recomputes the ITC features with a graph in 2 parallel shards (threads) and
  backpropagates feature · cached gradient plus each shard's ITM and ITG rows. So vlalign runs
  the ITC query and text passes twice (once without backward); this twin runs them once, the plain
  LAVIS one-graph step a LAVIS user would run, with intra-op threads instead of shards.
- ITG runs the queries again (the [B, 40, 40] multimodal causal mask over queries + text, given
  to the Q-Former as an additive [B, 1, 40, 40] mask), as vlalign does. LAVIS instead feeds the
  query pass's cached keys and values (`past_key_values`) to the decoder, so only the 32 text
  positions run there; transformers' Blip2QFormerModel has no such cache. The extra query rows
  of the ITG pass are counted in qformer_gflop here, and are not in the LAVIS count of
  src/apps/bench/flops.rs.
- Hard negatives: one vectorised torch.multinomial over the rows (LAVIS loops over rows calling
  it once per row) from the softmax with the positive masked to -10000 (current LAVIS; an older
  LAVIS adds 1e-4 to the softmax and then zeroes the positive). vlalign draws from the same
  distributions with its own RNG and also never draws a caption known to be true of its image,
  which random data does not have.
- No dropout (LAVIS's BERT config has 0.1; vlalign has none). The temperature is clamped after
  the optimiser step, as vlalign does (LAVIS clamps at the start of forward: the same sequence).
- Random initial weights (HF's initialisers); the timing does not depend on them.

Run:  .venv/bin/python tools/reference/bench_qformer_torch.py [--threads 2] [--warmup 3] [--iters 20]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

# configs/qformer-tiny.toml and configs/clip-tiny.toml [model].
BATCH = 32
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 128, 4, 4, 512
CROSS_FREQ, QUERIES, EMBED_DIM, TEXT_LEN = 1, 8, 64, 32
IMAGE, PATCH, VISION_WIDTH, VISION_LAYERS, VISION_HEADS, VISION_MLP = 64, 16, 128, 3, 4, 512
VISION_DROP_LAYERS = 1
# The shapes word-level tokenizer (src/data/shapes.rs `vocabulary`, src/data/text.rs): 4 specials
# (0 pad, 1 unk, 2 start, 3 end) + 50 words = 54 ids; [DEC] is appended as id 54.
SHAPES_VOCAB = 54
VOCAB = SHAPES_VOCAB + 1
PAD, CLS, SEP, DEC = 0, 2, 3, SHAPES_VOCAB
# src/objectives/itc.rs.
TEMP_INIT, TEMP_MIN, TEMP_MAX, LABEL_SMOOTHING = 0.07, 0.001, 0.5, 0.1
# [train] of configs/qformer-tiny.toml (constant lr: the schedule costs nothing).
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.05


class LmHead(nn.Module):
    """BERT's `BertLMPredictionHead` (LAVIS `cls.predictions`): dense, GELU, LayerNorm, then the
    word embeddings (tied) plus a bias."""

    def __init__(self, words: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, HIDDEN)
        self.layer_norm = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.words = words
        self.bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, x):
        x = self.layer_norm(F.gelu(self.dense(x)))
        return x @ self.words.weight.t() + self.bias


class Stage1(nn.Module):
    """LAVIS `Blip2Qformer`'s trained parts: ln_vision, the queries, the Q-Former, its text
    embeddings, the ITC projections, the ITM and ITG heads and the temperature."""

    def __init__(self):
        super().__init__()
        cfg = Blip2QFormerConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, hidden_act="gelu",
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=TEXT_LEN, layer_norm_eps=1e-12, pad_token_id=PAD,
            cross_attention_frequency=CROSS_FREQ, encoder_hidden_size=VISION_WIDTH,
            use_qformer_text_input=True,
        )
        self.ln_vision = nn.LayerNorm(VISION_WIDTH, eps=1e-5)
        self.query_tokens = nn.Parameter(torch.randn(1, QUERIES, HIDDEN) * 0.02)
        self.qformer = Blip2QFormerModel(cfg)
        self.embeddings = Blip2TextEmbeddings(cfg)
        nn.init.normal_(self.embeddings.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.embeddings.position_embeddings.weight, std=0.02)
        self.vision_proj = nn.Linear(HIDDEN, EMBED_DIM)
        self.text_proj = nn.Linear(HIDDEN, EMBED_DIM)
        self.itm_head = nn.Linear(HIDDEN, 2)
        self.lm_head = LmHead(self.embeddings.word_embeddings)
        self.temp = nn.Parameter(TEMP_INIT * torch.ones([]))

    def queries(self, b):
        return self.query_tokens.expand(b, -1, -1)

    def forward(self, hidden, ids):
        """ITC + ITM + ITG of one batch: `hidden` the frozen tower's features, `ids` [B, T]."""
        b, t = ids.shape
        image = self.ln_vision(hidden)
        ones = torch.ones(b, t, dtype=torch.long)

        # ITC: the queries alone over the image; the text alone, its [CLS].
        q_out = self.qformer(query_embeds=self.queries(b), query_length=QUERIES,
                             encoder_hidden_states=image).last_hidden_state
        image_feats = F.normalize(self.vision_proj(q_out), dim=-1)  # [B, Q, D]
        t_out = self.qformer(query_embeds=self.embeddings(input_ids=ids), query_length=0,
                             attention_mask=ones).last_hidden_state
        text_feat = F.normalize(self.text_proj(t_out[:, 0]), dim=-1)  # [B, D]
        sim_i2t = torch.einsum("iqd,jd->ijq", image_feats, text_feat).amax(-1) / self.temp
        sim_t2i = torch.einsum("jd,iqd->jiq", text_feat, image_feats).amax(-1) / self.temp
        targets = torch.arange(b)
        itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
               + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)) / 2

        # ITM: a hard-negative image per text and a hard-negative text per image.
        with torch.no_grad():
            eye = torch.eye(b, dtype=torch.bool)
            w_t2i = F.softmax(sim_t2i.masked_fill(eye, -10000.0), dim=1)
            w_i2t = F.softmax(sim_i2t.masked_fill(eye, -10000.0), dim=1)
            neg_image = torch.multinomial(w_t2i, 1).squeeze(1)
            neg_text = torch.multinomial(w_i2t, 1).squeeze(1)
        ids_all = torch.cat([ids, ids, ids[neg_text]], dim=0)  # pos, pos, neg
        image_all = torch.cat([image, image[neg_image], image], dim=0)  # pos, neg, pos
        mask_all = torch.ones(3 * b, QUERIES + t, dtype=torch.long)
        vl = self.qformer(
            query_embeds=self.embeddings(input_ids=ids_all, query_embeds=self.queries(3 * b)),
            query_length=QUERIES, attention_mask=mask_all, encoder_hidden_states=image_all,
        ).last_hidden_state[:, :QUERIES]
        logits = self.itm_head(vl).mean(dim=1)
        labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
        itm = F.cross_entropy(logits, labels)

        # ITG: [DEC] first; queries see queries, text sees every query and the text up to itself.
        dec = ids.clone()
        dec[:, 0] = DEC
        lm_labels = dec.masked_fill(dec == PAD, -100)
        n = QUERIES + t
        allowed = torch.zeros(n, n, dtype=torch.bool)
        allowed[:, :QUERIES] = True
        allowed[QUERIES:, QUERIES:] = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = allowed.expand(b, n, n)  # the [B, Q+T, Q+T] multimodal causal mask
        additive = torch.zeros(b, 1, n, n).masked_fill(~allowed.unsqueeze(1),
                                                       torch.finfo(torch.float32).min)
        h = self.qformer(
            query_embeds=self.embeddings(input_ids=dec, query_embeds=self.queries(b)),
            query_length=QUERIES, attention_mask=additive, encoder_hidden_states=image,
        ).last_hidden_state[:, QUERIES:]
        scores = self.lm_head(h)[:, :-1]
        itg = F.cross_entropy(scores.reshape(-1, VOCAB), lm_labels[:, 1:].reshape(-1),
                              ignore_index=-100, label_smoothing=LABEL_SMOOTHING)
        return itc + itm + itg


def vision_tower():
    """clip-tiny's vision tower without its last `VISION_DROP_LAYERS` layers, frozen."""
    cfg = CLIPVisionConfig(
        hidden_size=VISION_WIDTH, intermediate_size=VISION_MLP,
        num_hidden_layers=VISION_LAYERS - VISION_DROP_LAYERS, num_attention_heads=VISION_HEADS,
        image_size=IMAGE, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    )
    tower = CLIPVisionModel(cfg).eval()
    tower.requires_grad_(False)
    return tower


def param_groups(model):
    """Decay matrices only: not biases, norms, embedding tables, the queries or the temperature
    (vlalign's src/train/optim.rs `decays`)."""
    tables = ("word_embeddings", "position_embeddings", "query_tokens")
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not any(t in name for t in tables) else rest).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


def peak_rss_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def qformer_setup(threads=2):
    """The twin's model, optimiser and batch; returns the function of one step (its loss)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tower = vision_tower()
    model = Stage1().train()
    opt = torch.optim.AdamW(param_groups(model), lr=LR, betas=BETAS, eps=EPS)
    pixels = torch.rand(BATCH, 3, IMAGE, IMAGE) * 4.0 - 2.0
    ids = torch.randint(4, SHAPES_VOCAB, (BATCH, TEXT_LEN))
    ids[:, 0], ids[:, -1] = CLS, SEP

    def step():
        with torch.no_grad():
            hidden = tower(pixel_values=pixels).last_hidden_state  # before post_layernorm
        loss = model(hidden, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.temp.clamp_(TEMP_MIN, TEMP_MAX)
        return loss

    return step


def qformer_step_bench(threads=2, warmup=3, iters=20):
    step = qformer_setup(threads)
    counter = FlopCounterMode(display=False)
    with counter:
        loss = step()
    if not torch.isfinite(loss):
        raise RuntimeError(f"the step's loss is {loss.item()}")
    gflop = counter.get_total_flops() / 1e9

    for _ in range(warmup):
        step()
    peak_rss_reset()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    peak = peak_rss_mb()
    return {
        "threads": threads,
        "torch": torch.__version__,
        "vocab": VOCAB,
        "qformer_step_ms": statistics.median(times),
        "qformer_step_ms_all": times,
        "qformer_gflop": gflop,
        "qformer_peak_rss_mb": peak,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    print(json.dumps(qformer_step_bench(a.threads, a.warmup, a.iters)))


if __name__ == "__main__":
    main()
