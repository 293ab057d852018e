"""Gated linear units, the MLP activations of LLaMA-family (SwiGLU) and Gemma-family (GeGLU) models.

    swiglu(gate, up) = silu(gate) * up,                 silu(g) = g sigmoid(g)
    geglu(gate, up)  = gelu(gate) * up,                 gelu(g) = g Phi(g), exact (erf) or tanh-approximated

gate and up are the two projections of the block's input (w1 x and w3 x in LLaMA's naming). The backward recomputes
the activation from the gate:

    grad_gate = grad_out * up * act'(gate),             grad_up = grad_out * act(gate)

so the forward saves only its inputs, which the projections' own backward keeps anyway: unfused, autograd would also
keep act(gate), one more tensor of the MLP's width per layer. Arithmetic in fp32, one rounding per output element;
sigmoid and tanh are formed from exp of a non-positive argument, so no input overflows them.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .backend import Implementation, Implementations
from .triton import glu as triton_glu

# The activation codes of csrc/kernels.h's GluActivation.
SILU, GELU, GELU_TANH = 0, 1, 2
APPROXIMATIONS = {"none": GELU, "tanh": GELU_TANH}

# --- Implementations ------------------------------------------------------------------------------------------------
# forward(gate, up, activation, out) fills out; backward(grad_out, gate, up, activation, grad_gate, grad_up) fills the
# gradients. gate, up, grad_out: (rows >= 1, cols) with unit last stride; out and the gradients contiguous.


def _torch_forward(gate, up, activation, out):
    out.copy_(reference.glu(gate, up, activation))


def _torch_backward(grad_out, gate, up, activation, grad_gate, grad_up):
    """The closed form the kernels implement (an autograd graph cannot be recorded inside a custom op)."""
    g, dy = gate.float(), grad_out.float()
    grad_gate.copy_(dy * up.float() * reference.glu_slope(g, activation))
    grad_up.copy_(dy * reference.GLU_ACTIVATIONS[activation](g))


def _native_forward(backend, gate, up, activation, out):
    _backend.call_native(backend, "glu_forward", gate, gate=gate, gate_row_stride=gate.stride(0), up=up,
                         up_row_stride=up.stride(0), out=out, rows=gate.shape[0], cols=gate.shape[1],
                         activation=activation, dtype=gate.dtype)


def _native_backward(backend, grad_out, gate, up, activation, grad_gate, grad_up):
    _backend.call_native(backend, "glu_backward", gate, grad_out=grad_out, grad_out_row_stride=grad_out.stride(0),
                         gate=gate, gate_row_stride=gate.stride(0), up=up, up_row_stride=up.stride(0),
                         grad_gate=grad_gate, grad_up=grad_up, rows=gate.shape[0], cols=gate.shape[1],
                         activation=activation, dtype=gate.dtype)


IMPLEMENTATIONS = Implementations(
    "glu",
    triton=Implementation(triton_glu.forward, triton_glu.backward, limits=triton_glu.limits),
    cpu=Implementation(functools.partial(_native_forward, "cpu"), functools.partial(_native_backward, "cpu")),
    torch=Implementation(_torch_forward, _torch_backward),
)


@_backend.autocast_off
def _forward(gate, up, activation, backend):
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    with _backend.on_device(gate):
        IMPLEMENTATIONS[backend].forward(gate, up, activation, out)
    return out


@_backend.autocast_off
def _backward(grad_out, gate, up, activation, backend):
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty_like(grad_gate)
    with _backend.on_device(gate):
        IMPLEMENTATIONS[backend].backward(grad_out, gate, up, activation, grad_gate, grad_up)
    return grad_gate, grad_up


# --- torch.library ops (opaque to torch.compile, with fake implementations) and autograd ------------------------------


@torch.library.custom_op("aquila::glu_forward", mutates_args=())
def _forward_op(gate: Tensor, up: Tensor, activation: int, backend: str) -> Tensor:
    return _forward(gate, up, activation, backend)


@_forward_op.register_fake
def _(gate, up, activation, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("aquila::glu_backward", mutates_args=())
def _backward_op(grad_out: Tensor, gate: Tensor, up: Tensor, activation: int, backend: str) -> tuple[Tensor, Tensor]:
    return _backward(_backend.with_unit_stride(grad_out), gate, up, activation, backend)


@_backward_op.register_fake
def _(grad_out, gate, up, activation, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


class GluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, activation, backend):
        ctx.save_for_backward(gate, up)
        ctx.activation, ctx.backend = activation, backend
        return _forward_op(gate, up, activation, backend)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up = ctx.saved_tensors
        grad_gate, grad_up = _backward_op(grad_out, gate, up, ctx.activation, ctx.backend)
        return grad_gate, grad_up, None, None


# --- Public API -----------------------------------------------------------------------------------------------------


def _apply(op, gate, up, activation, backend):
    _backend.check_tensor(op, "gate", gate)
    _backend.check_tensor(op, "up", up, device=gate.device, shape=gate.shape)
    # A gate and an up projection of different float dtypes compute in their common one.
    gate, up = _backend.promoted(gate, up)
    if gate.dim() == 0 or gate.numel() == 0:
        return reference.glu(gate, up, activation)  # nothing for a kernel to do; still differentiable
    cols = gate.shape[-1]
    backward = _backend.needs_backward(gate, up)
    backend = _backend.resolve(IMPLEMENTATIONS, gate, backend, op=op, backward=backward, cols=cols)
    gate_rows, up_rows = _backend.as_rows(gate), _backend.as_rows(up)
    if _backend.direct_call(backward):
        out = _forward(gate_rows, up_rows, activation, backend)
    else:
        out = GluFunction.apply(gate_rows, up_rows, activation, backend)
    return out.view(gate.shape)


def swiglu(gate: Tensor, up: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """silu(gate) * up, elementwise (fp32, fp16 or bf16, any shape, gate and up alike); differentiable in both, the
    activation recomputed in the backward rather than saved."""
    return _apply("swiglu", gate, up, SILU, backend)


def geglu(gate: Tensor, up: Tensor, *, approximate: str = "none", backend: Optional[str] = None) -> Tensor:
    """gelu(gate, approximate) * up, elementwise, `approximate` as in torch.nn.functional.gelu: "none" (erf) or
    "tanh" (Gemma's gelu_pytorch_tanh). Differentiable in both, the activation recomputed in the backward."""
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"geglu: approximate must be 'none' or 'tanh' (as in torch.nn.functional.gelu), got "
                         f"{approximate!r}")
    return _apply("geglu", gate, up, APPROXIMATIONS[approximate], backend)
