"""The trainer's data: which samples each process reads at each step, for pretraining and SFT.

Every optimizer step consumes one global batch of samples, batch_size x gradient_accumulation_steps x processes, and
the samples of step s are [s * global_batch, (s + 1) * global_batch) of one deterministic, seeded order. So the data
position is the step number (a resumed run reads exactly what it would have read), and the same global batch split
over 1 or 2 processes, or over more micro-batches, covers the same samples.
"""

import hashlib
import os
from collections.abc import Iterator
from typing import Optional, Protocol

import numpy as np
import torch

from aquila.data import demo_file
from aquila.data.indexed import IndexedDataset
from aquila.data.packing import BlendedDataset, PackedDataset, collate, split_documents
from aquila.train.config import TrainConfig
from aquila.train.engine import Processes


def tokenized_corpus(corpus: str, tokenizer, cache_dir: str, show_progress: bool) -> str:
    """The indexed-dataset prefix of a jsonl corpus, tokenized on first use ([BOS] + ids + [EOS] per document) and
    cached under a name that changes with the corpus file and the tokenizer."""
    from aquila.data.preprocess import preprocess

    if not os.path.isfile(corpus):
        raise FileNotFoundError(f"corpus {corpus} does not exist")
    status = os.stat(corpus)
    key = hashlib.sha1(f"{os.path.abspath(corpus)}|{status.st_size}|{status.st_mtime_ns}|".encode()
                       + tokenizer.backend.to_str().encode()).hexdigest()[:12]
    stem = os.path.basename(corpus).split(".")[0]
    prefix = os.path.join(cache_dir, f"{stem}-{key}")
    if not os.path.isfile(prefix + ".idx"):
        os.makedirs(cache_dir, exist_ok=True)
        preprocess([corpus], prefix, tokenizer, workers=1, show_progress=show_progress)
    return prefix


def first_sample(config: TrainConfig, processes: Processes, step: int, micro_batch: int) -> int:
    """The first of this process's batch_size samples in micro-batch micro_batch of optimizer step step."""
    index = (step * config.gradient_accumulation_steps + micro_batch) * processes.world_size + processes.rank
    return index * config.batch_size


def _prefixes_and_weights(entries: list) -> tuple[list[str], list[float]]:
    """train_data: [prefix] or [prefix, weight, prefix, weight, ...] (Megatron's data_path)."""
    if len(entries) == 1:
        return [entries[0]], [1.0]
    if len(entries) % 2 or not all(isinstance(w, (int, float)) for w in entries[1::2]):
        raise ValueError(f"train_data: expected [prefix] or [prefix, weight, prefix, weight, ...], got {entries}")
    return list(entries[0::2]), [float(w) for w in entries[1::2]]


CHECKED_TOKENS = 2 * 10**8


class TrainingData(Protocol):
    """What the trainer reads, for pretraining and SFT alike. Batches are dicts of tokens, targets (IGNORE_INDEX
    where not learned), positions and cu_seqlens, as aquila.data.packing.collate makes them."""

    description: Optional[str]  # a line for the log about what was loaded, or None
    tokens_per_epoch: int
    samples_per_epoch: Optional[int]  # None: the epoch budget counts tokens instead of samples

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raises ValueError, naming the data, if a token id is outside a vocabulary of vocab_size."""

    def build(self, total_samples: int) -> None:
        """Lays out the order of the run's total_samples training samples; called once, before any batch."""

    def batch(self, step: int, micro_batch: int) -> dict:
        """This process's share of micro-batch micro_batch of optimizer step step."""

    @property
    def has_validation(self) -> bool:
        """Whether valid_batches has anything to evaluate."""

    def valid_batches(self) -> Iterator[dict]:
        """This process's validation batches; every process gets as many."""


