"""RMSNorm, optionally fused with the residual add in front of it.

    out = x / sqrt(mean(x^2) + eps) * (offset + weight)           rms_norm(x, weight)
    h = x + residual; out = rms_norm(h, weight); return out, h     fused_add_rms_norm(x, residual, weight)

offset is 0 for LLaMA-family models and 1 for Gemma's (weights stored as w - 1); weight None is a norm without a
learned scale (elementwise_affine=False). Statistics and arithmetic in fp32, one rounding to x's dtype on store
(Gemma's casting), or with casting_mode="llama" a rounding of x / rms to x's dtype before the weight multiplies it,
as transformers' LlamaRMSNorm does. The forward saves 1/rms per row, so the backward
reads each row once more and never recomputes the reduction. The weight gradient is summed per program (per thread on
CPU, per persistent block on GPU) into a row of partial sums that one torch reduction adds: deterministic, no atomics.

inplace_backward=True writes grad x over the incoming gradient of the output instead of a new buffer (every backend's
kernel reads each element of it before writing the same element, and no other afterwards). That saves an
activation-sized allocation per norm, and is done only when it is safe as far as the op can see: the incoming gradient
is in x's dtype, contiguous (grad x's layout), does not require grad (no create_graph), shares no memory with the
normalised input nor, other than being the very same tensor, with the residual stream's gradient; and not under
torch.compile, whose graphs take no in-place writes to their inputs. Otherwise the backward allocates, silently, as
without the option. What the op cannot see is the caller's promise: nothing else may read that gradient afterwards.
It is autograd's own buffer when the norm's output feeds operations that each make a new gradient (the linear
projections of a transformer block, whose gradients autograd sums into a buffer of its own); it need not be when the
output feeds an add (whose backward passes the same tensor to both operands), and it is not when it is the tensor
given to out.backward(gradient).
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .backend import Implementation, Implementations
from .triton import rms_norm as triton_rms_norm

# --- Implementations ------------------------------------------------------------------------------------------------
# forward(x, residual, weight, eps, out, residual_out, rstd, round_normalized) fills out, residual_out (with a
# residual) and rstd for x, residual: (rows >= 1, hidden) with unit last stride; weight is the fp32 scale (the offset
# added). backward(grad_out, x, weight, rstd, grad_residual, grad_x)
# fills grad_x and returns the fp32 weight gradient, x being what the forward normalised. grad_x may be grad_out itself
# (inplace_backward), and grad_residual may be grad_out too.


def _torch_forward(x, residual, weight, eps, out, residual_out, rstd, round_normalized):
    h = x if residual is None else residual_out.copy_(x + residual)
    hf = h.to(reference.compute_dtype(h.dtype))
    rstd.copy_(torch.rsqrt(hf.pow(2).mean(-1) + eps))
    out.copy_(reference.rms_norm(h, weight, eps, round_normalized=round_normalized))


def _torch_backward(grad_out, x, weight, rstd, grad_residual, grad_x):
    """The closed form the kernels implement (an autograd graph cannot be recorded inside a custom op)."""
    x_hat = x.float() * rstd[:, None]
    grad_weight = (grad_out.float() * x_hat).sum(0)  # before grad_x, which may be grad_out's buffer
    weighted = grad_out.float() * weight.float()
    grad = (weighted - x_hat * (weighted * x_hat).mean(-1, keepdim=True)) * rstd[:, None]
    if grad_residual is not None:
        grad += grad_residual
    grad_x.copy_(grad)
    return grad_weight


def _native_forward(backend, x, residual, weight, eps, out, residual_out, rstd, round_normalized):
    _backend.call_native(
        backend, "rms_norm_forward", x, x=x, x_row_stride=x.stride(0), residual=residual,
        residual_row_stride=0 if residual is None else residual.stride(0), weight=weight.float(), out=out,
        residual_out=None if residual is None else residual_out, rstd=rstd, rows=x.shape[0], hidden=x.shape[1],
        eps=eps, round_normalized=round_normalized, dtype=x.dtype)


def _native_backward(backend, grad_out, x, weight, rstd, grad_residual, grad_x):
    rows, hidden = x.shape
    partials = torch.empty((_backend.native_partial_rows(backend, x, rows), hidden), dtype=torch.float32,
                           device=x.device)
    _backend.call_native(
        backend, "rms_norm_backward", x, grad_out=grad_out, grad_out_row_stride=grad_out.stride(0), input=x,
        input_row_stride=x.stride(0), weight=weight.float(), rstd=rstd, grad_residual=grad_residual,
        grad_residual_row_stride=0 if grad_residual is None else grad_residual.stride(0), grad_input=grad_x,
        grad_weight_partials=partials, partial_rows=partials.shape[0], rows=rows, hidden=hidden, dtype=x.dtype)
    return partials.sum(0)


IMPLEMENTATIONS = Implementations(
    "rms_norm",
    triton=Implementation(triton_rms_norm.forward, triton_rms_norm.backward, limits=triton_rms_norm.limits),
    cuda=Implementation(functools.partial(_native_forward, "cuda"), functools.partial(_native_backward, "cuda")),
    cpu=Implementation(functools.partial(_native_forward, "cpu"), functools.partial(_native_backward, "cpu")),
    torch=Implementation(_torch_forward, _torch_backward),
)


@_backend.autocast_off
def _forward(x, residual, weight, eps, round_normalized, backend):
    """x, residual: (rows, hidden) with unit last stride. Returns out, residual_out (empty without residual), rstd."""
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else x.new_empty(0)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        with _backend.on_device(x):
            IMPLEMENTATIONS[backend].forward(x, residual, weight, eps, out, residual_out, rstd, round_normalized)
    return out, residual_out, rstd


@_backend.autocast_off
def _backward(grad_out, x, weight, rstd, grad_residual, backend, inplace=False):
    """Returns grad_x and grad_weight (in weight's dtype) for the normalised input x; grad_x is grad_out itself when
    `inplace` (see _may_overwrite)."""
    grad_x = grad_out if inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        return grad_x, torch.zeros_like(weight)
    with _backend.on_device(x):
        grad_weight = IMPLEMENTATIONS[backend].backward(grad_out, x, weight, rstd, grad_residual, grad_x)
    return grad_x, grad_weight.to(weight.dtype)


# --- torch.library ops (opaque to torch.compile, with fake implementations) and autograd ------------------------------


@torch.library.custom_op("aquila::rms_norm_forward", mutates_args=())
def _forward_op(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, round_normalized: bool,
                backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, residual, weight, eps, round_normalized, backend)


@_forward_op.register_fake
def _(x, residual, weight, eps, round_normalized, backend):
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


@torch.library.custom_op("aquila::rms_norm_backward_inplace", mutates_args=("grad_out",))
def _backward_inplace_op(grad_out: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, grad_residual: Optional[Tensor],
                         backend: str) -> Tensor:
    """Writes grad_x over grad_out (which _may_overwrite has approved) and returns grad_weight."""
    return _backward(grad_out, x, weight, rstd, grad_residual, backend, inplace=True)[1]


def _shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _may_overwrite(grad_out, x, grad_residual):
    """Whether the backward may write grad x over grad_out (the conditions in the module's docstring that the op can
    check; the caller promises the rest by asking for inplace_backward)."""
    if grad_out.dtype != x.dtype or not grad_out.is_contiguous() or grad_out.requires_grad or not grad_out.numel():
        return False
    if _shares_memory(grad_out, x):
        return False
    return grad_residual is None or not _shares_memory(grad_out, grad_residual) or (
        grad_residual.data_ptr() == grad_out.data_ptr() and grad_residual.stride() == grad_out.stride())


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps, round_normalized, backend, inplace_backward):
        out, residual_out, rstd = _forward_op(x, residual, weight, eps, round_normalized, backend)
        ctx.save_for_backward(residual_out if residual is not None else x, weight, rstd)
        ctx.has_residual, ctx.backend = residual is not None, backend
        ctx.inplace_backward = inplace_backward and not torch.compiler.is_compiling()
        return out, residual_out

    @staticmethod
    def backward(ctx, grad_out, grad_residual_out):
        normalised, weight, rstd = ctx.saved_tensors
        # The residual stream leaves the block as residual_out, so its gradient adds to the norm's input gradient.
        grad_residual = grad_residual_out if ctx.has_residual else None
        if ctx.inplace_backward and _may_overwrite(grad_out, normalised, grad_residual):
            grad_weight = _backward_inplace_op(grad_out, normalised, weight, rstd, grad_residual, ctx.backend)
            grad_x = grad_out
        else:
            grad_x, grad_weight = _backward_op(grad_out, normalised, weight, rstd, grad_residual, ctx.backend)
        return grad_x, grad_x if ctx.has_residual else None, grad_weight, None, None, None, None


# --- Public API -----------------------------------------------------------------------------------------------------

CASTING_MODES = ("gemma", "llama")


def _apply(op, x, residual, weight, eps, offset, casting_mode, inplace_backward, backend):
    _backend.check_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    if weight is not None:
        _backend.check_tensor(op, "weight", weight, device=x.device, shape=(hidden,))
    out_dtype = x.dtype
    if residual is not None:
        _backend.check_tensor(op, "residual", residual, device=x.device, shape=x.shape)
        # A residual stream kept in higher precision than the block's output (fp32 under bf16 autocast): the sum and
        # the stream stay in the wider dtype, the normalised output comes in x's.
        x, residual = _backend.promoted(x, residual)
    if not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    offset = _backend.check_number(op, "offset", offset)
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"{op}: casting_mode must be one of {CASTING_MODES}, got {casting_mode!r}")
    # The scale the kernels multiply by, in fp32: (offset + weight) formed here, so autograd carries its gradient
    # back to weight; ones for a norm without weight.
    if weight is None:
        scale = torch.full((hidden,), 1.0 + offset, dtype=torch.float32, device=x.device)
    else:
        scale = weight if offset == 0 else weight.float() + offset
    backward = _backend.needs_backward(x, residual, scale)
    backend = _backend.resolve(IMPLEMENTATIONS, x, backend, op=op, backward=backward, hidden=hidden)
    rows = _backend.as_rows(x)
    residual_rows = None if residual is None else _backend.as_rows(residual)
    round_normalized = casting_mode == "llama"
    if _backend.direct_call(backward):
        out, residual_out, _ = _forward(rows, residual_rows, scale, float(eps), round_normalized, backend)
    else:
        out, residual_out = RMSNormFunction.apply(rows, residual_rows, scale, float(eps), round_normalized, backend,
                                                  bool(inplace_backward))
    return out.view(x.shape).to(out_dtype), residual_out.view(x.shape) if residual is not None else None


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, *, offset: float = 0.0,
             casting_mode: str = "gemma", inplace_backward: bool = False, backend: Optional[str] = None) -> Tensor:
    """RMSNorm over the last dimension of x (fp32, fp16 or bf16; any leading shape): x / rms * (offset + weight).
    weight has x's last size and any float dtype, or is None (no learned scale). offset: 1 for Gemma's weights.
    casting_mode: "gemma" (all in fp32, one rounding) or "llama" (x / rms rounded to x's dtype before the weight, as
    transformers' LlamaRMSNorm). Differentiable in x and weight. inplace_backward: the backward writes grad x over the
    output's incoming gradient where it safely can (the rule is in this module's docstring)."""
    return _apply("rms_norm", x, None, weight, eps, offset, casting_mode, inplace_backward, backend)[0]


def fused_add_rms_norm(x: Tensor, residual: Tensor, weight: Optional[Tensor], eps: float = 1e-6, *,
                       offset: float = 0.0, casting_mode: str = "gemma", inplace_backward: bool = False,
                       backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """h = x + residual, then rms_norm(h, weight): returns (normalised, h), h being the residual stream for the next
    block. One pass over memory instead of three. inplace_backward as in rms_norm (the normalised output's gradient
    is overwritten)."""
    return _apply("fused_add_rms_norm", x, residual, weight, eps, offset, casting_mode, inplace_backward, backend)


class RMSNorm(torch.nn.Module):
    """Drop-in RMSNorm layer (the weight is named ``weight``, as in Hugging Face and FlagAI checkpoints).
    ``forward(x)`` returns the normalised x; ``forward(x, residual)`` returns (normalised x + residual, x + residual).
    offset, casting_mode and inplace_backward as in rms_norm; elementwise_affine=False: no weight.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, offset: float = 0.0, casting_mode: str = "gemma",
                 elementwise_affine: bool = True, inplace_backward: bool = False, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        init = torch.zeros if offset else torch.ones  # the scale offset + weight starts at 1 either way
        self.weight = (torch.nn.Parameter(init(hidden_size, device=device, dtype=dtype)) if elementwise_affine
                       else None)
        self.hidden_size, self.eps, self.offset, self.casting_mode = hidden_size, eps, offset, casting_mode
        self.inplace_backward, self.backend = inplace_backward, backend

    def forward(self, x, residual=None):
        options = dict(offset=self.offset, casting_mode=self.casting_mode, inplace_backward=self.inplace_backward,
                       backend=self.backend)
        if residual is None:
            return rms_norm(x, self.weight, self.eps, **options)
        return fused_add_rms_norm(x, residual, self.weight, self.eps, **options)

    def extra_repr(self):
        return (f"{self.hidden_size}, eps={self.eps}, offset={self.offset}, casting_mode={self.casting_mode}, "
                f"elementwise_affine={self.weight is not None}")
