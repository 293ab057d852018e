"""aquila.files.AtomicFile: a file is replaced whole or not at all, with an ordinary file's permissions."""

import errno
import os
import stat

import pytest

from aquila.files import AtomicFile, write_text_atomically


def test_text_and_binary_writes_replace_the_target_with_the_umasks_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        write_text_atomically(tmp_path / "notes.txt", "床前明月光\n")
        with AtomicFile(tmp_path / "data.bin", "wb") as out:
            out.write(b"\x00\x01")
    finally:
        os.umask(umask)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "床前明月光\n"
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\x01"
    for name in ("notes.txt", "data.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640  # not mkstemp's 0o600
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "notes.txt"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), AtomicFile(target) as out:
        out.write("new, half-written")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["config.json"]


def test_commit_and_discard_for_a_file_written_across_calls(tmp_path):
    kept, dropped = AtomicFile(tmp_path / "kept", "wb"), AtomicFile(tmp_path / "dropped", "wb")
    for part in (b"a", b"b"):
        kept.file.write(part)
        dropped.file.write(part)
    assert os.listdir(tmp_path) != [] and not (tmp_path / "kept").exists()  # only the temporaries so far
    kept.commit()
    dropped.discard()
    assert os.listdir(tmp_path) == ["kept"] and (tmp_path / "kept").read_bytes() == b"ab"


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        AtomicFile(tmp_path / "x", "a")
    assert os.listdir(tmp_path) == []


def test_a_failed_write_names_the_file(tmp_path, monkeypatch):
    """A full disk fails in write, flush or fsync with an error that names no file; AtomicFile adds the target's."""
    def full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as error, AtomicFile(tmp_path / "data.bin", "wb") as out:
        out.write(b"data")
    assert (error.value.errno, error.value.filename) == (errno.ENOSPC, str(tmp_path / "data.bin"))
    assert os.listdir(tmp_path) == []


def test_saved_checkpoints_tokenizers_and_datasets_get_the_umasks_permissions(small_tokenizer, tmp_path):
    """Under umask 022 every file the project writes is 0644 and every directory 0755: weights are no more private
    than datasets (safetensors' save_file and mkdtemp made them 0600 and 0700)."""
    from aquila.data.preprocess import preprocess
    from aquila.model.checkpoint import save_hf
    from aquila.model.config import AquilaConfig
    from aquila.model.model import Aquila

    model = Aquila(AquilaConfig(dim=32, n_layers=2, n_heads=2, vocab_size=small_tokenizer.vocab_size,
                                multiple_of=16, max_seq_len=64))
    (tmp_path / "corpus.txt").write_text("床前明月光", encoding="utf-8")
    umask = os.umask(0o022)
    try:
        save_hf(model, str(tmp_path / "out" / "single"))
        save_hf(model, str(tmp_path / "out" / "sharded"), max_shard_bytes=20_000)
        save_hf(model, str(tmp_path / "out" / "sharded"), max_shard_bytes=30_000, overwrite=True)
        small_tokenizer.save(str(tmp_path / "out" / "single"))
        small_tokenizer.save(str(tmp_path / "out" / "tokenizer"))
        preprocess([str(tmp_path / "corpus.txt")], str(tmp_path / "out" / "data" / "corpus"), small_tokenizer,
                   workers=1, show_progress=False)
    finally:
        os.umask(umask)
    modes = {}
    for root, directories, files in os.walk(tmp_path / "out"):
        for name in directories + files:
            path = os.path.join(root, name)
            modes[os.path.relpath(path, tmp_path / "out")] = stat.S_IMODE(os.stat(path).st_mode)
    assert "sharded/model.safetensors.index.json" in modes and "data/corpus.idx" in modes
    assert {name: mode for name, mode in modes.items() if mode != (0o755 if os.path.isdir(tmp_path / "out" / name)
                                                                   else 0o644)} == {}
