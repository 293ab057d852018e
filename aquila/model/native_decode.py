"""The decoding step as one C++ call (csrc/cpu/decode.cpp): the plumbing between the model and that kernel, the
choice of its one host-dependent setting, and its output projection on its own (output_logits), which ends a
prompt's prefill.

At batch 1 a decoding step reads every weight once and does little else, so the Python and dispatch overhead of ~200
op calls would otherwise cost a third of its time. The kernel runs where it can: CPU, the CPU kernels chosen (not the
reference), everything contiguous; embeddings, norms and cache in fp32 or bf16, all of one dtype, the step's (the
activations stay fp32 inside the step); each linear either dense in that dtype or a QuantizedLinear (int8, or int4
of any group size, symmetric or not: its qweight, scales and zeros as they are, dequantized in registers). Where it
cannot (fp16, a GPU, the torch reference backend), decoder() returns None and the model decodes through its modules.

A bf16 step's dense projections take their input rounded to bf16 (``bf16_inputs``), as a bf16 model's matmuls do,
where the CPU multiplies bf16 pairs in one instruction (AVX512-BF16: ``aquila._C.cpu_isa() == "avx512_bf16"``): the
weights are then multiplied as they lie in memory instead of being widened to fp32 first, which is what bounds the
step's speed on such CPUs. Elsewhere the inputs stay fp32 (the closer result, at no cost there); either can be asked
for on any CPU.

A bf16 step's weight-only quantized projections take their input rounded to int8 (``int8_inputs``: in blocks of 32,
one scale each, as llama.cpp's Q8_0 activations), where the CPU multiplies bytes in one instruction (AVX512-VNNI:
``aquila._C.cpu_vnni()``): the products then run on integers, 64 an instruction, instead of dequantizing each weight
to fp32, which is what bounds an int8 or int4 step's speed on such CPUs. What the rounding costs in quality is
measured by scripts/quantization_quality.py (docs/model.md). An fp32 step (whose user asked for fp32 precision) and
other CPUs keep fp32 inputs; either can be asked for on any CPU and dtype, by decoder()'s argument or, for every step
and prefill the process makes (`aquila generate`, `generate()`), by AQUILA_DECODE_INT8_INPUTS=1 or =0. A prompt's
prefill (Aquila.forward_with_cache) rounds where its steps do (default_int8_inputs), so that both compute alike; on
VNNI it then multiplies integers too (aquila.kernels.quantized_linear's int8_inputs: a GEMM on vpdpbusd, or on AMX
tiles where the CPU has AMX-INT8).

The step's projections prefetch their weights some distance ahead of their reads. The distance that pays depends on
the CPU (a distance tuned on one host ran a step at a fraction of its speed on another), so it is chosen per host:
- AQUILA_DECODE_PREFETCH=<bytes> forces one (0: no prefetch), with no tuning;
- otherwise, when the model's weights are larger than the private caches of the cores that run the step (so that
  they stream from a shared cache or from memory, where the distance matters), the first decoder made in a process
  times a few steps of that model at each of
  PREFETCH_CANDIDATES and keeps the fastest median. The choice is saved per (CPU model, ISA path) in
  decode-tuning.json under $AQUILA_CACHE_DIR (default ~/.cache/aquila), which later processes read instead of tuning
  (per kind of projection loop as well: tuning_key), for models within TUNING_SIZE_FACTOR of the size it was tuned
  on: a model further from it tunes again and replaces the entry;
- a model whose weights fit in those private caches has nothing for a prefetch to hide: no prefetch, no tuning.
The last-level cache does not count: a socket's cores share it, and on a virtual machine other tenants too, so it
cannot be relied on to hold a model from one step to the next. On a 2-core Xeon VM that reports a 480 MB L3, the
steps of a 119 MB model (aquila-100m in bf16, int8 and int4) ran 13-25% faster with a prefetch than without.
"""

import datetime
import functools
import json
import os
import statistics
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor, nn

from aquila import host
from aquila.files import AtomicFile
from aquila.kernels import backend as _backend
from aquila.model.quantize import QuantizedLinear

