"""Training checkpoints that survive crashes.

A checkpoint is a directory `checkpoints/step-000123/` holding:
- the model in the Hugging Face layout (config.json + model.safetensors) and the tokenizer: `aquila generate` and
  transformers load it as it is;
- `train_state/`: model and optimizer state as the engine saves it: torch.distributed.checkpoint's format, each
  process writing its own shards (FSDP state is never gathered on one rank for this), or BMTrain's;
- `trainer.json`: step, scheduler and loss-scaler state, the config; `rng-<rank>.json`: each process's RNG states.

It is written to `.step-000123.partial/` and renamed when complete, then `latest` (a one-line file, itself replaced
atomically) names it, and checkpoints beyond the newest keep_checkpoints are deleted (never the one just written). A
crash mid-save leaves the previous checkpoint and `latest` as they were. Saving a step that already has a checkpoint
(resuming a finished run) moves the old one aside to `.step-000123.previous/`, renames the new one in, then deletes
the old: recover() puts an aside copy back when a crash came before its replacement was in place, and deletes it when
after. On resume, a checkpoint that is incomplete or fails to load is reported and the one before it is used; one
whose run was configured differently is refused (ConfigChangedError) rather than skipped.
"""

import json
import os
import random
import shutil
from collections.abc import Callable
from typing import Optional

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

from aquila.files import write_text_atomically
from aquila.model.checkpoint import save_hf_tensors
from aquila.train.engine import Optimization, Processes, barrier

REQUIRED_FILES = ("config.json", "trainer.json")
PARTIAL, ASIDE = ".partial", ".previous"


class ConfigChangedError(ValueError):
    pass


def rng_state() -> dict:
    """This process's RNG states as JSON (no pickle to load back)."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    state = {"torch": torch.get_rng_state().tolist(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "python": [version, list(python_state), python_gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = state["python"]
    random.setstate((version, tuple(python_state), python_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def resolve(path: str) -> str:
    """A checkpoint directory from a checkpoint directory or a run's output directory (its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    latest = Checkpoints(path, None, 1).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (no config.json) nor a run directory with "
                                "checkpoints")
    return latest


class Checkpoints:
    def __init__(self, output_dir: str, processes: Processes, keep: int):
        self.directory = os.path.join(output_dir, "checkpoints")
        self.processes, self.keep = processes, keep

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:06d}")

    def hidden(self, name: str, suffix: str) -> str:
        return os.path.join(self.directory, f".{name}{suffix}")

    def recover(self, log) -> None:
        """Finishes or undoes what a crash interrupted (main process, before anything else touches the directory): a
        checkpoint moved aside for a re-save comes back when its replacement never arrived and goes when it did;
        partial checkpoints, saves that never completed, and temporary copies of `latest` are deleted."""
        if not os.path.isdir(self.directory):
            return
        for entry in sorted(os.listdir(self.directory)):
            if entry.startswith(".step-") and entry.endswith(ASIDE):
                name, aside = entry[1:-len(ASIDE)], os.path.join(self.directory, entry)
                if os.path.isdir(os.path.join(self.directory, name)):
                    shutil.rmtree(aside)
                else:
                    os.replace(aside, os.path.join(self.directory, name))
                    log(f"restored checkpoint {name}, moved aside by a save that did not finish")
            elif entry.startswith(".step-") and entry.endswith(PARTIAL):
                shutil.rmtree(os.path.join(self.directory, entry))
            elif entry.startswith(".latest.") and entry.endswith(".tmp"):  # AtomicFile's, killed before its rename
                os.unlink(os.path.join(self.directory, entry))

    def save(self, step: int, optimization: Optimization, trainer_state: dict, config, tokenizer) -> str:
        """Every process calls this: each writes its shards, the main process the rest."""
        final = self.path(step)
        step_name = os.path.basename(final)
        partial = self.hidden(step_name, PARTIAL)
        main = self.processes.is_main
        if main:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        barrier(self.processes)
        optimization.save_sharded(os.path.join(partial, "train_state"))
        full = optimization.full_model_state()
        write_text_atomically(os.path.join(partial, f"rng-{self.processes.rank}.json"), json.dumps(rng_state()))
        if main:
            weights = os.path.join(partial, "weights")
            save_hf_tensors(config, full.items(), weights)
            for name in os.listdir(weights):
                os.replace(os.path.join(weights, name), os.path.join(partial, name))
            os.rmdir(weights)
            tokenizer.save(partial)
            write_text_atomically(os.path.join(partial, "trainer.json"),
                                  json.dumps({**trainer_state, "step": step}, indent=1))
        barrier(self.processes)
        if main:
            aside = None
            if os.path.exists(final):  # the last good copy of this step goes only once its replacement is in place
                aside = self.hidden(step_name, ASIDE)
                os.replace(final, aside)
            os.replace(partial, final)
            write_text_atomically(os.path.join(self.directory, "latest"), step_name + "\n")
            if aside is not None:
                shutil.rmtree(aside)
            others = [other for other in self.completed() if other != step_name]
            for old in others[:max(0, len(others) - (self.keep - 1))]:
                shutil.rmtree(os.path.join(self.directory, old))
        barrier(self.processes)
        return final

    def completed(self) -> list[str]:
        """Checkpoint directory names, oldest first (partial ones excluded)."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(name for name in os.listdir(self.directory) if name.startswith("step-"))

    def latest(self) -> Optional[str]:
        pointer = os.path.join(self.directory, "latest")
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as handle:
                name = handle.read().strip()
            if os.path.isdir(os.path.join(self.directory, name)):
                return os.path.join(self.directory, name)
            if os.path.isdir(self.hidden(name, ASIDE)):  # a re-save crashed before recover() ran
                return self.hidden(name, ASIDE)
        names = self.completed()
        return os.path.join(self.directory, names[-1]) if names else None

    def load_latest(self, optimization: Optimization, log, check: Callable[[dict, str], None]) -> Optional[dict]:
        """Restores the newest loadable checkpoint into model and optimizer; returns its trainer state, or None when
        there is no checkpoint. A broken one is reported through log and skipped. check(trainer_state, path) runs
        before the state is loaded; the ConfigChangedError it may raise ends the search."""
        newest = self.latest()
        candidates = [os.path.join(self.directory, n) for n in reversed(self.completed())]
        if newest in candidates:
            candidates.remove(newest)
            candidates.insert(0, newest)
        for path in candidates:
            try:
                return self._load(path, optimization, check)
            except ConfigChangedError:
                raise
            except (Exception, CheckpointException) as error:  # DCP's CheckpointException is a BaseException
                log(f"checkpoint {path} cannot be loaded ({type(error).__name__}: {error}); trying the one before")
        if candidates:
            raise ValueError(f"no loadable checkpoint in {self.directory}")
        return None

    def _load(self, path: str, optimization: Optimization, check: Callable[[dict, str], None]) -> dict:
        missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ValueError(f"incomplete checkpoint, missing {missing}")
        with open(os.path.join(path, "trainer.json"), encoding="utf-8") as handle:
            trainer_state = json.load(handle)
        check(trainer_state, path)
        optimization.load_sharded(os.path.join(path, "train_state"))
        rng_file = os.path.join(path, f"rng-{self.processes.rank}.json")
        if os.path.isfile(rng_file):
            with open(rng_file, encoding="utf-8") as handle:
                set_rng_state(json.load(handle))
        trainer_state["path"] = path
        return trainer_state
