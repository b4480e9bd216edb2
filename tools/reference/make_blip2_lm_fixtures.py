"""BLIP-2 stage-2 parity fixtures: tiny random Blip2ForConditionalGeneration directories as
transformers 5 writes them (config.json, model.safetensors, tokenizer.json, processor_config.json
with the image processor inside), one over an OPT decoder and one over a Llama decoder, with a
byte-level BPE tokenizer trained here on shape captions plus the `<image>` token.

Writes tests/fixtures/blip2-{opt,llama}/, tests/fixtures/blip2-{opt,llama}-lm/ (the language model
alone with the tokenizer: a frozen LM for the stage-2 training tests) and tests/fixtures/blip2-{opt,llama}.reference.safetensors:

  pixel_values           [2, 3, S, S]: the processor on two random 40x36 RGB images, saved as
                         tests/fixtures/blip2-{opt,llama}-images/{0,1}.png
  language_model_inputs  language_projection(query_output)                         [2, Q, W]
  input_ids, attention_mask   the processor's layout: Q `<image>` tokens, then the tokenizer's
                         left-padded BOS + prompt (row 1 is shorter: its padding sits between
                         the image tokens and BOS)
  logits                 Blip2ForConditionalGeneration(pixel_values, input_ids, mask).logits,
                         with position_ids from the mask (cumsum − 1) as `generate` derives them
                         (a Llama forward without them counts padding positions)
  generated_ids          generate(...) greedy, 6 new tokens, no eos (the new tokens only)
  bare_generated_ids     generate(pixel_values) with no prompt: [<image> x Q, BOS] start
  legacy_ids, legacy_mask     BOS + prompt tokens, no image tokens, left-padded
  legacy_logits          language_model(inputs_embeds = [projected queries; embed(ids)])
                         (LAVIS blip2_opt.py / transformers <= 4.46 layout)
  legacy_generated_ids   language_model.generate(inputs_embeds=..., 6 new tokens)

Run:  .venv/bin/python tools/reference/make_blip2_lm_fixtures.py
"""

import json
import os

import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
)

from common import fixture_path, perturb_

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "grey"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "diamond"]
PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the centre"]


def corpus():
    out = []
    for c in COLOURS:
        for s in SHAPES:
            for p in PLACES:
                out.append(f"a photo of a {c} {s} {p}")
                out.append(f"Question: what colour is the {s}? Answer: {c}")
    return out


def tokenizer():
    """Byte-level BPE, 300 entries: <pad> 0, </s> 1 (BOS and EOS, as OPT's), then bytes and merges;
    `<image>` appended at 300 as transformers' BLIP-2 processor adds it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert fast.convert_tokens_to_ids("<image>") == 300, fast.convert_tokens_to_ids("<image>")
    return fast


VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    image_size=28, patch_size=14, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
)
QFORMER = dict(
    vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=48, max_position_embeddings=32, cross_attention_frequency=1,
    use_qformer_text_input=False,
)
TEXT = {
    "blip2-opt": OPTConfig(
        vocab_size=301, hidden_size=32, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
        eos_token_id=1,
    ),
    "blip2-llama": LlamaConfig(
        vocab_size=301, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=1, head_dim=6,
    ),
}
QUERIES = 4


def greedy(gen, n, **kw):
    return gen(**kw, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n,
               eos_token_id=None, pad_token_id=0)


def build(name, seed):
    tok = tokenizer()
    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=VISION, qformer_config=QFORMER, text_config=TEXT[name].to_dict(),
        num_query_tokens=QUERIES, image_token_index=300,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    perturb_(model, seed + 1, scale=0.2)
    image_processor = BlipImageProcessor(
        size={"height": 28, "width": 28}, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3],
    )
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=QUERIES)
    out_dir = os.path.dirname(fixture_path(name, "config.json"))
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # The language model alone with its tokenizer: a frozen LM for stage-2 training tests.
    lm_dir = os.path.dirname(fixture_path(f"{name}-lm", "config.json"))
    model.language_model.save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)

    g = torch.Generator().manual_seed(seed + 2)
    images = [
        Image.fromarray(torch.randint(0, 256, (36, 40, 3), generator=g).to(torch.uint8).numpy())
        for _ in range(2)
    ]
    for i, im in enumerate(images):
        im.save(fixture_path(f"{name}-images", f"{i}.png"))
    prompts = ["a photo of a", "a"]
    enc = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    ids, mask, pixels = enc["input_ids"], enc["attention_mask"], enc["pixel_values"]
    assert (ids[:, :QUERIES] == 300).all(), ids
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    legacy = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        proj = model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        logits = model(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, position_ids=positions
        ).logits
        gen = greedy(model.generate, 6, pixel_values=pixels, input_ids=ids, attention_mask=mask)
        gen = gen[:, ids.shape[1]:] if gen.shape[1] > 6 else gen
        bare = greedy(model.generate, 5, pixel_values=pixels)
        bare = bare[:, QUERIES + 1:] if bare.shape[1] > 5 else bare
        emb = model.get_input_embeddings()(legacy.input_ids)
        # Left padding sits before the queries in the legacy layout: pad rows, then queries.
        lmask = torch.cat([torch.ones(2, QUERIES, dtype=torch.long), legacy.attention_mask], 1)
        lemb = torch.cat([proj, emb], 1)
        pad = (legacy.attention_mask == 0).sum(1)
        for r in range(2):
            if pad[r] > 0:
                k = int(pad[r])
                lemb[r] = torch.cat([emb[r, :k], proj[r], emb[r, k:]], 0)
                lmask[r] = torch.cat([torch.zeros(k, dtype=torch.long), torch.ones(QUERIES + legacy.input_ids.shape[1] - k, dtype=torch.long)])
        lpos = (lmask.cumsum(-1) - 1).masked_fill(lmask == 0, 1)
        llogits = model.language_model(
            inputs_embeds=lemb, attention_mask=lmask, position_ids=lpos
        ).logits
        lgen = greedy(model.language_model.generate, 6, inputs_embeds=lemb, attention_mask=lmask)
    save_file(
        {
            "pixel_values": pixels.contiguous(),
            "language_model_inputs": proj.contiguous(),
            "input_ids": ids.to(torch.int64).contiguous(),
            "attention_mask": mask.to(torch.int64).contiguous(),
            "logits": logits.contiguous(),
            "generated_ids": gen.to(torch.int64).contiguous(),
            "bare_generated_ids": bare.to(torch.int64).contiguous(),
            "legacy_ids": legacy.input_ids.to(torch.int64).contiguous(),
            "legacy_mask": legacy.attention_mask.to(torch.int64).contiguous(),
            "legacy_embeds_mask": lmask.to(torch.int64).contiguous(),
            "legacy_logits": llogits.contiguous(),
            "legacy_generated_ids": lgen.to(torch.int64).contiguous(),
        },
        fixture_path(f"{name}.reference.safetensors"),
    )
    print(name, "ids", ids.tolist(), "gen", gen.tolist(), "bare", bare.tolist(), "legacy", lgen.tolist())
    print(" decoded:", [tok.decode(x) for x in gen])


def main():
    for i, name in enumerate(TEXT):
        build(name, 300 + 10 * i)


if __name__ == "__main__":
    main()
