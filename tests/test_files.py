"""aquila.files.AtomicFile: a file is replaced whole or not at all, with an ordinary file's permissions."""

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
