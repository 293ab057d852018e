"""Rotary position embedding (RoPE) for q and k.

Each pair of features (a, b) of a head is rotated by the angle position * theta^(-2i/head_dim):
    a' = a cos - b sin,    b' = b cos + a sin.
Pairs are (2i, 2i+1) in the interleaved layout of Meta and FlagAI checkpoints, and (i, i + head_dim/2) in the
rotate-half layout of Hugging Face checkpoints. The backward is the same rotation by the opposite angle.

Tensors are [batch, seq, heads, head_dim] or [seq, heads, head_dim], in any strides with a contiguous head_dim, so a
Hugging Face [batch, heads, seq, head_dim] tensor goes in as ``x.transpose(1, 2)`` without a copy; the output has the
input's layout. Positions are ``offset + arange(seq)`` (the KV-cache offset), or explicit position ids ([seq] or
[batch, seq]) for packed sequences. Every backend computes the angle from the integer position in float64 (exact up
to 2**53) and cos/sin inside the kernels, so large positions lose nothing.

The scaled variants of RoPE (linear, dynamic NTK, YaRN, Llama 3's, multimodal ones) change the angles or scale
cos/sin: for them the caller passes its own ``cos`` and ``sin`` tables, [seq, head_dim/2] or [batch, seq, head_dim/2]
(the first half of a Hugging Face [.., head_dim] table, whose halves repeat), read in fp32 in place of the computed
ones. The tables are constants: no gradient flows to them.
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .backend import Implementation, Implementations
from .triton import rotary as triton_rotary

# Positions beyond this lose their exactness in the float64 angle every backend computes.
MAX_POSITION = 2**53

# --- Implementations ------------------------------------------------------------------------------------------------
# rotate(x, positions, offset, theta, interleaved, inverse, out, table) fills out for x [batch, seq, heads, head_dim]
# (not empty, unit last stride), positions None or int64 [batch or 1, seq], table None or the caller's (cos, sin),
# fp32 [batch or 1, seq, head_dim/2] with a unit last stride. The backward is the inverse rotation, so one function
# serves both directions.


def _torch_rotate(x, positions, offset, theta, interleaved, inverse, out, table):
    cos, sin = table if table is not None else (None, None)
    out.copy_(reference.rotary(x, positions, offset, theta, interleaved, inverse, cos, sin))


def _native_rotate(backend, x, positions, offset, theta, interleaved, inverse, out, table):
    batch, seq, heads, head_dim = x.shape
    positions_strides = (0, 0) if positions is None else (positions.stride(0) if positions.shape[0] > 1 else 0,
                                                         positions.stride(1))
    cos, sin = table if table is not None else (None, None)
    table_strides = triton_rotary.table_strides(cos) if table is not None else (0, 0)
    _backend.call_native(
        backend, "rotary", x, x=x, x_stride_batch=x.stride(0), x_stride_seq=x.stride(1), x_stride_head=x.stride(2),
        out=out, out_stride_batch=out.stride(0), out_stride_seq=out.stride(1), out_stride_head=out.stride(2),
        positions=positions, positions_stride_batch=positions_strides[0], positions_stride_seq=positions_strides[1],
        offset=offset, batch=batch, seq=seq, heads=heads, head_dim=head_dim, theta=theta, interleaved=interleaved,
        inverse=inverse, cos=cos, sin=sin, table_stride_batch=table_strides[0], table_stride_seq=table_strides[1],
        dtype=x.dtype)


IMPLEMENTATIONS = Implementations(
    "rotary_embedding",
    triton=Implementation.both_directions(triton_rotary.rotate),
    cuda=Implementation.both_directions(functools.partial(_native_rotate, "cuda")),
    cpu=Implementation.both_directions(functools.partial(_native_rotate, "cpu")),
    torch=Implementation.both_directions(_torch_rotate),
)


@_backend.autocast_off
def _rotate(x, positions, offset, theta, interleaved, inverse, cos, sin, backend):
    """The output has x's layout (torch.empty_like keeps the strides of a dense tensor)."""
    out = torch.empty_like(x)
    if x.numel():
        implementation = IMPLEMENTATIONS[backend]
        table = None if cos is None else (cos, sin)
        with _backend.on_device(x):
            (implementation.backward if inverse else implementation.forward)(
                x, positions, offset, theta, interleaved, inverse, out, table)
    return out


@torch.library.custom_op("aquila::rotary", mutates_args=())
def _rotary_op(x: Tensor, positions: Optional[Tensor], offset: int, theta: float, interleaved: bool, inverse: bool,
               cos: Optional[Tensor], sin: Optional[Tensor], backend: str) -> Tensor:
    return _rotate(x, positions, offset, theta, interleaved, inverse, cos, sin, backend)


@_rotary_op.register_fake
def _(x, positions, offset, theta, interleaved, inverse, cos, sin, backend):
    return torch.empty_like(x)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, offset, theta, interleaved, cos, sin, backend):
        ctx.save_for_backward(positions, cos, sin)
        ctx.args = (offset, theta, interleaved)
        ctx.backend = backend
        return _rotary_op(x, positions, offset, theta, interleaved, False, cos, sin, backend)

    @staticmethod
    def backward(ctx, grad_out):
        positions, cos, sin = ctx.saved_tensors
        offset, theta, interleaved = ctx.args
        grad_x = _rotary_op(_backend.with_unit_stride(grad_out), positions, offset, theta, interleaved, True, cos, sin,
                            ctx.backend)
        return grad_x, None, None, None, None, None, None, None


