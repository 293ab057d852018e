"""Tokenising a corpus into Megatron's indexed format (`aquila data preprocess`): documents in, a .bin/.idx pair out.

Each document (a JSON lines record's text, or a whole text file; see aquila.data.documents) becomes one sequence
[BOS] + ids + [EOS], in input order, so the result is the same whatever the number of worker processes: a run with
workers=8 writes byte for byte the files a run with workers=1 writes.

Decisions, stated once:
- An empty document ("") is skipped and counted (``empty_documents_skipped``): [BOS, EOS] alone teaches nothing but
  "end right after start", and Megatron's preprocessing drops empty documents too. Whitespace-only text is kept, it
  has tokens.
- A lone surrogate (text that is not valid Unicode, typically a JSON "\\ud800" escape from a broken scraper) becomes
  U+FFFD rather than stopping a long run; each one is counted (``replaced_surrogates``) so it does not go unnoticed.
- A malformed input (invalid JSON, a record without the text key, a missing file) stops the run with the file and
  line named. Output is atomic: the writer fills temporary files and renames them into place only after the last
  document, so a failure or Ctrl-C leaves no half-written .bin/.idx and never touches an existing dataset of that
  name; the workers finish the batches they hold and exit, and the temporary files are removed.

Parallelism: the parent reads the inputs and submits batches of documents to a ProcessPoolExecutor whose
initializer loads the tokenizer from disk in each worker, keeping a few batches per worker in flight; it takes the
results in submission order and writes them. A batch travels back as one concatenated token array, which pickles
cheaply. A worker that dies (the out-of-memory killer's SIGKILL, a crash) breaks the executor, which the parent notices
at once: the run stops with WorkerDiedError rather than waiting forever for a batch that will never come, as a
multiprocessing Pool would. Workers ignore SIGINT, so Ctrl-C reaches the parent alone, which then drops the batches not
yet started and waits for the workers to finish the ones they hold (otherwise every worker would print its own
traceback).
"""

import collections
import concurrent.futures
import itertools
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import NamedTuple, Optional, Union

import numpy as np
from tqdm import tqdm

from aquila.data.documents import read_documents
from aquila.data.indexed import IndexedDatasetWriter, best_dtype, data_file, index_file
from aquila.data.tokenizer import LONE_SURROGATE, Tokenizer


class WorkerDiedError(RuntimeError):
    """A worker process ended without returning its batch (killed, e.g. by the out-of-memory killer, or crashed)."""


class EncodedBatch(NamedTuple):
    tokens: np.ndarray  # the batch's non-empty documents, [BOS] + ids + [EOS] each, back to back
    lengths: np.ndarray  # int64 [documents]: tokens per document
    empty_documents: int  # documents of the batch skipped for being empty
    replaced_surrogates: int  # lone surrogates encoded as U+FFFD


def encode_documents(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> EncodedBatch:
    """One batch of documents as [BOS] + ids + [EOS] each, empty documents left out."""
    kept = [text for text in texts if text]
    # A lone surrogate is rare; counting them costs one regex scan per document, done here in the workers.
    replaced = sum(len(LONE_SURROGATE.findall(text)) for text in kept)
    encoded = tokenizer.encode_batch(kept, bos=True, eos=True, errors="replace")
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    tokens = np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum()))
    return EncodedBatch(tokens, lengths, len(texts) - len(kept), replaced)


# --- the worker processes ---------------------------------------------------------------------------------------
# Module globals, set once per worker by the executor's initializer: the tokenizer is loaded from disk in each worker
# rather than pickled with every batch.
_worker_tokenizer: Optional[Tokenizer] = None
_worker_dtype: Optional[np.dtype] = None
TOKENIZERS_PARALLELISM = "TOKENIZERS_PARALLELISM"


