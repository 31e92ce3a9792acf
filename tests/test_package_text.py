"""Code, technical and legal text from installed packages: documents of 256-512 tokens, stable splits."""

from __future__ import annotations

import pytest

from engines import MODEL
from steer_workbench import package_text as pt


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL)


def test_chunks_are_256_to_512_tokens_and_cut_at_lines(tokenizer):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}\n" for i in range(400))
    pieces = pt.chunk(tokenizer, text)
    sizes = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    assert all(256 <= n <= 512 for n in sizes[:-1]) and 64 <= sizes[-1] <= 512
    assert all(p.endswith("\n") for p in pieces) and "".join(pieces) in text


def test_licences_deduplicated_and_splits_stable(tokenizer):
    files = pt.licence_files()
    if not files:
        pytest.skip("no Debian licence files on this machine")
    paragraphs = [" ".join(p.split()) for _, text in files for p in text.split("\n\n")]
    assert len(paragraphs) == len(set(paragraphs))
    docs = pt.documents(tokenizer, "legal", files[:20])
    assert docs and {d.split for d in docs} <= {"train", "heldout"}
    by_file = {}
    for d in docs:
        by_file.setdefault(d.id.rsplit(":", 1)[0], set()).add(d.split)
    assert all(len(s) == 1 for s in by_file.values())  # a file's chunks stay on one side
    assert pt.split_of("stdlib/json/decoder.py") == pt.split_of("stdlib/json/decoder.py")
    names = [f"f{i}" for i in range(2000)]
    assert 0.03 < sum(pt.split_of(n) == "heldout" for n in names) / len(names) < 0.07
