"""RMSNorm, optionally fused with the residual add in front of it.

    out = x / sqrt(mean(x^2) + eps) * weight                      rms_norm(x, weight)
    h = x + residual; out = rms_norm(h, weight); return out, h     fused_add_rms_norm(x, residual, weight)

Statistics and arithmetic in fp32, one rounding to x's dtype on store. The forward saves 1/rms per row, so the backward
reads each row once more and never recomputes the reduction. The weight gradient is summed per program (per thread on
CPU, per persistent block on GPU) into a row of partial sums that one torch reduction adds: deterministic, no atomics.
"""

from typing import Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .triton_compat import tl, triton

# The Triton kernels keep a whole row in registers; wider rows than this are for the cpu/cuda/torch backends.
TRITON_MAX_HIDDEN = 65536


# --- Triton kernels -------------------------------------------------------------------------------------------------


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


def _triton_config(hidden):
    """(BLOCK, num_warps): the whole row in one block, more warps for wider rows."""
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


def triton_compile_cases():
    """Each Triton configuration the launchers below can pick, for the ahead-of-time compile check."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for hidden in (64, 4096, 11008, 16384, TRITON_MAX_HIDDEN):
            block, num_warps = _triton_config(hidden)
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


# --- Dispatch: one implementation per backend, all with the same outputs -----------------------------------------------


def _forward(x, residual, weight, eps, backend):
    """x, residual: (rows, hidden) with unit last stride. Returns out, residual_out (empty without residual), rstd."""
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else x.new_empty(0)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return out, residual_out, rstd
    if backend == "torch":
        h = x if residual is None else residual_out.copy_(x + residual)
        hf = h.to(reference.compute_dtype(h.dtype))
        rstd.copy_(torch.rsqrt(hf.pow(2).mean(-1) + eps))
        out.copy_(reference.rms_norm(h, weight, eps))
        return out, residual_out, rstd
    weight = weight.float()  # a few kB: the native kernels read fp32 weights whatever the parameters' dtype
    with _backend.on_device(x):
        if backend == "triton":
            block, num_warps = _triton_config(hidden)
            has_residual = residual is not None
            _forward_kernel[(rows,)](
                x, x.stride(0), residual if has_residual else x, residual.stride(0) if has_residual else 0, weight,
                out, residual_out if has_residual else out, rstd, hidden, eps,
                HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=num_warps)
        else:
            extension, launch = _backend.native(backend, x)
            extension.rms_norm_forward(
                _backend.address(x), x.stride(0), _backend.address(residual),
                residual.stride(0) if residual is not None else 0, _backend.address(weight), _backend.address(out),
                _backend.address(residual_out) if residual is not None else 0, _backend.address(rstd), rows, hidden,
                eps, _backend.DTYPE_CODES[x.dtype], launch)
    return out, residual_out, rstd


def _backward(grad_out, x, weight, rstd, grad_residual, backend):
    """Returns grad_x and grad_weight (in weight's dtype) for the normalised input x."""
    rows, hidden = x.shape
    if backend == "torch" or rows == 0:
        # The closed form the kernels implement (an autograd graph cannot be recorded inside a custom op).
        x_hat = x.float() * rstd[:, None]
        weighted = grad_out.float() * weight.float()
        grad_x = (weighted - x_hat * (weighted * x_hat).mean(-1, keepdim=True)) * rstd[:, None]
        if grad_residual is not None:
            grad_x += grad_residual
        return grad_x.to(x.dtype), (grad_out.float() * x_hat).sum(0).to(weight.dtype)
    grad_x = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    weight32 = weight.float()
    with _backend.on_device(x):
        if backend == "triton":
            block, num_warps = _triton_config(hidden)
            programs = _backend.program_count(x, cap=rows)
            partials = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
            has_grad_residual = grad_residual is not None
            _backward_kernel[(programs,)](
                grad_out, grad_out.stride(0), x, x.stride(0), weight32, rstd,
                grad_residual if has_grad_residual else grad_out,
                grad_residual.stride(0) if has_grad_residual else 0, grad_x, partials, rows, hidden,
                triton.cdiv(rows, programs), HAS_GRAD_RESIDUAL=has_grad_residual, BLOCK=block, num_warps=num_warps)
        else:
            extension, launch = _backend.native(backend, x)
            programs = launch if backend == "cpu" else _backend.program_count(x, cap=rows)
            partials = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
            extension.rms_norm_backward(
                _backend.address(grad_out), grad_out.stride(0), _backend.address(x), x.stride(0),
                _backend.address(weight32), _backend.address(rstd), _backend.address(grad_residual),
                grad_residual.stride(0) if grad_residual is not None else 0, _backend.address(grad_x),
                _backend.address(partials), programs, rows, hidden, _backend.DTYPE_CODES[x.dtype], launch)
    return grad_x, partials.sum(0).to(weight.dtype)


# --- torch.library ops (opaque to torch.compile, with fake implementations) and autograd -------------------------------


@torch.library.custom_op("aquila::rms_norm_forward", mutates_args=())
def _forward_op(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, residual, weight, eps, backend)


@_forward_op.register_fake
def _(x, residual, weight, eps, backend):
    rows = x.shape[0]
    residual_out = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), residual_out, x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("aquila::rms_norm_backward", mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_residual: Optional[Tensor],
                 backend: str) -> tuple[Tensor, Tensor]:
    return _backward(_backend.with_unit_stride(grad_out), x, weight, rstd,
                     None if grad_residual is None else _backend.with_unit_stride(grad_residual), backend)


