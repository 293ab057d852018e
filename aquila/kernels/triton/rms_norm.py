"""RMSNorm's Triton kernels and their launchers (the maths is in aquila/kernels/rms_norm.py).

One program normalises one row. A row of up to MAX_BLOCK elements is held whole in registers (one read); a wider row
is read in MAX_BLOCK chunks, twice (sum of squares, then the output), since a whole 32k-64k row in one block at 32 warps
spilled (up to 2.4 KB per thread in the backward). The backward runs a few persistent programs per SM, each summing its
rows' weight gradient into its own row of partial sums (in registers, or chunk by chunk in that row for wide rows).
"""

import torch

from aquila.kernels import backend as _backend
from aquila.kernels.triton_compat import tl, triton

# The chunked loop has no width limit of its own; this is the width the other backends and the tests are held to.
MAX_HIDDEN = 65536
# The widest block: a row wider than this is processed in chunks of this size.
MAX_BLOCK = 8192


def limits(hidden):
    return f"takes hidden sizes up to {MAX_HIDDEN}, got {hidden}" if hidden > MAX_HIDDEN else None


@triton.jit
def _load_sum(X, x_offset, RESIDUAL, residual_offset, RESIDUAL_OUT, out_offset, cols, mask,
              HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    """x (fp32), or with a residual x + residual rounded to RESIDUAL_OUT's dtype (and stored there when asked)."""
    # Loads are widened to fp32 before any arithmetic (also the workaround for bf16 math in the interpreter).
    x = tl.load(X + x_offset + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + residual_offset + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + residual).to(RESIDUAL_OUT.dtype.element_ty)  # normalise the sum as it is stored
        if STORE_SUM:
            tl.store(RESIDUAL_OUT + out_offset + cols, h, mask=mask)
        x = h.to(tl.float32)
    return x


@triton.jit
def _normalised(x, rstd, weight, OUT, ROUND_NORMALIZED: tl.constexpr):
    """x * rstd * weight in OUT's dtype; with Llama's casting, x * rstd rounded to that dtype before the weight."""
    if ROUND_NORMALIZED:
        return ((x * rstd).to(OUT.dtype.element_ty).to(tl.float32) * weight).to(OUT.dtype.element_ty)
    return (x * rstd * weight).to(OUT.dtype.element_ty)


@triton.jit
def _forward_kernel(X, x_row_stride, RESIDUAL, residual_row_stride, WEIGHT, OUT, RESIDUAL_OUT, RSTD, hidden, eps,
                    HAS_RESIDUAL: tl.constexpr, ROUND_NORMALIZED: tl.constexpr, BLOCK: tl.constexpr,
                    CHUNKED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_offset, residual_offset, out_offset = row * x_row_stride, row * residual_row_stride, row * hidden
    cols = tl.arange(0, BLOCK)
    if CHUNKED:
        squares = tl.zeros([BLOCK], tl.float32)
        for start in range(0, hidden, BLOCK):
            x = _load_sum(X, x_offset + start, RESIDUAL, residual_offset + start, RESIDUAL_OUT, out_offset + start,
                          cols, start + cols < hidden, HAS_RESIDUAL, True)
            squares += x * x
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / hidden + eps)
        tl.store(RSTD + row, rstd)
        for start in range(0, hidden, BLOCK):  # the sum recomputed (same rounding), not read back from RESIDUAL_OUT
            mask = start + cols < hidden
            x = _load_sum(X, x_offset + start, RESIDUAL, residual_offset + start, RESIDUAL_OUT, out_offset + start,
                          cols, mask, HAS_RESIDUAL, False)
            weight = tl.load(WEIGHT + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(OUT + out_offset + start + cols, _normalised(x, rstd, weight, OUT, ROUND_NORMALIZED), mask=mask)
    else:
        mask = cols < hidden
        x = _load_sum(X, x_offset, RESIDUAL, residual_offset, RESIDUAL_OUT, out_offset, cols, mask, HAS_RESIDUAL,
                      True)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / hidden + eps)
        tl.store(RSTD + row, rstd)
        weight = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + out_offset + cols, _normalised(x, rstd, weight, OUT, ROUND_NORMALIZED), mask=mask)


@triton.jit
def _grad_x(GRAD_RESIDUAL, grad_residual_offset, cols, mask, grad_out, x_hat, weight, mean_dot, rstd,
            HAS_GRAD_RESIDUAL: tl.constexpr):
    grad_x = (grad_out * weight - x_hat * mean_dot) * rstd
    if HAS_GRAD_RESIDUAL:
        grad_x += tl.load(GRAD_RESIDUAL + grad_residual_offset + cols, mask=mask, other=0.0).to(tl.float32)
    return grad_x


