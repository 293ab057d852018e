"""Fixed-length pretraining samples packed from documents, GPT style, with the document boundaries kept.

PackedDataset lays the documents end to end, one shuffled epoch after another (each epoch shuffled afresh), and cuts
the stream into samples of seq_len + 1 tokens, consecutive samples sharing one token: sample j is stream tokens
j * seq_len .. (j + 1) * seq_len inclusive, its first seq_len tokens the inputs and its last seq_len the targets.
Nothing is padded and no token is dropped, as in Megatron-LM. The samples are then visited in a shuffled order.

Unlike a plain GPT stream, each sample also says where its documents start (``positions``, ``doc_lengths``), so that
attention stays inside a document (the model's packed path, through cu_seqlens) and every document sees position
ids from 0. A row always starts a new sequence: the tail of a document cut at the start of a sample is attended to
as a sequence of its own, from position 0.

The index behind this (the document order, where each sample starts, the sample order) is built with vectorised
numpy and cached as .npy files named by a hash of everything it depends on, so a restarted run finds it, and any
change of dataset, document subset or parameter gets its own.

BlendedDataset mixes several datasets in given proportions; split_documents splits a corpus's documents into
training and validation; collate stacks samples into the batch Aquila.forward takes.
"""

import hashlib
import json
import os
from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from aquila.data.indexed import IndexedDataset
from aquila.files import AtomicFile

# Part of every cache key: raise it when the meaning of the cached arrays changes, so old caches are not reused.
INDEX_FORMAT = 1
CACHED_ARRAYS = ("document_order", "sample_index", "shuffle_index")
# Blending compares targets and deadlines up to this relative difference, so that exact ties, which are common, break
# by dataset order whatever the rounding: weights 6:3:1 and 0.6:0.3:0.1 give the same sequence.
TIE_TOLERANCE = 1e-9


class PackingIndex(NamedTuple):
    document_order: np.ndarray  # [stream documents]: document ids in stream order, epoch after epoch
    sample_index: np.ndarray  # [num_samples + 1, 2]: (stream document, token offset in it) where sample j starts
    shuffle_index: np.ndarray  # [num_samples]: the stream sample read for dataset item i


def _compact(array: np.ndarray) -> np.ndarray:
    """int32 when the values fit, to halve the memory of indices over billions of tokens."""
    if array.size == 0 or (array.min() >= np.iinfo(np.int32).min and array.max() <= np.iinfo(np.int32).max):
        return array.astype(np.int32)
    return array.astype(np.int64)


