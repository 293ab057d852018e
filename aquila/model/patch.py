"""Running a Hugging Face transformers ``LlamaForCausalLM`` on Aquila's fused kernels.

Why: users who train with transformers (and its Trainer, PEFT, ...) should get the kernels' speed and memory savings
without moving to Aquila's own model. ``apply_aquila_kernels_to_llama`` swaps the pieces of a Llama model that have
a fused equivalent, leaving parameter names, parameter objects, the config and the checkpoint format untouched:

* RMSNorm -> :class:`AquilaLlamaRMSNorm` (an :class:`aquila.kernels.RMSNorm` holding the very same weight Parameter).
* Attention -> :class:`AquilaLlamaAttention`: q/k/v stay in the [batch, seq, heads, head_dim] layout the projections
  produce (no transposes), rotary runs on Aquila's kernel from the position ids, and attention on Aquila's flash
  attention (causal, GQA without repeating k/v), with transformers' KV cache.
* Loss -> fused linear cross-entropy: in training mode with ``labels``, the loss comes straight from the last hidden
  states and ``lm_head.weight``, so the [tokens, vocab] logits are never materialised; the output's ``logits`` is then
  None (as with Liger-Kernel). In eval mode, or without labels, the original forward runs and returns logits (with the
  loss when labels are given), so evaluation loops, metrics and ``generate`` keep working.

Two ways to apply it:

* ``apply_aquila_kernels_to_llama(model)``: patches that instance only (in place; returns it).
* ``apply_aquila_kernels_to_llama()`` or ``(LlamaForCausalLM)``: patches ``transformers.models.llama.modeling_llama``:
  models built afterwards get the Aquila RMSNorm and attention modules; ``LlamaForCausalLM.forward`` (a class
  attribute, so every instance, existing ones included) gets the fused loss. Calling it again only updates the
  options; ``remove_aquila_kernels_from_llama()`` restores transformers' classes.

Fallbacks, chosen per call so the results stay those of transformers (each is the original code path, not an error):

* Rotary: Aquila's kernel computes plain RoPE (``rope_type == "default"``) from the position ids; scaled RoPE
  variants (linear, dynamic, yarn, llama3, ...), or a call without ``position_ids``, run on the kernel with
  transformers' cos/sin tables. Only tables that require grad, or of another width than the head, take
  transformers' rotation.
* Attention: Aquila's kernel runs whenever the mask transformers built for the configured ``attn_implementation``
  (eager or sdpa) is causal with padding, or causal within packed sequences. transformers 5 hands the attention a 4-D
  mask (None for SDPA when its ``is_causal`` suffices): the patch compares it, once per forward, with the causal mask
  of a 2-D padding mask it reads off the mask's last row, and, when they are equal, runs the kernel the way flash-attn's
  transformers integration does: the plain batched kernel when nothing is padded; else the varlen kernel on the real
  tokens of each row (``cu_seqlens`` for queries and keys; with a KV cache, dynamic or static, the keys are the cached
  positions the mask lets each row see), padded back. Padded query positions get what transformers' attention gives
  them, so logits and gradients match at every position: a padded query after real tokens attends to them (a second
  varlen call, without causal mask); one before any real token, whose mask row allows nothing, runs through
  transformers' attention (eager returns the mean of the values, SDPA zeros). Left padding, right padding, padding
  anywhere, caches, beam search and position ids (rotary takes them as given) are covered.
  Transformers' attention runs instead (counted by ``fallback_counts()``, and logged at debug level the first time
  for each reason; see ``FALLBACK_REASONS``) for ``output_attentions``, attention dropout in training, a
  non-causal config, any other 4-D mask (custom masks: prefix-LM, sliding windows, ...), flex attention's BlockMask,
  flash attention with padding or varlen keyword arguments (flash attention is then the fallback), and dtypes or
  head dims the kernel lacks.
  Under torch.compile nothing may read a tensor's values while tracing: the choice is made from shapes, dtypes and
  flags, and the mask is checked with tensor ops inside the graph, where ``torch.cond`` runs the kernel (plain causal
  masks; in inference over a static cache, generation's case, the KV-cache kernel over each row's filled keys,
  gathered first when left padding puts them elsewhere) or transformers' attention (padding in training, whose
  unpadding needs shapes that depend on the mask). In training, ``torch.cond``'s backward recomputes the attention
  forward. Calls inside a compiled graph are not counted.
* Loss: ``logits_to_keep`` other than 0 with labels uses the original forward.

Numerics: the Aquila ops compute in fp32 and round once to the input dtype, where transformers rounds some
intermediates (e.g. RMSNorm casts to the input dtype before the weight multiply, rotary multiplies by cos/sin rounded
to the input dtype). In fp32 the results agree to rounding; in bf16/fp16 they differ by a few units in the last place.
One visible difference: transformers' RMSNorm returns fp32 when the weight is fp32 and the input bf16; Aquila's
returns the input's dtype.

Limits: fp32, fp16 and bf16 models (the kernels' dtypes; a float64 model gets the kernels' TypeError). Patch before
accelerate dispatches the model across devices (a forward replaced per instance is refused with an error). Not
patched: the decoder layer's residual adds (fusing them into the norms, as Aquila's own model does, would mean
replacing LlamaDecoderLayer.forward), and transformers' rotary_emb, which still computes cos/sin once per forward
for the fallback.

Deprecated arguments: the patched forwards sit in transformers' own deprecation wrappers of the originals (5.x:
``past_key_values`` for ``cache``), so they rename, warn and refuse exactly as transformers does.
"""

