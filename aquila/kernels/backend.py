"""Choosing a backend, checking tensors, and handing raw pointers to the native kernels.

Backends, per call (``backend=``) or for CUDA tensors through ``AQUILA_BACKEND``:

* ``triton``: the Triton kernels; the default for CUDA tensors. On CPU tensors only under ``TRITON_INTERPRET=1``.
* ``cuda``: the CUDA C++ kernels in ``aquila._cuda`` (built when nvcc was found at install).
* ``cpu``: the C++ CPU kernels in ``aquila._C``; the default for CPU tensors.
* ``torch``: the pure-torch reference, on any device.

The native kernels see addresses and sizes only, so every tensor is checked here first: a bad argument is a clear
``ValueError``/``TypeError`` naming it, never a crash inside a kernel.
"""

import contextlib
import os

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
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Element type codes shared with csrc/kernels.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(op, tensor, backend=None):
    """The backend that runs `op` on `tensor`: the per-call choice, else AQUILA_BACKEND (CUDA tensors), else the
    device's default. Raises if the chosen backend cannot run here."""
    if backend is None:
        backend = _default_backend(tensor)
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{op}: the triton backend needs Triton: pip install triton")
        if not tensor.is_cuda and not (tensor.device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"{op}: the triton backend runs on CUDA tensors, or on CPU tensors under "
                             f"TRITON_INTERPRET=1; got a tensor on {tensor.device}")
    elif backend == "cuda":
        if not tensor.is_cuda:
            raise ValueError(f"{op}: the cuda backend needs CUDA tensors, got a tensor on {tensor.device}")
        if cuda_extension is None:
            raise RuntimeError(f"{op}: aquila._cuda is not built (nvcc was not found at install): reinstall with "
                               "CUDA_HOME set, or use backend='triton'")
    elif backend == "cpu":
        if tensor.device.type != "cpu":
            raise ValueError(f"{op}: the cpu backend needs CPU tensors, got a tensor on {tensor.device}")
        if cpu_extension is None:
            raise RuntimeError(f"{op}: aquila._C is not built: run pip install -e . in the repository")
    return backend


def _default_backend(tensor):
    chosen = os.environ.get("AQUILA_BACKEND", "").strip() or None
    if chosen is not None and chosen not in BACKENDS:
        raise ValueError(f"AQUILA_BACKEND must be one of {', '.join(BACKENDS)}, got {chosen!r}")
    if tensor.is_cuda:
        if chosen in ("triton", "cuda", "torch"):
            return chosen
        if HAS_TRITON:
            return "triton"
        return "cuda" if cuda_extension is not None else "torch"
    if tensor.device.type == "cpu":
        return "torch" if chosen == "torch" or cpu_extension is None else "cpu"
    return "torch"


def direct_call(*tensors):
    """True when an op may call its kernels straight away: nothing needs a gradient and torch.compile is not
    tracing. The custom-op and autograd layers cost tens of microseconds a call, which is most of a decoding step's
    time for a small model; they are only needed for gradients and for torch.compile."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def check_tensor(op, name, tensor, *, dtypes=FLOAT_DTYPES, device=None, shape=None, dtype=None):
    """Raises a clear error if `tensor` is not a tensor of one of `dtypes`, on `device`, of `shape`."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype} (like x), got {tensor.dtype}")
    if dtypes is not None and tensor.dtype not in dtypes:
        names = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have one of the dtypes {names}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{op}: {name} must be on {device} (like x), got {tensor.device}")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


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


def address(tensor):
    """The address the native kernels read: 0 for None."""
    return 0 if tensor is None else tensor.data_ptr()


# Below this many elements a CPU kernel runs on one thread: waking an OpenMP team costs more than the work (a decoding
# step's norms and rotary on one token's features).
PARALLEL_GRAIN = 32768


def native(backend, tensor, work=None):
    """(extension module, launch argument) for a native backend: the thread count on CPU (one for less than
    PARALLEL_GRAIN elements of work, by default tensor's), the stream on CUDA."""
    if backend == "cpu":
        small = (tensor.numel() if work is None else work) < PARALLEL_GRAIN
        return cpu_extension, 1 if small else torch.get_num_threads()
    return cuda_extension, torch.cuda.current_stream(tensor.device).cuda_stream


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
