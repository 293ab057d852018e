"""Fused scaled dot-product attention: training kernels (forward and backward), generation against a KV cache.

    out = softmax(scale * Q K^T + mask) V

Never quadratic in memory: the forward streams key/value blocks with an online softmax (exp2 form) and saves only
the log-sum-exp of each query row; the backward recomputes the probabilities from it. Key/value heads may be fewer
than query heads (GQA/MQA): query head h reads key/value head h // (heads_q // heads_k), with no repeated copies.
Sequences may be packed ("varlen", as flash-attn's API): documents packed into one training row never attend across
their boundaries. With causal masking and more keys than queries the mask is aligned bottom-right (flash-attn >= 2.1):
the queries are the last q_len positions of the sequence, as with a KV cache.

Every kernel sees the batch as a list of sequences: sequence b's queries are tokens q_start[b] .. + q_len[b] of a
[tokens, heads, head_dim] tensor, its keys and values tokens k_start[b] .. + k_len[b] (csrc/kernels.h). The batched
form [batch, seq, heads, head_dim], packed sequences with cu_seqlens, and a KV cache with per-sequence lengths are
all that list.

Backends: Triton (forward and the deterministic backward: dK/dV per key block over the query blocks of every query
head of its group, dQ in its own pass; no atomics), the CUDA C++ split-K decode kernel for generation, the C++ CPU
flash attention (forward and backward), and the explicit-softmax torch reference.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .triton_compat import tl, triton

MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634

# --- Triton kernels -------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(BASE, tokens, token_stride, head_offset, dims, token_mask, dim_mask):
    """A [len(tokens), len(dims)] tile of one head, zero outside the masks."""
    pointers = BASE + tokens[:, None] * token_stride + head_offset + dims[None, :]
    return tl.load(pointers, mask=token_mask[:, None] & dim_mask[None, :], other=0.0)


@triton.jit
def _query_block(Q_START, K_START, K_LEN, sequence, head, group, block_m, q_len, head_dim, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Where a program's block of queries and its sequence's keys are, and how far into the keys it must look (the
    causal mask, bottom-right aligned, hides the keys after the block's last query)."""
    k_len = tl.load(K_LEN + sequence)
    q_start = tl.load(Q_START + sequence).to(tl.int64)
    k_start = tl.load(K_START + sequence).to(tl.int64)
    kv_head = (head // group).to(tl.int64)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    shift = k_len - q_len  # query i sees keys j <= i + shift
    end = k_len
    if CAUSAL:
        end = tl.minimum(k_len, (block_m + 1) * BLOCK_M + shift)
    return k_len, q_start, k_start, kv_head, rows, dims, rows < q_len, dims < head_dim, shift, end


@triton.jit
def _attention_forward_kernel(Q, K, V, OUT, LSE, q_token_stride, q_head_stride, k_token_stride, k_head_stride,
                              v_token_stride, v_head_stride, out_token_stride, out_head_stride, Q_START, Q_LEN,
                              K_START, K_LEN, heads_q, group, head_dim, scale_log2,
                              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    block_m = tl.program_id(0)
    sequence = tl.program_id(1) // heads_q
    head = tl.program_id(1) % heads_q
    q_len = tl.load(Q_LEN + sequence)
    if block_m * BLOCK_M >= q_len:
        return
    k_len, q_start, k_start, kv_head, rows, dims, row_mask, dim_mask, shift, end = _query_block(
        Q_START, K_START, K_LEN, sequence, head, group, block_m, q_len, head_dim, CAUSAL, BLOCK_M, BLOCK_D)
    q = _load_rows(Q, q_start + rows, q_token_stride, head.to(tl.int64) * q_head_stride, dims, row_mask, dim_mask)

    # Online softmax in base 2: scores are scaled by scale * log2(e) so that exp2 does the work.
    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < k_len
        k = _load_rows(K, k_start + cols, k_token_stride, kv_head * k_head_stride, dims, col_mask, dim_mask)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        visible = col_mask[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + shift)
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
                                   CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """The backward's recomputation for a tile of queries x keys: P from the saved lse, and dS = P (dP - delta) with
    dP = dO V^T. Rows that saw no key in the forward (lse -inf) have P = 0."""
    visible = row_mask[:, None] & col_mask[None, :] & (lse[:, None] > float("-inf"))
    if CAUSAL:
        visible = visible & (cols[None, :] <= rows[:, None] + shift)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    probs = tl.where(visible, tl.exp(scores - lse[:, None]), 0.0)
    grad_probs = tl.dot(grad_out, tl.trans(v), input_precision=PRECISION)
    return probs, probs * (grad_probs - delta[:, None])


@triton.jit
def _attention_backward_kv_kernel(Q, K, V, GRAD_OUT, LSE, DELTA, GRAD_K, GRAD_V, q_token_stride, q_head_stride,
                                  k_token_stride, k_head_stride, v_token_stride, v_head_stride, do_token_stride,
                                  do_head_stride, dk_token_stride, dk_head_stride, dv_token_stride, dv_head_stride,
                                  Q_START, Q_LEN, K_START, K_LEN, heads_q, heads_k, group, head_dim, scale,
                                  CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of one block of keys of one key/value head: a sum over the query blocks of every query head of
    its group, in a fixed order (deterministic)."""
    block_n = tl.program_id(0)
    sequence = tl.program_id(1) // heads_k
    kv_head = tl.program_id(1) % heads_k
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
    if CAUSAL:  # queries before this one see none of the block's keys
        first = tl.maximum(block_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
    for g in range(0, group):
        head = (kv_head * group + g).to(tl.int64)
        for start in range(first, q_len, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < q_len
            q = _load_rows(Q, q_start + rows, q_token_stride, head * q_head_stride, dims, row_mask, dim_mask)
            grad_out = _load_rows(GRAD_OUT, q_start + rows, do_token_stride, head * do_head_stride, dims, row_mask,
                                  dim_mask)
            lse = tl.load(LSE + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
            probs, grad_scores = _probabilities_and_score_grads(q, k, v, grad_out, lse, delta, rows, cols, row_mask,
                                                                col_mask, shift, scale, CAUSAL, PRECISION)
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
                                 heads_q, group, head_dim, scale, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of one block of queries of one head: a sum over the key blocks it sees."""
    block_m = tl.program_id(0)
    sequence = tl.program_id(1) // heads_q
    head = tl.program_id(1) % heads_q
    q_len = tl.load(Q_LEN + sequence)
    if block_m * BLOCK_M >= q_len:
        return
    k_len, q_start, k_start, kv_head, rows, dims, row_mask, dim_mask, shift, end = _query_block(
        Q_START, K_START, K_LEN, sequence, head, group, block_m, q_len, head_dim, CAUSAL, BLOCK_M, BLOCK_D)
    head64 = head.to(tl.int64)
    q = _load_rows(Q, q_start + rows, q_token_stride, head64 * q_head_stride, dims, row_mask, dim_mask)
    grad_out = _load_rows(GRAD_OUT, q_start + rows, do_token_stride, head64 * do_head_stride, dims, row_mask,
                          dim_mask)
    lse = tl.load(LSE + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + (q_start + rows) * heads_q + head, mask=row_mask, other=0.0)
    grad_q = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < k_len
        k = _load_rows(K, k_start + cols, k_token_stride, kv_head * k_head_stride, dims, col_mask, dim_mask)
        v = _load_rows(V, k_start + cols, v_token_stride, kv_head * v_head_stride, dims, col_mask, dim_mask)
        _, grad_scores = _probabilities_and_score_grads(q, k, v, grad_out, lse, delta, rows, cols, row_mask,
                                                        col_mask, shift, scale, CAUSAL, PRECISION)
        grad_q += tl.dot(grad_scores.to(k.dtype), k, input_precision=PRECISION)
    dq_pointers = GRAD_Q + (q_start + rows)[:, None] * dq_token_stride + head64 * dq_head_stride
    tl.store(dq_pointers + dims[None, :], (grad_q * scale).to(GRAD_Q.dtype.element_ty),
             mask=row_mask[:, None] & dim_mask[None, :])


def _block_dim(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (16-bit or fp32 inputs, head_dim up to 128 or 256). The compile
# check (tests/kernels/triton_compile_check.py) holds each within A100's and H100's shared memory.
_FORWARD_CONFIGS = {(2, 128): (128, 64, 8, 3), (2, 256): (64, 32, 8, 2), (4, 128): (64, 64, 8, 2),
                    (4, 256): (32, 32, 4, 1)}
_BACKWARD_CONFIGS = {(2, 128): (64, 64, 8, 2), (2, 256): (32, 32, 8, 1), (4, 128): (32, 64, 4, 1),
                     (4, 256): (16, 32, 4, 1)}


def _forward_config(head_dim, dtype):
    return _FORWARD_CONFIGS[(dtype.itemsize, 128 if _block_dim(head_dim) <= 128 else 256)]


def _backward_config(head_dim, dtype):
    return _BACKWARD_CONFIGS[(dtype.itemsize, 128 if _block_dim(head_dim) <= 128 else 256)]


def _precision(dtype):
    """fp32 inputs get true fp32 products (torch's default for fp32 matmuls), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def triton_compile_cases():
    """Each Triton configuration the launchers below can pick, for the ahead-of-time compile check."""
    cases = []
    common = {"CAUSAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr",
              "PRECISION": "constexpr"}
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for head_dim in (64, 80, 128, 256):
            block_d = _block_dim(head_dim)
            precision = _precision(torch_dtype)
            tensors = lambda names: {name: f"*{dtype}" for name in names}  # noqa: E731
            ints = lambda names: {name: "i32" for name in names}  # noqa: E731
            sequences = {name: "*i32" for name in ("Q_START", "Q_LEN", "K_START", "K_LEN")}
            m, n, warps, stages = _forward_config(head_dim, torch_dtype)
            signature = {**tensors(["Q", "K", "V", "OUT"]), "LSE": "*fp32",
                         **ints(["q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
                                 "v_token_stride", "v_head_stride", "out_token_stride", "out_head_stride"]),
                         **sequences, **ints(["heads_q", "group", "head_dim"]), "scale_log2": "fp32", **common}
            constexprs = {"CAUSAL": True, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "PRECISION": precision}
            cases.append((_attention_forward_kernel, signature, constexprs, warps, stages))
            m, n, warps, stages = _backward_config(head_dim, torch_dtype)
            constexprs = {"CAUSAL": True, "BLOCK_M": m, "BLOCK_N": n, "BLOCK_D": block_d, "PRECISION": precision}
            signature = {**tensors(["Q", "K", "V", "GRAD_OUT"]), "LSE": "*fp32", "DELTA": "*fp32",
                         **tensors(["GRAD_K", "GRAD_V"]),
                         **ints(["q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
                                 "v_token_stride", "v_head_stride", "do_token_stride", "do_head_stride",
                                 "dk_token_stride", "dk_head_stride", "dv_token_stride", "dv_head_stride"]),
                         **sequences, **ints(["heads_q", "heads_k", "group", "head_dim"]), "scale": "fp32", **common}
            cases.append((_attention_backward_kv_kernel, signature, constexprs, warps, stages))
            signature = {**tensors(["Q", "K", "V", "GRAD_OUT"]), "LSE": "*fp32", "DELTA": "*fp32",
                         **tensors(["GRAD_Q"]),
                         **ints(["q_token_stride", "q_head_stride", "k_token_stride", "k_head_stride",
                                 "v_token_stride", "v_head_stride", "do_token_stride", "do_head_stride",
                                 "dq_token_stride", "dq_head_stride"]),
                         **sequences, **ints(["heads_q", "group", "head_dim"]), "scale": "fp32", **common}
            cases.append((_attention_backward_q_kernel, signature, constexprs, warps, stages))
    return cases


# --- The batch as a list of sequences -------------------------------------------------------------------------------


class Sequences(NamedTuple):
    """Where each sequence's queries and keys are (int32 tensors on the kernels' device), and the longest of each."""

    q_start: Tensor
    q_len: Tensor
    k_start: Tensor
    k_len: Tensor
    max_q_len: int
    max_k_len: int

    @property
    def batch(self):
        return self.q_len.shape[0]

    def as_list(self):
        return list(zip(*(t.tolist() for t in (self.q_start, self.q_len, self.k_start, self.k_len))))

    def as_dict(self):
        return {"q_start": self.q_start.data_ptr(), "q_len": self.q_len.data_ptr(),
                "k_start": self.k_start.data_ptr(), "k_len": self.k_len.data_ptr(), "batch": self.batch,
                "max_q_len": self.max_q_len, "max_k_len": self.max_k_len}


def _strided(tensor):
    return {"data": tensor.data_ptr(), "token_stride": tensor.stride(0), "head_stride": tensor.stride(1)}


# --- Dispatch -------------------------------------------------------------------------------------------------------


def _forward(q, k, v, seq, scale, causal, backend):
    """q [total_q, heads_q, d], k/v [total_k, heads_k, d] with unit last stride. Returns out (q's shape, contiguous)
    and lse fp32 [total_q, heads_q]."""
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_k = k.shape[1]
    if backend == "torch":
        out, lse = reference.attention(q, k, v, seq.as_list(), scale, causal)
        return out, lse.float()
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if seq.batch == 0 or seq.max_q_len == 0:
        return out, lse
    with _backend.on_device(q):
        if backend == "triton":
            block_m, block_n, num_warps, num_stages = _forward_config(head_dim, q.dtype)
            grid = (triton.cdiv(seq.max_q_len, block_m), seq.batch * heads_q)
            _attention_forward_kernel[grid](
                q, k, v, out, lse, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *out.stride()[:2],
                seq.q_start, seq.q_len, seq.k_start, seq.k_len, heads_q, heads_q // heads_k, head_dim,
                scale * LOG2E, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_dim(head_dim),
                PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
        else:
            extension, launch = _backend.native(backend, q, work=q.numel() + k.numel())
            args = {"q": _strided(q), "k": _strided(k), "v": _strided(v), "out": _strided(out),
                    "lse": lse.data_ptr(), "seq": seq.as_dict(), "heads_q": heads_q, "heads_k": heads_k,
                    "head_dim": head_dim, "scale": scale, "causal": causal, "dtype": _backend.DTYPE_CODES[q.dtype]}
            if backend == "cuda":
                splits = decode_splits(q, seq, heads_k)
                partial_out = torch.empty((splits, *q.shape), dtype=torch.float32, device=q.device)
                partial_lse = torch.empty((splits, *q.shape[:2]), dtype=torch.float32, device=q.device)
                args.update(partial_out=partial_out.data_ptr(), partial_lse=partial_lse.data_ptr(), splits=splits)
                extension.decode_attention(args, launch)
            else:
                extension.attention_forward(args, launch)
    return out, lse


def decode_splits(q, seq, heads_k):
    """How many ranges the CUDA decode kernel cuts each sequence's keys into. Its blocks each take up to 16 query
    rows (8 for head_dim > 128) of a key/value head's group; enough splits that the blocks fill the GPU's SMs about
    16 times over (some five waves at three blocks per SM), none shorter than 256 keys."""
    multiprocessors = torch.cuda.get_device_properties(q.device).multi_processor_count
    rows_per_block = 16 if q.shape[-1] <= 128 else 8
    row_chunks = math.ceil(seq.max_q_len * (q.shape[1] // heads_k) / rows_per_block)
    wanted = math.ceil(16 * multiprocessors / max(1, seq.batch * heads_k * row_chunks))
    return max(1, min(wanted, math.ceil(seq.max_k_len / 256)))


def _backward(grad_out, q, k, v, out, lse, seq, scale, causal, backend):
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_k = k.shape[1]
    grad_q = torch.zeros_like(q, memory_format=torch.contiguous_format)
    grad_k = torch.zeros_like(k, memory_format=torch.contiguous_format)
    grad_v = torch.zeros_like(v, memory_format=torch.contiguous_format)
    if seq.batch == 0:
        return grad_q, grad_k, grad_v
    with _backend.on_device(q):
        if backend == "triton":
            delta = (grad_out.float() * out.float()).sum(-1)  # [total_q, heads_q]: rowsum(dO * O)
            block_m, block_n, num_warps, num_stages = _backward_config(head_dim, q.dtype)
            common = dict(CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_dim(head_dim),
                          PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
            sequences = (seq.q_start, seq.q_len, seq.k_start, seq.k_len)
            _attention_backward_kv_kernel[(triton.cdiv(seq.max_k_len, block_n), seq.batch * heads_k)](
                q, k, v, grad_out, lse, delta, grad_k, grad_v, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
                *grad_out.stride()[:2], *grad_k.stride()[:2], *grad_v.stride()[:2], *sequences, heads_q, heads_k,
                heads_q // heads_k, head_dim, scale, **common)
            _attention_backward_q_kernel[(triton.cdiv(seq.max_q_len, block_m), seq.batch * heads_q)](
                q, k, v, grad_out, lse, delta, grad_q, *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
                *grad_out.stride()[:2], *grad_q.stride()[:2], *sequences, heads_q, heads_q // heads_k, head_dim,
                scale, **common)
        else:
            extension, launch = _backend.native(backend, q, work=q.numel() + k.numel())
            delta = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # the kernel fills it
            extension.attention_backward(
                {"q": _strided(q), "k": _strided(k), "v": _strided(v), "out": _strided(out),
                 "grad_out": _strided(grad_out), "lse": lse.data_ptr(), "grad_q": _strided(grad_q),
                 "grad_k": _strided(grad_k), "grad_v": _strided(grad_v), "delta": delta.data_ptr(),
                 "seq": seq.as_dict(), "heads_q": heads_q, "heads_k": heads_k, "head_dim": head_dim,
                 "scale": scale, "causal": causal, "dtype": _backend.DTYPE_CODES[q.dtype]}, launch)
    return grad_q, grad_k, grad_v


# --- torch.library ops and autograd -----------------------------------------------------------------------------------


@torch.library.custom_op("aquila::attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, q_len: Tensor, k_start: Tensor, k_len: Tensor,
                max_q_len: int, max_k_len: int, scale: float, causal: bool, backend: str) -> tuple[Tensor, Tensor]:
    seq = Sequences(q_start, q_len, k_start, k_len, max_q_len, max_k_len)
    return _forward(q, k, v, seq, scale, causal, backend)


@_forward_op.register_fake
def _(q, k, v, q_start, q_len, k_start, k_len, max_q_len, max_k_len, scale, causal, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("aquila::attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_start: Tensor,
                 q_len: Tensor, k_start: Tensor, k_len: Tensor, max_q_len: int, max_k_len: int, scale: float,
                 causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    seq = Sequences(q_start, q_len, k_start, k_len, max_q_len, max_k_len)
    return _backward(_backend.with_unit_stride(grad_out), q, k, v, out, lse, seq, scale, causal, backend)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len, max_q_len, max_k_len, scale, causal, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq, scale, causal, backend):
        out, lse = _forward_op(q, k, v, *seq, scale, causal, backend)
        ctx.save_for_backward(q, k, v, out, lse, *seq[:4])
        ctx.args = (*seq[4:], scale, causal, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *sequence_tensors = ctx.saved_tensors
        grads = _backward_op(grad_out, q, k, v, out, lse, *sequence_tensors, *ctx.args)
        return (*grads, None, None, None, None)


# --- Public API -----------------------------------------------------------------------------------------------------


def _lengths_from_cu_seqlens(op, name, cu_seqlens, total, device):
    """(starts, lengths) from cumulative lengths, after checking them: integer, 1-D, from 0, non-decreasing, ending at
    the number of tokens. (Reads the values: a host sync for a GPU tensor.)"""
    _backend.check_tensor(op, name, cu_seqlens, dtypes=(torch.int32, torch.int64))
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{op}: {name} must be 1-D with batch + 1 entries, got shape {tuple(cu_seqlens.shape)}")
    values = cu_seqlens.tolist()
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 8 else values[:4] + ["..."] + values[-3:]
        raise ValueError(f"{op}: {name} must start at 0, never decrease and end at the number of tokens ({total}); "
                         f"got {shown}")
    cu = torch.tensor(values, dtype=torch.int32, device=device)
    return cu[:-1], cu[1:] - cu[:-1]


def _checked_max(op, name, given, lengths):
    actual = int(lengths.max()) if lengths.numel() else 0
    if given is None:
        return actual
    if not isinstance(given, int) or given < actual:
        raise ValueError(f"{op}: {name} must be an int >= the longest sequence ({actual}), got {given!r}")
    return given


def _check_heads(op, q, k, v):
    _backend.check_tensor(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        _backend.check_tensor(op, name, t, device=q.device, dtype=q.dtype)
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or v.shape[-1] != head_dim:
        raise ValueError(f"{op}: q, k and v must have the same head_dim (last dimension), got {q.shape[-1]}, "
                         f"{k.shape[-1]} and {v.shape[-1]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"{op}: head_dim must be between 1 and {MAX_HEAD_DIM}, got {head_dim}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: k and v must have the same number of heads, got {k.shape[-2]} and {v.shape[-2]}")
    if k.shape[-2] == 0 or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"{op}: the query heads ({q.shape[-2]}) must be a multiple of the key/value heads "
                         f"({k.shape[-2]})")


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
              cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
              backend: Optional[str] = None) -> Tensor:
    """softmax(scale * Q K^T + mask) V, differentiable in q, k and v.

    Batched: q [batch, seq_q, heads_q, head_dim], k and v [batch, seq_k, heads_k, head_dim].
    Packed (varlen): q [total_q, heads_q, head_dim], k and v [total_k, heads_k, head_dim], with cu_seqlens_q and
        cu_seqlens_k (default: cu_seqlens_q) the cumulative sequence lengths [batch + 1] as flash-attn takes them;
        max_seqlen_q/k are computed when not given.
    heads_q must be a multiple of heads_k (GQA/MQA). scale defaults to head_dim^-0.5. causal: bottom-right aligned.
    fp16, bf16 or fp32; head_dim up to 256. The output has q's shape.
    """
    op = "attention"
    _check_heads(op, q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens_q is None:
        if cu_seqlens_k is not None:
            raise ValueError(f"{op}: cu_seqlens_k needs cu_seqlens_q")
        if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[0] != q.shape[0]:
            raise ValueError(f"{op}: batched inputs are q [batch, seq_q, heads_q, d] and k, v [batch, seq_k, heads_k, "
                             f"d], got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        batch, seq_q = q.shape[:2]
        seq_k = k.shape[1]
        arange = torch.arange(batch, dtype=torch.int32, device=q.device)
        seq = Sequences(arange * seq_q, torch.full_like(arange, seq_q), arange * seq_k, torch.full_like(arange, seq_k),
                        seq_q, seq_k)
        packed = [t.reshape(-1, *t.shape[2:]) for t in (q, k, v)]
    else:
        if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
            raise ValueError(f"{op}: packed inputs are q [total_q, heads_q, d] and k, v [total_k, heads_k, d], got q "
                             f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        q_start, q_len = _lengths_from_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
        if cu_seqlens_k is None:
            k_start, k_len = q_start, q_len
        else:
            k_start, k_len = _lengths_from_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
        if k_len.shape != q_len.shape:
            raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                             f"{q_len.shape[0]} and {k_len.shape[0]}")
        seq = Sequences(q_start, q_len, k_start, k_len, _checked_max(op, "max_seqlen_q", max_seqlen_q, q_len),
                        _checked_max(op, "max_seqlen_k", max_seqlen_k, k_len))
        packed = [q, k, v]
    packed = [_backend.with_unit_stride(t) for t in packed]
    backend = _backend.resolve(op, q, backend)
    if backend == "cuda":
        raise ValueError(f"{op}: the cuda backend has the decoding kernel only (attention_with_kv_cache); train "
                         "with backend='triton'")
    if backend == "torch":  # the reference, through torch's own autograd
        return reference.attention(*packed, seq.as_list(), scale, causal)[0].view(q.shape)
    if _backend.direct_call(q, k, v):
        return _forward(*packed, seq, scale, bool(causal), backend)[0].view(q.shape)
    return AttentionFunction.apply(*packed, seq, scale, bool(causal), backend).view(q.shape)


def _kv_cache_forward(q, k_cache, v_cache, lengths, new_tokens, scale, causal, backend):
    """q [batch * new_tokens, heads_q, d] against the caches flattened to [batch * max_len, heads_k, d]."""
    batch = lengths.shape[0]
    max_len = k_cache.shape[0] // max(batch, 1)
    # A length past the cache would make the kernels read another sequence's cache, or past the end: always checked
    # (a host sync on GPU).
    if lengths.numel() and bool(((lengths < 0) | (lengths > max_len)).any()):
        raise ValueError(f"attention_with_kv_cache: cache_seqlens must be between 0 and the cache length {max_len}, "
                         f"got {lengths.tolist()}")
    arange = torch.arange(batch, dtype=torch.int32, device=q.device)
    seq = Sequences(arange * new_tokens, torch.full_like(arange, new_tokens), arange * max_len, lengths, new_tokens,
                    max_len)
    if backend == "torch":
        return reference.attention(q, k_cache, v_cache, seq.as_list(), scale, causal)[0]
    return _forward(q, k_cache, v_cache, seq, scale, causal, backend)[0]


@torch.library.custom_op("aquila::attention_with_kv_cache", mutates_args=())
def _kv_cache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, new_tokens: int, scale: float,
                 causal: bool, backend: str) -> Tensor:
    return _kv_cache_forward(q, k_cache, v_cache, lengths, new_tokens, scale, causal, backend).contiguous()


@_kv_cache_op.register_fake
def _(q, k_cache, v_cache, lengths, new_tokens, scale, causal, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attention_with_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                            causal: bool = True, scale: Optional[float] = None,
                            backend: Optional[str] = None) -> Tensor:
    """Generation: q [batch, new_tokens, heads_q, d] against a KV cache k_cache, v_cache [batch, max_len, heads_k, d]
    of which the first cache_seqlens[b] tokens (the new ones included) are valid. Causal by default (the new tokens
    are the last ones of each sequence). On GPU the CUDA split-K decode kernel runs it, reading the cache once."""
    op = "attention_with_kv_cache"
    _check_heads(op, q, k_cache, v_cache)
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: q must be [batch, new_tokens, heads_q, d] and the caches [batch, max_len, heads_k, "
                         f"d], got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    _backend.check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), device=q.device,
                          shape=(q.shape[0],))
    lengths = cache_seqlens.to(torch.int32)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend is None and q.is_cuda and _backend.cuda_extension is not None:
        backend = "cuda"
    backend = _backend.resolve(op, q, backend)
    packed = [_backend.with_unit_stride(t.reshape(-1, *t.shape[2:])) for t in (q, k_cache, v_cache)]
    if torch.compiler.is_compiling():  # the lengths are checked inside the op, where they have values
        return _kv_cache_op(*packed, lengths, q.shape[1], scale, bool(causal), backend).view(q.shape)
    with torch.no_grad():
        out = _kv_cache_forward(*packed, lengths, q.shape[1], scale, bool(causal), backend)
    return out.view(q.shape)