import collections
import dataclasses
import functools
import logging
import types
import weakref
from typing import ClassVar, Optional

import torch
from torch import Tensor

from aquila import IGNORE_INDEX
from aquila.kernels import RMSNorm, apply_rotary, attention, attention_with_kv_cache, linear_cross_entropy
from aquila.kernels import backend as _backend
from aquila.kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from aquila.kernels.attention import MAX_HEAD_DIM
from aquila.kernels.backend import BACKENDS, FLOAT_DTYPES, UnsupportedBackend

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llama import modeling_llama
    from transformers.utils import can_return_tuple
except ImportError as error:  # transformers is an optional dependency of aquila
    raise ImportError("aquila.model.patch needs transformers: pip install transformers") from error

__all__ = ["FALLBACK_REASONS", "AquilaLlamaAttention", "AquilaLlamaRMSNorm", "apply_aquila_kernels_to_llama",
           "fallback_counts", "kernel_counts", "remove_aquila_kernels_from_llama", "reset_counts"]

# transformers' own classes and forward, captured once at import, so that patching twice never wraps a patch and
# removing the patch restores exactly these.
ORIGINAL_RMS_NORM = modeling_llama.LlamaRMSNorm
ORIGINAL_ATTENTION = modeling_llama.LlamaAttention
ORIGINAL_CAUSAL_LM_FORWARD = modeling_llama.LlamaForCausalLM.forward
LlamaForCausalLM = modeling_llama.LlamaForCausalLM

# Keyword arguments with which transformers hands pre-computed packed-sequence boundaries to flash attention.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _deprecation_wrapper_code():
    try:
        from transformers.utils.deprecation import deprecate_kwarg
    except ImportError:
        return None
    return deprecate_kwarg("unused", "0.0.1")(lambda: None).__code__


# The code of the wrapper transformers' deprecate_kwarg puts around a function (one code object for every use), which
# calls the function it wraps through its closure cell "func"; None where that is not so.
DEPRECATION_WRAPPER_CODE = _deprecation_wrapper_code()
if DEPRECATION_WRAPPER_CODE is not None and "func" not in DEPRECATION_WRAPPER_CODE.co_freevars:
    DEPRECATION_WRAPPER_CODE = None


def _with_deprecations_of(original, function):
    """`function` inside the same deprecate_kwarg layers as `original` (a transformers forward): deprecated keyword
    arguments (5.x: ``past_key_values`` for ``cache``) are renamed, refused or warned about exactly as transformers
    does for the original, with its messages and versions. Each layer is transformers' own wrapper function, rebuilt
    around `function` in place of the original's."""
    layers = []
    while original is not None:
        if DEPRECATION_WRAPPER_CODE is not None and getattr(original, "__code__", None) is DEPRECATION_WRAPPER_CODE:
            layers.append(original)
        original = getattr(original, "__wrapped__", None)
    for layer in reversed(layers):
        closure = tuple(types.CellType(function) if name == "func" else cell
                        for name, cell in zip(layer.__code__.co_freevars, layer.__closure__))
        wrapper = types.FunctionType(layer.__code__, layer.__globals__, layer.__name__, layer.__defaults__, closure)
        function = functools.update_wrapper(wrapper, function)
    return function


