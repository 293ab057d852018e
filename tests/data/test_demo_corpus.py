"""Checks of the bundled demo corpus and SFT conversation set (aquila/data/demo).

Offline and fast: they read the committed files only. The files are built by
scripts/build_demo_corpus.py; shares are measured in Unicode characters of the
"text" fields.
"""

from __future__ import annotations

import functools
import gzip
import json
import unicodedata
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "aquila" / "data" / "demo"
LANGS = ("zh", "en", "code")
SHARE_RANGES = {"zh": (0.30, 0.50), "en": (0.30, 0.50), "code": (0.10, 0.30)}
MAX_DOC_CHARS = 8000
MAX_EXCHANGE_CHARS = 600


@functools.cache
def records(split: str) -> tuple[dict, ...]:
    with gzip.open(DEMO / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


@functools.cache
def chat() -> tuple[dict, ...]:
    with open(DEMO / "chat.jsonl", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f)


def test_files_exist():
    for name in ("train.jsonl.gz", "valid.jsonl.gz", "chat.jsonl", "NOTICE.md"):
        assert (DEMO / name).is_file(), name


@pytest.mark.parametrize("split", ["train", "valid"])
def test_records_well_formed(split):
    rs = records(split)
    assert rs
    for r in rs:
        assert set(r) == {"text", "source", "lang"}, r.keys()
        assert r["lang"] in LANGS
        assert isinstance(r["text"], str) and r["text"].strip()
        assert isinstance(r["source"], str) and r["source"]
        assert len(r["text"]) <= MAX_DOC_CHARS
        assert unicodedata.is_normalized("NFC", r["text"])
        assert r["text"] == r["text"].strip("\n")


@pytest.mark.parametrize("split", ["train", "valid"])
def test_gzip_is_reproducible(split):
    # no file name and mtime 0 in the header, so rebuilds are byte-identical
    head = (DEMO / f"{split}.jsonl.gz").read_bytes()[:10]
    assert head[:2] == b"\x1f\x8b"
    assert head[3] & 0x08 == 0, "gzip header carries a file name"
    assert head[4:8] == b"\0\0\0\0", "gzip header carries an mtime"


def test_language_shares():
    chars = {lang: 0 for lang in LANGS}
    for split in ("train", "valid"):
        for r in records(split):
            chars[r["lang"]] += len(r["text"])
    total = sum(chars.values())
    for lang, (lo, hi) in SHARE_RANGES.items():
        share = chars[lang] / total
        assert lo <= share <= hi, f"{lang}: {share:.1%} of characters"


def test_train_valid_disjoint_and_deduplicated():
    train = [r["text"] for r in records("train")]
    valid = [r["text"] for r in records("valid")]
    assert len(set(train)) == len(train)
    assert len(set(valid)) == len(valid)
    assert not set(train) & set(valid)


def test_valid_split_size_and_languages():
    n_train, n_valid = len(records("train")), len(records("valid"))
    assert 0.01 <= n_valid / (n_train + n_valid) <= 0.10
    assert {r["lang"] for r in records("valid")} == set(LANGS)
    assert {r["lang"] for r in records("train")} == set(LANGS)


def test_compressed_size():
    total = sum((DEMO / f"{s}.jsonl.gz").stat().st_size for s in ("train", "valid"))
    assert 1_000_000 <= total <= 8_000_000, total


def test_notice_names_every_source():
    notice = (DEMO / "NOTICE.md").read_text(encoding="utf-8")
    packages = {r["source"].split(":", 1)[0] for s in ("train", "valid") for r in records(s)}
    assert len(packages) >= 5
    for p in packages:
        assert p in notice, p
    assert "licence" in notice.lower() or "license" in notice.lower()


def test_chat_format():
    cs = chat()
    assert 300 <= len(cs) <= 600, len(cs)
    ids = [c["id"] for c in cs]
    assert len(set(ids)) == len(ids)
    multi = with_instruction = 0
    for c in cs:
        assert set(c) <= {"id", "conversations", "instruction"}, c.keys()
        assert isinstance(c["id"], str) and c["id"]
        turns = c["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0, c["id"]
        for i, t in enumerate(turns):
            assert set(t) == {"from", "value"}, c["id"]
            assert t["from"] == ("human" if i % 2 == 0 else "gpt"), c["id"]
            assert isinstance(t["value"], str) and t["value"].strip(), c["id"]
        instruction = c.get("instruction", "")
        assert isinstance(instruction, str)
        total = sum(len(t["value"]) for t in turns) + len(instruction)
        assert total <= MAX_EXCHANGE_CHARS, (c["id"], total)
        multi += len(turns) > 2
        with_instruction += bool(instruction)
    assert multi >= 20
    assert with_instruction >= 20


def test_chat_is_bilingual():
    def has_cjk(s):
        return any("\u4e00" <= ch <= "\u9fff" for ch in s)

    zh = sum(1 for c in chat() if has_cjk(c["conversations"][-1]["value"]))
    en = sum(1 for c in chat() if not has_cjk(c["conversations"][-1]["value"]))
    assert zh >= 50 and en >= 50