PREFETCH_CANDIDATES = (0, 2048, 8192, 32768)
PREFETCH_ENV = "AQUILA_DECODE_PREFETCH"
INT8_INPUTS_ENV = "AQUILA_DECODE_INT8_INPUTS"
TUNING_FILE = "decode-tuning.json"
TUNING_ROUNDS = 5  # timed steps per candidate, taken in turns so that a load that comes and goes hits each alike
# A choice tuned on a model that reads more than this many times fewer (or more) bytes a step is not reused: its steps
# met the caches and the timer's noise in other proportions (a 60 MB model's 2-8 ms steps say little of a 14 GB one's).
TUNING_SIZE_FACTOR = 4

# This process's choice for models that stream their weights: {host key: (bytes, where it came from, the weight bytes
# a step of the model it was tuned on reads)}.
_choices: dict = {}


# The dtypes the C++ step takes for its embeddings, norms, cache and dense weights.
STEP_DTYPES = (torch.float32, torch.bfloat16)
# DecodeLinear's formats (WeightFormat in csrc/kernels.h).
DENSE, INT8, INT4 = 0, 1, 2


def workspace_floats(config, batch: int, max_len: int) -> int:
    """The scratch a step needs (DecodeStep's workspace in csrc/kernels.h)."""
    attended = config.n_heads * config.head_dim
    return batch * (3 * config.dim + 2 * (config.n_heads + config.kv_heads) * config.head_dim
                    + 2 * config.hidden_dim + config.n_heads * max_len
                    + max(config.dim, attended, config.hidden_dim))