@dataclasses.dataclass(frozen=True)
class PatchOptions:
    """What a patched model (or the patched classes) run on Aquila's kernels, and on which backend."""

    rms_norm: bool = True
    rotary: bool = True
    attention: bool = True
    cross_entropy: bool = True
    backend: Optional[str] = None


# The options of the class-level patch; None while transformers' classes are unpatched.
class_patch_options: Optional[PatchOptions] = None


# --- RMSNorm ----------------------------------------------------------------------------------------------------------


class AquilaLlamaRMSNorm(RMSNorm):
    """Aquila's RMSNorm with transformers' LlamaRMSNorm constructor and attribute names, so code that builds or
    inspects Llama norms (weight init matches on "RMSNorm" in the class name; PEFT and others read
    ``variance_epsilon``) keeps working."""

    def __init__(self, hidden_size, eps=1e-6, *, backend=None, device=None, dtype=None):
        if backend is None and class_patch_options is not None:  # built by a class-patched modeling_llama
            backend = class_patch_options.backend
        super().__init__(hidden_size, eps, backend=backend, device=device, dtype=dtype)

    @property
    def variance_epsilon(self):
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value):
        self.eps = value


def _norm_sharing_weight(norm, aquila, backend):
    """An AquilaLlamaRMSNorm (aquila) or transformers' LlamaRMSNorm holding `norm`'s weight Parameter itself (not a
    copy), so an optimizer built before the swap still updates the weight the model uses, and the state_dict key stays
    ``...weight``."""
    if aquila:
        replacement = AquilaLlamaRMSNorm(norm.weight.shape[0], norm.variance_epsilon, device="meta")
        replacement.backend = backend  # this call's choice, whatever a class-level patch chose
    else:
        with torch.device("meta"):  # its fresh weight is dropped at once: never allocate it
            replacement = ORIGINAL_RMS_NORM(norm.weight.shape[0], eps=norm.variance_epsilon)
    replacement.weight = norm.weight
    replacement.train(norm.training)
    return replacement


# --- Counting the fallbacks -------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

# Why a patched attention call ran transformers' attention instead of Aquila's kernel (the keys of fallback_counts()).
FALLBACK_REASONS = {
    "output_attentions": "the attention weights were asked for (output_attentions), and the kernel never forms them",
    "dropout": "attention dropout in training mode, which the kernel does not have",
    "not_causal": "bidirectional attention (is_causal off, or no mask at all under eager attention, which then attends "
                  "to every key)",
    "dtype": "a dtype other than fp32, fp16 and bf16",
    "head_dim": f"a head_dim over {MAX_HEAD_DIM}",
    "attn_implementation": "an attn_implementation whose masks the patch does not read (flash attention given a "
                           "padding mask or varlen keyword arguments, flex attention's BlockMask, a custom one)",
    "custom_mask": "a mask other than causal with padding, or causal within packed sequences",
}

_kernel_counts = collections.Counter()
_fallback_counts = collections.Counter()
_reported_reasons = set()


def kernel_counts():
    """How many patched attention calls ran Aquila's kernel since import or reset_counts(), by path: "dense" (the
    batch as it is), "varlen" (padding removed, cu_seqlens built from the mask), "packed" (packed sequences).
    Calls inside a torch.compile'd graph are not counted (the choice is made in the graph, at run time)."""
    return dict(_kernel_counts)


def fallback_counts():
    """How many patched attention calls ran transformers' attention instead of Aquila's kernel since import or
    reset_counts(), by reason (see FALLBACK_REASONS); the first call for each reason is also logged at debug level on
    the ``aquila.model.patch`` logger. Calls inside a torch.compile'd graph are not counted."""
    return dict(_fallback_counts)


def reset_counts():
    """Zeroes kernel_counts() and fallback_counts(); the next fallback for each reason is logged again."""
    _kernel_counts.clear()
    _fallback_counts.clear()
    _reported_reasons.clear()


def _count_fallback(reason):
    if torch.compiler.is_compiling():
        return
    _fallback_counts[reason] += 1
    if reason not in _reported_reasons:
        _reported_reasons.add(reason)
        logger.debug("Aquila's attention falls back to transformers' attention: %s (%s)", reason,
                     FALLBACK_REASONS[reason])


