"""Tokenizer fixture: ids that transformers' CLIPTokenizer (built from open_clip's BPE vocabulary,
independently of assets/clip/tokenizer.json) gives for a few dozen awkward texts, truncated to
77 tokens. Writes tests/fixtures/clip_tokenizer_ids.json.

Run:  .venv/bin/python tools/reference/make_tokenizer_fixture.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from make_clip_tokenizer import bytes_to_unicode  # noqa: E402

import gzip  # noqa: E402

import open_clip  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from common import fixture_path  # noqa: E402

TEXTS = [
    "a photo of a cat",
    "A photo of a CAT.",
    "",
    " ",
    "hello, world!!!",
    "don't you're I'll we've she'd it's",
    "naïve café résumé",
    "Ünïcödé ÀÉÎÕÜ",
    "東京タワーの写真",
    "фотография кошки",
    "صورة قطة",
    "बिल्ली की तस्वीर",
    "🚀🐱 emoji 👍🏽 family 👨‍👩‍👧",
    "x² + y³ = z½",
    "ﬁne ligatures ﬂow",
    "  multiple   spaces\tand\ttabs\nand\nnewlines  ",
    "COVID-19 in 2020/2021: 12345 cases (3.5%)",
    "https://example.com/path?q=1&r=2",
    "<|startoftext|> inside <|endoftext|> text",
    "&amp; &lt;tag&gt; html entities",
    "email me at someone@example.org #hashtag @user",
    "a large red circle on the left and a small blue square at the top",
    "left: a big red circle",
    "a red circle and a small blue square above it",
    "punctuation... --- ;;; ??? !!! ''' \"\"\"",
    "MiXeD CaSe WoRdS",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000",
    "tab\tseparated\tvalues",
    "ß straße STRASSE",
    "İstanbul ıi",
    "a " * 100,
    "the quick brown fox jumps over the lazy dog " * 12,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u00e9 vs e\u0301 (composed vs decomposed)",
]


def main():
    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=77)
    cases = []
    for t in TEXTS:
        ids = tok(t, truncation=True, max_length=77)["input_ids"]
        full = tok(t)["input_ids"]
        cases.append({"text": t, "ids": ids, "truncated": len(full) > 77})
    with open(fixture_path("clip_tokenizer_ids.json"), "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
    print(f"{len(cases)} cases, {sum(c['truncated'] for c in cases)} truncated")


if __name__ == "__main__":
    main()
