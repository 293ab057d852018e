"""Writing files so that a crash never leaves one half-written: to a temporary file beside the target, flushed to
disk, then renamed over it."""

import os
import tempfile


def make_public(path: str) -> None:
    """Gives a file made by mkstemp (private to its owner) the mode an ordinary new file gets under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text_atomically(path: str, text: str) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        make_public(temporary)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