# --- Attention: what the mask asks for --------------------------------------------------------------------------------
# transformers 5 builds the mask once per forward (masking_utils.create_causal_mask) for the configured
# attn_implementation and hands every layer that same object: a 4-D additive float mask [batch, 1, q_len, kv_len]
# (0 where a query may attend, the dtype's minimum elsewhere) for eager; a 4-D boolean one, or None when SDPA's own
# is_causal says the same (no padding, q_len == kv_len or q_len == 1, or the prefill of an empty static cache), for
# sdpa; the 2-D padding mask or None for flash attention; a BlockMask for flex attention. The patch keeps the
# configured implementation (its fallback), so it reads what that implementation would: each mask is compared, once
# per forward, with the masks the kernel can compute, and the matching "plan" is reused by every layer.


@dataclasses.dataclass(frozen=True)
class _Fallback:
    reason: str


@dataclasses.dataclass(frozen=True)
class _Dense:
    """Every query attends causally (aligned bottom-right) to the first `keys` keys of its row."""

    path: ClassVar[str] = "dense"
    keys: int


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
    zeros) is what it computes, on the first `blind_rows` queries of the batch."""

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


def _plan_without_mask(implementation, q_len, kv_len):
    """What transformers' attention computes with no mask: SDPA's is_causal (aligned top-left: with more keys than
    queries, the prefill of a static cache, only the first q_len keys are seen), flash attention's causal (aligned
    bottom-right), nothing masked under eager; a single query sees every key in all of them."""
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


def _plan_for_mask(mask, batch, q_len, kv_len, implementation):
    """Reads a mask (a host sync on GPU) and returns the plan that computes exactly what it asks for."""
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
    # The queries are the last q_len positions of the keys up to the last one any row may see (the filled part of a
    # static cache, whose later keys are masked; with a dynamic cache or none, every key), or failing that (every row
    # ends in padding), of all the keys.
    seen = valid.any(0).nonzero()
    filled = int(seen[-1]) + 1 if seen.numel() else 0
    offsets = [filled - q_len] if q_len <= filled < kv_len else []
    for offset in offsets + [kv_len - q_len]:
        expected = valid[:, None, None, :] & (key_positions <= query_rows + offset)
        if torch.equal(allowed, expected.expand(allowed.shape)):
            return _padding_plan(valid.expand(batch, kv_len)[:, :offset + q_len], offset)
    return _packed_plan(allowed, batch, q_len, kv_len)


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


def _padding_plan(valid, offset):
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
                   blind_rows, blind_index, order)


class _PlanCache:
    """The plan of the last mask read. Every layer of one forward receives the same mask object, so the mask is read
    (a host sync on GPU) and the index tensors built once per forward, not once per layer. A weak reference: a mask
    that is gone can never match a new one that reuses its address; and the mask's version counter: a mask changed
    in place since (a caller's reused buffer) is read again (inference-mode tensors have no version counter)."""

    def __init__(self):
        self._last = (None, None, None)  # (weakref to the mask, sizes, plan), replaced as one tuple

    def plan(self, mask, batch, q_len, kv_len, implementation):
        sizes = (batch, q_len, kv_len, implementation, None if mask.is_inference() else mask._version)
        reference, last_sizes, plan = self._last
        if reference is not None and reference() is mask and last_sizes == sizes:
            return plan
        plan = _plan_for_mask(mask, batch, q_len, kv_len, implementation)
        self._last = (weakref.ref(mask), sizes, plan)
        return plan


_plans = _PlanCache()


class _ContiguousGradient(torch.autograd.Function):
    """Identity whose gradient is contiguous: torch.cond needs both branches' gradients in the same layout."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# --- Attention --------------------------------------------------------------------------------------------------------


class AquilaLlamaAttention(ORIGINAL_ATTENTION):
    """transformers' LlamaAttention (same parameters, same names) whose forward runs Aquila's rotary and attention
    kernels, falling back to transformers' code paths where those do not apply (see the module docstring)."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        # Built by a class-patched modeling_llama: take that patch's options.
        self.aquila_options = class_patch_options or PatchOptions()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        options = self.aquila_options
        token_shape = hidden_states.shape[:-1]
        # [batch, seq, heads, head_dim]: the layout of the projections' output, which the Aquila kernels take as is.
        heads_shape = (*token_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape)
        key = self.k_proj(hidden_states).view(heads_shape)
        value = self.v_proj(hidden_states).view(heads_shape)

        query, key = self._rotate(query, key, position_embeddings, kwargs.get("position_ids"), options)

        if cache is not None:  # transformers' caches hold [batch, heads, seq, head_dim]
            key, value = cache.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_idx, kwargs=kwargs)
            key, value = key.transpose(1, 2), value.transpose(1, 2)

        output = self._kernel_attention(query, key, value, attention_mask, cache, kwargs) if options.attention else None
        weights = None
        if output is None:
            output, weights = self._transformers_attention(query, key, value, attention_mask, kwargs)
        output = output.reshape(*token_shape, -1).contiguous()
        return self.o_proj(output), weights

    def _rotate(self, query, key, position_embeddings, position_ids, options):
        rope = getattr(self.config, "rope_parameters", None) or {}
        plain_rope = rope.get("rope_type", "default") == "default" and "rope_theta" in rope
        if options.rotary and plain_rope and isinstance(position_ids, Tensor):
            # The kernel computes cos/sin itself from the positions, in fp32 with an exact angle.
            return apply_rotary(query, key, position_ids, theta=float(rope["rope_theta"]), interleaved=False,
                                backend=options.backend)
        cos, sin = position_embeddings
        half = query.shape[-1] // 2
        constant = not (torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad))
        if options.rotary and constant and cos.shape[-1] == 2 * half and cos.dim() == 3:
            # Scaled RoPE variants (or no position ids): the kernel rotates by transformers' own cos/sin, whose two
            # halves repeat in the rotate-half layout.
            return apply_rotary(query, key, cos=cos[..., :half], sin=sin[..., :half], interleaved=False,
                                backend=options.backend)
        # Otherwise transformers' rotation, through the module-level function so that whatever is installed there
        # (the original or another library's) runs, in its own [b, h, s, d] layout.
        query, key = modeling_llama.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query.transpose(1, 2), key.transpose(1, 2)

    def _transformers_attention(self, query, key, value, attention_mask, kwargs):
        """The configured attn_implementation, as LlamaAttention runs it: (output [b, s, heads, d], weights)."""
        interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_llama.eager_attention_forward)
        return interface(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                         dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **kwargs)

    def _unsupported(self, query, kwargs):
        """Why the kernel cannot run this call whatever the mask, or None: decided from flags, dtypes and shapes."""
        if self.training and self.attention_dropout > 0:
            return "dropout"
        if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
            return "output_attentions"
        if not (getattr(self.config, "is_causal", True) and self.is_causal) or kwargs.get("is_causal") is False:
            return "not_causal"
        implementation = self.config._attn_implementation or "eager"
        if implementation.startswith("flash_attention") and any(kwargs.get(name) is not None for name in
                                                                VARLEN_KWARGS):
            return "attn_implementation"
        if query.dtype not in FLOAT_DTYPES:
            return "dtype"
        if not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
            return "head_dim"
        return None

    def _kernel_attention(self, query, key, value, attention_mask, cache, kwargs):
        """Aquila's attention where it computes exactly what transformers' would, else None."""
        reason = self._unsupported(query, kwargs)
        if reason is not None:
            _count_fallback(reason)
            return None
        if torch.compiler.is_compiling():
            return self._compiled_attention(query, key, value, attention_mask, cache, kwargs)
        (batch, q_len), kv_len = query.shape[:2], key.shape[1]
        implementation = self.config._attn_implementation or "eager"
        if attention_mask is None:
            plan = _plan_without_mask(implementation, q_len, kv_len)
        elif isinstance(attention_mask, Tensor):
            plan = _plans.plan(attention_mask, batch, q_len, kv_len, implementation)
        else:  # flex attention's BlockMask
            plan = _Fallback("attn_implementation")
        if isinstance(plan, _Fallback):
            _count_fallback(plan.reason)
            return None
        _kernel_counts[plan.path] += 1
        if isinstance(plan, _Dense):
            return self._dense(query, key[:, :plan.keys], value[:, :plan.keys])
        if isinstance(plan, _Packed):
            flat = [t.reshape(-1, *t.shape[2:]) for t in (query, key, value)]
            return self._varlen(*flat, True, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                                plan.max_seqlen).view(query.shape)
        return self._unpadded(plan, query, key, value, attention_mask, kwargs)

    def _dense(self, query, key, value):
        return attention(query, key, value, causal=True, scale=self.scaling, backend=self.aquila_options.backend)

    def _varlen(self, query, key, value, causal, cu_queries, cu_keys, max_queries, max_keys):
        if not query.shape[0]:
            return query.new_zeros(query.shape)
        return attention(query, key, value, causal=causal, scale=self.scaling, cu_seqlens_q=cu_queries,
                         cu_seqlens_k=cu_keys, max_seqlen_q=max_queries, max_seqlen_k=max_keys,
                         backend=self.aquila_options.backend)

    def _unpadded(self, plan, query, key, value, attention_mask, kwargs):
        """Unpad, attend with the varlen kernel, pad back (see _Varlen)."""
        batch, q_len, heads, head_dim = query.shape
        flat_query = query.reshape(batch * q_len, heads, head_dim)
        flat_key, flat_value = (t[:, :plan.keys].reshape(batch * plan.keys, *t.shape[2:]) for t in (key, value))
        outputs = [self._varlen(flat_query[plan.query_index], flat_key[plan.key_index], flat_value[plan.key_index],
                                True, plan.cu_queries, plan.cu_keys, plan.max_queries, plan.max_keys)]
        if plan.padded_query_index.numel():
            outputs.append(self._varlen(flat_query[plan.padded_query_index], flat_key[plan.padded_key_index],
                                        flat_value[plan.padded_key_index], False, plan.cu_padded_queries,
                                        plan.cu_padded_keys, plan.max_padded_queries, plan.max_padded_keys))
        if plan.blind_rows:
            blind, _ = self._transformers_attention(query[:, :plan.blind_rows], key, value,
                                                    attention_mask[:, :, :plan.blind_rows], kwargs)
            outputs.append(blind.reshape(-1, heads, head_dim)[plan.blind_index].to(outputs[0].dtype))
        return torch.cat(outputs)[plan.order].view(batch, q_len, heads, head_dim)

    def _compiled_attention(self, query, key, value, attention_mask, cache, kwargs):
        """Under torch.compile: no value of a tensor may decide anything while tracing, and shapes stay static. A mask
        is checked with tensor ops and torch.cond picks the kernel or transformers' attention when the graph runs:
        the kernel for a plain causal mask, and, in inference with a static cache (generation), the KV-cache kernel
        over each row's filled keys, gathered first when padding makes them other than a prefix."""
        (batch, q_len), kv_len = query.shape[:2], key.shape[1]
        implementation = self.config._attn_implementation or "eager"
        if attention_mask is None:
            plan = _plan_without_mask(implementation, q_len, kv_len)
            return self._dense(query, key[:, :plan.keys], value[:, :plan.keys]) if isinstance(plan, _Dense) else None
        if (implementation not in ("eager", "sdpa") or not isinstance(attention_mask, Tensor)
                or attention_mask.dim() != 4 or tuple(attention_mask.shape[-2:]) != (q_len, kv_len)):
            return None
        allowed, readable = _allowed(attention_mask, implementation)
        if allowed is None:
            return None
        # Flat outputs: torch.cond needs both branches' outputs (and gradients) in one layout.
        def fallback(query, key, value, attention_mask, *_):
            query, key, value = (_ContiguousGradient.apply(t) for t in (query, key, value))
            return self._transformers_attention(query, key, value, attention_mask, kwargs)[0].reshape(-1)

        key_positions = torch.arange(kv_len, device=attention_mask.device)
        query_rows = torch.arange(q_len, device=attention_mask.device)[:, None]
        if _backend.needs_backward(query, key, value) or not getattr(cache, "is_compileable", False):
            plain = readable & (allowed == (key_positions <= query_rows + (kv_len - q_len))).all()
            return torch.cond(plain, lambda q, k, v, m: self._dense(q, k, v).reshape(-1), fallback,
                              (query, key, value, attention_mask)).view(query.shape)

        # A static cache: the keys are its whole buffer; the mask says which hold this batch's tokens.
        valid = allowed[:, 0, -1, :].expand(batch, kv_len).clone()  # not a view of the mask: cond's operands
        lengths = valid.sum(1)
        filled = ((key_positions + 1) * valid.any(0)).max()
        offset = filled - q_len
        expected = valid[:, None, None, :] & (key_positions <= query_rows + offset)
        query_positions = (offset + query_rows.T).clamp(0, kv_len - 1).expand(batch, q_len)
        matches = readable & (offset >= 0) & valid.gather(1, query_positions).all() & (allowed == expected).all()
        prefix = (valid == (key_positions < lengths[:, None])).all()
        scale, backend = self.scaling, self.aquila_options.backend

        def kv_cache(query, key, value, attention_mask, lengths, valid):
            return attention_with_kv_cache(query, key, value, lengths, scale=scale, backend=backend).reshape(-1)

        def gathered_kv_cache(query, key, value, attention_mask, lengths, valid):
            # Each row's tokens first, in order: the KV-cache kernel reads the first `lengths` keys.
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :, None, None]
            key, value = (t.gather(1, order.expand(t.shape)) for t in (key, value))
            return kv_cache(query, key, value, attention_mask, lengths, valid)

        def kernel(*operands):
            return torch.cond(prefix, kv_cache, gathered_kv_cache, operands)

        return torch.cond(matches, kernel, fallback,
                          (query, key, value, attention_mask, lengths, valid)).view(query.shape)


