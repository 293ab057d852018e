"""Fused scaled dot-product attention: training kernels (forward and backward), generation against a KV cache.

    out = softmax(cap(scale * Q K^T) + mask) V

Sliding windows (Mistral, Qwen2, Gemma 2) and logit softcapping (Gemma 2) are options of every kernel. With
bottom-right alignment (below), query i of a sequence of q_len queries and k_len keys sits at key position
p = i + k_len - q_len, and window_size = (left, right), as flash-attn takes it, lets it see key j only if

    p - left <= j  (when left >= 0)   and   j <= p + right  (when right >= 0);

-1 leaves a side unbounded, and causal=True sets right to 0. Mistral's sliding_window W (key j visible iff
p - j < W) is window_size=(W - 1, 0) with causal. The kernels skip the key blocks that lie wholly outside every
window of a query block, so a window of W keys costs about W / k_len of the full attention. softcap c > 0 replaces
each score s by cap(s) = c tanh(s / c) before the mask and softmax (Gemma 2's attn_logit_softcapping); the backward
multiplies dS by cap'(s) = 1 - tanh^2(s / c). A query that sees no key outputs 0 with lse -inf and passes no gradient.

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

Backends (the tables below): Triton (forward and the deterministic backward, aquila/kernels/triton/attention.py),
the C++ CPU flash attention (forward and backward), the explicit-softmax torch reference with the closed-form backward,
and, for generation only, the CUDA C++ split-K decode kernel.
"""

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backend as _backend
from . import reference
from .backend import Implementation, Implementations
from .triton import attention as triton_attention

MAX_HEAD_DIM = 256

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
        """The kernels' AttentionSequences (csrc/kernels.h)."""
        return {"q_start": self.q_start.data_ptr(), "q_len": self.q_len.data_ptr(),
                "k_start": self.k_start.data_ptr(), "k_len": self.k_len.data_ptr(), "batch": self.batch,
                "max_q_len": self.max_q_len, "max_k_len": self.max_k_len}


class Scores(NamedTuple):
    """How the scores become probabilities: s = scale * q.k, capped to softcap * tanh(s / softcap) when softcap > 0,
    then the keys outside each query's window hidden. Canonical (as `checked_scores` makes it): causal implies
    window_right == 0, so window_right alone bounds what lies after a query."""

    scale: float
    causal: bool
    window_left: int
    window_right: int
    softcap: float

    @property
    def window_size(self):
        return self.window_left, self.window_right


def checked_scores(op, head_dim, scale, causal, window_size, softcap):
    """Checks the options of a call of `op` and returns its canonical Scores."""
    scale = head_dim ** -0.5 if scale is None else _backend.check_number(op, "scale", scale)
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
            isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"{op}: window_size must be a pair (left, right) of ints >= -1 (-1: unbounded), got "
                         f"{window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (
            math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{op}: softcap must be a finite number >= 0 (0: no softcapping), got {softcap!r}")
    left, right = window_size
    return Scores(scale, bool(causal), left, 0 if causal else right, float(softcap))


# --- Implementations ------------------------------------------------------------------------------------------------
# forward(q, k, v, seq, scores, out, lse) fills out (zeros) and lse (-inf) where queries see keys, for q
# [total_q, heads_q, d] and k, v [total_k, heads_k, d] with unit last stride, seq a non-empty Sequences and scores a
# canonical Scores.
# backward(grad_out, q, k, v, out, lse, seq, scores, grad_q, grad_k, grad_v) fills the zeroed gradients.


def _torch_forward(q, k, v, seq, scores, out, lse):
    exact_out, exact_lse = reference.attention(q, k, v, seq.as_list(), scores.scale, scores.causal,
                                               window_size=scores.window_size, softcap=scores.softcap)
    out.copy_(exact_out)
    lse.copy_(exact_lse)


def _torch_backward(grad_out, q, k, v, out, lse, seq, scores, grad_q, grad_k, grad_v):
    exact = reference.attention_backward(grad_out, q, k, v, out, lse, seq.as_list(), scores.scale, scores.causal,
                                         window_size=scores.window_size, softcap=scores.softcap)
    for grad, exact_grad in zip((grad_q, grad_k, grad_v), exact):
        grad.copy_(exact_grad)


