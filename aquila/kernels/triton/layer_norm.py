"""LayerNorm's Triton kernels and their launchers (the maths is in aquila/kernels/layer_norm.py).

Laid out as RMSNorm's (aquila/kernels/triton/rms_norm.py): one program normalises one row, held whole in registers up
to MAX_BLOCK elements; a wider row is read in MAX_BLOCK chunks, three times in the forward (mean, variance from the
deviations, output) and twice in the backward. The backward runs a few persistent programs per SM, each summing its
rows' weight and bias gradients into its own rows of partial sums.
"""

import torch

from aquila.kernels import backend as _backend
from aquila.kernels.triton.rms_norm import MAX_HIDDEN, _config, limits
from aquila.kernels.triton_compat import tl, triton

__all__ = ["MAX_HIDDEN", "backward", "forward", "launch_cases", "limits"]


@triton.jit
def _forward_kernel(X, x_row_stride, WEIGHT, BIAS, OUT, MEAN, RSTD, hidden, eps, BLOCK: tl.constexpr,
                    CHUNKED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, out_row = X + row * x_row_stride, OUT + row * hidden
    cols = tl.arange(0, BLOCK)
    # Loads are widened to fp32 before any arithmetic (also the workaround for bf16 math in the interpreter).
    if CHUNKED:
        sums = tl.zeros([BLOCK], tl.float32)
        for start in range(0, hidden, BLOCK):
            sums += tl.load(x_row + start + cols, mask=start + cols < hidden, other=0.0).to(tl.float32)
        mean = tl.sum(sums, axis=0) / hidden
        squares = tl.zeros([BLOCK], tl.float32)
        for start in range(0, hidden, BLOCK):
            mask = start + cols < hidden
            deviation = tl.where(mask, tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            squares += deviation * deviation
        rstd = tl.rsqrt(tl.sum(squares, axis=0) / hidden + eps)
        for start in range(0, hidden, BLOCK):
            mask = start + cols < hidden
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            weight = tl.load(WEIGHT + start + cols, mask=mask, other=0.0)
            bias = tl.load(BIAS + start + cols, mask=mask, other=0.0)
            tl.store(out_row + start + cols, ((x - mean) * rstd * weight + bias).to(OUT.dtype.element_ty), mask=mask)
    else:
        mask = cols < hidden
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / hidden
        deviation = tl.where(mask, x - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(deviation * deviation, axis=0) / hidden + eps)
        weight = tl.load(WEIGHT + cols, mask=mask, other=0.0)
        bias = tl.load(BIAS + cols, mask=mask, other=0.0)
        tl.store(out_row + cols, (deviation * rstd * weight + bias).to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _backward_kernel(GRAD_OUT, grad_out_row_stride, X, x_row_stride, WEIGHT, MEAN, RSTD, GRAD_X,
                     GRAD_WEIGHT_PARTIALS, GRAD_BIAS_PARTIALS, rows, hidden, rows_per_program, BLOCK: tl.constexpr,
                     CHUNKED: tl.constexpr):
    """The partials must be zeros when CHUNKED (each chunk of a program's partial rows is added to)."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    first_row = program.to(tl.int64) * rows_per_program  # 64-bit, so every row offset below is too
    weight_partials = GRAD_WEIGHT_PARTIALS + program.to(tl.int64) * hidden
    bias_partials = GRAD_BIAS_PARTIALS + program.to(tl.int64) * hidden
    if CHUNKED:
        for step in range(0, tl.minimum(rows_per_program, rows - first_row)):
            row = first_row + step
            mean, rstd = tl.load(MEAN + row), tl.load(RSTD + row)
            go_row, x_row = GRAD_OUT + row * grad_out_row_stride, X + row * x_row_stride
            sums_g = tl.zeros([BLOCK], dtype=tl.float32)
            sums_g_x_hat = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, hidden, BLOCK):
                mask = start + cols < hidden
                g = (tl.load(go_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                     * tl.load(WEIGHT + start + cols, mask=mask, other=0.0))
                x_hat = (tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                sums_g += g
                sums_g_x_hat += g * x_hat
            mean_g = tl.sum(sums_g, axis=0) / hidden
            mean_g_x_hat = tl.sum(sums_g_x_hat, axis=0) / hidden
            for start in range(0, hidden, BLOCK):
                mask = start + cols < hidden
                grad_out = tl.load(go_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                weight = tl.load(WEIGHT + start + cols, mask=mask, other=0.0)
                x_hat = (tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
                grad_x = (grad_out * weight - mean_g - x_hat * mean_g_x_hat) * rstd
                tl.store(GRAD_X + row * hidden + start + cols, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)
                # The same thread adds to the same elements row after row (same layout each time): no race.
                partial = tl.load(weight_partials + start + cols, mask=mask, other=0.0)
                tl.store(weight_partials + start + cols, partial + grad_out * x_hat, mask=mask)
                partial = tl.load(bias_partials + start + cols, mask=mask, other=0.0)
                tl.store(bias_partials + start + cols, partial + grad_out, mask=mask)
    else:
        mask = cols < hidden
        weight = tl.load(WEIGHT + cols, mask=mask, other=0.0)
        grad_weight = tl.zeros([BLOCK], dtype=tl.float32)
        grad_bias = tl.zeros([BLOCK], dtype=tl.float32)
        for step in range(0, tl.minimum(rows_per_program, rows - first_row)):
            row = first_row + step
            mean, rstd = tl.load(MEAN + row), tl.load(RSTD + row)
            grad_out = tl.load(GRAD_OUT + row * grad_out_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
            x_hat = (tl.load(X + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            grad_weight += grad_out * x_hat
            grad_bias += grad_out
            g = grad_out * weight
            mean_g = tl.sum(g, axis=0) / hidden
            mean_g_x_hat = tl.sum(g * x_hat, axis=0) / hidden
            grad_x = (g - mean_g - x_hat * mean_g_x_hat) * rstd
            tl.store(GRAD_X + row * hidden + cols, grad_x.to(GRAD_X.dtype.element_ty), mask=mask)
        tl.store(weight_partials + cols, grad_weight, mask=mask)
        tl.store(bias_partials + cols, grad_bias, mask=mask)


# What the launch-time compile check drives the launchers over: RMSNorm's widths (every block size and warp count,
# one block and chunked, odd and even), each dtype, aligned rows and a row stride of 1 element.
LAUNCH_WIDTHS = (1, 3, 64, 1000, 2048, 4096, 5120, 8192, 11008, 16384, 65536)


def launch_cases(widths=LAUNCH_WIDTHS, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """[(name, thunk)]: each thunk runs forward and backward below on small CPU tensors of one width and dtype, as
    aquila.kernels.layer_norm calls them."""
    def case(dtype, hidden):
        def run():
            rows = 2
            x, out, grad_out, grad_x = (torch.zeros(rows, hidden, dtype=dtype) for _ in range(4))
            weight, bias = torch.ones(hidden), torch.zeros(hidden)
            mean, rstd = (torch.zeros(rows, dtype=torch.float32) for _ in range(2))
            forward(x, weight, bias, 1e-5, out, mean, rstd)
            backward(grad_out, x, weight, mean, rstd, grad_x)
        return f"layer_norm {str(dtype)[6:]} hidden={hidden}", run

    return [case(dtype, hidden) for dtype in dtypes for hidden in widths]


def forward(x, weight, bias, eps, out, mean, rstd):
    rows, hidden = x.shape
    block, num_warps, chunked = _config(hidden)
    _forward_kernel[(rows,)](x, x.stride(0), weight.float(), bias.float(), out, mean, rstd, hidden, eps, BLOCK=block,
                             CHUNKED=chunked, num_warps=num_warps)


def backward(grad_out, x, weight, mean, rstd, grad_x):
    rows, hidden = x.shape
    block, num_warps, chunked = _config(hidden)
    programs = _backend.program_count(x, cap=rows)
    weight_partials, bias_partials = ((x.new_zeros if chunked else x.new_empty)((programs, hidden),
                                                                                dtype=torch.float32)
                                      for _ in range(2))
    _backward_kernel[(programs,)](
        grad_out, grad_out.stride(0), x, x.stride(0), weight.float(), mean, rstd, grad_x, weight_partials,
        bias_partials, rows, hidden, triton.cdiv(rows, programs), BLOCK=block, CHUNKED=chunked, num_warps=num_warps)
    return weight_partials.sum(0), bias_partials.sum(0)