class PretrainingData(TrainingData):
    """Packed samples of seq_len + 1 tokens with their document boundaries, blended from one or more datasets."""

    def __init__(self, config: TrainConfig, tokenizer, processes: Processes):
        self.config, self.processes = config, processes
        cache = os.path.join(config.output_dir, "data")
        show = config.progress and processes.is_main
        if config.train_data:
            prefixes, weights = _prefixes_and_weights(config.train_data)
        else:
            corpus = config.corpus or demo_file("train.jsonl.gz")
            prefixes, weights = [self._tokenized(corpus, tokenizer, cache, show)], [1.0]
        self.indexed = [IndexedDataset(p) for p in prefixes]
        self.weights = weights
        self.train_documents: list[Optional[np.ndarray]] = [None] * len(prefixes)
        valid_prefix, valid_documents = None, None
        if config.valid_data:
            valid_prefix = config.valid_data[0]
        elif config.valid_fraction > 0:
            train, valid = split_documents(len(self.indexed[0]), config.valid_fraction, config.seed)
            self.train_documents[0], valid_prefix, valid_documents = train, prefixes[0], valid
        elif not config.train_data:
            valid_prefix = self._tokenized(config.valid_corpus or demo_file("valid.jsonl.gz"), tokenizer, cache, show)
        self.valid_prefix, self.valid_documents = valid_prefix, valid_documents
        self.cache = cache
        self.tokens_per_epoch = sum(int(d.sizes.sum()) for d in self.indexed)
        self.samples_per_epoch = None  # pretraining budgets count tokens
        self.description = None

    def _tokenized(self, corpus, tokenizer, cache, show):
        # One process tokenizes; the others wait for it, then read the same files.
        if self.processes.is_main:
            prefix = tokenized_corpus(corpus, tokenizer, cache, show)
        from aquila.train.engine import barrier

        barrier(self.processes)
        if not self.processes.is_main:
            prefix = tokenized_corpus(corpus, tokenizer, cache, False)
        return prefix

    def check_vocabulary(self, vocab_size: int) -> None:
        """A token id the model has no embedding for would fail deep inside the first forward that meets it: found
        here instead, naming the dataset (a dataset of up to CHECKED_TOKENS tokens is read whole; larger ones are
        trusted to their tokenizer)."""
        for indexed in self.indexed:
            if indexed.num_tokens and indexed.num_tokens <= CHECKED_TOKENS:
                largest = int(np.asarray(indexed.token_array).max())
                if largest >= vocab_size:
                    raise ValueError(f"{indexed.prefix}: token id {largest} is outside the model's vocabulary of "
                                     f"{vocab_size}: was it tokenized with another tokenizer?")

    def build(self, total_samples: int) -> None:
        config = self.config
        parts = [PackedDataset(indexed, config.seq_len, max(1, int(np.ceil(total_samples * w / sum(self.weights))) + 1),
                               config.seed + i, documents=documents, cache_dir=self.cache)
                 for i, (indexed, w, documents) in enumerate(zip(self.indexed, self.weights, self.train_documents))]
        self.train = parts[0] if len(parts) == 1 else BlendedDataset(parts, self.weights, total_samples)
        self.valid = None
        if self.valid_prefix is not None:
            count = config.eval_batches * config.batch_size * self.processes.world_size
            self.valid = PackedDataset(IndexedDataset(self.valid_prefix), config.seq_len, count, config.seed,
                                       documents=self.valid_documents, cache_dir=self.cache)

    def batch(self, step: int, micro_batch: int) -> dict:
        first = first_sample(self.config, self.processes, step, micro_batch)
        return collate([self.train[i] for i in range(first, first + self.config.batch_size)])

    @property
    def has_validation(self) -> bool:
        return self.valid is not None

    def valid_batches(self) -> Iterator[dict]:
        c, p = self.config, self.processes
        for index in range(c.eval_batches):
            first = (index * p.world_size + p.rank) * c.batch_size
            yield collate([self.valid[i] for i in range(first, first + c.batch_size)])


