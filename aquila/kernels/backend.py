"""Choosing a backend from an op's table, checking tensors, and calling the native kernels.

Every op keeps one table of implementations (an ``Implementations``): for each backend that has it, its forward and
backward functions and what it supports (dtypes, and limits on sizes such as the head dim). The backends:

* ``triton``: the Triton kernels (aquila/kernels/triton/), for CUDA tensors; for CPU tensors only under
  ``TRITON_INTERPRET=1`` and only when named.
* ``cuda``: the CUDA C++ kernels in ``aquila._cuda`` (built when nvcc was found at install).
* ``cpu``: the C++ CPU kernels in ``aquila._C``.
* ``torch``: the pure-torch reference, on any device.

``resolve`` picks one per call. A backend named in the call (``backend="..."``) is a demand: if it cannot run the
call, an ``UnsupportedBackend`` error says what it lacks and which backends can. Otherwise ``AQUILA_BACKEND`` is a
preference, used wherever it supports the call, and the table's first entry that does is the automatic choice.

The native kernels see addresses and sizes only, so every tensor is checked before a call: a bad argument is a clear
``ValueError``/``TypeError`` naming it, never a crash inside a kernel.
"""

import contextlib
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from .triton_compat import HAS_TRITON

try:
    from aquila import _C as cpu_extension
except ImportError:  # an uninstalled source tree: the cpu backend says how to build it
    cpu_extension = None
try:
    from aquila import _cuda as cuda_extension
except ImportError:  # built without nvcc
    cuda_extension = None

BACKENDS = ("triton", "cuda", "cpu", "torch")
# The native backends, named after the device type they run on: (extension module or None, how to build it).
NATIVE_BUILDS = {"cuda": (cuda_extension, "aquila._cuda: nvcc was not found at install; reinstall with CUDA_HOME set"),
                 "cpu": (cpu_extension, "aquila._C: run pip install -e . in the repository")}
DIRECTIONS = ("forward", "backward")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Element type codes shared with csrc/kernels.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class UnsupportedBackend(ValueError):
    """A backend was asked for a call it cannot run (another device, a dtype, a direction or a size it lacks)."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op. forward/backward: its functions (None: it lacks that direction), with
    the signatures the op's module states. limits(**sizes): why a call's sizes are out of its reach, or None."""

    forward: Optional[Callable] = None
    backward: Optional[Callable] = None
    dtypes: tuple = FLOAT_DTYPES
    limits: Optional[Callable[..., Optional[str]]] = None

    @classmethod
    def both_directions(cls, function: Callable) -> "Implementation":
        """One function for both directions (a kernel whose backward is the forward with an option)."""
        return cls(forward=function, backward=function)


class Implementations(dict):
    """An op's table: backend name -> Implementation, in the order of the automatic choice."""

    def __init__(self, op: str, **by_backend: Implementation):
        unknown = set(by_backend) - set(BACKENDS)
        if unknown:
            raise ValueError(f"{op}: unknown backends {sorted(unknown)} in its table")
        super().__init__(by_backend)
        self.op = op
        # resolve's choices for this table: a call's device, dtype, direction, sizes and environment -> backend. The
        # choice depends on nothing else, and making it costs more than many small kernels' work.
        self.choices = {}


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _runtime_missing(backend, device, named):
    """Why `backend` cannot run on `device` at all here, or None."""
    if backend == "triton":
        if not HAS_TRITON:
            return "needs Triton (pip install triton)"
        if device.type == "cuda" or (device.type == "cpu" and named and triton_interpreting()):
            return None
        return f"runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), not on {device}"
    if backend in NATIVE_BUILDS:
        extension, how_to_build = NATIVE_BUILDS[backend]
        if device.type != backend:
            return f"runs on {backend.upper()} tensors, not on {device}"
        if extension is None:
            return f"is not built ({how_to_build})"
    return None


def _missing(table, backend, tensor, directions, sizes, named):
    """Why `backend` cannot run this call of `table`'s op, or None."""
    implementation = table.get(backend)
    if implementation is None:
        return f"has no {table.op} kernel"
    lacking = [d for d in directions if getattr(implementation, d) is None]
    if lacking:
        return f"has no {' or '.join(lacking)}"
    if tensor.dtype not in implementation.dtypes:
        return f"does not take {tensor.dtype}"
    if implementation.limits is not None:
        reason = implementation.limits(**sizes)
        if reason:
            return reason
    return _runtime_missing(backend, tensor.device, named)


