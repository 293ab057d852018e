"""What a run reports: a jsonl file of metrics (optionally TensorBoard too), a live progress bar, MFU, and the plots.

MFU counts 6 N FLOPs per token for the matrices (N: parameters outside the embedding table, which is a lookup, but
with the output projection) plus 6 n_layers dim seq_len for causal attention (half of PaLM's 12 L d T, since a causal
mask skips half the scores), over the peak the config names or, on CPU, the matmul rate measured at start-up.
"""

import contextlib
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from aquila.files import AtomicFile
from aquila.model.config import AquilaConfig

TAIL_BYTES = 1 << 16  # more than any record's line
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 per GPU, vendor figures


def flops_per_token(config: AquilaConfig, seq_len: int) -> float:
    matrices = config.num_parameters() - config.vocab_size * config.dim * (0 if config.tie_embeddings else 1)
    return 6.0 * matrices + 6.0 * config.n_layers * config.dim * seq_len


def peak_flops(device: torch.device, configured_tflops: Optional[float], dtype: torch.dtype = torch.float32
               ) -> tuple[float, str]:
    """Peak FLOP/s per device and where the figure comes from (on CPU: a matmul in the training's dtype, measured)."""
    if configured_tflops:
        return configured_tflops * 1e12, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{key} bf16 dense"
        return 312e12, "unknown GPU: A100 bf16 assumed"
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    start, repeats = time.perf_counter(), 8
    for _ in range(repeats):
        a @ b
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    return repeats * 2 * 1024 ** 3 / (time.perf_counter() - start), f"measured {name} matmul"


def memory_mb(device: torch.device) -> float:
    """The peak memory of this process so far: allocated on the GPU, else resident on the host."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsWindow:
    """The training steps since the last record: their mean loss (a non-finite step counting as 0) and throughput.
    Time spent inside paused() does not count."""

    def __init__(self):
        self.loss_sum, self.steps, self.tokens = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum += loss if math.isfinite(loss) else 0.0
        self.steps += 1
        self.tokens += tokens

    def mean_loss(self) -> float:
        return self.loss_sum / self.steps

    def tokens_per_s(self) -> float:
        return self.tokens / (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused_at


def warn_on_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def drop_torn_tail(path: str, warn: Callable[[str], None]) -> None:
    """Ends metrics.jsonl with a whole line before more are appended: a last line without its newline is a record
    whose writer was killed. Complete, it gets its newline; cut short, it is removed (with a warning), since the next
    record would otherwise be glued to it."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        start = max(0, size - TAIL_BYTES)
        handle.seek(start)
        tail = handle.read()
        if not tail or tail.endswith(b"\n"):
            return
        newline = tail.rfind(b"\n")
        if newline < 0 and start > 0:
            raise ValueError(f"{path}: its last line is over {TAIL_BYTES} bytes long: not a metrics file")
        fragment = tail[newline + 1:]
        try:
            json.loads(fragment)
        except ValueError:
            handle.truncate(start + newline + 1)
            warn(f"warning: {path}: removed its last line, {len(fragment)} bytes cut short by a killed run")
        else:
            handle.write(b"\n")


class MetricsLog:
    """Appends one JSON object per record to metrics.jsonl (main process only)."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool, warn: Callable[[str], None]):
        self.enabled, self.warn = enabled, warn
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.tail_checked = False
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError(f"tensorboard: true needs the tensorboard package ({error})") from None
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self.tail_checked:
            drop_torn_tail(self.path, self.warn)
            self.tail_checked = True
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{name}", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str, warn: Callable[[str], None] = warn_on_stderr) -> list[dict]:
    """The records of a metrics file. Its last line, cut short when a run was killed writing it, is skipped with a
    warning; any other line that is not a JSON object is an error naming path:line."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        lines = [(number, line) for number, line in enumerate(handle, 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as error:
            if index == len(lines) - 1:
                warn(f"warning: {path}:{number}: skipped its last line, cut short by a killed run")
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


def plot(metrics_path: str, output: str, warn: Callable[[str], None] = warn_on_stderr) -> str:
    """Loss (training and validation) and throughput against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path, warn)
    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    if not train:
        raise ValueError(f"{metrics_path} has no training records to plot")
    figure, (losses, speed) = plt.subplots(1, 2, figsize=(11, 4))
    losses.plot([r["step"] for r in train], [r["loss"] for r in train], label="training loss")
    if valid:
        losses.plot([r["step"] for r in valid], [r["loss"] for r in valid], "o-", label="validation loss")
    losses.set_xlabel("optimizer step")
    losses.set_ylabel("cross-entropy (nats/token)")
    losses.legend()
    losses.grid(alpha=0.3)
    speed.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], color="tab:green")
    speed.set_xlabel("optimizer step")
    speed.set_ylabel("tokens/s (all processes)")
    speed.grid(alpha=0.3)
    figure.suptitle(os.path.dirname(os.path.abspath(metrics_path)))
    figure.tight_layout()
    with AtomicFile(output, "wb") as image:
        figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    return output
