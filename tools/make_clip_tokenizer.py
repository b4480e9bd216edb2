"""Build assets/clip/tokenizer.json: the OpenAI CLIP BPE (49408 tokens) as HF `tokenizers` JSON.

The vocabulary ships inside PyPI's open_clip_torch (bpe_simple_vocab_16e6.txt.gz); transformers'
CLIPTokenizer (v5: constructor takes vocab= and merges=) turns it into the fast-tokenizer JSON that
the Rust `tokenizers` crate reads. Run once:  .venv/bin/python tools/make_clip_tokenizer.py
"""

import gzip
import os
import sys

import open_clip
from transformers import CLIPTokenizer

OUT = os.path.join(os.path.dirname(__file__), "..", "assets", "clip", "tokenizer.json")


def bytes_to_unicode():
    """GPT-2 / CLIP byte-to-printable-character table, in the order CLIP's vocabulary uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main():
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    ids = tok("a photo of a cat")["input_ids"]
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407], ids
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tok.backend_tokenizer.save(OUT, pretty=False)
    print(f"wrote {os.path.normpath(OUT)} ({len(vocab)} tokens, {len(merges)} merges)", file=sys.stderr)


if __name__ == "__main__":
    main()
