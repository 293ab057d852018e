"""Rotary position embedding (RoPE) for q and k.

Each pair of features (a, b) of a head is rotated by the angle position * theta^(-2i/head_dim):
    a' = a cos - b sin,    b' = b cos + a sin.
Pairs are (2i, 2i+1) in the interleaved layout of Meta and FlagAI checkpoints, and (i, i + head_dim/2) in the
rotate-half layout of Hugging Face checkpoints. The backward is the same rotation by the opposite angle.

Tensors are [batch, seq, heads, head_dim] or [seq, heads, head_dim], in any strides with a contiguous head_dim, so a
Hugging Face [batch, heads, seq, head_dim] tensor goes in as ``x.transpose(1, 2)`` without a copy; the output has the
input's layout. Positions are ``offset + arange(seq)`` (the KV-cache offset), or explicit position ids ([seq] or
[batch, seq]) for packed sequences. cos/sin are computed inside the kernels, in fp32 from an angle exact to fp32
precision even at large positions (the inverse frequencies come split into a high and a low fp32 part).
"""

import functools
from typing import Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .triton_compat import tl, triton

# --- Triton kernel --------------------------------------------------------------------------------------------------

# float32(2 pi), then the two float32 parts of the remainder: removing whole turns from the angle against all three
# keeps it exact to float32 for positions far beyond any context length.
TWO_PI_HI = tl.constexpr(6.2831854820251465)
TWO_PI_MID = tl.constexpr(-1.7484555314695172e-07)
TWO_PI_LO = tl.constexpr(-7.105427357601002e-15)