def _native_fields(seq, scores, q, k):
    return dict(seq=seq.as_dict(), heads_q=q.shape[1], heads_k=k.shape[1], head_dim=q.shape[2], scale=scores.scale,
                causal=scores.causal, window_left=scores.window_left, window_right=scores.window_right,
                softcap=scores.softcap, dtype=q.dtype)


def _cpu_forward(q, k, v, seq, scores, out, lse):
    _backend.call_native(
        "cpu", "attention_forward", q, work=q.numel() + k.numel(), q=_backend.strided(q), k=_backend.strided(k),
        v=_backend.strided(v), out=_backend.strided(out), lse=lse, partial_out=None, partial_lse=None, splits=0,
        **_native_fields(seq, scores, q, k))


def _cpu_backward(grad_out, q, k, v, out, lse, seq, scores, grad_q, grad_k, grad_v):
    delta = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)  # the kernel fills it
    strided = {name: _backend.strided(t) for name, t in (("q", q), ("k", k), ("v", v), ("out", out),
                                                          ("grad_out", grad_out), ("grad_q", grad_q),
                                                          ("grad_k", grad_k), ("grad_v", grad_v))}
    _backend.call_native("cpu", "attention_backward", q, work=q.numel() + k.numel(), lse=lse, delta=delta,
                         **strided, **_native_fields(seq, scores, q, k))