def resolve(table: Implementations, tensor: torch.Tensor, backend: Optional[str] = None, *, op: Optional[str] = None,
            backward: bool = False, **sizes) -> str:
    """The backend that runs a call of `table`'s op (named `op` in errors, by default the table's) on `tensor` (its
    device and dtype), with a backward when `backward`, at `sizes` (the keywords the table's limits take)."""
    op = op or table.op
    if torch.compiler.is_compiling():  # sizes may be symbolic there, and the table is no state to trace
        return _resolve(table, tensor, backend, op, backward, sizes)
    environment = (os.environ.get("AQUILA_BACKEND"), os.environ.get("TRITON_INTERPRET"))
    key = (backend, tensor.device, tensor.dtype, backward, *sizes.items(), environment)
    choice = table.choices.get(key)
    if choice is None:
        choice = table.choices[key] = _resolve(table, tensor, backend, op, backward, sizes)
    return choice


def _resolve(table, tensor, backend, op, backward, sizes):
    directions = DIRECTIONS if backward else DIRECTIONS[:1]
    if backward and all(implementation.backward is None for implementation in table.values()):
        raise UnsupportedBackend(f"{op} is not differentiable: call it under torch.no_grad(), or on tensors that do "
                                 "not require grad")
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
        reason = _missing(table, backend, tensor, directions, sizes, named=True)
        if reason:
            able = [b for b in table if not _missing(table, b, tensor, directions, sizes, named=True)]
            instead = " or ".join(filter(None, [", ".join(able), "backend=None"]))
            raise UnsupportedBackend(f"{op}: {backend} {reason}; use {instead}")
        return backend
    preferred = os.environ.get("AQUILA_BACKEND", "").strip() or None
    if preferred is not None and preferred not in BACKENDS:
        raise ValueError(f"AQUILA_BACKEND must be one of {', '.join(BACKENDS)}, got {preferred!r}")
    candidates = ([preferred] if preferred else []) + list(table)
    reasons = {}
    for name in candidates:
        reasons[name] = _missing(table, name, tensor, directions, sizes, named=False)
        if reasons[name] is None:
            return name
    raise UnsupportedBackend(f"{op}: no backend can run this call: "
                             + "; ".join(f"{name} {reason}" for name, reason in reasons.items()))


# --- Mixed precision ------------------------------------------------------------------------------------------------
# The ops compute in fp32 whatever their inputs' dtypes. torch.autocast casts nothing for a custom op, so the ops set
# their own rule (docs/numerics.md): attention and linear_cross_entropy, matmuls at heart, run in autocast's dtype as
# torch's scaled_dot_product_attention and linear do; the others run in their inputs' dtypes, inputs of different
# float dtypes promoted to a common one. Inside, the kernels and the torch backends run with autocast off, so that
# the torch backends' own matmuls keep fp32 and a backward called under autocast computes what the forward promised.


def autocast_dtype(tensor):
    """The dtype autocast runs matmuls in on `tensor`'s device, or None when autocast is off there."""
    device_type = tensor.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def promoted(*tensors):
    """`tensors` (None passes through) cast to their common float dtype: only those of another dtype are copied."""
    present = [t for t in tensors if t is not None]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in present))
    return [None if t is None else t.to(dtype) for t in tensors]


def autocast_off(function):
    """Runs `function` with autocast off on every device (a no-op, and no cost, when it is off already)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return function(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)

    return wrapper


def needs_backward(*tensors):
    """True when autograd will ask a call on these tensors for gradients."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def direct_call(backward):
    """True when an op may call its kernels straight away: no backward to record and torch.compile not tracing. The
    custom-op and autograd layers cost tens of microseconds a call, which is most of a decoding step's time for a
    small model; they are only needed for gradients and for torch.compile."""
    return not backward and not torch.compiler.is_compiling()


