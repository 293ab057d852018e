"""Triton, when it is installed.

Triton is needed only to run the Triton backend (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``). Without it
the kernel definitions below still import, so the CPU and CUDA C++ backends work on a light install.
"""

import types

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    # Only what kernel modules touch at import time: the decorator, constexpr annotations and constants.
    triton = types.SimpleNamespace(jit=_jit)
    tl = types.SimpleNamespace(constexpr=lambda value=None: value)

__all__ = ["HAS_TRITON", "triton", "tl"]