def build_packing_index(document_ids: np.ndarray, document_lengths: np.ndarray, seq_len: int, num_samples: int,
                        seed: int) -> PackingIndex:
    """The packing of documents (ids and their token counts, all positive) into num_samples samples of seq_len + 1
    tokens: as many epochs as that takes, each a new permutation of the documents, the last one cut after the
    document holding the final token."""
    tokens_needed = num_samples * seq_len + 1  # the last sample's final target included
    tokens_per_epoch = int(document_lengths.sum())
    num_epochs = -(-tokens_needed // tokens_per_epoch)
    generator = np.random.default_rng(seed)
    epochs = np.broadcast_to(np.arange(len(document_ids)), (num_epochs, len(document_ids)))
    stream = generator.permuted(epochs, axis=1).ravel()  # positions into document_ids, shuffled per epoch
    stream_ends = np.cumsum(document_lengths[stream], dtype=np.int64)
    stream = stream[:np.searchsorted(stream_ends, tokens_needed - 1, side="right") + 1]
    stream_ends = stream_ends[:len(stream)]
    sample_starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    # The stream document holding token t is the first whose end is past t.
    start_documents = np.searchsorted(stream_ends, sample_starts, side="right")
    start_offsets = sample_starts - (stream_ends[start_documents] - document_lengths[stream[start_documents]])
    sample_index = _compact(np.stack([start_documents, start_offsets], axis=1))
    shuffle_index = _compact(generator.permutation(num_samples))
    return PackingIndex(_compact(document_ids[stream]), sample_index, shuffle_index)


def _checked_positive_int(owner: str, name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


class PackedDataset(torch.utils.data.Dataset):
    """num_samples samples of seq_len + 1 tokens packed from an IndexedDataset's documents (``documents``: a subset
    of its document ids, all by default; empty documents are skipped). A document is one sequence of the
    IndexedDataset, as Megatron's GPT dataset takes it. With eos_id, that token is appended to every document, for
    corpora written without an end-of-document token.

    Item i is a dict: ``tokens`` int64 [seq_len + 1]; ``positions`` int64 [seq_len], each input token's position
    in its document, 0 at every document start and at the start of the sample; ``doc_lengths`` int64, the lengths of
    the document pieces making up the seq_len input tokens (they sum to seq_len).

    With cache_dir, the index is loaded from there when a cache with the same key exists, else built and saved.
    """

    def __init__(self, indexed: IndexedDataset, seq_len: int, num_samples: int, seed: int,
                 documents: Optional[npt.ArrayLike] = None, cache_dir: Optional[str] = None,
                 eos_id: Optional[int] = None):
        self.indexed = indexed
        self.seq_len = _checked_positive_int("PackedDataset", "seq_len", seq_len)
        self.num_samples = _checked_positive_int("PackedDataset", "num_samples", num_samples)
        self.seed = int(seed)
        self.eos_id = None if eos_id is None else int(eos_id)
        document_ids = self._checked_documents(documents)
        stored_lengths = indexed.sizes[document_ids].astype(np.int64)
        non_empty = stored_lengths > 0
        document_ids = document_ids[non_empty]
        if len(document_ids) == 0:
            raise ValueError(f"PackedDataset: documents: none of the {non_empty.size} selected documents of "
                             f"{indexed.prefix} has any tokens")
        document_lengths = stored_lengths[non_empty] + (self.eos_id is not None)
        self.tokens_per_epoch = int(document_lengths.sum())
        self.num_epochs = -(-(self.num_samples * self.seq_len + 1) // self.tokens_per_epoch)
        self.cache_files: Optional[dict[str, str]] = None
        if cache_dir is None:
            index = build_packing_index(document_ids, document_lengths, self.seq_len, self.num_samples, self.seed)
        else:
            index = self._cached_index(os.fspath(cache_dir), document_ids, document_lengths)
        self.document_order, self._sample_index, self._shuffle_index = index

    def _checked_documents(self, documents: Optional[npt.ArrayLike]) -> np.ndarray:
        count = len(self.indexed)
        if documents is None:
            return np.arange(count, dtype=np.int64)
        ids = np.asarray(documents)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise ValueError(f"PackedDataset: documents must be a 1-D array of document ids, got dtype {ids.dtype} "
                             f"and shape {ids.shape}")
        ids = ids.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= count):
            raise ValueError(f"PackedDataset: documents must be ids in 0..{count - 1} ({self.indexed.prefix} has "
                             f"{count} documents), got values from {ids.min()} to {ids.max()}")
        return ids

    def _cache_key(self, document_ids: np.ndarray, document_lengths: np.ndarray) -> str:
        # The document lengths stand for the dataset's content: the index depends on nothing else in it, so a
        # rewritten corpus with other lengths gets a new key, and one with the same lengths rightly reuses it.
        description = {
            "format": INDEX_FORMAT, "prefix": os.path.abspath(self.indexed.prefix), "seq_len": self.seq_len,
            "num_samples": self.num_samples, "seed": self.seed, "eos_id": self.eos_id,
            "documents": hashlib.sha256(document_ids.astype("<i8").tobytes()).hexdigest(),
            "document_lengths": hashlib.sha256(document_lengths.astype("<i8").tobytes()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]

    def _cached_index(self, cache_dir: str, document_ids: np.ndarray, document_lengths: np.ndarray) -> PackingIndex:
        key = self._cache_key(document_ids, document_lengths)
        name = os.path.basename(self.indexed.prefix)
        self.cache_files = {part: os.path.join(cache_dir, f"{name}_packed_{key}_{part}.npy") for part in CACHED_ARRAYS}
        index = self._load_cache()
        if index is None:
            index = build_packing_index(document_ids, document_lengths, self.seq_len, self.num_samples, self.seed)
            os.makedirs(cache_dir, exist_ok=True)
            # shuffle_index last: loading needs all three, so a run killed in between leaves no usable half.
            # Concurrent builders (several ranks) write identical arrays, so whichever rename lands last is right.
            for part in CACHED_ARRAYS:
                with AtomicFile(self.cache_files[part], "wb") as out:
                    np.save(out, getattr(index, part))
        return index

    def _load_cache(self) -> Optional[PackingIndex]:
        """The cached index, or None when it is missing or does not fit these parameters (a damaged or foreign
        file), in which case it is rebuilt."""
        try:
            index = PackingIndex(*(np.load(self.cache_files[part], mmap_mode="r") for part in CACHED_ARRAYS))
        except (OSError, ValueError):
            return None
        order, samples, shuffle = index
        fits = (order.ndim == 1 and len(order) > 0 and samples.shape == (self.num_samples + 1, 2)
                and shuffle.shape == (self.num_samples,) and int(samples[-1, 0]) == len(order) - 1)
        return index if fits else None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"PackedDataset: sample {index} is out of range for {self.num_samples} samples")
        return self.stream_sample(int(self._shuffle_index[index]))

    def _document_length(self, document: int) -> int:
        return int(self.indexed.sizes[document]) + (self.eos_id is not None)

    def stream_sample(self, sample: int) -> dict[str, Tensor]:
        """Sample number ``sample`` in stream order (before the sample shuffle): stream tokens sample * seq_len ..
        (sample + 1) * seq_len inclusive."""
        if not 0 <= sample < self.num_samples:
            raise IndexError(f"PackedDataset: stream sample {sample} is out of range for {self.num_samples} samples")
        first_document, first_offset = (int(v) for v in self._sample_index[sample])
        last_document, last_offset = (int(v) for v in self._sample_index[sample + 1])
        tokens = np.empty(self.seq_len + 1, dtype=np.int64)
        piece_lengths = []
        filled = 0
        for stream_position in range(first_document, last_document + 1):
            document = int(self.document_order[stream_position])
            start = first_offset if stream_position == first_document else 0
            stop = last_offset + 1 if stream_position == last_document else self._document_length(document)
            stored_stop = min(stop, int(self.indexed.sizes[document]))
            tokens[filled:filled + stored_stop - start] = self.indexed.get(document, start, stored_stop - start)
            if stop > stored_stop:  # the piece ends with the appended end-of-document token
                tokens[filled + stop - start - 1] = self.eos_id
            filled += stop - start
            piece_lengths.append(stop - start)
        # The inputs are all but the last token, which only serves as a target: the last piece loses it.
        piece_lengths[-1] -= 1
        doc_lengths = np.array([length for length in piece_lengths if length > 0], dtype=np.int64)
        piece_starts = np.cumsum(doc_lengths) - doc_lengths
        positions = np.arange(self.seq_len, dtype=np.int64) - np.repeat(piece_starts, doc_lengths)
        return {"tokens": torch.from_numpy(tokens), "positions": torch.from_numpy(positions),
                "doc_lengths": torch.from_numpy(doc_lengths)}


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, valid ids), each sorted: a random valid_fraction of the documents 0 .. num_documents - 1 (at
    least one when valid_fraction > 0 and there are two or more documents, and never all of them)."""
    if isinstance(num_documents, bool) or not isinstance(num_documents, (int, np.integer)) or num_documents < 0:
        raise ValueError(f"split_documents: num_documents must be a non-negative int, got {num_documents!r}")
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"split_documents: valid_fraction must be in [0, 1), got {valid_fraction!r}")
    num_valid = int(round(valid_fraction * num_documents))
    if valid_fraction > 0 and num_documents >= 2:
        num_valid = min(max(num_valid, 1), num_documents - 1)
    permutation = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(permutation[num_valid:]), np.sort(permutation[:num_valid])


def _normalised_weights(weights: Sequence[float], num_datasets: Optional[int] = None) -> np.ndarray:
    values = np.asarray(weights, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got {weights!r}")
    if num_datasets is not None and len(values) != num_datasets:
        raise ValueError(f"weights: {len(values)} weights for {num_datasets} datasets")
    if not np.isfinite(values).all() or (values < 0).any() or values.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights!r}")
    return values / values.sum()


def blending_indices(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset of each sample, the sample's index within that dataset) for num_samples samples drawn from datasets
    in the proportions ``weights`` (normalised).

    Each dataset's count after n samples stays within one sample of weight * n, for every n. Megatron-LM gives each
    sample to the dataset furthest below its target, which can fall more than one sample behind with three or more
    datasets; here, as in earliest-deadline-first scheduling, each sample goes to the dataset whose next sample is
    due soonest (count + 1 <= weight * n at the latest) among those still below their target, which keeps the
    bound for any number of datasets. Deterministic; a loop over the samples (about a second per million on one core).
    """
    shares = _normalised_weights(weights).tolist()
    num_samples = _checked_positive_int("blending_indices", "num_samples", num_samples)
    counts = [0] * len(shares)
    dataset_index = np.empty(num_samples, dtype=np.int32 if len(shares) < 2 ** 31 else np.int64)
    sample_in_dataset = np.empty(num_samples, dtype=np.int64)
    for sample in range(num_samples):
        target_time = sample + 1
        chosen, chosen_deadline = -1, 0.0
        for dataset, share in enumerate(shares):
            # Only datasets below their target may take the sample, so none gets a whole sample ahead; one always
            # is below, since the counts sum to target_time - 1 and the targets to target_time.
            if share * target_time - counts[dataset] > TIE_TOLERANCE * target_time:
                deadline = (counts[dataset] + 1) / share
                if chosen < 0 or deadline < chosen_deadline * (1 - TIE_TOLERANCE):
                    chosen, chosen_deadline = dataset, deadline
        dataset_index[sample] = chosen
        sample_in_dataset[sample] = counts[chosen]
        counts[chosen] += 1
    return dataset_index, sample_in_dataset


class BlendedDataset(torch.utils.data.Dataset):
    """num_samples samples drawn from ``datasets`` in the proportions ``weights``, interleaved evenly (see
    blending_indices). Each dataset supplies its own samples in its own (shuffled) order, so it must hold at least
    its share: ceil(weight * num_samples) samples always suffice."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float], num_samples: int):
        if len(datasets) == 0:
            raise ValueError("BlendedDataset: datasets is empty")
        try:
            self.weights = _normalised_weights(weights, len(datasets))
        except ValueError as error:
            raise ValueError(f"BlendedDataset: {error}") from None
        self.datasets = list(datasets)
        self.num_samples = _checked_positive_int("BlendedDataset", "num_samples", num_samples)
        self.dataset_index, self.sample_in_dataset = blending_indices(self.weights, self.num_samples)
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for number, (dataset, count) in enumerate(zip(self.datasets, needed)):
            if len(dataset) < count:
                raise ValueError(f"BlendedDataset: datasets[{number}] has {len(dataset)} samples; its weight "
                                 f"{self.weights[number]:.6g} of num_samples {self.num_samples} needs {count}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"BlendedDataset: sample {index} is out of range for {self.num_samples} samples")
        return self.datasets[int(self.dataset_index[index])][int(self.sample_in_dataset[index])]


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """A batch for ``Aquila.forward(tokens, targets, positions=..., cu_seqlens=...)`` from PackedDataset samples:
    tokens and targets int64 [batch, seq_len] (targets are tokens shifted by one), positions int64 [batch, seq_len],
    and cu_seqlens int32 [documents + 1], the document pieces of every row in turn over the flattened batch."""
    if len(samples) == 0:
        raise ValueError("collate: samples is empty")
    lengths = {len(sample["tokens"]) for sample in samples}
    if len(lengths) != 1:
        raise ValueError(f"collate: samples must have one length, got lengths {sorted(lengths)}")
    tokens = torch.stack([sample["tokens"] for sample in samples])
    doc_lengths = torch.cat([sample["doc_lengths"] for sample in samples])
    cu_seqlens = torch.zeros(len(doc_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(doc_lengths, 0)
    return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(),
            "positions": torch.stack([sample["positions"] for sample in samples]), "cu_seqlens": cu_seqlens}