AquilaLlamaAttention.forward = _with_deprecations_of(ORIGINAL_ATTENTION.forward, AquilaLlamaAttention.forward)


# --- Loss -------------------------------------------------------------------------------------------------------------


def _fused_causal_lm_loss(hidden, lm_head, labels, *, shift_labels, ignore_index, num_items_in_batch, backend):
    """transformers' ForCausalLMLoss (token t predicts label t + 1; a mean over counted tokens, or a sum divided by
    num_items_in_batch for gradient accumulation) from the hidden states, without forming the logits."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(hidden.device)
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        # The lm_head would have run in the autocast dtype: so does the fused op (it does not autocast itself).
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(hidden, weight, targets, bias, ignore_index=ignore_index, reduction=reduction,
                                backend=backend)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _logits_to_keep_is_all(logits_to_keep):
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def aquila_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                             inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """LlamaForCausalLM.forward with the fused linear cross-entropy: in training mode with labels, the loss comes
    from the last hidden states and returned logits are None; otherwise the original forward runs."""
    options = self.__dict__.get("aquila_options") or class_patch_options or PatchOptions(cross_entropy=False)
    arguments = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                     inputs_embeds=inputs_embeds, use_cache=use_cache)
    fused = options.cross_entropy and self.training and labels is not None and _logits_to_keep_is_all(logits_to_keep)
    if not fused:
        return ORIGINAL_CAUSAL_LM_FORWARD(self, **arguments, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    outputs = self.model(**arguments, **kwargs)
    loss = _fused_causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels,
                                 shift_labels=kwargs.get("shift_labels"),
                                 ignore_index=kwargs.get("ignore_index", IGNORE_INDEX),
                                 num_items_in_batch=kwargs.get("num_items_in_batch"), backend=options.backend)
    return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


# As LlamaForCausalLM.forward: return_dict handled by can_return_tuple, deprecated arguments by transformers' own
# deprecation wrappers (whose messages name the function "forward" of the model's class).
aquila_causal_lm_forward.__name__ = "forward"
aquila_causal_lm_forward = _with_deprecations_of(ORIGINAL_CAUSAL_LM_FORWARD, can_return_tuple(aquila_causal_lm_forward))


# --- Applying and removing the patch ----------------------------------------------------------------------------------


def _checked_options(rms_norm, rotary, attention, cross_entropy, backend):
    flags = dict(rms_norm=rms_norm, rotary=rotary, attention=attention, cross_entropy=cross_entropy)
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"apply_aquila_kernels_to_llama: {name} must be True or False, got {value!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"apply_aquila_kernels_to_llama: backend must be one of {', '.join(BACKENDS)} or None "
                         f"(each device's default), got {backend!r}")
    if backend is not None and attention and backend not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedBackend(f"apply_aquila_kernels_to_llama: {backend} has no training attention kernel: use "
                                 "backend=None (each device's default), or attention=False")
    return PatchOptions(**flags, backend=backend)


def _refuse_wrapped_forward(name, module):
    # accelerate's dispatch hooks (device_map with offloading) replace a module's forward per instance; a swapped
    # module or class would silently lose them, or never run.
    if "forward" in module.__dict__:
        raise ValueError(f"apply_aquila_kernels_to_llama: {name or 'the model'}'s forward is replaced on the instance "
                         "(accelerate hooks?): apply the patch before dispatching the model to devices")


def _patch_instance(model, options):
    if options.cross_entropy and type(model).forward not in (ORIGINAL_CAUSAL_LM_FORWARD, aquila_causal_lm_forward):
        raise ValueError(f"apply_aquila_kernels_to_llama: {type(model).__name__} overrides LlamaForCausalLM.forward, "
                         "whose loss the patch replaces: pass cross_entropy=False")
    for name, module in list(model.named_modules()):
        if isinstance(module, (ORIGINAL_RMS_NORM, AquilaLlamaRMSNorm)):
            if isinstance(module, AquilaLlamaRMSNorm) == options.rms_norm:
                if options.rms_norm:  # patched before: only the backend may change
                    module.backend = options.backend
                continue
            _refuse_wrapped_forward(name, module)
            parent_name, _, child_name = name.rpartition(".")
            model.get_submodule(parent_name).register_module(
                child_name, _norm_sharing_weight(module, options.rms_norm, options.backend))
        elif isinstance(module, ORIGINAL_ATTENTION):
            _refuse_wrapped_forward(name, module)
            # Swapping the class keeps the module object, its parameters, hooks and registrations; only forward
            # changes. AquilaLlamaAttention adds no parameters or buffers.
            module.__class__ = AquilaLlamaAttention if options.rotary or options.attention else ORIGINAL_ATTENTION
            module.aquila_options = options
    if options.cross_entropy:
        if getattr(model.__dict__.get("forward"), "func", None) is not aquila_causal_lm_forward:
            _refuse_wrapped_forward("", model)
        # On the instance only: an instance attribute shadows the class's forward for this model (nn.Module.__call__
        # looks up self.forward). A partial of a module-level function, not a bound method: both follow the model
        # through copy.deepcopy, but only the partial pickles (torch.save of the whole model).
        model.forward = functools.partial(aquila_causal_lm_forward, model)
    elif getattr(model.__dict__.get("forward"), "func", None) is aquila_causal_lm_forward:
        del model.forward  # re-applied without the loss: back to the class's forward
    model.aquila_options = options
    return model


def _patch_classes(options):
    global class_patch_options
    class_patch_options = options
    modeling_llama.LlamaRMSNorm = AquilaLlamaRMSNorm if options.rms_norm else ORIGINAL_RMS_NORM
    modeling_llama.LlamaAttention = AquilaLlamaAttention if options.rotary or options.attention else ORIGINAL_ATTENTION
    LlamaForCausalLM.forward = aquila_causal_lm_forward if options.cross_entropy else ORIGINAL_CAUSAL_LM_FORWARD


def apply_aquila_kernels_to_llama(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                  cross_entropy: bool = True, backend: Optional[str] = None):
    """Runs transformers' LlamaForCausalLM on Aquila's fused kernels.

    model: a LlamaForCausalLM instance (patched in place, and returned); or None / the LlamaForCausalLM class, to patch
        transformers' modeling_llama for models built afterwards (returns None; see remove_aquila_kernels_from_llama).
    rms_norm, rotary, attention, cross_entropy: which parts to swap (each falls back to transformers' code where the
        kernel does not apply; see the module docstring).
    backend: the Aquila backend for every op ("triton", "cpu", "torch"; "cuda" only with attention=False), or None for
        each device's default.
    Applying again replaces the options (a part switched off is restored); parameters are never copied.
    """
    options = _checked_options(rms_norm, rotary, attention, cross_entropy, backend)
    if model is None or (isinstance(model, type) and issubclass(model, LlamaForCausalLM)):
        _patch_classes(options)
        return None
    if not isinstance(model, LlamaForCausalLM):
        kind = model.__name__ if isinstance(model, type) else type(model).__name__
        hint = " (a PEFT wrapper: pass model.get_base_model())" if hasattr(model, "get_base_model") else ""
        raise TypeError(f"apply_aquila_kernels_to_llama: expected a transformers LlamaForCausalLM (instance or class) "
                        f"or None, got {kind}{hint}")
    return _patch_instance(model, options)


def remove_aquila_kernels_from_llama():
    """Undoes the class-level patch: modeling_llama builds transformers' own modules again and LlamaForCausalLM.forward
    is the original. Models built while the patch was on keep their Aquila modules (they remain correct)."""
    global class_patch_options
    class_patch_options = None
    modeling_llama.LlamaRMSNorm = ORIGINAL_RMS_NORM
    modeling_llama.LlamaAttention = ORIGINAL_ATTENTION
    LlamaForCausalLM.forward = ORIGINAL_CAUSAL_LM_FORWARD