def cache_directory() -> str:
    return os.environ.get("AQUILA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "aquila")


# forward_with_cache makes a decoder for every step: what the choice reads from the system is read once.
@functools.cache
def host_key() -> str:
    """What a tuned choice holds for: the CPU model and the ISA path the kernels take (AQUILA_CPU_ISA can narrow it)."""
    return f"{host.cpu_model()} | {_backend.cpu_extension.cpu_isa()}"


@functools.cache
def private_cache_bytes(folder: str = "/sys/devices/system/cpu/cpu0/cache") -> Optional[int]:
    """Size of the largest CPU cache below the last level (Linux's sysfs `folder` of the first CPU's caches): the one
    each core has to itself, on the CPUs that have one. None where it reports fewer than two levels."""
    sizes = {}
    try:
        for index in (name for name in os.listdir(folder) if name.startswith("index")):
            with open(os.path.join(folder, index, "level")) as f:
                level = int(f.read())
            with open(os.path.join(folder, index, "size")) as f:
                size = f.read().strip()
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            size = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
            sizes[level] = max(size, sizes.get(level, 0))  # level 1 has a data and an instruction cache
    except (OSError, ValueError):
        return None
    levels = sorted(sizes)
    return sizes[levels[-2]] if len(levels) >= 2 else None


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


def forced_int8_inputs() -> Optional[bool]:
    """AQUILA_DECODE_INT8_INPUTS: 1 or 0 for every quantized step of the process, unset for the default."""
    value = os.environ.get(INT8_INPUTS_ENV, "").strip()
    if not value:
        return None
    if value not in ("0", "1"):
        raise ValueError(f"Aquila: {INT8_INPUTS_ENV} must be 1 or 0, got {value!r}")
    return value == "1"


def default_int8_inputs(dtype: torch.dtype) -> bool:
    """Whether quantized projections take their inputs rounded to int8 where nobody asked either way, in decoding steps
    and prefills alike: AQUILA_DECODE_INT8_INPUTS where set, else bf16 activations on a CPU with VNNI."""
    forced = forced_int8_inputs()
    return forced if forced is not None else _backend.cpu_int8_products() and dtype == torch.bfloat16


def _read_tuning(path: str) -> dict:
    try:
        with open(path) as f:
            hosts = json.load(f)
    except (OSError, ValueError):  # none yet, or unreadable: tuned again and rewritten
        return {}
    return hosts if isinstance(hosts, dict) else {}


def _comparable(tuned_bytes, weight_bytes: int) -> bool:
    """Whether a choice tuned on a model reading tuned_bytes a step holds for one reading weight_bytes."""
    return (isinstance(tuned_bytes, int) and tuned_bytes > 0
            and tuned_bytes * TUNING_SIZE_FACTOR >= weight_bytes and weight_bytes * TUNING_SIZE_FACTOR >= tuned_bytes)


def _saved_choice(entry, weight_bytes: int) -> Optional[int]:
    """The entry's distance, if it is one and was tuned on a model of comparable size (_comparable)."""
    if not isinstance(entry, dict) or not _comparable(entry.get("weight_bytes"), weight_bytes):
        return None
    value = entry.get("prefetch_bytes")
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


def tuning_key(model, bf16_inputs: bool, int8_inputs: bool = False) -> str:
    """What a tuned choice holds for: the host (host_key) and the inner loops of the step's block projections (int8 and
    int4 with fp32 or int8 inputs, dense with fp32 or bf16 inputs), which consume their weights at different paces and
    want different distances. Dense with fp32 inputs alone is the host's key as it is."""
    def loop(linear) -> str:
        if isinstance(linear, QuantizedLinear):
            return f"int{linear.bits}, int8 inputs" if int8_inputs else f"int{linear.bits}"
        return "dense, bf16 inputs" if bf16_inputs else "dense"
    loops = sorted({loop(linear) for layer in model.layers for linear in _block_linears(layer).values()})
    return host_key() if loops == ["dense"] else " | ".join([host_key(), *loops])


def prefetch_choice(weight_bytes: int, make_runner: Callable[[], Callable[[int], None]], key: str) -> tuple:
    """(prefetch distance in bytes, where it came from: "env", "fits in cache", "cache file", "tuned" or "tuned, not
    saved") for a model that reads weight_bytes per step, under `key` (tuning_key) in the tuning file; make_runner()
    gives run(prefetch_bytes), which runs one step of it, when the choice needs tuning. A choice made on a model of
    another size (beyond TUNING_SIZE_FACTOR) is tuned again, and the new one replaces it in the file."""
    forced = forced_prefetch()
    if forced is not None:
        return forced, "env"
    cache_size = private_cache_bytes()
    if cache_size is not None and weight_bytes <= cache_size * torch.get_num_threads():
        return 0, "fits in cache"
    if key in _choices and _comparable(_choices[key][2], weight_bytes):
        return _choices[key][:2]
    path = os.path.join(cache_directory(), TUNING_FILE)
    hosts = _read_tuning(path)
    saved = _saved_choice(hosts.get(key), weight_bytes)
    if saved is not None:
        _choices[key] = (saved, "cache file", hosts[key]["weight_bytes"])
        return _choices[key][:2]
    best, medians = tune_prefetch(make_runner())
    hosts[key] = {"prefetch_bytes": best, "median_ms": {str(c): round(s * 1e3, 4) for c, s in medians.items()},
                  "weight_bytes": weight_bytes, "threads": torch.get_num_threads(),
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with AtomicFile(path, "w") as out:
            json.dump(hosts, out, indent=1)
        _choices[key] = (best, "tuned", weight_bytes)
    except OSError as error:
        warnings.warn(f"Aquila: could not save the decoding step's tuning ({error}); this process keeps its choice",
                      stacklevel=3)
        _choices[key] = (best, "tuned, not saved", weight_bytes)
    return _choices[key][:2]


def _block_linears(layer) -> dict:
    return {"wq": layer.attention.wq, "wk": layer.attention.wk, "wv": layer.attention.wv, "wo": layer.attention.wo,
            "w1": layer.feed_forward.w1, "w2": layer.feed_forward.w2, "w3": layer.feed_forward.w3}


def _linear_tensors(linear) -> dict:
    """The tensors the step reads of a linear: its weight, or a QuantizedLinear's buffers (zeros: asymmetric only)."""
    if isinstance(linear, QuantizedLinear):
        return {name: getattr(linear, name) for name in ("qweight", "scales", "zeros")
                if getattr(linear, name) is not None}
    return {"weight": linear.weight}


def _linear_fields(linear) -> dict:
    """DecodeLinear's fields for a linear."""
    tensors = _linear_tensors(linear)
    if not isinstance(linear, QuantizedLinear):
        return {"format": DENSE, "weight": tensors["weight"].data_ptr(), "scales": 0, "zeros": 0, "group_size": 0}
    zeros = tensors.get("zeros")
    return {"format": INT8 if linear.bits == 8 else INT4, "weight": tensors["qweight"].data_ptr(),
            "scales": tensors["scales"].data_ptr(), "zeros": 0 if zeros is None else zeros.data_ptr(),
            "group_size": linear.group_size or 0}


def _linears(model) -> list:
    return [model.output, *(linear for layer in model.layers for linear in _block_linears(layer).values())]


def _linears_supported(model, dtype: torch.dtype) -> bool:
    """Every linear is bias-free, dense in the step's dtype or quantized with the buffers' dtypes of the format."""
    buffer_dtypes = {"qweight": {8: torch.int8, 4: torch.uint8}, "scales": {8: torch.float32, 4: torch.float32},
                     "zeros": {4: torch.uint8}}
    for linear in _linears(model):
        if isinstance(linear, QuantizedLinear):
            if any(t.dtype != buffer_dtypes[name].get(linear.bits) for name, t in _linear_tensors(linear).items()):
                return False
        elif not isinstance(linear, nn.Linear) or linear.bias is not None or linear.weight.dtype != dtype:
            return False
    return True


def _weights_supported(model) -> bool:
    """Whether the C++ step can run `model`'s weights: the CPU kernels chosen and built; embeddings and norms in one of
    STEP_DTYPES, the step's; every linear supported (_linears_supported); everything on the CPU and contiguous."""
    if model.backend not in (None, "cpu") or _backend.cpu_extension is None:
        return False
    dtype = step_dtype(model)
    in_dtype = [model.tok_embeddings.weight, model.norm.weight,
                *(norm.weight for layer in model.layers for norm in (layer.attention_norm, layer.ffn_norm))]
    return (dtype in STEP_DTYPES and all(t.dtype == dtype for t in in_dtype) and _linears_supported(model, dtype)
            and all(t.device.type == "cpu" and t.is_contiguous() for t in _weight_tensors(model)))


def _weight_tensors(model) -> list:
    """Every weight tensor the step reads (the tied output's table once)."""
    tensors = [model.tok_embeddings.weight, model.norm.weight]
    for layer in model.layers:
        tensors += [layer.attention_norm.weight, layer.ffn_norm.weight]
        tensors += [t for linear in _block_linears(layer).values() for t in _linear_tensors(linear).values()]
    return tensors + [t for t in _linear_tensors(model.output).values() if t is not model.tok_embeddings.weight]


def _arguments(model, caches, lengths, batch, max_len, workspace, bf16_inputs, int8_inputs=False):
    """DecodeStep's fields but tokens, logits and prefetch_bytes, for `model` on the caches [(k, v) per layer]."""
    c = model.config
    layers = [{"attention_norm": layer.attention_norm.weight.data_ptr(), "ffn_norm": layer.ffn_norm.weight.data_ptr(),
               "k_cache": k.data_ptr(), "v_cache": v.data_ptr(),
               **{name: _linear_fields(linear) for name, linear in _block_linears(layer).items()}}
              for layer, (k, v) in zip(model.layers, caches)]
    return {"batch": batch, "dim": c.dim, "heads": c.n_heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "hidden_dim": c.hidden_dim, "vocab": c.vocab_size, "max_len": max_len, "eps": c.norm_eps,
            "theta": c.rope_theta, "interleaved": c.rope_interleaved,
            "embeddings": model.tok_embeddings.weight.data_ptr(), "final_norm": model.norm.weight.data_ptr(),
            "output": _linear_fields(model.output), "dtype": _backend.DTYPE_CODES[step_dtype(model)],
            "lengths": lengths.data_ptr(), "workspace": workspace.data_ptr(), "layers": layers,
            "bf16_inputs": bf16_inputs, "int8_inputs": int8_inputs}


def step_dtype(model) -> torch.dtype:
    """The step's dtype: the embeddings' (also that of the norms, the cache and every dense linear)."""
    return model.tok_embeddings.weight.dtype


def weight_bytes_per_step(model) -> int:
    """The weights a step reads: every linear's (dense, or its quantized buffers) and the norms, not the embeddings
    (of which it reads one row per sequence) unless the output projection shares them."""
    tied = isinstance(model.output, nn.Linear) and model.output.weight is model.tok_embeddings.weight
    return sum(t.numel() * t.element_size() for t in _weight_tensors(model)
               if tied or t is not model.tok_embeddings.weight)


def _scratch_runner(model, bf16_inputs: bool, int8_inputs: bool) -> Callable[[int], None]:
    """run(prefetch_bytes): one step of `model` at batch 1 on a one-position cache of its own (its length stays 0), so
    that tuning leaves the caller's cache alone."""
    c = model.config
    dtype = step_dtype(model)
    caches = [(torch.zeros(1, 1, c.kv_heads, c.head_dim, dtype=dtype), torch.zeros(1, 1, c.kv_heads, c.head_dim,
                                                                                  dtype=dtype))
              for _ in model.layers]
    lengths = torch.zeros(1, dtype=torch.int32)
    workspace = torch.empty(workspace_floats(c, 1, 1))
    tokens = torch.zeros(1, dtype=torch.int64)
    logits = torch.empty(1, c.vocab_size)
    arguments = {**_arguments(model, caches, lengths, 1, 1, workspace, bf16_inputs, int8_inputs),
                 "tokens": tokens.data_ptr(),
                 "logits": logits.data_ptr()}
    threads = torch.get_num_threads()

    def run(prefetch_bytes: int) -> None:
        _backend.cpu_extension.decode_step({**arguments, "prefetch_bytes": prefetch_bytes}, threads)

    run.keep_alive = (caches, lengths, workspace, tokens, logits)
    return run


def _addresses(model, cache) -> Callable[[], list]:
    """addresses(): where everything the step reads and writes is now, cheap enough to take at every step. It holds
    the parameters themselves (model.to(dtype) swaps a parameter's data, not the parameter) and each QuantizedLinear's
    table of buffers (they are replaced whole: the scales by a cast, all of them by loading)."""
    parameters = [t for t in _weight_tensors(model) if isinstance(t, nn.Parameter)]
    buffers = [(linear._buffers, name) for linear in _linears(model) if isinstance(linear, QuantizedLinear)
               for name in _linear_tensors(linear)]

    def addresses() -> list:
        return ([p.data_ptr() for p in parameters] + [table[name].data_ptr() for table, name in buffers]
                + [cache.k.data_ptr(), cache.v.data_ptr()])

    return addresses


def _prefetch_for(model, bf16_inputs: bool, int8_inputs: bool) -> tuple:
    """prefetch_choice for `model`'s steps with these roundings of their inputs (tuned on its own steps if need be)."""
    return prefetch_choice(weight_bytes_per_step(model), lambda: _scratch_runner(model, bf16_inputs, int8_inputs),
                           tuning_key(model, bf16_inputs, int8_inputs))


# Per model: (what its output projection's fields were made for, the fields, or None where the step cannot run).
_projections: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _projection_fields(model, int8_inputs: bool) -> Optional[dict]:
    """DecodeProjection's fields but in, out, workspace and batch for `model`'s output projection, or None where the
    step cannot run. Made (the whole model checked, the prefetch distance chosen: a step's work) once per model,
    output weights, dtype and settings: a prefill takes them for a dictionary lookup."""
    output = model.output
    made_for = (id(output), *(t.data_ptr() for t in _linear_tensors(output).values()), step_dtype(model),
                model.backend, len(model.layers), int8_inputs, forced_prefetch(), torch.get_num_threads())
    known = _projections.get(model)
    if known is not None and known[0] == made_for:
        return known[1]
    fields = None
    if _weights_supported(model):
        dtype = step_dtype(model)
        bf16_inputs = _backend.cpu_bf16_products() and dtype == torch.bfloat16
        int8_inputs = int8_inputs and any(isinstance(linear, QuantizedLinear) for linear in _linears(model))
        prefetch, _ = _prefetch_for(model, bf16_inputs, int8_inputs)
        fields = {"weight": _linear_fields(output), "rows": model.config.vocab_size, "cols": model.config.dim,
                  "prefetch_bytes": prefetch, "dtype": _backend.DTYPE_CODES[dtype], "bf16_inputs": bf16_inputs,
                  "int8_inputs": int8_inputs}
    _projections[model] = (made_for, fields)
    return fields


def output_logits(model, hidden: Tensor, int8_inputs: bool) -> Optional[Tensor]:
    """The logits [batch, 1, vocab] (fp32, as a step's) of hidden [batch, 1, dim], the final norm's output at each
    sequence's last position, through the output projection as the decoding steps compute theirs: on the step's loops,
    with its prefetch distance and its rounding of inputs (bf16_inputs by default; int8_inputs as the prefill rounds
    its quantized linears' inputs), in one C++ call (DecodeProjection in csrc/kernels.h). A prompt's prefill ends with
    it: torch's matmul of one row by a bf16 vocabulary projection streams the weights at a fraction of the step's
    rate. None where the step cannot run: the model then projects through its module."""
    if hidden.device.type != "cpu":
        return None
    fields = _projection_fields(model, int8_inputs)
    if fields is None:
        return None
    rows = hidden.reshape(-1, model.config.dim).float().contiguous()
    logits = torch.empty(rows.shape[0], 1, model.config.vocab_size)
    workspace = torch.empty(rows.shape)
    _backend.cpu_extension.decode_projection(
        {**fields, "in": rows.data_ptr(), "out": logits.data_ptr(), "workspace": workspace.data_ptr(),
         "batch": rows.shape[0]}, torch.get_num_threads())
    return logits


def decoder(model, cache, prefetch_bytes: Optional[int] = None, bf16_inputs: Optional[bool] = None,
            int8_inputs: Optional[bool] = None) -> Optional[Callable[[Tensor], Tensor]]:
    """step(tokens [batch, 1]) -> logits [batch, 1, vocab] for `model` (an Aquila) and its KVCache `cache`, advancing
    the cache; None where the C++ step cannot run. prefetch_bytes: the step's prefetch distance (default: chosen for
    this host, see the module's docstring); step.prefetch says which distance it uses and where that came from.
    bf16_inputs (bf16 steps only): round the dense projections' inputs to bf16 (default: where the CPU has bf16 dot
    products, see the module's docstring); step.bf16_inputs says which. int8_inputs (models with quantized linears
    only): round the quantized projections' inputs to int8 (default: AQUILA_DECODE_INT8_INPUTS where set, else bf16
    steps where the CPU has VNNI, see the module's docstring); step.int8_inputs says which."""
    caches = [(cache.k[index], cache.v[index]) for index in range(len(model.layers))]
    dtype = step_dtype(model)
    if not _weights_supported(model) or not all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == dtype
                                                for pair in caches for t in pair):
        return None
    if prefetch_bytes is not None and prefetch_bytes < 0:
        raise ValueError(f"Aquila: prefetch_bytes must be >= 0, got {prefetch_bytes}")
    if bf16_inputs and dtype != torch.bfloat16:
        raise ValueError(f"Aquila: bf16_inputs=True takes a bf16 model, got a {dtype} one")
    quantized = any(isinstance(linear, QuantizedLinear) for linear in _linears(model))
    if int8_inputs and not quantized:
        raise ValueError("Aquila: int8_inputs=True takes a model with quantized linears (int8 or int4), got none")
    bf16_inputs = bool(_backend.cpu_bf16_products() if bf16_inputs is None else bf16_inputs) and dtype == torch.bfloat16
    int8_inputs = bool(default_int8_inputs(dtype) if int8_inputs is None else int8_inputs) and quantized
    prefetch = ((prefetch_bytes, "argument") if prefetch_bytes is not None else
                _prefetch_for(model, bf16_inputs, int8_inputs))
    c, (batch, max_len) = model.config, cache.k.shape[1:3]
    workspace = torch.empty(workspace_floats(c, batch, max_len))
    arguments = {**_arguments(model, caches, cache.lengths, batch, max_len, workspace, bf16_inputs, int8_inputs),
                 "prefetch_bytes": prefetch[0]}

    addresses = _addresses(model, cache)
    expected = addresses()

    def step(tokens: Tensor) -> Tensor:
        if addresses() != expected:
            raise RuntimeError("Aquila: the model's weights or its cache moved (another dtype, device or storage) "
                               "since model.decoder(cache) was made: make a new decoder")
        cache.check_room(tokens)
        tokens = tokens.reshape(batch).to("cpu", torch.int64).contiguous()
        logits = torch.empty(batch, 1, c.vocab_size)
        _backend.cpu_extension.decode_step(
            {**arguments, "tokens": tokens.data_ptr(), "logits": logits.data_ptr()}, torch.get_num_threads())
        cache.lengths += 1
        return logits

    # The model and cache hold what the addresses point into; a step finds them unchanged before it runs.
    step.keep_alive = (workspace, cache)
    step.prefetch = prefetch
    step.bf16_inputs = bf16_inputs
    step.int8_inputs = int8_inputs
    return step