@_backward_op.register_fake
def _(grad_out, x, weight, rstd, grad_residual, backend):
    return x.new_empty(x.shape), torch.empty_like(weight)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, backend):
        out, residual_out, rstd = _forward_op(x, residual, weight, eps, backend)
        ctx.save_for_backward(residual_out if residual is not None else x, weight, rstd)
        ctx.has_residual, ctx.backend = residual is not None, backend
        return out, residual_out

    @staticmethod
    def backward(ctx, grad_out, grad_residual_out):
        normalised, weight, rstd = ctx.saved_tensors
        # The residual stream leaves the block as residual_out, so its gradient adds to the norm's input gradient.
        grad_residual = grad_residual_out if ctx.has_residual else None
        grad_x, grad_weight = _backward_op(grad_out, normalised, weight, rstd, grad_residual, ctx.backend)
        return grad_x, grad_x if ctx.has_residual else None, grad_weight, None, None


# --- Public API -----------------------------------------------------------------------------------------------------


def _apply(op, x, residual, weight, eps, backend):
    _backend.check_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    _backend.check_tensor(op, "weight", weight, device=x.device, shape=(hidden,))
    if residual is not None:
        _backend.check_tensor(op, "residual", residual, device=x.device, shape=x.shape, dtype=x.dtype)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    backend = _backend.resolve(op, x, backend)
    if backend == "triton" and hidden > TRITON_MAX_HIDDEN:
        raise ValueError(f"{op}: the triton backend takes hidden sizes up to {TRITON_MAX_HIDDEN}, got {hidden}; "
                         "use backend='cuda' or 'torch'")
    rows = _backend.as_rows(x)
    residual_rows = None if residual is None else _backend.as_rows(residual)
    if _backend.direct_call(x, residual, weight):
        out, residual_out, _ = _forward(rows, residual_rows, weight, float(eps), backend)
    else:
        out, residual_out = RMSNormFunction.apply(rows, residual_rows, weight, float(eps), backend)
    return out.view(x.shape), residual_out.view(x.shape) if residual is not None else None


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, backend: Optional[str] = None) -> Tensor:
    """RMSNorm over the last dimension of x (fp32, fp16 or bf16; any leading shape); weight has x's last size and
    any float dtype. Differentiable in x and weight."""
    return _apply("rms_norm", x, None, weight, eps, backend)[0]


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, *,
                       backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """h = x + residual, then rms_norm(h, weight): returns (normalised, h), h being the residual stream for the next
    block. One pass over memory instead of three."""
    return _apply("fused_add_rms_norm", x, residual, weight, eps, backend)


class RMSNorm(torch.nn.Module):
    """Drop-in RMSNorm layer (the weight is named ``weight``, as in Hugging Face and FlagAI checkpoints).
    ``forward(x)`` returns the normalised x; ``forward(x, residual)`` returns (normalised x + residual, x + residual).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps, self.backend = eps, backend

    def forward(self, x, residual=None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps, backend=self.backend)
        return fused_add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"
