"""Attention's Triton kernels and their launchers (the maths is in aquila/kernels/attention.py).

The forward streams key/value blocks past a block of queries with an online softmax in base 2. The backward is
deterministic, without atomics: dK/dV per key block over the query blocks of every query head of its group, then dQ
per query block in its own pass. Every loop runs over the blocks that the window lets some row of its block see
(the causal mask is the window's right side at 0); LEFT, RIGHT and SOFTCAP are constexprs, so a kernel without them
is the plain one.
"""

import torch

from aquila.kernels.triton.cross_entropy import _tanh_and_slope
from aquila.kernels.triton_compat import tl, triton

LOG2E = 1.4426950408889634


@triton.jit
def _load_rows(BASE, tokens, token_stride, head_offset, dims, token_mask, dim_mask):
    """A [len(tokens), len(dims)] tile of one head, zero outside the masks."""
    pointers = BASE + tokens[:, None] * token_stride + head_offset + dims[None, :]
    return tl.load(pointers, mask=token_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def _program_query_block(Q_LEN, heads_q):
    """(block of queries, sequence, query head, the sequence's query count) of this program (see grid)."""
    sequence = tl.program_id(0) // heads_q
    return tl.program_id(1), sequence, tl.program_id(0) % heads_q, tl.load(Q_LEN + sequence)


@triton.jit
def _query_block(Q_START, K_START, K_LEN, sequence, head, group, block_m, q_len, head_dim, window_left, window_right,
                 LEFT: tl.constexpr, RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Where a program's block of queries and its sequence's keys are, and which key blocks it must look at: from
    the block of the first key its first query's window reaches (LEFT) to the last key its last query's reaches
    (RIGHT), bottom-right aligned (query i sits at key position i + shift)."""
    k_len = tl.load(K_LEN + sequence)
    q_start = tl.load(Q_START + sequence).to(tl.int64)
    k_start = tl.load(K_START + sequence).to(tl.int64)
    kv_head = (head // group).to(tl.int64)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    shift = k_len - q_len
    begin = 0
    if LEFT:
        begin = tl.maximum(block_m * BLOCK_M + shift - window_left, 0) // BLOCK_N * BLOCK_N
    end = k_len
    if RIGHT:
        end = tl.minimum(k_len, (block_m + 1) * BLOCK_M + shift + window_right)
    return k_len, q_start, k_start, kv_head, rows, dims, rows < q_len, dims < head_dim, shift, begin, end


@triton.jit
def _in_window(rows, cols, shift, window_left, window_right, LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """[rows, cols]: whether query row sees key col (as far as the window goes; True without one)."""
    visible = cols[None, :] >= 0
    if RIGHT:
        visible = visible & (cols[None, :] <= rows[:, None] + shift + window_right)
    if LEFT:
        visible = visible & (cols[None, :] >= rows[:, None] + shift - window_left)
    return visible


@triton.jit
def _attention_forward_kernel(Q, K, V, OUT, LSE, q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                              v_token_stride, v_head_stride, out_token_stride, out_head_stride, Q_START, Q_LEN,
                              K_START, K_LEN, heads_q, group, head_dim, scale_log2, window_left, window_right,
                              softcap_log2, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr):
    block_m, sequence, head, q_len = _program_query_block(Q_LEN, heads_q)
    if block_m * BLOCK_M >= q_len:
        return
    k_len, q_start, k_start, kv_head, rows, dims, row_mask, dim_mask, shift, begin, end = _query_block(
        Q_START, K_START, K_LEN, sequence, head, group, block_m, q_len, head_dim, window_left, window_right, LEFT,
        RIGHT, BLOCK_M, BLOCK_N, BLOCK_D)
    q = _load_rows(Q, q_start + rows, q_token_stride, head.to(tl.int64) * q_head_stride, dims, row_mask, dim_mask)

    # Online softmax in base 2: scores are scaled by scale * log2(e) so that exp2 does the work (and the softcap with
    # them: c tanh(s / c) log2(e) = c' tanh(s' / c') for s' = s log2(e), c' = c log2(e)).
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < k_len
        k = _load_rows(K, k_start + cols, k_token_stride, kv_head * k_head_stride, dims, col_mask, dim_mask)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        if SOFTCAP:
            capped, _ = _tanh_and_slope(scores / softcap_log2)
            scores = softcap_log2 * capped
        visible = col_mask[None, :] & _in_window(rows, cols, shift, window_left, window_right, LEFT, RIGHT)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows that have seen no key yet
        probs = tl.math.exp2(scores - safe_max[:, None])
        rescale = tl.math.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, axis=1)
        v = _load_rows(V, k_start + cols, v_token_stride, kv_head * v_head_stride, dims, col_mask, dim_mask)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision=PRECISION)
        row_max = new_max

    seen = row_sum > 0.0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    out_pointers = OUT + (q_start + rows)[:, None] * out_token_stride + head.to(tl.int64) * out_head_stride
    tl.store(out_pointers + dims[None, :], out.to(OUT.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])
    lse = tl.where(seen, (row_max + tl.math.log2(tl.where(seen, row_sum, 1.0))) / 1.4426950408889634, float("-inf"))
    tl.store(LSE + (q_start + rows) * heads_q + head, lse, mask=row_mask)


@triton.jit
def _probabilities_and_score_grads(q, k, v, grad_out, lse, delta, rows, cols, row_mask, col_mask, shift, scale,
                                   window_left, window_right, softcap, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                                   SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """The backward's recomputation for a tile of queries x keys: P from the saved lse, and dS = P (dP - delta) with
    dP = dO V^T, times the softcap's slope 1 - tanh^2 with SOFTCAP. Rows that saw no key in the forward (lse -inf)
    have P = 0."""
    visible = row_mask[:, None] & col_mask[None, :] & (lse[:, None] > float("-inf"))
    visible = visible & _in_window(rows, cols, shift, window_left, window_right, LEFT, RIGHT)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    if SOFTCAP:
        capped, slope = _tanh_and_slope(scores / softcap)
        scores = softcap * capped
    probs = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
    grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
    grad_scores = probs * (grad_probs - delta[:, None])
    if SOFTCAP:
        grad_scores = grad_scores * slope
    return probs, grad_scores


@triton.jit
def _attention_backward_kv_kernel(Q, K, V, GRAD_OUT, LSE, DELTA, GRAD_K, GRAD_V, q_token_stride, q_head_stride,
                                  k_token_stride, k_head_stride, v_token_stride, v_head_stride, do_token_stride,
                                  do_head_stride, dk_token_stride, dk_head_stride, dv_token_stride, dv_head_stride,
                                  Q_START, Q_LEN, K_START, K_LEN, heads_q, heads_k, group, head_dim, scale,
                                  window_left, window_right, softcap, LEFT: tl.constexpr, RIGHT: tl.constexpr,
                                  SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of one block of keys of one key/value head: a sum over the query blocks of every query head of
    its group that see some of its keys, in a fixed order (deterministic)."""
    block_n = tl.program_id(1)
    sequence = tl.program_id(0) // heads_k
    kv_head = tl.program_id(0) % heads_k
    k_len = tl.load(K_LEN + sequence)
    if block_n * BLOCK_N >= k_len:
        return
    q_len = tl.load(Q_LEN + sequence)
    q_start = tl.load(Q_START + sequence).to(tl.int64)
    k_start = tl.load(K_START + sequence).to(tl.int64)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    col_mask = cols < k_len
    dim_mask = dims < head_dim
    k = _load_rows(K, k_start + cols, k_token_stride, kv_head.to(tl.int64) * k_head_stride, dims, col_mask, dim_mask)
    v = _load_rows(V, k_start + cols, v_token_stride, kv_head.to(tl.int64) * v_head_stride, dims, col_mask, dim_mask)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    shift = k_len - q_len
    first = 0
    if RIGHT:  # queries before this one see none of the block's keys
        first = tl.maximum(block_n * BLOCK_N - shift - window_right, 0) // BLOCK_M * BLOCK_M
    last = q_len
    if LEFT:  # nor do queries from this one on
        last = tl.minimum(q_len, (block_n + 1) * BLOCK_N - shift + window_left)
    for g in range(0, group):
        head = (kv_head * group + g).to(tl.int64)
        for start in range(first, last, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < q_len
            q = _load_rows(Q, q_start + rows, q_token_stride, head * q_head_stride, dims, row_mask, dim_mask)
            grad_out = _load_rows(GRAD_OUT, q_start + rows, do_token_stride, head * do_head_stride, dims, row_mask,
                                  dim_mask)
            lse = tl.load(LSE + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
            probs, grad_scores = _probabilities_and_score_grads(
                q, k, v, grad_out, lse, delta, rows, cols, row_mask, col_mask, shift, scale, window_left,
                window_right, softcap, LEFT, RIGHT, SOFTCAP, PRECISION)
            grad_v += tl.dot(tl.trans(probs.to(grad_out.dtype)), grad_out, input_precision=PRECISION)
            grad_k += tl.dot(tl.trans(grad_scores.to(q.dtype)), q, input_precision=PRECISION)
    mask = col_mask[:, None] & dim_mask[None, :]
    dk_pointers = GRAD_K + (k_start + cols)[:, None] * dk_token_stride + kv_head.to(tl.int64) * dk_head_stride
    tl.store(dk_pointers + dims[None, :], (grad_k * scale).to(GRAD_K.dtype.element_ty), mask=mask)
    dv_pointers = GRAD_V + (k_start + cols)[:, None] * dv_token_stride + kv_head.to(tl.int64) * dv_head_stride
    tl.store(dv_pointers + dims[None, :], grad_v.to(GRAD_V.dtype.element_ty), mask=mask)


@triton.jit
def _attention_backward_q_kernel(Q, K, V, GRAD_OUT, LSE, DELTA, GRAD_Q, q_token_stride, q_head_stride,
                                 k_token_stride, k_head_stride, v_token_stride, v_head_stride, do_token_stride,
                                 do_head_stride, dq_token_stride, dq_head_stride, Q_START, Q_LEN, K_START, K_LEN,
                                 heads_q, group, head_dim, scale, window_left, window_right, softcap,
                                 LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                 PRECISION: tl.constexpr):
    """dQ of one block of queries of one head: a sum over the key blocks it sees."""
    block_m, sequence, head, q_len = _program_query_block(Q_LEN, heads_q)
    if block_m * BLOCK_M >= q_len:
        return
    k_len, q_start, k_start, kv_head, rows, dims, row_mask, dim_mask, shift, begin, end = _query_block(
        Q_START, K_START, K_LEN, sequence, head, group, block_m, q_len, head_dim, window_left, window_right, LEFT,
        RIGHT, BLOCK_M, BLOCK_N, BLOCK_D)
    head64 = head.to(tl.int64)
    q = _load_rows(Q, q_start + rows, q_token_stride, head64 * q_head_stride, dims, row_mask, dim_mask)
    grad_out = _load_rows(GRAD_OUT, q_start + rows, do_token_stride, head64 * do_head_stride, dims, row_mask,
                          dim_mask)
    lse = tl.load(LSE + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < k_len
        k = _load_rows(K, k_start + cols, k_token_stride, kv_head * k_head_stride, dims, col_mask, dim_mask)
        v = _load_rows(V, k_start + cols, v_token_stride, kv_head * v_head_stride, dims, col_mask, dim_mask)
        _, grad_scores = _probabilities_and_score_grads(
            q, k, v, grad_out, lse, delta, rows, cols, row_mask, col_mask, shift, scale, window_left, window_right,
            softcap, LEFT, RIGHT, SOFTCAP, PRECISION)
        grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=PRECISION)
    dq_pointers = GRAD_Q + (q_start + rows)[:, None] * dq_token_stride + head64 * dq_head_stride
    tl.store(dq_pointers + dims[None, :], (grad_q * scale).to(GRAD_Q.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


# CUDA caps grid axes 1 and 2 at 65,535 blocks, axis 0 at 2^31 - 1.
MAX_GRID_Y = 65535


def grid(sequence_heads, length, block):
    """The launch grid: axis 0 (sequence, head) pairs, any number of them (a packed batch of thousands of documents
    at 32 heads); axis 1 the blocks along the longest sequence, up to MAX_GRID_Y."""
    blocks = triton.cdiv(length, block)
    if blocks > MAX_GRID_Y:
        raise ValueError(f"attention: the triton backend takes sequences of up to {MAX_GRID_Y * block} tokens here, "
                         f"got {length}")
    return sequence_heads, blocks


def _block_dim(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (16-bit or fp32 inputs, head-dim class: head_dim up to 64, 128 or
# 256). The launch-time compile check (tests/kernels/triton_compile_check.py) holds each within A100's and H100's shared
# memory as launched, 16-bit ones without a spill and fp32 ones within its FP32_SPILL_BUDGET (128 bytes of spill
# stores), at sm_80 and sm_90. fp32 dots are IEEE (no tensor cores): the FMA dot keeps a thread's share of both
# operands in registers for the whole reduction, so fp32 takes small tiles over 8 warps (64x64 and 32x64 tiles over
# 4-8 warps spilled 15-41 KB per thread at head dim 128). 16-bit at head dim 128: a 128x64 forward tile spilled at
# sm_80 and a 64x64 dK/dV tile at both; at 256 a 32x32 dQ tile.
_FORWARD_CONFIGS = {(2, 64): (128, 64, 8, 3), (2, 128): (128, 32, 8, 3), (2, 256): (64, 32, 8, 2),
                    (4, 64): (64, 16, 8, 1), (4, 128): (32, 16, 8, 1), (4, 256): (16, 16, 8, 1)}
_BACKWARD_CONFIGS = {(2, 64): (64, 64, 8, 2), (2, 128): (32, 64, 8, 2), (2, 256): (16, 32, 4, 1),
                     (4, 64): (64, 32, 8, 1), (4, 128): (16, 16, 8, 1), (4, 256): (16, 16, 8, 1)}
# Softcapping keeps a tile of slopes live through the dK/dV products: with it the 16-bit 64x64 tiles at head dim 64
# spilled at sm_80 (28 bytes; 32x64 tiles too), so they take blocks of 32 keys.
_SOFTCAP_BACKWARD_CONFIGS = {**_BACKWARD_CONFIGS, (2, 64): (64, 32, 8, 2)}


def _head_dim_class(head_dim):
    block_d = _block_dim(head_dim)
    return 64 if block_d <= 64 else block_d


def _forward_config(head_dim, dtype):
    return _FORWARD_CONFIGS[(dtype.itemsize, _head_dim_class(head_dim))]


def _backward_config(head_dim, dtype, softcap):
    configs = _SOFTCAP_BACKWARD_CONFIGS if softcap else _BACKWARD_CONFIGS
    return configs[(dtype.itemsize, _head_dim_class(head_dim))]


def _precision(dtype):
    """fp32 inputs get true fp32 products (torch's default for fp32 matmuls), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


# What the launch-time compile check (tests/kernels/triton_compile_check.py) drives the launchers over: every head-dim
# class with head dims that are and are not multiples of 16 (Triton specialises on it), MHA, GQA and MQA (heads_k 1),
# a single query head (strides and head counts equal to 1), each masking (LAUNCH_MASKINGS: window_size with causal
# or not; a window side of 16 is specialised as divisible by 16, one of 1 as equal to 1) with and without softcap,
# in each dtype.
LAUNCH_HEAD_DIMS = (1, 8, 16, 24, 32, 40, 64, 72, 80, 128, 160, 256)
LAUNCH_HEADS = ((4, 4), (8, 2), (4, 1), (1, 1))
LAUNCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LAUNCH_MASKINGS = {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "sliding": (True, (3, 0)),
                   "window": (False, (16, 1))}
LAUNCH_SOFTCAPS = (0.0, 50.0)


def launch_cases(head_dims=LAUNCH_HEAD_DIMS, heads=LAUNCH_HEADS, dtypes=LAUNCH_DTYPES, maskings=tuple(LAUNCH_MASKINGS),
                 softcaps=LAUNCH_SOFTCAPS):
    """[(name, thunk)]: each thunk runs forward and backward below on small CPU tensors of one shape, dtype, masking
    (a name of LAUNCH_MASKINGS) and softcap, as aquila.kernels.attention calls them ([tokens, heads, head_dim] with
    unit last stride)."""
    from aquila.kernels.attention import Sequences, checked_scores

    def case(dtype, head_dim, heads_q, heads_k, masking, softcap):
        def run():
            lengths = torch.tensor([5, 3], dtype=torch.int32)
            starts = torch.tensor([0, 5], dtype=torch.int32)
            seq = Sequences(starts, lengths, starts, lengths, 5, 5)
            q, grad_out, out, grad_q = (torch.zeros(8, heads_q, head_dim, dtype=dtype) for _ in range(4))
            k, v, grad_k, grad_v = (torch.zeros(8, heads_k, head_dim, dtype=dtype) for _ in range(4))
            lse = torch.zeros(8, heads_q, dtype=torch.float32)
            scores = checked_scores("attention", head_dim, None, *LAUNCH_MASKINGS[masking], softcap)
            forward(q, k, v, seq, scores, out, lse)
            backward(grad_out, q, k, v, out, lse, seq, scores, grad_q, grad_k, grad_v)
        return (f"attention {str(dtype)[6:]} d={head_dim} heads={heads_q}/{heads_k} {masking} softcap={softcap}",
                run)

    return [case(dtype, head_dim, heads_q, heads_k, masking, softcap) for dtype in dtypes for head_dim in head_dims
            for heads_q, heads_k in heads for masking in maskings for softcap in softcaps]


def _scoring_arguments(scores):
    """The kernels' window and softcap arguments and constexprs: a side of the window is bounded (LEFT, RIGHT) when
    it is >= 0 (causal is window_right 0 in a canonical Scores). Unused arguments are passed as constants, so that
    they do not make new specialisations."""
    left, right = scores.window_left, scores.window_right
    return ((max(left, 0), max(right, 0), scores.softcap or 1.0),
            dict(LEFT=left >= 0, RIGHT=right >= 0, SOFTCAP=scores.softcap > 0))


def forward(q, k, v, seq, scores, out, lse):
    heads_q, head_dim = q.shape[1], q.shape[2]
    block_m, block_n, num_warps, num_stages = _forward_config(head_dim, q.dtype)
    (left, right, softcap), flags = _scoring_arguments(scores)
    _attention_forward_kernel[grid(seq.batch * heads_q, seq.max_q_len, block_m)](
        q, k, v, out, lse, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
        seq.q_start, seq.q_len, seq.k_start, seq.k_len, heads_q, heads_q // k.shape[1], head_dim,
        scores.scale * LOG2E, left, right, softcap * LOG2E, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=_block_dim(head_dim), PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)


def backward(grad_out, q, k, v, out, lse, seq, scores, grad_q, grad_k, grad_v):
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_k = k.shape[1]
    delta = (grad_out.float() * out.float()).sum(-1)  # [total_q, heads_q]: rowsum(dO * O)
    block_m, block_n, num_warps, num_stages = _backward_config(head_dim, q.dtype, scores.softcap)
    scoring, flags = _scoring_arguments(scores)
    common = dict(**flags, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_dim(head_dim),
                  PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    sequences = (seq.q_start, seq.q_len, seq.k_start, seq.k_len)
    _attention_backward_kv_kernel[grid(seq.batch * heads_k, seq.max_k_len, block_n)](
        q, k, v, grad_out, lse, delta, grad_k, grad_v, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
        *grad_out.stride()[:2], *grad_k.stride()[:2], *grad_v.stride()[:2], *sequences, heads_q, heads_k,
        heads_q // heads_k, head_dim, scores.scale, *scoring, **common)
    _attention_backward_q_kernel[grid(seq.batch * heads_q, seq.max_q_len, block_m)](
        q, k, v, grad_out, lse, delta, grad_q, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
        *grad_out.stride()[:2], *grad_q.stride()[:2], *sequences, heads_q, heads_q // heads_k, head_dim,
        scores.scale, *scoring, **common)
