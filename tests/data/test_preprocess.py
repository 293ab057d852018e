"""aquila.data.preprocess: documents to a .bin/.idx pair, in order, the same with any number of workers, and never a
half-written output."""

import gzip
import json
import lzma
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from aquila.data.indexed import IndexedDataset, IndexedDatasetWriter
from aquila.data.preprocess import format_stats, preprocess

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "Mixed 中文 and English, with emoji 😀🎉 and a family 👨‍👩‍👧.",
    "",  # empty: skipped and counted
    "lone \ud800 surrogate",  # written below as the JSON escape "\ud800", which json.loads turns into a lone surrogate
    "   \n\t  ",  # whitespace only: kept
    "</s> [CLS] typed as text is ordinary text",
]


def write_jsonl(path, texts, key="text", opener=open):
    with opener(path, "wt", encoding="utf-8") as out:
        for number, text in enumerate(texts):
            out.write(json.dumps({"id": number, key: text}) + "\n")  # ensure_ascii: "\ud800" stays an escape
    return str(path)


def expected_documents(tokenizer, texts):
    return [[tokenizer.bos_id] + tokenizer.encode(text, errors="replace") + [tokenizer.eos_id]
            for text in texts if text]


def files_in(directory):
    return sorted(name for name in os.listdir(directory))