class SFTData(TrainingData):
    """Conversations rendered with the chat template, fitted to seq_len, and packed first-fit into rows of seq_len
    tokens (conversations in a row do not attend to each other). The rows are the samples: an epoch visits each
    once, in an order shuffled afresh every epoch."""

    def __init__(self, config: TrainConfig, tokenizer, processes: Processes):
        from aquila.data.sft import SFTDataset, first_fit, load_conversations

        self.config, self.processes = config, processes
        conversations = load_conversations(config.sft_data or demo_file("chat.jsonl"))
        order = np.random.default_rng(config.seed).permutation(len(conversations))
        held_out = int(round(len(conversations) * config.valid_fraction))
        valid = [conversations[i] for i in order[:held_out]]
        train = [conversations[i] for i in order[held_out:]]
        self.train_set = SFTDataset(train, tokenizer, config.seq_len)
        self.valid_set = SFTDataset(valid, tokenizer, config.seq_len) if valid else None
        if len(self.train_set) == 0:
            raise ValueError(f"{config.sft_data or 'the demo conversations'}: no conversation fits in seq_len "
                             f"{config.seq_len} tokens")
        self.description = self.train_set.describe()
        self.rows = first_fit(self.train_set.lengths().tolist(), config.seq_len)
        self.valid_rows = first_fit(self.valid_set.lengths().tolist(), config.seq_len) if self.valid_set else []
        self.pad_id = tokenizer.pad_id
        self.samples_per_epoch = len(self.rows)
        self.tokens_per_epoch = len(self.rows) * config.seq_len

    def check_vocabulary(self, vocab_size: int) -> None:
        """The rendered conversations are in memory: every token id is checked, as a tokenizer whose ids exceed its
        own vocabulary size, or a model with fewer embeddings, would otherwise fail inside a forward pass."""
        for dataset in (self.train_set, self.valid_set):
            largest = dataset.largest_token_id() if dataset is not None else -1
            if largest >= vocab_size:
                raise ValueError(f"{self.config.sft_data or 'the demo conversations'}: token id {largest} is outside "
                                 f"the model's vocabulary of {vocab_size}: was the tokenizer made for another model?")

    def build(self, total_samples: int) -> None:
        epochs = -(-total_samples // len(self.rows))
        self.order = np.concatenate([np.random.default_rng([self.config.seed, epoch]).permutation(len(self.rows))
                                     for epoch in range(epochs)])

    def _rows(self, dataset, rows) -> dict:
        from aquila.data.sft import pack

        packed = [pack([dataset[i] for i in members], self.config.seq_len, self.pad_id) for members in rows]
        offsets = np.cumsum([0] + [p["cu_seqlens"][-1].item() for p in packed[:-1]])
        return {"tokens": torch.cat([p["tokens"] for p in packed]),
                "targets": torch.cat([p["targets"] for p in packed]),
                "positions": torch.cat([p["positions"] for p in packed]),
                "cu_seqlens": torch.cat([packed[0]["cu_seqlens"][:1]] + [p["cu_seqlens"][1:] + int(o)
                                                                         for p, o in zip(packed, offsets)])}

    def batch(self, step: int, micro_batch: int) -> dict:
        first = first_sample(self.config, self.processes, step, micro_batch)
        return self._rows(self.train_set, [self.rows[i] for i in self.order[first:first + self.config.batch_size]])

    @property
    def has_validation(self) -> bool:
        return self.valid_set is not None

    def valid_batches(self) -> Iterator[dict]:
        c, p = self.config, self.processes
        # Every process runs the same number of forwards (FSDP gathers parameters in each).
        usable = len(self.valid_rows) - len(self.valid_rows) % p.world_size
        rows = self.valid_rows[:usable][p.rank::p.world_size]
        for start in range(0, min(len(rows), c.eval_batches * c.batch_size), c.batch_size):
            yield self._rows(self.valid_set, rows[start:start + c.batch_size])


def to_device(batch: dict, device: torch.device) -> dict:
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


def make_data(config: TrainConfig, tokenizer, processes: Processes) -> TrainingData:
    return SFTData(config, tokenizer, processes) if config.kind == "sft" else PretrainingData(config, tokenizer,
                                                                                            processes)