@triton.jit
def _backward_kernel(GRAD_OUT, grad_out_row_stride, X, x_row_stride, WEIGHT, RSTD, GRAD_RESIDUAL,
                     grad_residual_row_stride, GRAD_X, GRAD_WEIGHT_PARTIALS, rows, hidden, rows_per_program,
                     HAS_GRAD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, CHUNKED: tl.constexpr):
    """GRAD_WEIGHT_PARTIALS must be zeros when CHUNKED (each chunk of a program's partial row is added to)."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    first_row = program.to(tl.int64) * rows_per_program  # 64-bit, so every row offset below is too
    partials = GRAD_WEIGHT_PARTIALS + program.to(tl.int64) * hidden
    if CHUNKED:
        for step in range(0, tl.minimum(rows_per_program, rows - first_row)):
            row = first_row + step
            rstd = tl.load(RSTD + row)
            go_row, x_row = GRAD_OUT + row * grad_out_row_stride, X + row * x_row_stride
            dots = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                mask = start + cols < hidden
                grad_out = tl.load(go_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                dots += grad_out * tl.load(WEIGHT + start + cols, mask=mask, other=0.0).to(tl.float32) * x_hat
            mean_dot = tl.sum(dots, axis=0) / hidden
            for start in range(0, hidden, BLOCK):
                mask = start + cols < hidden
                grad_out = tl.load(go_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                weight = tl.load(WEIGHT + start + cols, mask=mask, other=0.0).to(tl.float32)
                grad_x = _grad_x(GRAD_RESIDUAL, row * grad_residual_row_stride + start, cols, mask, grad_out, x_hat,
                                 weight, mean_dot, rstd, HAS_GRAD_RESIDUAL)
                tl.store(GRAD_X + row * hidden + start + cols, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)
                # The same thread adds to the same elements row after row (same layout each time): no race.
                partial = tl.load(partials + start + cols, mask=mask, other=0.0)
                tl.store(partials + start + cols, partial + grad_out * x_hat, mask=mask)
    else:
        mask = cols < hidden
        weight = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
        grad_weight = tl.zeros([BLOCK], dtype=tl.float32)
        for step in range(0, tl.minimum(rows_per_program, rows - first_row)):
            row = first_row + step
            rstd = tl.load(RSTD + row)
            grad_out = tl.load(GRAD_OUT + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat = tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            grad_weight += grad_out * x_hat
            mean_dot = tl.sum(grad_out * weight * x_hat, axis=0) / hidden
            grad_x = _grad_x(GRAD_RESIDUAL, row * grad_residual_row_stride, cols, mask, grad_out, x_hat, weight,
                             mean_dot, rstd, HAS_GRAD_RESIDUAL)
            tl.store(GRAD_X + row * hidden + cols, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)
        tl.store(partials + cols, grad_weight, mask=mask)


def _config(hidden):
    """(BLOCK, num_warps, CHUNKED): the whole row in one block up to MAX_BLOCK, more warps for wider rows; chunks of
    MAX_BLOCK beyond."""
    block = min(triton.next_power_of_2(hidden), MAX_BLOCK)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    return block, num_warps, hidden > block


# What the launch-time compile check drives the launchers over: every block size and warp count (widths 1 to
# MAX_HIDDEN, odd and even), each dtype, with and without a residual, aligned rows and a row stride of 1 element.
LAUNCH_WIDTHS = (1, 3, 64, 1000, 2048, 4096, 5120, 8192, 11008, 16384, 65536)


def launch_cases(widths=LAUNCH_WIDTHS, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """[(name, thunk)]: each thunk runs forward and backward below on small CPU tensors of one width and dtype, with
    and without the residual, as aquila.kernels.rms_norm calls them."""
    def case(dtype, hidden):
        def run():
            rows = 2
            x, residual, out, residual_out, grad_out, grad_x = (torch.zeros(rows, hidden, dtype=dtype)
                                                                 for _ in range(6))
            weight, rstd = torch.ones(hidden, dtype=dtype), torch.zeros(rows, dtype=torch.float32)
            for res in (None, residual):
                for round_normalized in (False, True):
                    forward(x, res, weight, 1e-6, out, residual_out if res is not None else None, rstd,
                            round_normalized)
                backward(grad_out, x, weight, rstd, res, grad_x)
        return f"rms_norm {str(dtype)[6:]} hidden={hidden}", run

    return [case(dtype, hidden) for dtype in dtypes for hidden in widths]


def forward(x, residual, weight, eps, out, residual_out, rstd, round_normalized):
    rows, hidden = x.shape
    block, num_warps, chunked = _config(hidden)
    has_residual = residual is not None
    _forward_kernel[(rows,)](
        x, x.stride(0), residual if has_residual else x, residual.stride(0) if has_residual else 0, weight.float(),
        out, residual_out if has_residual else out, rstd, hidden, eps,
        HAS_RESIDUAL=has_residual, ROUND_NORMALIZED=round_normalized, BLOCK=block, CHUNKED=chunked,
        num_warps=num_warps)


def backward(grad_out, x, weight, rstd, grad_residual, grad_x):
    rows, hidden = x.shape
    block, num_warps, chunked = _config(hidden)
    programs = _backend.program_count(x, cap=rows)
    partials = (x.new_zeros if chunked else x.new_empty)((programs, hidden), dtype=torch.float32)
    has_grad_residual = grad_residual is not None
    _backward_kernel[(programs,)](
        grad_out, grad_out.stride(0), x, x.stride(0), weight.float(), rstd,
        grad_residual if has_grad_residual else grad_out, grad_residual.stride(0) if has_grad_residual else 0,
        grad_x, partials, rows, hidden, triton.cdiv(rows, programs), HAS_GRAD_RESIDUAL=has_grad_residual,
        BLOCK=block, CHUNKED=chunked, num_warps=num_warps)
    return partials.sum(0)
