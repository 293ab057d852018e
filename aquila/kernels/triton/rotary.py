"""Rotary embedding's Triton kernel and its launcher (the maths is in aquila/kernels/rotary.py).

One program rotates one token, all its heads in blocks; cos/sin come from an angle reduced exactly in fp32.
"""

import functools

import torch

from aquila.kernels import reference
from aquila.kernels.triton_compat import tl, triton

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


def _config(heads, half):
    """(BLOCK_HEADS, BLOCK_HALF, num_warps): about 4k elements of a token's heads per loop step."""
    block_half = triton.next_power_of_2(half)
    block_heads = min(triton.next_power_of_2(heads), max(1, 2048 // block_half))
    return block_heads, block_half, 4


def compile_cases():
    """Each Triton configuration the launcher below can pick, for the ahead-of-time compile check."""
    cases = []
    for dtype in ("fp32", "bf16"):
        for heads, head_dim in ((32, 128), (8, 128), (1, 2), (40, 80), (16, 256)):
            block_heads, block_half, num_warps = _config(heads, head_dim // 2)
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


def rotate(x, positions, offset, theta, interleaved, inverse, out):
    batch, seq, heads, head_dim = x.shape
    block_heads, block_half, num_warps = _config(heads, head_dim // 2)
    inv_freq = _split_inverse_frequencies(head_dim, theta, x.device)
    positions_strides = (0, 0) if positions is None else (positions.stride(0) if positions.shape[0] > 1 else 0,
                                                         positions.stride(1))
    _rotary_kernel[(batch * seq,)](
        x, *x.stride()[:3], out, *out.stride()[:3], positions if positions is not None else inv_freq,
        *positions_strides, inv_freq, offset, seq, heads, head_dim // 2,
        HAS_POSITIONS=positions is not None, INTERLEAVED=interleaved, INVERSE=inverse,
        BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, num_warps=num_warps)
