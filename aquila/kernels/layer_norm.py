"""LayerNorm over the last dimension, as torch.nn.LayerNorm with a 1-D normalized_shape.

    mean = mean(x),  rstd = 1 / sqrt(mean((x - mean)^2) + eps),  x_hat = (x - mean) * rstd
    out = x_hat * weight + bias

weight None is a norm without a learned scale (elementwise_affine=False), bias None one without a shift (bias=False).
Statistics and arithmetic in fp32, one rounding to x's dtype on store. The variance is summed from the deviations
(the row read again, from cache), never as mean(x^2) - mean^2, which cancels digits when |mean| is large against the
spread. The forward saves mean and rstd per row (fp32); with g = grad_out * weight the backward is

    grad_x = rstd * (g - mean(g) - x_hat * mean(g * x_hat))
    grad_weight = sum over rows of grad_out * x_hat,   grad_bias = sum over rows of grad_out

the two row sums taken per program (per thread on CPU, per persistent block on GPU) into rows of partial sums that one
torch reduction adds: deterministic, no atomics. Triton serves GPUs; there is no CUDA C++ LayerNorm.
"""

from typing import Optional, Union

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .backend import Implementation, Implementations
from .triton import layer_norm as triton_layer_norm

# --- Implementations ------------------------------------------------------------------------------------------------
# forward(x, weight, bias, eps, out, mean, rstd) fills out, mean and rstd for x: (rows >= 1, hidden) with unit last
# stride; weight and bias are hidden-sized (ones and zeros standing in for absent ones), converted to fp32 by each
# implementation. backward(grad_out, x, weight, mean, rstd, grad_x) fills grad_x and returns the fp32 weight and bias
# gradients.


def _torch_forward(x, weight, bias, eps, out, mean, rstd):
    h = x.to(reference.compute_dtype(x.dtype))
    variance, row_mean = torch.var_mean(h, -1, correction=0)
    mean.copy_(row_mean)
    rstd.copy_(torch.rsqrt(variance + eps))
    out.copy_((h - mean[:, None]) * rstd[:, None] * weight.to(h.dtype) + bias.to(h.dtype))


def _torch_backward(grad_out, x, weight, mean, rstd, grad_x):
    """The closed form the kernels implement (an autograd graph cannot be recorded inside a custom op)."""
    x_hat = (x.float() - mean[:, None]) * rstd[:, None]
    dy = grad_out.float()
    g = dy * weight.float()
    grad_x.copy_((g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True)) * rstd[:, None])
    return (dy * x_hat).sum(0), dy.sum(0)


def _cpu_forward(x, weight, bias, eps, out, mean, rstd):
    _backend.call_native(
        "cpu", "layer_norm_forward", x, x=x, x_row_stride=x.stride(0), weight=weight.float(), bias=bias.float(),
        out=out, mean=mean, rstd=rstd, rows=x.shape[0], hidden=x.shape[1], eps=eps, dtype=x.dtype)


def _cpu_backward(grad_out, x, weight, mean, rstd, grad_x):
    rows, hidden = x.shape
    weight_partials, bias_partials = (
        torch.empty((_backend.native_partial_rows("cpu", x, rows), hidden), dtype=torch.float32) for _ in range(2))
    _backend.call_native(
        "cpu", "layer_norm_backward", x, grad_out=grad_out, grad_out_row_stride=grad_out.stride(0), input=x,
        input_row_stride=x.stride(0), weight=weight.float(), mean=mean, rstd=rstd, grad_input=grad_x,
        grad_weight_partials=weight_partials, grad_bias_partials=bias_partials,
        partial_rows=weight_partials.shape[0], rows=rows, hidden=hidden, dtype=x.dtype)
    return weight_partials.sum(0), bias_partials.sum(0)


# No cuda entry: Triton serves GPUs (backend="cuda" is refused with UnsupportedBackend naming the others).
IMPLEMENTATIONS = Implementations(
    "layer_norm",
    triton=Implementation(triton_layer_norm.forward, triton_layer_norm.backward, limits=triton_layer_norm.limits),
    cpu=Implementation(_cpu_forward, _cpu_backward),
    torch=Implementation(_torch_forward, _torch_backward),
)