def check_tensor(op, name, tensor, *, dtypes=FLOAT_DTYPES, device=None, shape=None):
    """Raises a clear error if `tensor` is not a tensor of one of `dtypes`, on `device`, of `shape`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have one of the dtypes {names}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (like x), got {tensor.device}")
    if tensor.device.type == "meta":
        raise ValueError(f"{op}: {name} is on the meta device, which holds no values: materialise it first (e.g. "
                         "module.to_empty(device=...) and initialise)")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def check_number(op, name, value, *, positive=False):
    """A real, finite number (not a bool); > 0 when `positive`. Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            positive and not value > 0):
        wanted = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{op}: {name} must be {wanted}, got {value!r}")
    return float(value)


def with_unit_stride(tensor):
    """`tensor` itself when its last dimension is contiguous (the kernels take every other stride), else a copy."""
    return tensor if tensor.stride(-1) == 1 or tensor.shape[-1] <= 1 else tensor.contiguous()


def as_rows(tensor):
    """A 2-D (rows, last dim) view with a unit last stride, copying only when no such view exists."""
    tensor = with_unit_stride(tensor)
    if tensor.dim() == 2:
        return tensor
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return tensor.reshape(-1, tensor.shape[-1]).contiguous()


# Below this many elements a CPU kernel runs on one thread: waking an OpenMP team costs more than the work (a decoding
# step's norms and rotary on one token's features).
def cpu_bf16_products() -> bool:
    """Whether this process's CPU kernels take the AVX512-BF16 path (aquila._C.cpu_isa(), capped by AQUILA_CPU_ISA):
    bf16 pairs multiplied in one instruction, and torch's bf16 matmul native (AVX512-BF16 or AMX)."""
    return cpu_extension is not None and cpu_extension.cpu_isa() == "avx512_bf16"


def cpu_int8_products() -> bool:
    """Whether this process's decoding step multiplies int8 inputs by quantized weights on AVX512-VNNI (vpdpbusd:
    aquila._C.cpu_vnni(), off where AQUILA_CPU_ISA caps the AVX-512 path)."""
    return cpu_extension is not None and cpu_extension.cpu_vnni()


PARALLEL_GRAIN = 32768


def strided(tensor):
    """A [tokens, heads, head_dim] tensor as the kernels' StridedTensor."""
    return {"data": tensor.data_ptr(), "token_stride": tensor.stride(0), "head_stride": tensor.stride(1)}


def _native_argument(value):
    if isinstance(value, torch.Tensor):
        return value.data_ptr()
    if isinstance(value, torch.dtype):
        return DTYPE_CODES[value]
    return 0 if value is None else value


def threads(work):
    """The CPU kernels' thread count for `work` elements: one below PARALLEL_GRAIN."""
    return 1 if work < PARALLEL_GRAIN else torch.get_num_threads()


def call_native(backend, kernel, device_tensor, work=None, **fields):
    """Calls `kernel` of the native backend (cpu or cuda) with the fields of its struct in csrc/kernels.h: tensors
    pass as their addresses, None as a null pointer, a torch dtype as its code. Launches with a thread count on CPU
    (one for less than PARALLEL_GRAIN elements of work, by default device_tensor's), on the current stream on CUDA."""
    arguments = {name: _native_argument(value) for name, value in fields.items()}
    if backend == "cpu":
        getattr(cpu_extension, kernel)(arguments, threads(device_tensor.numel() if work is None else work))
    else:
        getattr(cuda_extension, kernel)(arguments, torch.cuda.current_stream(device_tensor.device).cuda_stream)


def native_partial_rows(backend, tensor, rows):
    """How many per-thread (CPU) or per-block (CUDA) partial sums a native reduction over `rows` writes."""
    return threads(tensor.numel()) if backend == "cpu" else program_count(tensor, cap=rows)


def on_device(tensor):
    """Makes `tensor`'s GPU the current one while kernels launch (Triton and CUDA launch on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def program_count(tensor, per_multiprocessor=2, cap=None):
    """How many persistent programs fill the device: a few per SM on GPU; a handful under the interpreter."""
    if tensor.is_cuda:
        count = per_multiprocessor * torch.cuda.get_device_properties(tensor.device).multi_processor_count
    else:
        count = 4
    return count if cap is None else max(1, min(count, cap))