# --- Public API -----------------------------------------------------------------------------------------------------


def _checked_table(op, cos, sin, x4, positions, offset):
    """The caller's cos and sin as fp32 [batch or 1, seq, head_dim/2] tables with a unit last stride."""
    if (cos is None) != (sin is None):
        raise ValueError(f"{op}: give both cos and sin, or neither")
    batch, seq, _, head_dim = x4.shape
    if positions is not None or offset:
        raise ValueError(f"{op}: give positions (or an offset) or a cos/sin table, not both: the table holds the "
                         "angles of its positions")
    tables = []
    for name, table in (("cos", cos), ("sin", sin)):
        _backend.check_tensor(op, name, table, device=x4.device)
        if table.dim() == 2:
            table = table.unsqueeze(0)
        if table.dim() != 3 or table.shape[1:] != (seq, head_dim // 2) or table.shape[0] not in (1, batch):
            raise ValueError(f"{op}: {name} must have shape ({seq}, {head_dim // 2}) or (batch or 1, {seq}, "
                             f"{head_dim // 2}) (half of head_dim: the first half of a Hugging Face table), got "
                             f"{tuple(table.shape)}")
        if torch.is_grad_enabled() and table.requires_grad:
            raise ValueError(f"{op}: {name} requires grad, but the tables are constants here (no gradient flows to "
                             "them): pass it detached")
        tables.append(_backend.with_unit_stride(table.to(torch.float32)))
    return tables


def rotary_embedding(x: Tensor, positions: Optional[Tensor] = None, *, offset: int = 0, theta: float = 10000.0,
                     interleaved: bool = False, cos: Optional[Tensor] = None, sin: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Applies rotary position embedding to x [batch, seq, heads, head_dim] or [seq, heads, head_dim].

    positions: optional integer position ids, [seq] or [batch, seq]; default offset + arange(seq).
    interleaved: True for Meta/FlagAI pairs (2i, 2i+1), False for Hugging Face rotate-half pairs (i, i + d/2).
    cos, sin: optional tables [seq, head_dim/2] or [batch, seq, head_dim/2] used instead of the angles from the
    positions and theta (scaled RoPE variants); constants, not differentiated.
    """
    op = "rotary_embedding"
    _backend.check_tensor(op, "x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: x must be [batch, seq, heads, head_dim] or [seq, heads, head_dim], "
                         f"got shape {tuple(x.shape)}")
    squeeze = x.dim() == 3
    x4 = _backend.with_unit_stride(x.unsqueeze(0) if squeeze else x)
    batch, seq, _, head_dim = x4.shape
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim (the last dimension of x) must be even, got {head_dim}")
    if not isinstance(offset, int):
        raise TypeError(f"{op}: offset must be an int, got {type(offset).__name__}")
    if abs(offset) > MAX_POSITION:
        raise ValueError(f"{op}: offset must be within +-2**53 (positions are exact in float64 there), got {offset}")
    if not isinstance(theta, (int, float)) or not theta > 0:
        raise ValueError(f"{op}: theta must be a number > 0, got {theta!r}")
    if positions is not None:
        _backend.check_tensor(op, "positions", positions, dtypes=(torch.int32, torch.int64), device=x.device)
        if offset:
            raise ValueError(f"{op}: give positions or offset, not both (add the offset to the positions)")
        if positions.dim() == 1 and positions.shape[0] == seq:
            positions = positions.unsqueeze(0)
        if positions.dim() != 2 or positions.shape[1] != seq or positions.shape[0] not in (1, batch):
            raise ValueError(f"{op}: positions must have shape ({seq},) or ({batch}, {seq}) to match x, "
                             f"got {tuple(positions.shape)}")
        positions = positions.to(torch.int64)
    if cos is not None or sin is not None:
        cos, sin = _checked_table(op, cos, sin, x4, positions, offset)
    backward = _backend.needs_backward(x)
    backend = _backend.resolve(IMPLEMENTATIONS, x, backend, op=op, backward=backward)
    if _backend.direct_call(backward):
        out = _rotate(x4, positions, offset, float(theta), bool(interleaved), False, cos, sin, backend)
    else:
        out = RotaryFunction.apply(x4, positions, offset, float(theta), bool(interleaved), cos, sin, backend)
    return out.squeeze(0) if squeeze else out


def apply_rotary(q: Tensor, k: Tensor, positions: Optional[Tensor] = None, *, offset: int = 0,
                 theta: float = 10000.0, interleaved: bool = False, cos: Optional[Tensor] = None,
                 sin: Optional[Tensor] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """rotary_embedding of q and k at the same positions (or with the same cos/sin tables); k may have fewer heads
    than q (GQA/MQA)."""
    if isinstance(q, Tensor) and isinstance(k, Tensor) and (
            q.dim() != k.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]):
        raise ValueError(f"apply_rotary: q and k must agree in every dimension but heads, got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}")
    kwargs = dict(offset=offset, theta=theta, interleaved=interleaved, cos=cos, sin=sin, backend=backend)
    return rotary_embedding(q, positions, **kwargs), rotary_embedding(k, positions, **kwargs)
