"""Rotary embedding's Triton kernel and its launcher (the maths is in aquila/kernels/rotary.py).

One program rotates one token, all its heads in blocks; cos/sin (fp32) come from the exact float64 angle reduced
to one turn.
"""

import functools

import torch

from aquila.kernels import reference
from aquila.kernels.triton_compat import tl, triton


@triton.jit
def _rotary_kernel(X, x_stride_batch, x_stride_seq, x_stride_head, OUT, out_stride_batch, out_stride_seq,
                   out_stride_head, POSITIONS, positions_stride_batch, positions_stride_seq, INV_FREQ, TURN, offset,
                   COS, SIN, table_stride_batch, table_stride_seq, seq, heads, half, HAS_POSITIONS: tl.constexpr,
                   HAS_TABLE: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                   BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    b = token // seq
    s = token % seq
    i = tl.arange(0, BLOCK_HALF)
    in_half = i < half
    if HAS_TABLE:  # the caller's cos and sin
        table = b * table_stride_batch + s * table_stride_seq + i
        cos = tl.load(COS + table, mask=in_half, other=0.0)
        sin = tl.load(SIN + table, mask=in_half, other=0.0)
    else:
        # The integer position, exact in float64 (up to 2**53); the angle position * theta^(-2i/d) in float64, as
        # the C++ backends compute it, then whole turns removed (2 pi in two float64 parts) so that fp32 cos/sin see
        # a small argument exact to fp32 at any position.
        if HAS_POSITIONS:
            position = tl.load(POSITIONS + b * positions_stride_batch + s * positions_stride_seq).to(tl.float64)
        else:
            position = (s + offset).to(tl.float64)
        angle = position * tl.load(INV_FREQ + i, mask=in_half, other=0.0)
        turns = tl.floor(angle * tl.load(TURN + 2) + 0.5)
        reduced = (tl.fma(-turns, tl.load(TURN), angle) - turns * tl.load(TURN + 1)).to(tl.float32)
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


# What the launch-time compile check drives the launcher over: each block shape (heads, head_dim), positions given
# (int64 for one row, int32 per row), a caller's cos/sin table or neither, either pair layout, forward and inverse, in
# each dtype.
LAUNCH_SHAPES = ((32, 128), (8, 128), (1, 2), (40, 80), (16, 256), (4, 64))
LAUNCH_POSITIONS = (None, "int64", "int32", "table")


def launch_cases(shapes=LAUNCH_SHAPES, positions_kinds=LAUNCH_POSITIONS,
                 dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """[(name, thunk)]: each thunk runs rotate below on a small CPU tensor [batch 2, seq 3, heads, head_dim] of one
    shape, dtype and kind of positions, with each pair layout, forward and inverse, as aquila.kernels.rotary calls
    it."""
    def case(dtype, heads, head_dim, kind):
        def run():
            x = torch.zeros(2, 3, heads, head_dim, dtype=dtype)
            positions = table = None
            if kind == "table":
                table = torch.zeros(1, 3, head_dim // 2), torch.zeros(1, 3, head_dim // 2)
            if kind == "int64":
                positions = torch.arange(3, dtype=torch.int64)[None]
            elif kind == "int32":
                positions = torch.arange(6, dtype=torch.int32).view(2, 3)
            for interleaved in (False, True):
                for inverse in (False, True):
                    rotate(x, positions, 0, 10000.0, interleaved, inverse, torch.empty_like(x), table)
        return f"rotary {str(dtype)[6:]} heads={heads} head_dim={head_dim} positions={kind}", run

    return [case(dtype, heads, head_dim, kind) for dtype in dtypes for heads, head_dim in shapes
            for kind in positions_kinds]


@functools.lru_cache(maxsize=64)
def _frequencies_and_turn(head_dim, theta, device):
    """float64: the inverse frequencies [head_dim/2], and 2 pi as a high and a low part with 1/(2 pi) [3]."""
    two_pi_high = 6.283185307179586
    turn = torch.tensor([two_pi_high, 2.4492935982947064e-16, 1 / two_pi_high], dtype=torch.float64, device=device)
    return reference.inverse_frequencies(head_dim, theta, device), turn


def table_strides(table):
    """(batch, seq) strides of a cos/sin table [batch or 1, seq, head_dim / 2]: batch 0 when shared by the batch."""
    return (table.stride(0) if table.shape[0] > 1 else 0), table.stride(1)


def rotate(x, positions, offset, theta, interleaved, inverse, out, table=None):
    """table: None, or the caller's (cos, sin), fp32 [batch or 1, seq, head_dim / 2] with a unit last stride."""
    batch, seq, heads, head_dim = x.shape
    block_heads, block_half, num_warps = _config(heads, head_dim // 2)
    inv_freq, turn = _frequencies_and_turn(head_dim, theta, x.device)
    positions_strides = (0, 0) if positions is None else (positions.stride(0) if positions.shape[0] > 1 else 0,
                                                         positions.stride(1))
    cos, sin = table if table is not None else (inv_freq, inv_freq)  # unread without a table
    _rotary_kernel[(batch * seq,)](
        x, *x.stride()[:3], out, *out.stride()[:3], positions if positions is not None else inv_freq,
        *positions_strides, inv_freq, turn, offset, cos, sin, *(table_strides(cos) if table is not None else (0, 0)),
        seq, heads, head_dim // 2, HAS_POSITIONS=positions is not None, HAS_TABLE=table is not None,
        INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_HEADS=block_heads, BLOCK_HALF=block_half,
        num_warps=num_warps)
