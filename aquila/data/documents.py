"""Reading text documents from disk: JSON lines (one object per line, the text under a key) or plain text files
(the whole file is one document), optionally gzip- or xz-compressed. Malformed input is reported with the file name
and line number, so a bad record never surfaces later as a crash in training."""

import gzip
import json
import lzma
import os
import zlib
from collections.abc import Iterable, Iterator
from typing import IO

# What reading a corrupt or truncated compressed file, or a file that is not UTF-8, raises.
UNREADABLE = (gzip.BadGzipFile, EOFError, zlib.error, lzma.LZMAError, UnicodeDecodeError)


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


def _unreadable(path: str, error: Exception, lines_read: int) -> ValueError:
    if isinstance(error, UnicodeDecodeError):
        problem = f"not UTF-8 text ({error.reason})"
    else:
        compression = "gzip" if path.endswith(".gz") else "xz" if path.endswith(".xz") else "compressed"
        problem = f"corrupt or truncated {compression} data ({error})"
    return ValueError(f"{path}: {problem}{f' after line {lines_read}' if lines_read else ''}")


def _lines(path: str, handle: IO[str]) -> Iterator[str]:
    """The lines of handle; a decompression or decoding error is a ValueError naming the file and the last good
    line."""
    number = 0
    while True:
        try:
            line = handle.readline()
        except UNREADABLE as error:
            raise _unreadable(path, error, number) from None
        if not line:
            return
        number += 1
        yield line


def read_text(path: str) -> str:
    """The whole text of a (compressed) file; a decompression or decoding error is a ValueError naming the file."""
    with open_text(path) as handle:
        try:
            return handle.read()
        except UNREADABLE as error:
            raise _unreadable(path, error, 0) from None


def read_json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object, or data that does not
    decompress or decode, is a ValueError naming the file and line."""
    with open_text(path) as handle:
        for number, line in enumerate(_lines(path, handle), 1):
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
            yield read_text(path)
            continue
        for number, record in read_json_lines(path):
            text = record.get(key)
            if not isinstance(text, str):
                found = "missing" if text is None else f"a {type(text).__name__}"
                raise ValueError(f"{path}:{number}: key {key!r} must hold a string, it is {found}")
            yield text
