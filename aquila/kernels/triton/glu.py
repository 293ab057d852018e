"""Gated linear units' Triton kernels and their launchers (the maths is in aquila/kernels/glu.py).

One program computes BLOCK columns of one row: out = act(gate) * up forward; grad_gate and grad_up backward, the
activation recomputed from the gate. Loads are widened to fp32, stores round once.
"""

import torch

from aquila.kernels.triton_compat import tl, triton

# The activation codes of csrc/kernels.h's GluActivation.
SILU, GELU, GELU_TANH = 0, 1, 2
BLOCK = 1024


@triton.jit
def _activation(g, ACTIVATION: tl.constexpr):
    """(act(g), act'(g)) in fp32; sigmoid and tanh from exp of a non-positive argument, so nothing overflows."""
    if ACTIVATION == 0:
        e = tl.exp(-tl.abs(g))
        sigmoid = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        act = g * sigmoid
        slope = sigmoid * (1.0 + g * (1.0 - sigmoid))
    elif ACTIVATION == 2:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(z >= 0, t, -t)
        act = 0.5 * g * (1.0 + t)
        slope = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        slope = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return act, slope


@triton.jit
def _forward_kernel(GATE, gate_row_stride, UP, up_row_stride, OUT, cols, ACTIVATION: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < cols
    g = tl.load(GATE + row * gate_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * up_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    act, _ = _activation(g, ACTIVATION)
    tl.store(OUT + row * cols + offsets, (act * u).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(GRAD_OUT, grad_out_row_stride, GATE, gate_row_stride, UP, up_row_stride, GRAD_GATE, GRAD_UP,
                     cols, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < cols
    dy = tl.load(GRAD_OUT + row * grad_out_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + row * gate_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + row * up_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
    act, slope = _activation(g, ACTIVATION)
    tl.store(GRAD_GATE + row * cols + offsets, (dy * u * slope).to(GRAD_GATE.dtype.element_ty), mask=mask)
    tl.store(GRAD_UP + row * cols + offsets, (dy * act).to(GRAD_UP.dtype.element_ty), mask=mask)


def _grid(rows, cols):
    """Rows on grid axis 0 (up to 2^31 - 1), column blocks on axis 1 (a row of up to 65,535 blocks of BLOCK)."""
    return rows, triton.cdiv(cols, BLOCK)


def limits(cols):
    most = 65535 * BLOCK
    return f"takes rows of up to {most} columns, got {cols}" if cols > most else None


def forward(gate, up, activation, out):
    rows, cols = gate.shape
    _forward_kernel[_grid(rows, cols)](gate, gate.stride(0), up, up.stride(0), out, cols, ACTIVATION=activation,
                                       BLOCK=BLOCK, num_warps=4)


def backward(grad_out, gate, up, activation, grad_gate, grad_up):
    rows, cols = gate.shape
    _backward_kernel[_grid(rows, cols)](grad_out, grad_out.stride(0), gate, gate.stride(0), up, up.stride(0),
                                        grad_gate, grad_up, cols, ACTIVATION=activation, BLOCK=BLOCK, num_warps=4)


# What the launch-time compile check drives the launchers over: each activation in each dtype, forward and backward.
def launch_cases(activations=(SILU, GELU, GELU_TANH), dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """[(name, thunk)]: each thunk runs forward and backward on a small CPU tensor [3, 1500] of one dtype and
    activation, as aquila.kernels.glu calls them."""
    def case(dtype, activation):
        def run():
            gate, up = torch.zeros(3, 1500, dtype=dtype), torch.zeros(3, 1500, dtype=dtype)
            forward(gate, up, activation, torch.empty_like(gate))
            backward(torch.zeros_like(gate), gate, up, activation, torch.empty_like(gate), torch.empty_like(up))
        return f"glu {str(dtype)[6:]} activation={activation}", run

    return [case(dtype, activation) for dtype in dtypes for activation in activations]
