"""What a transformers attention mask asks for, read into a "plan" that Aquila's attention kernel computes exactly, or
a fallback reason. Shared by every patched family (see aquila.model.patch)."""

import dataclasses
import weakref
from typing import ClassVar, Optional

import torch
from torch import Tensor

# --- Attention: what the mask asks for --------------------------------------------------------------------------------
# transformers 5 builds the mask once per forward (masking_utils.create_causal_mask) for the configured
# attn_implementation and hands every layer that same object: a 4-D additive float mask [batch, 1, q_len, kv_len]
# (0 where a query may attend, the dtype's minimum elsewhere) for eager; a 4-D boolean one, or None when SDPA's own
# is_causal says the same (no padding, q_len == kv_len or q_len == 1, or the prefill of an empty static cache), for
# sdpa; the 2-D padding mask or None for flash attention; a BlockMask for flex attention. The patch keeps the
# configured implementation (its fallback), so it reads what that implementation would: each mask is compared, once
# per forward, with the masks the kernel can compute, and the matching "plan" is reused by every layer.
# A layer with a sliding window of W keys (transformers' sliding_window: a query at position p sees the keys at
# positions p - W + 1 .. p, padding slots included) gets transformers' sliding causal mask, which equals the plain
# causal one until the sequence outgrows the window; past that, the plan carries the window.


@dataclasses.dataclass(frozen=True)
class _Fallback:
    reason: str


@dataclasses.dataclass(frozen=True)
class _Dense:
    """Every query attends causally (aligned bottom-right) to the first `keys` keys of its row; with a `window`, to
    the last `window` of those up to its own position only."""

    path: ClassVar[str] = "dense"
    keys: int
    window: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _Packed:
    """No padding, and rows that hold several sequences: each sequence attends causally to itself only."""

    path: ClassVar[str] = "packed"
    cu_seqlens: Tensor
    max_seqlen: int


@dataclasses.dataclass(frozen=True)
class _Varlen:
    """Causal attention with padding, over the first `keys` keys of each row. Indices are into the rows flattened:
    [batch * q_len] queries, [batch * keys] keys; cu_* and max_* are the varlen kernel's sequence boundaries.

    A real query attends to the real keys up to its own position: the varlen kernel on the real queries and real keys
    of each row (the real queries are the row's last real tokens, so the causal mask aligned bottom-right is exact).
    A padded query attends to whatever real keys precede it, as the mask says: the padded queries after the same
    real keys form one sequence with those keys, without causal mask. A padded query before every real key has a mask
    row with nothing allowed: what transformers' attention makes of it (eager: the mean of all the values; SDPA:
    zeros) is what it computes, on the first `blind_rows` queries of the batch. With a `window` (left padding only:
    then no padded query follows a real one, and the real keys of a row are consecutive positions, so counting the
    window in tokens, as the varlen kernel does, counts it in positions, as transformers does), the real queries see
    the last `window` keys up to their own."""

    path: ClassVar[str] = "varlen"
    keys: int
    query_index: Tensor
    cu_queries: Tensor
    max_queries: int
    key_index: Tensor
    cu_keys: Tensor
    max_keys: int
    padded_query_index: Tensor
    cu_padded_queries: Tensor
    max_padded_queries: int
    padded_key_index: Tensor
    cu_padded_keys: Tensor
    max_padded_keys: int
    blind_rows: int
    blind_index: Tensor  # into the first blind_rows queries of each row, flattened [batch * blind_rows]
    order: Tensor  # where each query's output is in the concatenated outputs (real, padded, blind)
    window: Optional[int] = None


def _plan_without_mask(implementation, q_len, kv_len, window=None):
    """What transformers' attention computes with no mask: SDPA's is_causal (aligned top-left: with more keys than
    queries, the prefill of a static cache, only the first q_len keys are seen), flash attention's causal (aligned
    bottom-right, within the layer's sliding window), nothing masked under eager; a single query sees every key in all
    of them, but for flash attention's window."""
    if implementation.startswith("flash_attention") and window is not None and window < kv_len:
        return _Fallback("sliding_window")
    if q_len == 1:
        return _Dense(kv_len)
    if implementation == "eager":
        return _Fallback("not_causal")
    if implementation == "sdpa":
        return _Dense(q_len) if q_len <= kv_len else _Fallback("custom_mask")
    if implementation.startswith("flash_attention"):
        return _Dense(kv_len) if q_len <= kv_len else _Fallback("custom_mask")
    return _Fallback("attn_implementation")  # a custom implementation gets no mask even with padding