@_backend.autocast_off
def _forward(x, weight, bias, eps, backend):
    """x: (rows, hidden) with unit last stride. Returns out, mean, rstd."""
    rows, hidden = x.shape
    out = torch.empty((rows, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        with _backend.on_device(x):
            IMPLEMENTATIONS[backend].forward(x, weight, bias, eps, out, mean, rstd)
    return out, mean, rstd


@_backend.autocast_off
def _backward(grad_out, x, weight, bias, mean, rstd, backend):
    """Returns grad_x, grad_weight (in weight's dtype) and grad_bias (in bias's dtype)."""
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        return grad_x, torch.zeros_like(weight), torch.zeros_like(bias)
    with _backend.on_device(x):
        grad_weight, grad_bias = IMPLEMENTATIONS[backend].backward(grad_out, x, weight, mean, rstd, grad_x)
    return grad_x, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)


# --- torch.library ops (opaque to torch.compile, with fake implementations) and autograd ------------------------------


@torch.library.custom_op("aquila::layer_norm_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, weight, bias, eps, backend)


@_forward_op.register_fake
def _(x, weight, bias, eps, backend):
    rows = x.shape[0]
    return x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


@torch.library.custom_op("aquila::layer_norm_backward", mutates_args=())
def _backward_op(grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(_backend.with_unit_stride(grad_out), x, weight, bias, mean, rstd, backend)


@_backward_op.register_fake
def _(grad_out, x, weight, bias, mean, rstd, backend):
    return x.new_empty(x.shape), torch.empty_like(weight), torch.empty_like(bias)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, backend):
        out, mean, rstd = _forward_op(x, weight, bias, eps, backend)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.backend = backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = _backward_op(grad_out, x, weight, bias, mean, rstd, ctx.backend)
        return grad_x, grad_weight, grad_bias, None, None


# --- Public API -----------------------------------------------------------------------------------------------------


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5, *,
               backend: Optional[str] = None) -> Tensor:
    """LayerNorm over the last dimension of x (fp32, fp16 or bf16; any leading shape): (x - mean) / std * weight +
    bias, as torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps). weight and bias have x's last size
    and any float dtype, or are None (no learned scale, no shift). Differentiable in x, weight and bias."""
    op = "layer_norm"
    _backend.check_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    hidden = x.shape[-1]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None:
            _backend.check_tensor(op, name, tensor, device=x.device, shape=(hidden,))
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"{op}: eps must be a number >= 0, got {eps!r}")
    # Ones and zeros (fp32) stand in for an absent weight and bias, so every kernel has one form.
    scale = weight if weight is not None else torch.ones(hidden, dtype=torch.float32, device=x.device)
    shift = bias if bias is not None else torch.zeros(hidden, dtype=torch.float32, device=x.device)
    backward = _backend.needs_backward(x, weight, bias)
    backend = _backend.resolve(IMPLEMENTATIONS, x, backend, op=op, backward=backward, hidden=hidden)
    rows = _backend.as_rows(x)
    if _backend.direct_call(backward):
        out = _forward(rows, scale, shift, float(eps), backend)[0]
    else:
        out = LayerNormFunction.apply(rows, scale, shift, float(eps), backend)
    return out.view(x.shape)


class LayerNorm(torch.nn.Module):
    """Drop-in torch.nn.LayerNorm over the last dimension: the same arguments and parameters (``weight``, ``bias``),
    so its state dicts load either way. normalized_shape is the hidden size (an int or a 1-tuple)."""

    def __init__(self, normalized_shape: Union[int, tuple[int], list[int]], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, *, backend: Optional[str] = None, device=None,
                 dtype=None):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
            raise ValueError("LayerNorm: normalized_shape must be the hidden size, an int >= 1 or a 1-tuple (the "
                             f"kernels normalise over the last dimension only), got {normalized_shape!r}")
        self.normalized_shape, self.eps, self.elementwise_affine = shape, eps, elementwise_affine
        self.backend = backend
        factory = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.ones(shape, **factory)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(shape, **factory)) if elementwise_affine and bias else None

    def reset_parameters(self):
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