@pytest.fixture(scope="module")
def tokenizer_dir(small_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    small_tokenizer.save(str(directory))
    return str(directory)


def test_round_trip(small_tokenizer, tokenizer_dir, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    assert "\\ud800" in Path(source).read_text()
    stats = preprocess([source], str(tmp_path / "out" / "corpus"), tokenizer_dir, workers=1, show_progress=False)
    dataset = IndexedDataset(str(tmp_path / "out" / "corpus"))
    expected = expected_documents(small_tokenizer, TEXTS)
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert dataset.dtype == np.uint16
    assert small_tokenizer.decode(dataset[3]) == "lone \ufffd surrogate"
    assert stats["documents"] == len(TEXTS) - 1 and stats["empty_documents_skipped"] == 1
    assert stats["replaced_surrogates"] == 1
    assert stats["tokens"] == sum(map(len, expected)) == dataset.num_tokens
    assert stats["seconds"] > 0 and stats["tokens_per_second"] > 0
    assert "1 empty documents skipped" in format_stats(stats) and "U+FFFD" in format_stats(stats)
    assert files_in(tmp_path / "out") == ["corpus.bin", "corpus.idx"]


def test_workers_write_identical_files(small_tokenizer, tmp_path, monkeypatch):
    """Several files and formats, many small batches: two worker processes give byte-identical files to one."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the workers' tokenizer.json goes
    os.makedirs(tmp_path / "tmp")
    texts = [f"{text} #{number}" if text else "" for number in range(40) for text in TEXTS]
    inputs = [write_jsonl(tmp_path / "a.jsonl", texts[:150]),
              write_jsonl(tmp_path / "b.jsonl.gz", texts[150:], opener=gzip.open)]
    (tmp_path / "c.txt").write_text("a whole text file\nis one document\n", encoding="utf-8")
    inputs.append(str(tmp_path / "c.txt"))
    outputs = {}
    for workers in (1, 2):
        prefix = str(tmp_path / f"workers{workers}")
        stats = preprocess(inputs, prefix, small_tokenizer, workers=workers, batch_size=7, show_progress=False)
        outputs[workers] = [Path(prefix + extension).read_bytes() for extension in (".bin", ".idx")]
        assert stats["documents"] == 40 * (len(TEXTS) - 1) + 1 and stats["empty_documents_skipped"] == 40
        assert stats["replaced_surrogates"] == 40
    assert outputs[1] == outputs[2]
    dataset = IndexedDataset(str(tmp_path / "workers2"))
    assert [d.tolist() for d in dataset] == expected_documents(
        small_tokenizer, texts + ["a whole text file\nis one document\n"])
    assert files_in(tmp_path / "tmp") == []  # the temporary tokenizer file is removed
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("opener, suffix", [(gzip.open, ".jsonl.gz"), (lzma.open, ".jsonl.xz")])
def test_compressed_input(small_tokenizer, tmp_path, opener, suffix):
    source = write_jsonl(tmp_path / f"docs{suffix}", TEXTS, key="content", opener=opener)
    preprocess([source], str(tmp_path / "corpus"), small_tokenizer, key="content", workers=1, show_progress=False)
    assert [d.tolist() for d in IndexedDataset(str(tmp_path / "corpus"))] == expected_documents(small_tokenizer,
                                                                                                 TEXTS)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated\n', r"bad\.jsonl:3: invalid JSON"),
    ('{"body": "no text key"}\n', r"bad\.jsonl:3: key 'text' must hold a string, it is missing"),
    ('["not", "an", "object"]\n', r"bad\.jsonl:3: expected a JSON object"),
])
def test_malformed_input_leaves_no_output(small_tokenizer, tmp_path, workers, bad_line, message):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "first"}\n\n' + bad_line + '{"text": "after"}\n', encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "corpus.bin").write_bytes(b"old data")  # an existing dataset of that name is left alone
    (out / "corpus.idx").write_bytes(b"old index")
    with pytest.raises(ValueError, match=message):
        preprocess([str(source)], str(out / "corpus"), small_tokenizer, workers=workers, batch_size=1,
                   show_progress=False)
    assert files_in(out) == ["corpus.bin", "corpus.idx"]
    assert (out / "corpus.bin").read_bytes() == b"old data" and (out / "corpus.idx").read_bytes() == b"old index"
    assert multiprocessing.active_children() == []


def test_missing_input_fails_before_any_work(small_tokenizer, tmp_path):
    present = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess([present, str(tmp_path / "nope.jsonl")], str(tmp_path / "corpus"), small_tokenizer,
                   show_progress=False)
    with pytest.raises(TypeError, match="list of paths"):
        preprocess(present, str(tmp_path / "corpus"), small_tokenizer, show_progress=False)
    with pytest.raises(ValueError, match="workers"):
        preprocess([present], str(tmp_path / "corpus"), small_tokenizer, workers=-1, show_progress=False)
    assert files_in(tmp_path) == ["docs.jsonl"]


def test_interrupt_tears_down_pool_and_removes_temporary_files(small_tokenizer, tmp_path, monkeypatch):
    """KeyboardInterrupt while writing (where Ctrl-C usually lands): the workers are stopped and nothing is left."""
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS * 20)
    out = tmp_path / "out"
    original = IndexedDatasetWriter.add_document
    written = []

    def interrupted(self, ids):
        if len(written) == 10:
            raise KeyboardInterrupt
        written.append(1)
        original(self, ids)

    monkeypatch.setattr(IndexedDatasetWriter, "add_document", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess([source], str(out / "corpus"), small_tokenizer, workers=2, batch_size=4, show_progress=False)
    assert files_in(out) == []
    assert multiprocessing.active_children() == []


def test_ctrl_c_on_the_process_group(tokenizer_dir, tmp_path):
    """A real Ctrl-C (SIGINT to the whole process group) in the middle of a run with worker processes: the run stops
    with KeyboardInterrupt, every process of the group exits, and the output directory is empty."""
    out = tmp_path / "out"
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS)  # must exist; its documents are replaced below
    script = textwrap.dedent(f"""
        import faulthandler, itertools, signal, time
        from aquila.data import preprocess as module

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # where it hangs, if it ever does
        # As in a terminal: a shell that starts this suite in the background has its children ignore SIGINT.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def endless_documents(paths, key):  # a corpus that never ends, so the run is surely interrupted mid-way
            for number in itertools.count():
                time.sleep(0.001)
                yield f"document {{number}} 床前明月光"

        module.read_documents = endless_documents
        module.preprocess([{source!r}], {str(out / "corpus")!r}, {tokenizer_dir!r}, workers=2, batch_size=8,
                          show_progress=False)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (out.exists() and any(n.startswith(".corpus.bin.")
                                                                        for n in os.listdir(out))):
            time.sleep(0.05)
        time.sleep(0.5)  # let the workers get busy
        assert process.poll() is None, process.stderr.read().decode()
        os.killpg(process.pid, signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGUSR1)  # the parent and its workers
            time.sleep(1)
            os.killpg(process.pid, signal.SIGKILL)
            threads = process.communicate()[1].decode()
            pytest.fail(f"the run did not stop within 20 s of Ctrl-C; the threads of its processes:\n{threads}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    stderr = stderr.decode()
    assert process.returncode != 0
    assert stderr.rstrip().endswith("KeyboardInterrupt")
    assert "PoolWorker" not in stderr  # the workers ignore SIGINT: no "Process ForkPoolWorker-1:" traceback
    assert files_in(out) == []
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # no worker outlived the parent
        os.killpg(process.pid, 0)


def test_a_killed_worker_stops_the_run_instead_of_hanging(tokenizer_dir, tmp_path):
    """A worker killed mid-run (as by the out-of-memory killer) stops the run with a one-line error from the command,
    leaving no output and no process behind; a multiprocessing Pool used to wait forever for the lost batch."""
    out = tmp_path / "out"
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS)  # must exist; its documents are replaced below
    script = textwrap.dedent(f"""
        import itertools, multiprocessing, os, signal, threading, time
        from aquila.cli import main
        from aquila.data import preprocess as module

        def endless_documents(paths, key):
            for number in itertools.count():
                time.sleep(0.001)
                yield f"document {{number}} 床前明月光"

        def kill_a_worker():
            time.sleep(1)  # the workers are busy by then
            while not multiprocessing.active_children():
                time.sleep(0.1)
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

        module.read_documents = endless_documents
        threading.Thread(target=kill_a_worker, daemon=True).start()
        main(["data", "preprocess", {source!r}, "--out", {str(out / "corpus")!r}, "--tokenizer", {tokenizer_dir!r},
              "--workers", "2"])
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("the run still waits 60 s after one of its workers was killed")
    last_line = stderr.decode().strip().splitlines()[-1]
    assert process.returncode == 1
    assert last_line == ("aquila data preprocess: preprocess: a worker process died (killed, e.g. by the out-of-memory "
                         "killer, or crashed); stopped without writing the output")
    assert "Traceback" not in stderr.decode()
    assert files_in(out) == []
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # no worker outlived the parent
        os.killpg(process.pid, 0)


def test_progress_bar_goes_to_stderr(small_tokenizer, tmp_path, capsys):
    source = write_jsonl(tmp_path / "docs.jsonl", TEXTS)
    preprocess([source], str(tmp_path / "corpus"), small_tokenizer, workers=1)
    captured = capsys.readouterr()
    assert captured.out == "" and "tokens/s" in captured.err