@triton.jit
def _rotary_kernel(X, x_stride_batch, x_stride_seq, x_stride_head, OUT, out_stride_batch, out_stride_seq,
                   out_stride_head, POSITIONS, positions_stride_batch, positions_stride_seq, INV_FREQ, offset, seq,
                   heads, half, HAS_POSITIONS: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                   BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq
    s = token % seq
    if HAS_POSITIONS:
        position = tl.load(POSITIONS + b * positions_stride_batch + s * positions_stride_seq).to(tl.float32)
    else:
        position = (s + offset).to(tl.float32)
    i = tl.arange(0, BLOCK_HALF)
    in_half = i < half
    freq_hi = tl.load(INV_FREQ + i, mask=in_half, other=0.0)
    freq_lo = tl.load(INV_FREQ + half + i, mask=in_half, other=0.0)
    # angle = position * (freq_hi + freq_lo) = rounded + error, with the product's rounding error recovered by an fma;
    # whole turns are removed before adding the error so that cos/sin see a small, exact argument.
    rounded = position * freq_hi
    error = tl.fma(position, freq_hi, -rounded) + position * freq_lo
    turns = tl.floor(rounded * 0.15915494309189535 + 0.5)
    reduced = tl.fma(-turns, TWO_PI_HI, rounded)
    reduced = tl.fma(-turns, TWO_PI_MID, reduced)
    reduced = tl.fma(-turns, TWO_PI_LO, reduced) + error
    cos = tl.cos(reduced)
    sin = tl.sin(reduced)
    if INVERSE:
        sin = -sin
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + half
    x_token = X + b * x_stride_batch + s * x_stride_seq
    out_token = OUT + b * out_stride_batch + s * out_stride_seq
    for head_start in range(0, heads, BLOCK_HEADS):
        h = (head_start + tl.arange(0, BLOCK_HEADS)).to(tl.int64)
        mask = (h < heads)[:, None] & in_half[None, :]
        x_head = x_token + h[:, None] * x_stride_head
        a = tl.load(x_head + first[None, :], mask=mask, other=0.0).to(tl.float32)
        c = tl.load(x_head + second[None, :], mask=mask, other=0.0).to(tl.float32)
        out_head = out_token + h[:, None] * out_stride_head
        tl.store(out_head + first[None, :], (a * cos - c * sin).to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_head + second[None, :], (c * cos + a * sin).to(OUT.dtype.element_ty), mask=mask)


def _triton_config(heads, half):
    """(BLOCK_HEADS, BLOCK_HALF, num_warps): about 4k elements of a token's heads per loop step."""
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(heads), max(1, 2048 // block_half))
    return block_heads, block_half, 4


def triton_compile_cases():
    """Each Triton configuration the launcher below can pick, for the ahead-of-time compile check."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for heads, head_dim in ((32, 128), (8, 128), (1, 2), (40, 80), (16, 256)):
            block_heads, block_half, num_warps = _triton_config(heads, head_dim // 2)
            for interleaved in (False, True):
                signature = {"X": f"*{dtype}", "x_stride_batch": "i32", "x_stride_seq": "i32", "x_stride_head": "i32",
                             "OUT": f"*{dtype}", "out_stride_batch": "i32", "out_stride_seq": "i32",
                             "out_stride_head": "i32", "POSITIONS": "*i64", "positions_stride_batch": "i32",
                             "positions_stride_seq": "i32", "INV_FREQ": "*fp32", "offset": "i32", "seq": "i32",
                             "heads": "i32", "half": "i32", "HAS_POSITIONS": "constexpr", "INTERLEAVED": "constexpr",
                             "INVERSE": "constexpr", "BLOCK_HEADS": "constexpr", "BLOCK_HALF": "constexpr"}
                constexprs = {"HAS_POSITIONS": interleaved, "INTERLEAVED": interleaved, "INVERSE": False,
                              "BLOCK_HEADS": block_heads, "BLOCK_HALF": block_half}
                cases.append((_rotary_kernel, signature, constexprs, num_warps))
    return cases


@functools.lru_cache(maxsize=64)
def _split_inverse_frequencies(head_dim, theta, device):
    """[2, head_dim/2] fp32: the float64 inverse frequencies as high part + low part."""
    exact = reference.inverse_frequencies(head_dim, theta, device)
    high = exact.float()
    return torch.stack([high, (exact - high.double()).float()])


# --- Dispatch -------------------------------------------------------------------------------------------------------


def _rotate(x, positions, offset, theta, interleaved, inverse, backend):
    """x: [batch, seq, heads, head_dim] with unit last stride; positions: None or int64 [batch or 1, seq].
    The output has x's layout (torch.empty_like keeps the strides of a dense tensor)."""
    batch, seq, heads, head_dim = x.shape
    out = torch.empty_like(x)
    if backend == "torch":
        return out.copy_(reference.rotary(x, positions, offset, theta, interleaved, inverse))
    if x.numel() == 0:
        return out
    positions_strides = (0, 0) if positions is None else (positions.stride(0) if positions.shape[0] > 1 else 0,
                                                         positions.stride(1))
    with _backend.on_device(x):
        if backend == "triton":
            block_heads, block_half, num_warps = _triton_config(heads, head_dim // 2)
            inv_freq = _split_inverse_frequencies(head_dim, theta, x.device)
            _rotary_kernel[(batch * seq,)](
                x, *x.stride()[:3], out, *out.stride()[:3], positions if positions is not None else inv_freq,
                *positions_strides, inv_freq, offset, seq, heads, head_dim // 2,
                HAS_POSITIONS=positions is not None, INTERLEAVED=interleaved, INVERSE=inverse,
                BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, num_warps=num_warps)
        else:
            extension, launch = _backend.native(backend, x)
            extension.rotary(
                _backend.address(x), *x.stride()[:3], _backend.address(out), *out.stride()[:3],
                _backend.address(positions), *positions_strides, offset, batch, seq, heads, head_dim, theta,
                interleaved, inverse, _backend.DTYPE_CODES[x.dtype], launch)
    return out


@torch.library.custom_op("aquila::rotary", mutates_args=())
def _rotary_op(x: Tensor, positions: Optional[Tensor], offset: int, theta: float, interleaved: bool, inverse: bool,
               backend: str) -> Tensor:
    return _rotate(x, positions, offset, theta, interleaved, inverse, backend)


@_rotary_op.register_fake
def _(x, positions, offset, theta, interleaved, inverse, backend):
    return torch.empty_like(x)


class RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, positions, offset, theta, interleaved, backend):
        ctx.save_for_backward(positions)
        ctx.args = (offset, theta, interleaved)
        ctx.backend = backend
        return _rotary_op(x, positions, offset, theta, interleaved, False, backend)

    @staticmethod
    def backward(ctx, grad_out):
        (positions,) = ctx.saved_tensors
        offset, theta, interleaved = ctx.args
        grad_x = _rotary_op(_backend.with_unit_stride(grad_out), positions, offset, theta, interleaved, True,
                            ctx.backend)
        return grad_x, None, None, None, None, None


# --- Public API -----------------------------------------------------------------------------------------------------


def rotary_embedding(x: Tensor, positions: Optional[Tensor] = None, *, offset: int = 0, theta: float = 10000.0,
                     interleaved: bool = False, backend: Optional[str] = None) -> Tensor:
    """Applies rotary position embedding to x [batch, seq, heads, head_dim] or [seq, heads, head_dim].

    positions: optional integer position ids, [seq] or [batch, seq]; default offset + arange(seq).
    interleaved: True for Meta/FlagAI pairs (2i, 2i+1), False for Hugging Face rotate-half pairs (i, i + d/2).
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
    backend = _backend.resolve(op, x, backend)
    if _backend.direct_call(x):
        out = _rotate(x4, positions, offset, float(theta), bool(interleaved), False, backend)
    else:
        out = RotaryFunction.apply(x4, positions, offset, float(theta), bool(interleaved), backend)
    return out.squeeze(0) if squeeze else out


def apply_rotary(q: Tensor, k: Tensor, positions: Optional[Tensor] = None, *, offset: int = 0,
                 theta: float = 10000.0, interleaved: bool = False,
                 backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """rotary_embedding of q and k at the same positions; k may have fewer heads than q (GQA/MQA)."""
    if isinstance(q, Tensor) and isinstance(k, Tensor):
        if q.dim() != k.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"apply_rotary: q and k must agree in every dimension but heads, got q "
                             f"{tuple(q.shape)} and k {tuple(k.shape)}")
    kwargs = dict(offset=offset, theta=theta, interleaved=interleaved, backend=backend)
    return rotary_embedding(q, positions, **kwargs), rotary_embedding(k, positions, **kwargs)