def _start_worker(tokenizer_path: str, dtype: str) -> None:
    global _worker_tokenizer, _worker_dtype
    # Ctrl-C goes to the whole process group; the parent alone handles it (see the module docstring).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ[TOKENIZERS_PARALLELISM] = "false"  # for start methods other than fork (see _start_executor)
    _worker_tokenizer = Tokenizer.load(tokenizer_path)
    _worker_dtype = np.dtype(dtype)


def _encode_in_worker(texts: list[str]) -> EncodedBatch:
    return encode_documents(_worker_tokenizer, texts, _worker_dtype)


def _batches(documents: Iterable[str], batch_size: int) -> Iterator[list[str]]:
    iterator = iter(documents)
    while batch := list(itertools.islice(iterator, batch_size)):
        yield batch


def available_cpus() -> int:
    """The CPUs this process may run on (fewer than os.cpu_count() in a container or under taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _TokenizerFile:
    """A path the workers can load the tokenizer from: the given path, or, for a Tokenizer object, its
    tokenizer.json written to a temporary directory that is removed afterwards."""

    def __init__(self, tokenizer: Union[Tokenizer, str]):
        self._directory = None
        if isinstance(tokenizer, Tokenizer):
            self._directory = tempfile.TemporaryDirectory(prefix="aquila-preprocess-")
            self.path = os.path.join(self._directory.name, "tokenizer.json")
            with open(self.path, "w", encoding="utf-8") as out:
                out.write(tokenizer.backend.to_str())
        else:
            self.path = os.fspath(tokenizer)

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc_info) -> None:
        if self._directory is not None:
            self._directory.cleanup()


def _encoded_batches(batches: Iterator[list[str]], tokenizer: Tokenizer, tokenizer_source: Union[Tokenizer, str],
                     dtype: np.dtype, workers: int) -> Iterator[EncodedBatch]:
    """The encoded batches in input order, from this process (workers=1) or a pool of worker processes. When the
    consumer stops early (an error or Ctrl-C closes this generator), the workers have exited before it returns."""
    if workers == 1:
        for batch in batches:
            yield encode_documents(tokenizer, batch, dtype)
        return
    with _TokenizerFile(tokenizer_source) as tokenizer_path:
        executor = _start_executor(workers, tokenizer_path, dtype)
        # A few batches per worker in flight keep every worker busy while bounding the memory held by results.
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        try:
            for batch in batches:
                pending.append(executor.submit(_encode_in_worker, batch))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:  # from result(), or from submit() once the executor knows
            raise WorkerDiedError("preprocess: a worker process died (killed, e.g. by the out-of-memory killer, or "
                                  "crashed); stopped without writing the output") from None
        finally:  # also on an error, Ctrl-C, or the consumer closing this generator (GeneratorExit)
            # Batches not yet started are dropped; the workers finish the ones they hold and exit (killing them
            # instead could leave the result queue's lock taken by a worker killed mid-write).
            executor.shutdown(wait=True, cancel_futures=True)


def _start_executor(workers: int, tokenizer_path: str, dtype: np.dtype) -> concurrent.futures.ProcessPoolExecutor:
    executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                                                      initializer=_start_worker, initargs=(tokenizer_path, dtype.str))
    # Each worker process tokenises on one thread: N processes already use the N CPUs, and the tokenizers library
    # would otherwise print a warning in every forked child about disabling its thread pool. The variable is set
    # only while the first task starts the workers (under fork, all of them at once), so this process's own
    # tokenizer keeps its threads.
    previous = os.environ.get(TOKENIZERS_PARALLELISM)
    os.environ[TOKENIZERS_PARALLELISM] = "false"
    try:
        executor.submit(int)
    finally:
        if previous is None:
            del os.environ[TOKENIZERS_PARALLELISM]
        else:
            os.environ[TOKENIZERS_PARALLELISM] = previous
    return executor


def preprocess(inputs: list[str], output_prefix: str, tokenizer: Union[Tokenizer, str], key: str = "text",
               workers: int = 0, batch_size: int = 512, show_progress: bool = True) -> dict[str, object]:
    """Tokenises the documents of ``inputs`` (JSON lines files, .jsonl/.json, whose records hold the text under
    ``key``, or text files, each one document; .gz/.xz compressed or not) into ``output_prefix``.bin/.idx.

    tokenizer: a Tokenizer, or a path Tokenizer.load accepts (a directory or a tokenizer.json). workers: processes
    that tokenise (0: one per available CPU; 1: this process alone). Token ids are stored as
    best_dtype(vocab_size). A progress bar (documents, tokens/s) goes to stderr when show_progress.

    Returns the statistics: documents (written), tokens, empty_documents_skipped, replaced_surrogates, seconds and
    tokens_per_second.
    """
    started = time.perf_counter()
    if isinstance(inputs, (str, bytes, os.PathLike)):
        raise TypeError("preprocess: inputs must be a list of paths, not a single path")
    inputs = [os.fspath(path) for path in inputs]
    if not inputs:
        raise ValueError("preprocess: no input files")
    missing = [path for path in inputs if not os.path.isfile(path)]
    if missing:  # checked before any work, rather than after the files before them were tokenised
        raise FileNotFoundError(f"preprocess: no such input file: {', '.join(missing)}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"preprocess: workers must be an int >= 0 (0: one per CPU), got {workers!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"preprocess: batch_size must be a positive int, got {batch_size!r}")
    tokenizer_source = tokenizer
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(os.fspath(tokenizer))
    workers = workers or available_cpus()
    dtype = best_dtype(tokenizer.vocab_size)
    output_prefix = os.fspath(output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)

    documents = tokens = empty = replaced = 0
    batches = _batches(read_documents(inputs, key), batch_size)
    encoded_batches = _encoded_batches(batches, tokenizer, tokenizer_source, dtype, workers)
    progress = tqdm(desc="preprocess", unit=" docs", file=sys.stderr, disable=not show_progress, dynamic_ncols=True)
    try:
        with IndexedDatasetWriter(output_prefix, dtype) as writer:
            for batch in encoded_batches:
                offsets = np.zeros(len(batch.lengths) + 1, dtype=np.int64)
                np.cumsum(batch.lengths, out=offsets[1:])
                for start, stop in zip(offsets[:-1], offsets[1:]):
                    writer.add_document(batch.tokens[start:stop])
                documents += len(batch.lengths)
                tokens += int(offsets[-1])
                empty += batch.empty_documents
                replaced += batch.replaced_surrogates
                progress.update(len(batch.lengths) + batch.empty_documents)
                elapsed = time.perf_counter() - started
                progress.set_postfix_str(f"{tokens:,} tokens, {tokens / max(elapsed, 1e-9):,.0f} tokens/s",
                                         refresh=False)
    finally:
        # On an error this stops the workers (closing the generator runs its finally) before the error surfaces.
        encoded_batches.close()
        progress.close()
    seconds = time.perf_counter() - started
    return {"documents": documents, "tokens": tokens, "empty_documents_skipped": empty,
            "replaced_surrogates": replaced, "seconds": seconds, "tokens_per_second": tokens / max(seconds, 1e-9),
            "output": [data_file(output_prefix), index_file(output_prefix)]}


def format_stats(stats: dict[str, object]) -> str:
    """preprocess()'s statistics as a few lines for the terminal."""
    lines = [f"{stats['documents']:,} documents, {stats['tokens']:,} tokens in {stats['seconds']:.1f} s "
             f"({stats['tokens_per_second']:,.0f} tokens/s)"]
    if stats["empty_documents_skipped"]:
        lines.append(f"{stats['empty_documents_skipped']:,} empty documents skipped")
    if stats["replaced_surrogates"]:
        lines.append(f"{stats['replaced_surrogates']:,} lone surrogates (invalid Unicode) encoded as U+FFFD")
    lines.append("wrote " + " and ".join(stats["output"]))
    return "\n".join(lines)