def _allowed(mask, implementation):
    """(allowed, readable): the boolean "may attend" form of a 4-D mask, and a 0-d boolean tensor telling whether
    that is all the mask does; None when the implementation does not take such a mask as a mask."""
    if mask.dtype == torch.bool:
        # Eager attention adds the mask to the scores: a boolean one would add 0 or 1, not mask.
        return (None, None) if implementation == "eager" else (mask, torch.ones((), dtype=torch.bool,
                                                                                device=mask.device))
    if not mask.is_floating_point():
        return None, None
    # Additive: exactly 0 where allowed, and so negative elsewhere that the softmax weight is exactly 0 (transformers
    # writes the dtype's minimum; -inf also qualifies), unless a whole row is blocked (see _Varlen).
    allowed = mask == 0
    return allowed, (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()


def _plan_for_mask(mask, batch, q_len, kv_len, implementation, window=None):
    """Reads a mask (a host sync on GPU) and returns the plan that computes exactly what it asks for. window: the
    layer's sliding window (transformers' sliding_window), or None."""
    if implementation not in ("eager", "sdpa"):
        return _Fallback("attn_implementation")
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, kv_len) or mask.shape[0] not in (1, batch):
        return _Fallback("custom_mask")
    allowed, readable = _allowed(mask, implementation)
    if allowed is None or not bool(readable):
        return _Fallback("custom_mask")
    # The last query comes after every key it may see: its row is the padding mask of the keys, if the mask is one.
    valid = allowed[:, 0, -1, :]
    key_positions = torch.arange(kv_len, device=mask.device)
    query_rows = torch.arange(q_len, device=mask.device)[:, None]
    for offset in _query_offsets(valid, q_len, kv_len):
        expected = valid[:, None, None, :] & (key_positions <= query_rows + offset)
        if torch.equal(allowed, expected.expand(allowed.shape)):
            return _padding_plan(valid.expand(batch, kv_len)[:, :offset + q_len], offset)
    if window is not None:
        plan = _windowed_plan(allowed, batch, q_len, kv_len, window)
        if plan is not None:
            return plan
    return _packed_plan(allowed, batch, q_len, kv_len)


def _query_offsets(valid, q_len, kv_len):
    """Where the queries may start among the keys, given valid [rows, kv_len], the keys each row may see: the last
    q_len positions of the keys up to the last one any row may see (the filled part of a static cache, whose later
    keys are masked; with a dynamic cache or none, every key), or failing that (every row ends in padding), of all the
    keys."""
    seen = valid.any(0).nonzero()
    filled = int(seen[-1]) + 1 if seen.numel() else 0
    return ([filled - q_len] if q_len <= filled < kv_len else []) + [kv_len - q_len]


def _windowed_plan(allowed, batch, q_len, kv_len, window):
    """transformers' sliding causal mask of a window that hides some keys: the keys any query may see stand for the
    padding mask (a key no query reaches is masked either way, and left out). Without padding within the queries'
    reach, the batched kernel with the window; with left padding, the varlen kernel with the window (see _Varlen);
    other padding, whose slots transformers counts in the window where the varlen kernel would count tokens, takes
    transformers' attention. None when the mask is no such mask."""
    seen = allowed[:, 0].any(1)  # [rows, kv_len]
    key_positions = torch.arange(kv_len, device=allowed.device)
    query_rows = torch.arange(q_len, device=allowed.device)[:, None]
    for offset in _query_offsets(seen, q_len, kv_len):
        expected = (seen[:, None, None, :] & (key_positions <= query_rows + offset)
                    & (key_positions > query_rows + offset - window))
        if not torch.equal(allowed, expected.expand(allowed.shape)):
            continue
        keys = seen.expand(batch, kv_len)[:, :offset + q_len]
        if bool(keys[:, max(offset - window + 1, 0):].all()):
            return _Dense(offset + q_len, window)
        if bool((keys[:, 1:] >= keys[:, :-1]).all()):  # each row: padding, then tokens to the end
            return _padding_plan(keys, offset, window)
        return _Fallback("sliding_window")
    return None


