"""Token files in Megatron-LM's memory-mapped indexed format (a ``.bin`` and ``.idx`` pair), read and written.

Megatron-LM, Megatron-Core and FlagAI store tokenised corpora this way, so corpora prepared by their tools load here
and files written here load there. The ``.bin`` file is every sequence's tokens back to back, nothing else. The
``.idx`` file is, all little-endian:

    magic            9 bytes   b"MMIDIDX\\x00\\x00"
    version          uint64    1
    dtype code       uint8     1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequences        uint64    N
    document entries uint64    D
    sizes            int32[N]  tokens per sequence
    pointers         int64[N]  byte offset of each sequence in .bin
    document index   int64[D]  0, then the sequence index at which each document ends (0, 1, ..., N when every
                               sequence is a document, as the writer here and Megatron's preprocessing write it)

Reading maps both files instead of loading them, so a corpus larger than memory costs only the pages touched, and
every dataloader worker shares the page cache. Opening checks everything the index claims that can be checked
without reading the tokens (sizes against pointers, pointers against the .bin size, the document index), so a
truncated copy or a .bin paired with the wrong .idx fails at once with the file named, instead of yielding garbage
tokens hours into a run.
"""

import operator
import os
import struct
from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from aquila.files import AtomicFile

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# magic, version, dtype code, number of sequences, number of document-index entries; "<" means no padding.
HEADER = struct.Struct("<9sQBQQ")
DTYPE_OF_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
CODE_OF_DTYPE: dict[np.dtype, int] = {dtype: code for code, dtype in DTYPE_OF_CODE.items()}
MAX_SEQUENCE_LENGTH = np.iinfo(np.int32).max  # sizes are stored as int32


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, malformed or inconsistent; the message names the file."""


def index_file(prefix: str) -> str:
    return f"{prefix}.idx"


def data_file(prefix: str) -> str:
    return f"{prefix}.bin"


def best_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron's preprocessing picks for a vocabulary: uint16 below 65500 ids, else int32."""
    if vocab_size < 1:
        raise ValueError(f"best_dtype: vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def _little_endian(dtype: np.dtype) -> np.dtype:
    # The format is little-endian whatever the machine; on little-endian machines this is the native dtype.
    return dtype.newbyteorder("<")


class IndexedDatasetWriter:
    """Writes a dataset one document at a time; nothing appears under ``prefix`` until finalize succeeds.

    Tokens stream into a temporary .bin beside the target (only the sizes stay in memory); finalize writes the
    temporary .idx and renames the .bin, then the .idx, over the targets. Used as a context manager it finalizes on
    a clean exit and, when the body raises, deletes its temporary files and leaves any existing dataset untouched.
    """

    def __init__(self, prefix: str, dtype: npt.DTypeLike):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE or self.dtype.kind not in "iu":
            integer_dtypes = sorted(str(d) for d in CODE_OF_DTYPE if d.kind in "iu")
            raise ValueError(f"IndexedDatasetWriter: dtype must be one of {integer_dtypes} for token ids, got "
                             f"{self.dtype}")
        self._limits = np.iinfo(self.dtype)
        self._sizes: list[int] = []
        self._data = AtomicFile(data_file(self.prefix), "wb")
        self._state = "open"

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.finalize()

    def _check_open(self, operation: str) -> None:
        if self._state != "open":
            raise RuntimeError(f"IndexedDatasetWriter: cannot {operation} {self.prefix}: the writer is {self._state}")

    def add_document(self, ids: npt.ArrayLike) -> None:
        """Appends one document (a 1-D sequence of integer token ids, possibly empty)."""
        self._check_open("add a document to")
        tokens = self._checked_tokens(ids)
        self._data.file.write(tokens.astype(_little_endian(self.dtype), copy=False).tobytes())
        self._sizes.append(len(tokens))

    def _checked_tokens(self, ids: npt.ArrayLike) -> np.ndarray:
        document = len(self._sizes)
        tokens = np.asarray(ids)
        if tokens.ndim != 1:
            raise ValueError(f"IndexedDatasetWriter: document {document} must be a 1-D sequence of token ids, got "
                             f"shape {tokens.shape}")
        if tokens.size == 0:  # np.asarray([]) is float64; an empty document has no values to check
            return np.empty(0, self.dtype)
        # Python ints too large for int64 arrive as an object array; they are compared exactly below.
        is_integer = tokens.dtype.kind in "iu" or (
            tokens.dtype.kind == "O" and all(isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                                             for value in tokens))
        if not is_integer:
            raise ValueError(f"IndexedDatasetWriter: document {document} must hold integer token ids, got dtype "
                             f"{tokens.dtype}")
        if len(tokens) > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"IndexedDatasetWriter: document {document} has {len(tokens)} tokens; the format stores "
                             f"sizes as int32, at most {MAX_SEQUENCE_LENGTH}")
        out_of_range = (tokens < self._limits.min) | (tokens > self._limits.max)
        if out_of_range.any():
            position = int(np.argmax(out_of_range))
            raise ValueError(f"IndexedDatasetWriter: token id {tokens[position]} at position {position} of document "
                             f"{document} does not fit {self.dtype} (range {self._limits.min}..{self._limits.max})")
        return tokens.astype(self.dtype)

    def finalize(self) -> None:
        """Writes the index and moves both files into place."""
        self._check_open("finalize")
        try:
            sizes = np.asarray(self._sizes, dtype="<i4")
            pointers = np.zeros(len(sizes), dtype="<i8")
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
            pointers *= self.dtype.itemsize
            document_indices = np.arange(len(sizes) + 1, dtype="<i8")  # every document is one sequence
            with AtomicFile(index_file(self.prefix), "wb") as index:
                index.write(HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[self.dtype], len(sizes), len(document_indices)))
                for array in (sizes, pointers, document_indices):
                    index.write(array.tobytes())
                # The .bin first: a crash between the renames leaves a new .bin beside an old (or no) .idx, which the
                # reader's size check rejects, never an index that points into missing data.
                self._data.commit()
        except BaseException:
            self.abort()
            raise
        self._state = "finalized"

    def abort(self) -> None:
        """Discards everything written so far; the target files, if any existed, stay as they were."""
        self._data.discard()
        if self._state == "open":
            self._state = "aborted"


