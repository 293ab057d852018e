"""SwiGLU and GeGLU (tanh), forward and forward+backward: Aquila's fused kernels against the torch eager
composition a model runs (act(gate) * up), torch.compile of it, and Liger-Kernel's fused SwiGLU/GeGLU on GPU (a
benchmark extra).

Effective bandwidth counts the bytes an op must move at least (forward: read gate and up, write out; backward: read
the output gradient, gate and up, write both gradients), as a fraction of the copy bandwidth. Each runs in fp32 and
bf16 on CPU, in bf16 on GPU, every contender in the same precision.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from aquila.kernels import geglu, swiglu


def eager_swiglu(gate, up):
    return F.silu(gate) * up


def eager_geglu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


@functools.cache
def compiled(fn):
    return torch.compile(fn)


def liger(activation):
    """Liger-Kernel's fused elementwise GLU (GPU only), or None when it is not installed."""
    try:
        from liger_kernel.ops.geglu import LigerGELUMulFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError:
        return None
    return (LigerSiLUMulFunction if activation == "swiglu" else LigerGELUMulFunction).apply


def contender(device, impl, activation):
    eager = eager_swiglu if activation == "swiglu" else eager_geglu
    ours = swiglu if activation == "swiglu" else functools.partial(geglu, approximate="tanh")
    if impl == "torch eager":
        return eager
    if impl == "torch.compile":
        return compiled(eager)
    if impl == "liger":
        return liger(activation) if device == "cuda" else None
    backend = {"aquila cpu": "cpu", "aquila triton": "triton"}[impl]
    if (backend == "cpu") != (device == "cpu"):
        return None
    return functools.partial(ours, backend=backend)


@pytest.mark.parametrize("impl", ["torch eager", "torch.compile", "liger", "aquila cpu", "aquila triton"])
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_glu(measure, device, quick, dtype, dtype_name, impl, activation, backward):
    rows, hidden = (64, 1376) if quick else (4096, 11008)
    fn = contender(device, impl, activation)
    if fn is None:
        pytest.skip(f"{impl} does not run on {device}, or is not installed")
    gate, up = (torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=backward) for _ in range(2))
    grad = torch.randn(rows, hidden, device=device, dtype=dtype)

    def step():
        out = fn(gate, up)
        if backward:
            out.backward(grad)

    label = f"{activation} {'fwd+bwd' if backward else 'fwd'} {rows}x{hidden}, {dtype_name}"
    measure(label, impl, step, (8 if backward else 3) * gate.numel() * gate.element_size(), dtype=dtype)
