"""Writing files so that a crash never leaves one half-written: to a temporary file beside the target, flushed to
disk, then renamed over it."""

import contextlib
import os
import tempfile
from typing import IO

WRITE_MODES = ("w", "wb")


def make_public(path: str) -> None:
    """Gives a file made by mkstemp or a directory made by mkdtemp (private to their owner) the mode an ordinary new
    file or directory gets under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def _naming(error: OSError, path: str) -> OSError:
    """error with `path` as its file name when it has none (a failed write or flush, such as a full disk, names no
    file), so that the message says which file could not be written."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, path)


class AtomicFile:
    """A new version of `path`, written into a temporary file in the same directory (renaming within one file system
    is atomic). commit() flushes it to disk, gives it the permissions a new file gets under the umask and renames it
    over `path`; discard() deletes it, leaving `path` as it was. As a context manager it yields the open file, commits
    on a clean exit and discards when the block raises:

        with AtomicFile(path, "wb") as out:
            out.write(data)

    mode: "w" (text, UTF-8) or "wb". The file is also open as .file, for writers whose output outlives one block.
    """

    def __init__(self, path: str, mode: str = "w"):
        if mode not in WRITE_MODES:
            raise ValueError(f"AtomicFile: mode must be one of {WRITE_MODES}, got {mode!r}")
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            handle, self.temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(self.path)}.",
                                                      suffix=".tmp")
        except OSError as error:  # named after the directory rather than mkstemp's random name
            raise type(error)(error.errno, error.strerror, directory) from error
        self.file: IO = os.fdopen(handle, mode, encoding=None if "b" in mode else "utf-8")

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            make_public(self.temporary)
            os.replace(self.temporary, self.path)
        except OSError as error:
            self.discard()
            named = _naming(error, self.path)
            if named is error:
                raise
            raise named from error
        except BaseException:
            self.discard()
            raise

    def discard(self) -> None:
        # Flushing the buffer fails again on a full disk; the file is closed and deleted all the same.
        with contextlib.suppress(OSError):
            self.file.close()
        if os.path.exists(self.temporary):
            os.unlink(self.temporary)

    def __enter__(self) -> IO:
        return self.file

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError):
            named = _naming(exc, self.path)
            if named is not exc:
                raise named from exc


def write_text_atomically(path: str, text: str) -> None:
    with AtomicFile(path, "w") as out:
        out.write(text)