class IndexedDataset:
    """A read-only, memory-mapped view of a .bin/.idx pair: ``dataset[i]`` is sequence i's tokens, without a copy.

    Each sequence is a document when the file was written by IndexedDatasetWriter or Megatron's preprocessing
    (``document_indices`` is then 0, 1, ..., N). Empty sequences are valid in the format; ``empty_documents``
    counts them, and the packing layer skips them.
    """

    def __init__(self, prefix: str):
        self.prefix = os.fspath(prefix)
        self._open()

    def _open(self) -> None:
        index_path, data_path = index_file(self.prefix), data_file(self.prefix)
        for path in (index_path, data_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"IndexedDataset: {path} does not exist (a dataset is the pair "
                                          f"{index_path} and {data_path})")
        index_bytes = os.path.getsize(index_path)
        with open(index_path, "rb") as f:
            header = f.read(HEADER.size)
        if len(header) < HEADER.size:
            raise IndexedDatasetError(f"IndexedDataset: {index_path} is truncated: {index_bytes} bytes, shorter than "
                                      f"the {HEADER.size}-byte header")
        magic, version, code, num_sequences, num_document_entries = HEADER.unpack(header)
        if magic != MAGIC:
            raise IndexedDatasetError(f"IndexedDataset: {index_path} is not a Megatron mmap index: it starts with "
                                      f"{magic!r}, not the magic {MAGIC!r}")
        if version != VERSION:
            raise IndexedDatasetError(f"IndexedDataset: {index_path} has index version {version}; only version "
                                      f"{VERSION} is supported")
        if code not in DTYPE_OF_CODE:
            raise IndexedDatasetError(f"IndexedDataset: {index_path} has dtype code {code}, not one of the known "
                                      f"codes {sorted(DTYPE_OF_CODE)}")
        sizes_offset = HEADER.size
        pointers_offset = sizes_offset + 4 * num_sequences
        documents_offset = pointers_offset + 8 * num_sequences
        expected_bytes = documents_offset + 8 * num_document_entries
        if index_bytes < expected_bytes:
            raise IndexedDatasetError(f"IndexedDataset: {index_path} is truncated: its header announces "
                                      f"{num_sequences} sequences and {num_document_entries} document-index entries, "
                                      f"{expected_bytes} bytes in all, but the file has {index_bytes}")
        if index_bytes > expected_bytes:
            raise IndexedDatasetError(f"IndexedDataset: {index_path} has {index_bytes - expected_bytes} bytes after "
                                      f"its document index (the sequence modes of a multimodal index are not "
                                      f"supported)")
        self._dtype = DTYPE_OF_CODE[code]
        self._stored_dtype = _little_endian(self._dtype)
        self._index_map = np.memmap(index_path, dtype=np.uint8, mode="r")
        self._sizes = np.frombuffer(self._index_map, dtype="<i4", count=num_sequences, offset=sizes_offset)
        self._pointers = np.frombuffer(self._index_map, dtype="<i8", count=num_sequences, offset=pointers_offset)
        self._document_indices = np.frombuffer(self._index_map, dtype="<i8", count=num_document_entries,
                                               offset=documents_offset)
        self._check_index(index_path)
        data_bytes = os.path.getsize(data_path)
        expected_data_bytes = int(self._sizes.sum(dtype=np.int64)) * self._dtype.itemsize
        if data_bytes != expected_data_bytes:
            raise IndexedDatasetError(
                f"IndexedDataset: {data_path} has {data_bytes} bytes, but {index_path} describes "
                f"{expected_data_bytes} ({num_sequences} sequences of {self._dtype}): the .bin is truncated or is not "
                f"the one this index was written with")
        # A zero-length file cannot be mapped; an empty buffer serves the (necessarily empty) sequences.
        self._data = np.memmap(data_path, dtype=np.uint8, mode="r") if data_bytes else np.empty(0, np.uint8)

    def _check_index(self, index_path: str) -> None:
        sizes, pointers, documents = self._sizes, self._pointers, self._document_indices
        if (sizes < 0).any():
            sequence = int(np.argmax(sizes < 0))
            raise IndexedDatasetError(f"IndexedDataset: {index_path}: sequence {sequence} has negative size "
                                      f"{sizes[sequence]}")
        expected_pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], dtype=np.int64, out=expected_pointers[1:])
        expected_pointers *= self._dtype.itemsize
        mismatched = pointers != expected_pointers
        if mismatched.any():
            sequence = int(np.argmax(mismatched))
            raise IndexedDatasetError(f"IndexedDataset: {index_path}: sequence {sequence} starts at byte "
                                      f"{pointers[sequence]} of the .bin, but the sizes before it put it at byte "
                                      f"{expected_pointers[sequence]}")
        if len(documents) == 0 or documents[0] != 0:
            first = documents[0] if len(documents) else "nothing"
            raise IndexedDatasetError(f"IndexedDataset: {index_path}: the document index must start with 0, it "
                                      f"starts with {first}")
        if (np.diff(documents) < 0).any() or documents[-1] > len(sizes):
            raise IndexedDatasetError(f"IndexedDataset: {index_path}: the document index must be non-decreasing "
                                      f"sequence indices within 0..{len(sizes)}, got {self._summary(documents)}")

    @staticmethod
    def _summary(array: np.ndarray) -> str:
        return np.array2string(np.asarray(array), threshold=12, separator=", ")

    def __getstate__(self) -> dict[str, Any]:
        # Dataloader workers started by spawn get the prefix and map the files themselves, rather than a pickled
        # copy of every token.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.prefix = state["prefix"]
        self._open()

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.get(index)

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens offset .. offset + length of sequence ``index`` (to its end when length is None), as a read-only
        view of the mapped .bin."""
        index = operator.index(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"IndexedDataset: sequence {index} is out of range for {len(self)} sequences in "
                             f"{self.prefix}")
        index %= len(self)
        size = int(self._sizes[index])
        if length is None:
            length = size - offset
        if not 0 <= offset <= size or not 0 <= length <= size - offset:
            raise IndexError(f"IndexedDataset: tokens {offset}..{offset + length} are out of range for sequence "
                             f"{index} of {size} tokens in {self.prefix}")
        start = int(self._pointers[index]) + offset * self._dtype.itemsize
        return np.frombuffer(self._data, dtype=self._stored_dtype, count=length, offset=start)

    @property
    def sizes(self) -> np.ndarray:
        """Tokens per sequence, int32 [N] (read-only)."""
        return self._sizes

    @property
    def document_indices(self) -> np.ndarray:
        """int64 [D]: 0, then the sequence index at which each document ends."""
        return self._document_indices

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def empty_documents(self) -> int:
        """How many sequences have no tokens."""
        return int(np.count_nonzero(self._sizes == 0))

    @property
    def token_array(self) -> np.ndarray:
        """Every token of the dataset, memory-mapped (no copy), in file order."""
        return self._data[:self.num_tokens * self._dtype.itemsize].view(_little_endian(self._dtype))

    @property
    def num_tokens(self) -> int:
        return int(self._sizes.sum(dtype=np.int64))