def decode_splits(q, seq, heads_k, window_left=-1):
    """How many ranges the CUDA decode kernel cuts each sequence's keys into (the keys its queries' windows reach:
    at most window_left + max_q_len of them). Its blocks each take up to 16 query rows (8 for head_dim > 128) of a
    key/value head's group; enough splits that the blocks fill the GPU's SMs about 16 times over (some five waves at
    three blocks per SM), none shorter than 256 keys."""
    multiprocessors = torch.cuda.get_device_properties(q.device).multi_processor_count
    rows_per_block = 16 if q.shape[-1] <= 128 else 8
    row_chunks = math.ceil(seq.max_q_len * (q.shape[1] // heads_k) / rows_per_block)
    wanted = math.ceil(16 * multiprocessors / max(1, seq.batch * heads_k * row_chunks))
    keys = seq.max_k_len if window_left < 0 else min(seq.max_k_len, window_left + seq.max_q_len)
    return max(1, min(wanted, math.ceil(keys / 256)))


def _cuda_decode_forward(q, k, v, seq, scores, out, lse):
    splits = decode_splits(q, seq, k.shape[1], scores.window_left)
    partial_out = torch.empty((splits, *q.shape), dtype=torch.float32, device=q.device)
    partial_lse = torch.empty((splits, *q.shape[:2]), dtype=torch.float32, device=q.device)
    _backend.call_native(
        "cuda", "decode_attention", q, q=_backend.strided(q), k=_backend.strided(k), v=_backend.strided(v),
        out=_backend.strided(out), lse=lse, partial_out=partial_out, partial_lse=partial_lse, splits=splits,
        **_native_fields(seq, scores, q, k))


def _cuda_decode_limits(head_dim):
    return None if head_dim % 8 == 0 else f"needs a head_dim that is a multiple of 8, got {head_dim}"


IMPLEMENTATIONS = Implementations(
    "attention",
    triton=Implementation(triton_attention.forward, triton_attention.backward),
    cpu=Implementation(_cpu_forward, _cpu_backward),
    torch=Implementation(_torch_forward, _torch_backward),
)

# Generation: a few new queries per sequence against a long cache, the CUDA split-K decode kernel's case, first on GPU.
KV_CACHE_IMPLEMENTATIONS = Implementations(
    "attention_with_kv_cache",
    cuda=Implementation(_cuda_decode_forward, limits=_cuda_decode_limits),
    triton=Implementation(triton_attention.forward),
    cpu=Implementation(_cpu_forward),
    torch=Implementation(_torch_forward),
)


@_backend.autocast_off
def _forward(q, k, v, seq, scores, backend, table=IMPLEMENTATIONS):
    """Returns out (q's shape, contiguous) and lse fp32 [total_q, heads_q]."""
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    if seq.batch and seq.max_q_len:
        with _backend.on_device(q):
            table[backend].forward(q, k, v, seq, scores, out, lse)
    return out, lse


@_backend.autocast_off
def _backward(grad_out, q, k, v, out, lse, seq, scores, backend):
    grad_q, grad_k, grad_v = (torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    if seq.batch and seq.max_q_len:
        with _backend.on_device(q):
            IMPLEMENTATIONS[backend].backward(grad_out, q, k, v, out, lse, seq, scores, grad_q, grad_k, grad_v)
    return grad_q, grad_k, grad_v


# --- torch.library ops and autograd -----------------------------------------------------------------------------------
# The ops take a Scores as its fields (scale, causal, window_left, window_right, softcap), in that order.


@torch.library.custom_op("aquila::attention_forward", mutates_args=())
def _forward_op(q: Tensor, k: Tensor, v: Tensor, q_start: Tensor, q_len: Tensor, k_start: Tensor, k_len: Tensor,
                max_q_len: int, max_k_len: int, scale: float, causal: bool, window_left: int, window_right: int,
                softcap: float, backend: str) -> tuple[Tensor, Tensor]:
    seq = Sequences(q_start, q_len, k_start, k_len, max_q_len, max_k_len)
    return _forward(q, k, v, seq, Scores(scale, causal, window_left, window_right, softcap), backend)


@_forward_op.register_fake
def _(q, k, v, q_start, q_len, k_start, k_len, max_q_len, max_k_len, scale, causal, window_left, window_right,
      softcap, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:2], dtype=torch.float32)


@torch.library.custom_op("aquila::attention_backward", mutates_args=())
def _backward_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_start: Tensor,
                 q_len: Tensor, k_start: Tensor, k_len: Tensor, max_q_len: int, max_k_len: int, scale: float,
                 causal: bool, window_left: int, window_right: int, softcap: float,
                 backend: str) -> tuple[Tensor, Tensor, Tensor]:
    seq = Sequences(q_start, q_len, k_start, k_len, max_q_len, max_k_len)
    return _backward(_backend.with_unit_stride(grad_out), q, k, v, out, lse, seq,
                     Scores(scale, causal, window_left, window_right, softcap), backend)


@_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, q_start, q_len, k_start, k_len, max_q_len, max_k_len, scale, causal, window_left,
      window_right, softcap, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq, scores, backend):
        out, lse = _forward_op(q, k, v, *seq, *scores, backend)
        ctx.save_for_backward(q, k, v, out, lse, *seq[:4])
        ctx.args = (*seq[4:], *scores, backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, *sequence_tensors = ctx.saved_tensors
        grads = _backward_op(grad_out, q, k, v, out, lse, *sequence_tensors, *ctx.args)
        return (*grads, None, None, None)


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
        _backend.check_tensor(op, name, t, device=q.device)
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
              backend: Optional[str] = None, window_size: tuple[int, int] = (-1, -1),
              softcap: float = 0.0) -> Tensor:
    """softmax(cap(scale * Q K^T) + mask) V, differentiable in q, k and v.

    Batched: q [batch, seq_q, heads_q, head_dim], k and v [batch, seq_k, heads_k, head_dim].
    Packed (varlen): q [total_q, heads_q, head_dim], k and v [total_k, heads_k, head_dim], with cu_seqlens_q and
        cu_seqlens_k (default: cu_seqlens_q) the cumulative sequence lengths [batch + 1] as flash-attn takes them;
        max_seqlen_q/k are computed when not given.
    heads_q must be a multiple of heads_k (GQA/MQA). scale defaults to head_dim^-0.5. causal: bottom-right aligned.
    window_size=(left, right): the keys each query sees, as in flash-attn (-1: unbounded; see the module's header).
    softcap > 0: scores capped to softcap * tanh(s / softcap) (0: off).
    fp16, bf16 or fp32; head_dim up to 256. The output has q's shape, in autocast's dtype under autocast (as
    scaled_dot_product_attention), else in the common dtype of q, k and v.
    """
    op = "attention"
    _check_heads(op, q, k, v)
    cast = _backend.autocast_dtype(q)
    q, k, v = (t.to(cast) for t in (q, k, v)) if cast is not None else _backend.promoted(q, k, v)
    options = checked_scores(op, q.shape[-1], scale, causal, window_size, softcap)
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
    backward = _backend.needs_backward(q, k, v)
    backend = _backend.resolve(IMPLEMENTATIONS, q, backend, backward=backward, head_dim=q.shape[-1])
    if _backend.direct_call(backward):
        return _forward(*packed, seq, options, backend)[0].view(q.shape)
    return AttentionFunction.apply(*packed, seq, options, backend).view(q.shape)