def _packed_plan(allowed, batch, q_len, kv_len):
    """Packed sequences (transformers' mask from position ids that restart, without padding or cache): causal within
    each run of tokens of which none may see the token before it."""
    if q_len != kv_len or q_len < 2:
        return _Fallback("custom_mask")
    starts = torch.ones(allowed.shape[0], q_len, dtype=torch.bool, device=allowed.device)
    starts[:, 1:] = ~allowed[:, 0].diagonal(offset=-1, dim1=-2, dim2=-1)
    segments = starts.cumsum(1)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=allowed.device).tril()
    expected = (segments[:, :, None] == segments[:, None, :]) & causal
    if not torch.equal(allowed, expected[:, None].expand(allowed.shape)):
        return _Fallback("custom_mask")
    first_tokens = starts.expand(batch, q_len).flatten().nonzero().squeeze(1)
    cu_seqlens = torch.cat([first_tokens, first_tokens.new_tensor([batch * q_len])]).to(torch.int32)
    return _Packed(cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def _cumulative(lengths):
    """cu_seqlens (int32, from 0) and the longest, from per-sequence lengths."""
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = lengths.cumsum(0)
    return cu, int(lengths.max()) if lengths.numel() else 0


def _padding_plan(valid, offset, window=None):
    """valid [batch, keys]: which keys hold tokens; the queries are the last keys - offset positions."""
    batch, keys = valid.shape
    if bool(valid.all()):
        return _Dense(keys)
    q_len = keys - offset
    real = valid[:, offset:]  # [batch, q_len]: the queries that are tokens
    seen = valid.cumsum(1)[:, offset:]  # how many keys each query may see
    query_index = real.flatten().nonzero().squeeze(1)
    key_index = valid.flatten().nonzero().squeeze(1)
    cu_queries, max_queries = _cumulative(real.sum(1))
    cu_keys, max_keys = _cumulative(valid.sum(1))

    # Padded queries that see some keys: a new sequence wherever the row or the number of keys seen changes.
    padded = ~real & (seen > 0)
    padded_query_index = padded.flatten().nonzero().squeeze(1)
    rows, counts = padded_query_index // q_len, seen.flatten()[padded_query_index]
    new = torch.ones_like(rows, dtype=torch.bool)
    new[1:] = (rows[1:] != rows[:-1]) | (counts[1:] != counts[:-1])
    firsts = new.nonzero().squeeze(1)
    group_sizes = torch.diff(firsts, append=firsts.new_tensor([rows.numel()]))
    group_rows, group_keys = rows[firsts], counts[firsts]
    cu_padded_queries, max_padded_queries = _cumulative(group_sizes)
    cu_padded_keys, max_padded_keys = _cumulative(group_keys)
    # Sequence g's keys: the first group_keys[g] valid keys of its row.
    first_key = cu_keys[:-1].long()[group_rows] - cu_padded_keys[:-1].long()
    padded_key_index = key_index[torch.repeat_interleave(first_key, group_keys) +
                                 torch.arange(int(group_keys.sum()), device=valid.device)]

    blind = ~real & (seen == 0)  # the first queries of a row, before its first token
    blind_rows = int(blind.sum(1).max())
    blind_flat = blind.flatten().nonzero().squeeze(1)
    blind_index = blind_flat - blind_flat // q_len * (q_len - blind_rows)
    position = torch.cat([query_index, padded_query_index, blind_flat])
    order = torch.empty_like(position)
    order[position] = torch.arange(position.numel(), device=valid.device)
    return _Varlen(keys, query_index, cu_queries, max_queries, key_index, cu_keys, max_keys, padded_query_index,
                   cu_padded_queries, max_padded_queries, padded_key_index, cu_padded_keys, max_padded_keys,
                   blind_rows, blind_index, order, window)


class _PlanCache:
    """The plans of the last masks read. Every layer of one forward receives the same mask object (one per layer type:
    full and sliding-window layers alternate in Qwen2 and Gemma 2), so each mask is read (a host sync on GPU) and the
    index tensors built once per forward, not once per layer. A weak reference: a mask that is gone can never match a
    new one that reuses its address; and the mask's version counter: a mask changed in place since (a caller's reused
    buffer) is read again (inference-mode tensors have no version counter)."""

    SIZE = 2  # one mask per layer type

    def __init__(self):
        self._last = ()  # ((weakref to the mask, sizes, plan), ...), newest first, replaced as one tuple

    def plan(self, mask, batch, q_len, kv_len, implementation, window=None):
        sizes = (batch, q_len, kv_len, implementation, window, None if mask.is_inference() else mask._version)
        for reference, last_sizes, plan in self._last:
            if reference() is mask and last_sizes == sizes:
                return plan
        plan = _plan_for_mask(mask, batch, q_len, kv_len, implementation, window)
        self._last = ((weakref.ref(mask), sizes, plan), *self._last[:self.SIZE - 1])
        return plan


_plans = _PlanCache()
