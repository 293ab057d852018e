"""The decoding step as one C++ call (csrc/cpu/decode.cpp): the plumbing between the model and that kernel, and the
choice of its one host-dependent setting.

At batch 1 a decoding step reads every weight once and does little else, so the Python and dispatch overhead of ~200
op calls would otherwise cost a third of its time. The kernel runs where it can: CPU, fp32 or bf16 weights and cache
(all of one dtype; the activations stay fp32 inside the step), the CPU kernels chosen (not the reference), everything
contiguous.

The step's projections prefetch their weights some distance ahead of their reads. The distance that pays depends on
the CPU (a distance tuned on one host ran a step at a fraction of its speed on another), so it is chosen per host:
- AQUILA_DECODE_PREFETCH=<bytes> forces one (0: no prefetch), with no tuning;
- otherwise, when the model's weights are larger than the CPU's last-level cache (so that they stream from memory,
  where the distance matters), the first decoder made in a process times a few steps of that model at each of
  PREFETCH_CANDIDATES and keeps the fastest median. The choice is saved per (CPU model, ISA path) in
  decode-tuning.json under $AQUILA_CACHE_DIR (default ~/.cache/aquila), which later processes read instead of tuning;
- a model whose weights fit in the last-level cache has nothing for a prefetch to hide: no prefetch, no tuning.
"""

import datetime
import functools
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from aquila import host
from aquila.files import AtomicFile
from aquila.kernels import backend as _backend

PREFETCH_CANDIDATES = (0, 2048, 8192, 32768)
PREFETCH_ENV = "AQUILA_DECODE_PREFETCH"
TUNING_FILE = "decode-tuning.json"
TUNING_ROUNDS = 5  # timed steps per candidate, taken in turns so that a load that comes and goes hits each alike

# This process's choice for models that stream their weights: {host key: (bytes, where it came from)}.
_choices: dict = {}


# The weight and cache dtypes the C++ step takes.
STEP_DTYPES = (torch.float32, torch.bfloat16)


def workspace_floats(config, batch: int, max_len: int) -> int:
    """The scratch a step needs (DecodeStep's workspace in csrc/kernels.h)."""
    return batch * (3 * config.dim + 2 * (config.n_heads + config.kv_heads) * config.head_dim
                    + 2 * config.hidden_dim + config.n_heads * max_len)


