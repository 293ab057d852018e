"""RMSNorm's Triton kernels and their launchers (the maths is in aquila/kernels/rms_norm.py).

One program normalises one row, held whole in registers (hence MAX_HIDDEN); the backward runs a few persistent
programs per SM, each summing its rows' weight gradient into its own row of partial sums.
"""

import torch

from aquila.kernels import backend as _backend
from aquila.kernels.triton_compat import tl, triton

# A whole row lives in one program's registers: wider rows are for the other backends.
MAX_HIDDEN = 65536


def limits(hidden):
    return f"takes hidden sizes up to {MAX_HIDDEN}, got {hidden}" if hidden > MAX_HIDDEN else None



@triton.jit
def _forward_kernel(X, x_row_stride, RESIDUAL, residual_row_stride, WEIGHT, OUT, RESIDUAL_OUT, RSTD, hidden, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    # Loads are widened to fp32 before any arithmetic (also the workaround for bf16 math in the interpreter).
    x = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + residual).to(RESIDUAL_OUT.dtype.element_ty)  # normalise the sum as it is stored
        tl.store(RESIDUAL_OUT + row * hidden + cols, h, mask=mask)
        x = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
    tl.store(RSTD + row, rstd)
    weight = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * hidden + cols, (x * rstd * weight).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(GRAD_OUT, grad_out_row_stride, X, x_row_stride, WEIGHT, RSTD, GRAD_RESIDUAL,
                     grad_residual_row_stride, GRAD_X, GRAD_WEIGHT_PARTIALS, rows, hidden, rows_per_program,
                     HAS_GRAD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    weight = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK], dtype=tl.float32)
    first_row = program.to(tl.int64) * rows_per_program  # 64-bit, so every row offset below is too
    for step in range(0, tl.minimum(rows_per_program, rows - first_row)):
        row = first_row + step
        grad_out = tl.load(GRAD_OUT + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x_hat = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) * tl.load(RSTD + row)
        grad_weight += grad_out * x_hat
        weighted = grad_out * weight
        mean_dot = tl.sum(weighted * x_hat, axis=0) / hidden
        grad_x = (weighted - x_hat * mean_dot) * tl.load(RSTD + row)
        if HAS_GRAD_RESIDUAL:
            grad_x += tl.load(GRAD_RESIDUAL + row * grad_residual_row_stride + cols, mask=mask, other=0.0).to(
                tl.float32)
        tl.store(GRAD_X + row * hidden + cols, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)
    tl.store(GRAD_WEIGHT_PARTIALS + program.to(tl.int64) * hidden + cols, grad_weight, mask=mask)


def _config(hidden):
    """(BLOCK, num_warps): the whole row in one block, more warps for wider rows."""
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


def compile_cases():
    """Each Triton configuration the launchers below can pick, for the ahead-of-time compile check."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for hidden in (64, 4096, 11008, 16384, MAX_HIDDEN):
            block, num_warps = _config(hidden)
            for residual in (False, True):
                signature = {"X": f"*{dtype}", "x_row_stride": "i32", "RESIDUAL": f"*{dtype}",
                             "residual_row_stride": "i32", "WEIGHT": "*fp32", "OUT": f"*{dtype}",
                             "RESIDUAL_OUT": f"*{dtype}", "RSTD": "*fp32", "hidden": "i32", "eps": "fp32",
                             "HAS_RESIDUAL": "constexpr", "BLOCK": "constexpr"}
                cases.append((_forward_kernel, signature, {"HAS_RESIDUAL": residual, "BLOCK": block}, num_warps))
                signature = {"GRAD_OUT": f"*{dtype}", "grad_out_row_stride": "i32", "X": f"*{dtype}",
                             "x_row_stride": "i32", "WEIGHT": "*fp32", "RSTD": "*fp32", "GRAD_RESIDUAL": f"*{dtype}",
                             "grad_residual_row_stride": "i32", "GRAD_X": f"*{dtype}",
                             "GRAD_WEIGHT_PARTIALS": "*fp32", "rows": "i32", "hidden": "i32",
                             "rows_per_program": "i32", "HAS_GRAD_RESIDUAL": "constexpr", "BLOCK": "constexpr"}
                cases.append((_backward_kernel, signature, {"HAS_GRAD_RESIDUAL": residual, "BLOCK": block}, num_warps))
    return cases


def forward(x, residual, weight, eps, out, residual_out, rstd):
    rows, hidden = x.shape
    block, num_warps = _config(hidden)
    has_residual = residual is not None
    _forward_kernel[(rows,)](
        x, x.stride(0), residual if has_residual else x, residual.stride(0) if has_residual else 0, weight.float(),
        out, residual_out if has_residual else out, rstd, hidden, eps,
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=num_warps)


def backward(grad_out, x, weight, rstd, grad_residual, grad_x):
    rows, hidden = x.shape
    block, num_warps = _config(hidden)
    programs = _backend.program_count(x, cap=rows)
    partials = x.new_empty((programs, hidden), dtype=torch.float32)
    has_grad_residual = grad_residual is not None
    _backward_kernel[(programs,)](
        grad_out, grad_out.stride(0), x, x.stride(0), weight.float(), rstd,
        grad_residual if has_grad_residual else grad_out, grad_residual.stride(0) if has_grad_residual else 0,
        grad_x, partials, rows, hidden, triton.cdiv(rows, programs), HAS_GRAD_RESIDUAL=has_grad_residual,
        BLOCK=block, num_warps=num_warps)
    return partials.sum(0)
