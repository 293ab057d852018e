"""A run's output directory: one run at a time, and never a run mixed into another's files.

- RunLock: `run.lock` in the directory, held for the whole run. A second run into the directory is refused, naming the
  holder's pid and host.
- check_earlier_run: a fresh run (no --resume) into a directory that holds an earlier run's outputs is refused, unless
  --overwrite: checkpoints of both would share one directory (and the older, longer run's sort last), and
  metrics.jsonl would mix them.
- remove_earlier_run: with --overwrite, once the new run has been built (its config, data and model checked), the
  earlier run's outputs are renamed into `.overwritten/` (one rename each, so a crash never leaves them half-deleted
  where the new run writes) and that is deleted. The data cache (`data/`, named by content) is kept.
"""

import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Optional

LOCK_NAME = "run.lock"
OVERWRITTEN = ".overwritten"
# What a run writes at the top of its output directory, beside the shared data cache.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "config.yaml", "tensorboard")


class RunDirectoryError(ValueError):
    pass


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another run (its lock is being written)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started', '?')})"


class RunLock:
    """run.lock, holding its holder's pid and host, and flock()ed while held: the kernel releases a flock when its
    process dies however it dies, so a lock file that can be flocked but names a holder was left by a dead run. One
    from a dead process of this host is taken over with a warning; one naming a live process (pid reuse, a flock that
    went astray) or another host (flock may not reach across hosts on shared file systems) is refused."""

    def __init__(self, directory: str, log: Callable[[str], None]):
        self.path = os.path.join(directory, LOCK_NAME)
        self.log = log
        self.descriptor: Optional[int] = None

    def acquire(self) -> None:
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = self._read(descriptor)
                finally:
                    os.close(descriptor)
                raise RunDirectoryError(f"{os.path.dirname(self.path)} is in use by {describe(holder)}: wait for that "
                                        f"run to end or choose another --output-dir (lock file {self.path})") from None
            if self._still_the_file(descriptor):
                break
            os.close(descriptor)  # its holder removed it as we opened it: lock the file now there
        try:
            self._take_over(descriptor)
        except BaseException:
            os.close(descriptor)
            raise
        self.descriptor = descriptor

    def _take_over(self, descriptor: int) -> None:
        """Writes this process into the flocked file, after checking that whoever it names is gone."""
        holder = self._read(descriptor)
        if holder:
            here = socket.gethostname()
            if holder.get("host") != here or not isinstance(holder.get("pid"), int) or process_alive(holder["pid"]):
                raise RunDirectoryError(f"{os.path.dirname(self.path)} may be in use by {describe(holder)}: its lock "
                                        f"file {self.path} is not held, but that process cannot be checked from here "
                                        f"or is alive; delete the lock file if no run uses the directory")
            self.log(f"warning: taking over the lock {self.path} of pid {holder['pid']} on {here}, which is no "
                     "longer running")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(descriptor)

    def release(self) -> None:
        if self.descriptor is None:
            return
        if self._still_the_file(self.descriptor):  # removed while flocked: no one can take a file about to go
            os.unlink(self.path)
        os.close(self.descriptor)
        self.descriptor = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _still_the_file(self, descriptor: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            return False

    def _read(self, descriptor: int) -> Optional[dict]:
        text = os.pread(descriptor, 4096, 0).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        if not isinstance(holder, dict):
            raise RunDirectoryError(f"{self.path}: not a lock file of this program ({text[:80]!r}); delete it if no "
                                    "run uses the directory")
        return holder


def earlier_run(directory: str) -> list[str]:
    """The outputs of an earlier run in directory (names relative to it; the newest checkpoint by name)."""
    found = []
    for name in RUN_OUTPUTS:
        path = os.path.join(directory, name)
        if name == "checkpoints":
            entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
            steps = [entry for entry in entries if entry.startswith("step-")]
            if steps:
                found.append(f"checkpoints/{steps[-1]}")
            elif entries:
                found.append("checkpoints/")
        elif os.path.exists(path):
            found.append(name)
    return found


def check_earlier_run(directory: str, resume: bool, overwrite: bool) -> None:
    """Refuses a fresh run into a directory that holds an earlier run's outputs (see the module's docstring)."""
    if resume and overwrite:
        raise RunDirectoryError("give --resume (continue the run in the output directory) or --overwrite (replace "
                                "it), not both")
    found = earlier_run(directory)
    if found and not resume and not overwrite:
        raise RunDirectoryError(f"{directory} holds an earlier run ({', '.join(found)}): continue it with --resume, "
                                "replace it with --overwrite, or choose another --output-dir")


def remove_earlier_run(directory: str, log: Callable[[str], None]) -> None:
    """Deletes an earlier run's outputs (--overwrite); call it holding the directory's lock."""
    found = earlier_run(directory)
    trash = os.path.join(directory, OVERWRITTEN)
    if not found and not os.path.exists(trash):
        return
    os.makedirs(trash, exist_ok=True)
    for name in RUN_OUTPUTS:
        if os.path.lexists(os.path.join(directory, name)):
            os.replace(os.path.join(directory, name), os.path.join(trash, f"{name}-{time.time_ns()}"))
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(trash)
    if found:
        log(f"--overwrite: deleted the earlier run's {', '.join(found)} from {directory}")