def cache_directory() -> str:
    return os.environ.get("AQUILA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "aquila")


# forward_with_cache makes a decoder for every step: what the choice reads from the system is read once.
@functools.cache
def host_key() -> str:
    """What a tuned choice holds for: the CPU model and the ISA path the kernels take (AQUILA_CPU_ISA can narrow it)."""
    return f"{host.cpu_model()} | {_backend.cpu_extension.cpu_isa()}"


@functools.cache
def last_level_cache_bytes() -> Optional[int]:
    """Size of the largest CPU cache that Linux reports (sysfs), None where it reports none."""
    sizes = {}
    folder = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in (name for name in os.listdir(folder) if name.startswith("index")):
            with open(os.path.join(folder, index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(folder, index, "size")) as f:
                size = f.read().strip()
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            sizes[level] = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except (OSError, ValueError):
        return None
    return sizes[max(sizes)] if sizes else None


def forced_prefetch() -> Optional[int]:
    value = os.environ.get(PREFETCH_ENV, "").strip()
    if not value:
        return None
    try:
        forced = int(value)
    except ValueError:
        forced = -1
    if forced < 0:
        raise ValueError(f"Aquila: {PREFETCH_ENV} must be a whole number of bytes >= 0, got {value!r}")
    return forced


def _read_tuning(path: str) -> dict:
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: tuned again and rewritten
        return {}
    return hosts if isinstance(hosts, dict) else {}


def _saved_choice(entry) -> Optional[int]:
    value = entry.get("prefetch_bytes") if isinstance(entry, dict) else None
    return value if isinstance(value, int) and value >= 0 else None


def tune_prefetch(run_step: Callable[[int], None], candidates=PREFETCH_CANDIDATES, rounds=TUNING_ROUNDS):
    """(fastest candidate, {candidate: median seconds}) of run_step(prefetch_bytes), each candidate warmed once and
    then timed `rounds` times, the candidates in turns."""
    times = {candidate: [] for candidate in candidates}
    for candidate in candidates:
        run_step(candidate)
    for _ in range(rounds):
        for candidate in candidates:
            start = time.perf_counter()
            run_step(candidate)
            times[candidate].append(time.perf_counter() - start)
    medians = {candidate: statistics.median(seconds) for candidate, seconds in times.items()}
    return min(candidates, key=medians.__getitem__), medians


def prefetch_choice(weight_bytes: int, make_runner: Callable[[], Callable[[int], None]]) -> tuple:
    """(prefetch distance in bytes, where it came from: "env", "fits in cache", "cache file", "tuned" or "tuned, not
    saved") for a model that reads weight_bytes per step; make_runner() gives run(prefetch_bytes), which runs one step
    of it, when the choice needs tuning."""
    forced = forced_prefetch()
    if forced is not None:
        return forced, "env"
    cache_size = last_level_cache_bytes()
    if cache_size is not None and weight_bytes <= cache_size:
        return 0, "fits in cache"
    key = host_key()
    if key in _choices:
        return _choices[key]
    path = os.path.join(cache_directory(), TUNING_FILE)
    hosts = _read_tuning(path)
    saved = _saved_choice(hosts.get(key))
    if saved is not None:
        _choices[key] = (saved, "cache file")
        return _choices[key]
    best, medians = tune_prefetch(make_runner())
    hosts[key] = {"prefetch_bytes": best, "median_ms": {str(c): round(s * 1e3, 4) for c, s in medians.items()},
                  "weight_bytes": weight_bytes, "threads": torch.get_num_threads(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with AtomicFile(path, "w") as out:
            json.dump(hosts, out, indent=1)
        _choices[key] = (best, "tuned")
    except OSError as error:
        warnings.warn(f"Aquila: could not save the decoding step's tuning ({error}); this process keeps its choice",
                      stacklevel=3)
        _choices[key] = (best, "tuned, not saved")
    return _choices[key]


def _layer_tensors(layer, k_cache, v_cache):
    return {"attention_norm": layer.attention_norm.weight, "wq": layer.attention.wq.weight,
            "wk": layer.attention.wk.weight, "wv": layer.attention.wv.weight, "wo": layer.attention.wo.weight,
            "ffn_norm": layer.ffn_norm.weight, "w1": layer.feed_forward.w1.weight, "w2": layer.feed_forward.w2.weight,
            "w3": layer.feed_forward.w3.weight, "k_cache": k_cache, "v_cache": v_cache}


def _arguments(model, caches, lengths, batch, max_len, workspace):
    """DecodeStep's fields but tokens, logits and prefetch_bytes, for `model` on the caches [(k, v) per layer]."""
    c = model.config
    layers = [_layer_tensors(layer, k, v) for layer, (k, v) in zip(model.layers, caches)]
    return {"batch": batch, "dim": c.dim, "heads": c.n_heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "hidden_dim": c.hidden_dim, "vocab": c.vocab_size, "max_len": max_len, "eps": c.norm_eps,
            "theta": c.rope_theta, "interleaved": c.rope_interleaved,
            "embeddings": model.tok_embeddings.weight.data_ptr(), "final_norm": model.norm.weight.data_ptr(),
            "output": model.output.weight.data_ptr(), "dtype": _backend.DTYPE_CODES[model.output.weight.dtype],
            "lengths": lengths.data_ptr(), "workspace": workspace.data_ptr(),
            "layers": [{name: t.data_ptr() for name, t in layer.items()} for layer in layers]}


def weight_bytes_per_step(model) -> int:
    """The weights a step reads: all but the embeddings, of which it reads one row per sequence."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters()
               if not name.startswith("tok_embeddings.") or model.output.weight is p)


def _scratch_runner(model) -> Callable[[int], None]:
    """run(prefetch_bytes): one step of `model` at batch 1 on a one-position cache of its own (its length stays 0), so
    that tuning leaves the caller's cache alone."""
    c = model.config
    dtype = model.output.weight.dtype
    caches = [(torch.zeros(1, 1, c.kv_heads, c.head_dim, dtype=dtype), torch.zeros(1, 1, c.kv_heads, c.head_dim,
                                                                                  dtype=dtype))
              for _ in model.layers]
    lengths = torch.zeros(1, dtype=torch.int32)
    workspace = torch.empty(workspace_floats(c, 1, 1))
    tokens = torch.zeros(1, dtype=torch.int64)
    logits = torch.empty(1, c.vocab_size)
    arguments = {**_arguments(model, caches, lengths, 1, 1, workspace), "tokens": tokens.data_ptr(),
                 "logits": logits.data_ptr()}
    threads = torch.get_num_threads()

    def run(prefetch_bytes: int) -> None:
        _backend.cpu_extension.decode_step({**arguments, "prefetch_bytes": prefetch_bytes}, threads)

    run.keep_alive = (caches, lengths, workspace, tokens, logits)
    return run


def decoder(model, cache, prefetch_bytes: Optional[int] = None) -> Optional[Callable[[Tensor], Tensor]]:
    """step(tokens [batch, 1]) -> logits [batch, 1, vocab] for `model` (an Aquila) and its KVCache `cache`, advancing
    the cache; None where the C++ step cannot run. prefetch_bytes: the step's prefetch distance (default: chosen for
    this host, see the module's docstring); step.prefetch says which distance it uses and where that came from."""
    if model.backend not in (None, "cpu") or _backend.cpu_extension is None or cache.k.device.type != "cpu":
        return None
    caches = [(cache.k[index], cache.v[index]) for index in range(len(model.layers))]
    tensors = [t for layer, (k, v) in zip(model.layers, caches) for t in _layer_tensors(layer, k, v).values()]
    tensors += [model.tok_embeddings.weight, model.norm.weight, model.output.weight]
    dtype = model.output.weight.dtype
    if dtype not in STEP_DTYPES or not all(
            t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    if prefetch_bytes is not None and prefetch_bytes < 0:
        raise ValueError(f"Aquila: prefetch_bytes must be >= 0, got {prefetch_bytes}")
    prefetch = ((prefetch_bytes, "argument") if prefetch_bytes is not None else
                prefetch_choice(weight_bytes_per_step(model), lambda: _scratch_runner(model)))
    c, (batch, max_len) = model.config, cache.k.shape[1:3]
    workspace = torch.empty(workspace_floats(c, batch, max_len))
    arguments = {**_arguments(model, caches, cache.lengths, batch, max_len, workspace), "prefetch_bytes": prefetch[0]}

    # The parameters themselves, not their data: model.to(dtype) swaps a parameter's data, which the step detects.
    addresses = [t.data_ptr() for t in tensors]

    def step(tokens: Tensor) -> Tensor:
        if [t.data_ptr() for t in tensors] != addresses:
            raise RuntimeError("Aquila: the model's weights or its cache moved (another dtype, device or storage) "
                               "since model.decoder(cache) was made: make a new decoder")
        cache.check_room(tokens)
        tokens = tokens.reshape(batch).to("cpu", torch.int64).contiguous()
        logits = torch.empty(batch, 1, c.vocab_size)
        _backend.cpu_extension.decode_step(
            {**arguments, "tokens": tokens.data_ptr(), "logits": logits.data_ptr()}, torch.get_num_threads())
        cache.lengths += 1
        return logits

    # With `tensors` above: everything the addresses point into lives as long as the step.
    step.keep_alive = (workspace, cache)
    step.prefetch = prefetch
    return step