def _kv_cache_forward(q, k_cache, v_cache, lengths, new_tokens, options, backend):
    """q [batch * new_tokens, heads_q, d] against the caches flattened to [batch * max_len, heads_k, d]."""
    batch = lengths.shape[0]
    max_len = k_cache.shape[0] // max(batch, 1)
    # A length past the cache would make the kernels read another sequence's cache, or past the end: always checked
    # (a host sync on GPU), and before the cast to the kernels' int32, which would wrap 2**32 + 3 to 3.
    if lengths.numel() and bool(((lengths < 0) | (lengths > max_len)).any()):
        raise ValueError(f"attention_with_kv_cache: cache_seqlens must be between 0 and the cache length {max_len}, "
                         f"got {lengths.tolist()}")
    lengths = lengths.to(torch.int32)
    arange = torch.arange(batch, dtype=torch.int32, device=q.device)
    seq = Sequences(arange * new_tokens, torch.full_like(arange, new_tokens), arange * max_len, lengths, new_tokens,
                    max_len)
    return _forward(q, k_cache, v_cache, seq, options, backend, KV_CACHE_IMPLEMENTATIONS)[0]


@torch.library.custom_op("aquila::attention_with_kv_cache", mutates_args=())
def _kv_cache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, new_tokens: int, scale: float,
                 causal: bool, window_left: int, window_right: int, softcap: float, backend: str) -> Tensor:
    options = Scores(scale, causal, window_left, window_right, softcap)
    return _kv_cache_forward(q, k_cache, v_cache, lengths, new_tokens, options, backend).contiguous()


@_kv_cache_op.register_fake
def _(q, k_cache, v_cache, lengths, new_tokens, scale, causal, window_left, window_right, softcap, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def attention_with_kv_cache(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                            causal: bool = True, scale: Optional[float] = None,
                            backend: Optional[str] = None, window_size: tuple[int, int] = (-1, -1),
                            softcap: float = 0.0) -> Tensor:
    """Generation: q [batch, new_tokens, heads_q, d] against a KV cache k_cache, v_cache [batch, max_len, heads_k, d]
    of which the first cache_seqlens[b] tokens (the new ones included) are valid. Causal by default (the new tokens
    are the last ones of each sequence). On GPU the CUDA split-K decode kernel runs it, reading the cache once.
    Not differentiable: a call that would need a gradient raises UnsupportedBackend. q is cast to the caches' dtype
    (the output's), which the model chose when it built them. window_size and softcap as for `attention` (a
    sliding window reads only the last window_left + new_tokens keys of each sequence)."""
    op = "attention_with_kv_cache"
    _check_heads(op, q, k_cache, v_cache)
    if k_cache.dtype != v_cache.dtype:
        raise TypeError(f"{op}: k_cache and v_cache must have one dtype, got {k_cache.dtype} and {v_cache.dtype}")
    q = q.to(k_cache.dtype)
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: q must be [batch, new_tokens, heads_q, d] and the caches [batch, max_len, heads_k, "
                         f"d], got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    _backend.check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=(torch.int32, torch.int64), device=q.device,
                          shape=(q.shape[0],))
    options = checked_scores(op, q.shape[-1], scale, causal, window_size, softcap)
    backend = _backend.resolve(KV_CACHE_IMPLEMENTATIONS, q, backend,
                               backward=_backend.needs_backward(q, k_cache, v_cache), head_dim=q.shape[-1])
    packed = [_backend.with_unit_stride(t.reshape(-1, *t.shape[2:])) for t in (q, k_cache, v_cache)]
    if torch.compiler.is_compiling():  # the lengths are checked inside the op, where they have values
        return _kv_cache_op(*packed, cache_seqlens, q.shape[1], *options, backend).view(q.shape)
    return _kv_cache_forward(*packed, cache_seqlens, q.shape[1], options, backend).view(q.shape)
