"""Reading text documents from disk: JSON lines (one object per line, the text under a key) or plain text files
(the whole file is one document), optionally gzip- or xz-compressed. Malformed input is reported with the file name
and line number, so a bad record never surfaces later as a crash in training."""

import gzip
import json
import lzma
import os
from collections.abc import Iterable, Iterator
from typing import IO


def open_text(path: str) -> IO[str]:
    """A text handle on path, decompressing .gz and .xz transparently."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def is_json_lines(path: str) -> bool:
    stem = path.removesuffix(".gz").removesuffix(".xz")
    return stem.endswith((".jsonl", ".json"))


def read_json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a ValueError naming
    the file and line."""
    with open_text(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def read_documents(paths: Iterable[str], key: str = "text") -> Iterator[str]:
    """The documents of each file in order: record[key] of JSON lines files, the whole text of other files."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such input file: {path}")
        if not is_json_lines(path):
            with open_text(path) as handle:
                yield handle.read()
            continue
        for number, record in read_json_lines(path):
            text = record.get(key)
            if not isinstance(text, str):
                found = "missing" if text is None else f"a {type(text).__name__}"
                raise ValueError(f"{path}:{number}: key {key!r} must hold a string, it is {found}")
            yield text
