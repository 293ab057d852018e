"""Running Hugging Face transformers causal LMs (Llama, Qwen2, Mistral, Qwen3, Gemma, Gemma 2, Phi-3, Mixtral) on
Aquila's fused kernels.

Why: users who train with transformers (and its Trainer, PEFT, ...) should get the kernels' speed and memory savings
without moving to Aquila's own model. ``apply_aquila_kernels_to_<family>`` (``_llama``, ``_qwen2``, ``_mistral``,
``_qwen3``, ``_gemma``, ``_gemma2``, ``_phi3``, ``_mixtral``) swaps the pieces of a model of that family that have a
fused equivalent, leaving parameter names, parameter objects, the config and the checkpoint format untouched. This
package holds what every family shares (options, the patched norm, attention, MLP and loss, counting, applying and
removing); each family's module (``llama.py``, ``qwen2.py``, ...) names its transformers classes, adds what is its
own, and defines its two public functions. Described here for Llama; docs/model.md tabulates what each family gets.

* RMSNorm -> :class:`AquilaLlamaRMSNorm` (an :class:`aquila.kernels.RMSNorm` holding the very same weight Parameter).
  Gemma's norms scale by ``1 + weight`` in fp32: Aquila's ``offset=1.0`` with its all-fp32 ("gemma") casting.
* Attention -> :class:`AquilaLlamaAttention`: q/k/v stay in the [batch, seq, heads, head_dim] layout the projections
  produce (no transposes; Phi-3's fused qkv_proj is split into views), rotary runs on Aquila's kernel from the position
  ids, and attention on Aquila's flash attention (causal, GQA without repeating k/v), with transformers' KV cache.
  Qwen3's per-head q/k norms run on Aquila's rms_norm before the rotary.
* MLP -> :class:`AquilaLlamaMLP`: the gated activation (silu(gate) * up, or gelu(gate) * up for Gemma's GeGLU) on
  Aquila's swiglu / geglu, whose backward recomputes the activation instead of saving it, where the module's
  activation is exactly one of theirs (SiLU; GELU exact or tanh-approximated); else transformers' MLP forward. Phi-3's
  fused gate_up_proj is split into views; Mixtral's experts get the fused activation in their ``_apply_gate``, which
  transformers' grouped_mm and batched_mm expert implementations call (the default; its "eager" expert loop keeps
  transformers' activation).
* Loss -> fused linear cross-entropy: in training mode with ``labels``, the loss comes straight from the last hidden
  states and ``lm_head.weight``, so the [tokens, vocab] logits are never materialised; the output's ``logits`` is then
  None (as with Liger-Kernel). Gemma 2's final logit softcapping is the fused loss's ``softcap``; Mixtral's router
  auxiliary loss is added as transformers adds it. In eval mode, or without labels, the original forward runs and
  returns logits (with the loss when labels are given), so evaluation loops, metrics and ``generate`` keep working.

Two ways to apply it (each family alike):

* ``apply_aquila_kernels_to_llama(model)``: patches that instance only (in place; returns it).
* ``apply_aquila_kernels_to_llama()`` or ``(LlamaForCausalLM)``: patches ``transformers.models.llama.modeling_llama``:
  models built afterwards get the Aquila RMSNorm, attention and MLP modules; ``LlamaForCausalLM.forward`` (a class
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
  non-causal config, any other 4-D mask (custom masks: prefix-LM, ...), flex attention's BlockMask,
  flash attention with padding or varlen keyword arguments (flash attention is then the fallback), and dtypes or
  head dims the kernel lacks. Sliding windows (Mistral, Qwen2, Qwen3, Gemma 2, Phi-3, Mixtral layers): transformers'
  sliding causal mask equals the plain causal one until the sequence outgrows the window, and meanwhile runs on the
  kernel as above; a window that hides keys is recognised by comparing the mask with the windowed causal one, and
  runs with ``window_size=(W - 1, 0)``, on the batched kernel when nothing is padded, on the varlen one under left
  padding (generation's case); other padding falls back ("sliding_window"). Gemma 2's attention logit softcapping
  runs on the kernel's ``softcap``.
  Under torch.compile nothing may read a tensor's values while tracing: the choice is made from shapes, dtypes and
  flags, and the mask is checked with tensor ops inside the graph, where ``torch.cond`` runs the kernel (plain causal
  masks; in inference over a static cache, generation's case, the KV-cache kernel over each row's filled keys,
  gathered first when left padding puts them elsewhere) or transformers' attention (padding in training, whose
  unpadding needs shapes that depend on the mask). In training, ``torch.cond``'s backward recomputes the attention
  forward. Calls inside a compiled graph are not counted. Under compile, sliding-window layers run the kernel only
  while their mask is plain causal, and softcapped ones only where the kernel has softcap.
* Loss: ``logits_to_keep`` other than 0 with labels uses the original forward.

Numerics: the Aquila ops compute in fp32 and round once to the input dtype, where transformers rounds some
intermediates (e.g. RMSNorm casts to the input dtype before the weight multiply, rotary multiplies by cos/sin rounded
to the input dtype). In fp32 the results agree to rounding; in bf16/fp16 they differ by a few units in the last place.
One visible difference: transformers' RMSNorm returns fp32 when the weight is fp32 and the input bf16; Aquila's
returns the input's dtype.

Limits: fp32, fp16 and bf16 models (the kernels' dtypes; a float64 model gets the kernels' TypeError). Patch before
accelerate dispatches the model across devices (a forward replaced per instance is refused with an error). Not
patched: the decoder layer's residual adds (fusing them into the norms, as Aquila's own model does, would mean
replacing LlamaDecoderLayer.forward), transformers' rotary_emb, which still computes cos/sin once per forward
for the fallback, the embeddings (Gemma's scaling included), and Mixtral's router and expert matmuls.

Deprecated arguments: the patched forwards sit in transformers' own deprecation wrappers of the originals (5.x:
``past_key_values`` for ``cache``), so they rename, warn and refuse exactly as transformers does.
"""

import collections
import dataclasses
import functools
import logging
import types
from typing import ClassVar, Optional

import torch
from torch import Tensor

from aquila import IGNORE_INDEX
from aquila.kernels import (
    RMSNorm,
    apply_rotary,
    attention,
    attention_with_kv_cache,
    geglu,
    linear_cross_entropy,
    swiglu,
)
from aquila.kernels import backend as _backend
from aquila.kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from aquila.kernels.attention import MAX_HEAD_DIM
from aquila.kernels.backend import BACKENDS, FLOAT_DTYPES, UnsupportedBackend

try:
    from transformers import activations
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.utils import can_return_tuple
except ImportError as error:  # transformers is an optional dependency of aquila
    raise ImportError("aquila.model.patch needs transformers: pip install transformers") from error

from .masks import _allowed, _Dense, _Fallback, _Packed, _plan_without_mask, _plans

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
    """What a patched model (or the patched classes) run on Aquila's kernels, and on which backend. mlp: the family's
    swiglu / geglu flag."""

    rms_norm: bool = True
    rotary: bool = True
    attention: bool = True
    cross_entropy: bool = True
    mlp: bool = True
    backend: Optional[str] = None


class Family:
    """One transformers model family: its modeling module, its causal LM class, the names there of the classes the
    patch swaps (norm, attention, MLP), and the options of its class-level patch (None while unpatched).

    transformers' own classes and forward are captured once, at import, so that patching twice never wraps a patch
    and removing the patch restores exactly these. The family's module then defines its Aquila classes and fused
    forward (attributes set by ``define``)."""

    def __init__(self, name, modeling, causal_lm, *, norm, attention, mlp, mlp_flag):
        self.name, self.modeling, self.causal_lm = name, modeling, causal_lm
        self.class_names = dict(norm=norm, attention=attention, mlp=mlp)
        self.originals = {part: getattr(modeling, class_name) for part, class_name in self.class_names.items()}
        self.original_forward = causal_lm.forward
        self.mlp_flag = mlp_flag  # the name of the MLP option: "swiglu" or "geglu"
        self.class_options: Optional[PatchOptions] = None
        self.patched = {}
        self.fused_forward = None

    @property
    def op(self):
        return f"apply_aquila_kernels_to_{self.name}"

    def define(self, fused_forward, **patched):
        """The family's Aquila classes (norm=, attention=, mlp=) and fused loss forward."""
        self.patched, self.fused_forward = patched, fused_forward
        # The attention forward inside transformers' own deprecation wrappers of the original's.
        attention_class = patched["attention"]
        attention_class.forward = _with_deprecations_of(self.originals["attention"].forward, PatchedAttention.forward)


# --- RMSNorm ----------------------------------------------------------------------------------------------------------


class PatchedRMSNorm(RMSNorm):
    """Aquila's RMSNorm with the constructor and attribute names of a family's RMSNorm (each family subclasses it), so
    code that builds or inspects those norms (weight init matches on "RMSNorm" in the class name; PEFT and others read
    ``variance_epsilon``, Gemma's ``eps``) keeps working. weight_offset: 1 where the scale is 1 + weight (Gemma)."""

    family: ClassVar[Family]
    weight_offset: ClassVar[float] = 0.0

    def __init__(self, hidden_size, eps=1e-6, *, backend=None, device=None, dtype=None):
        options = self.family.class_options
        if backend is None and options is not None:  # built by a class-patched modeling module
            backend = options.backend
        super().__init__(hidden_size, eps, offset=self.weight_offset, backend=backend, device=device, dtype=dtype)

    @property
    def variance_epsilon(self):
        return self.eps

    @variance_epsilon.setter
    def variance_epsilon(self, value):
        self.eps = value


def _norm_sharing_weight(family, norm, aquila, backend):
    """The family's Aquila RMSNorm (aquila) or transformers' own holding `norm`'s weight Parameter itself (not a copy),
    so an optimizer built before the swap still updates the weight the model uses, and the state_dict key stays
    ``...weight``."""
    eps = norm.variance_epsilon if hasattr(norm, "variance_epsilon") else norm.eps
    if aquila:
        replacement = family.patched["norm"](norm.weight.shape[0], eps, device="meta")
        replacement.backend = backend  # this call's choice, whatever a class-level patch chose
    else:
        with torch.device("meta"):  # its fresh weight is dropped at once: never allocate it
            replacement = family.originals["norm"](norm.weight.shape[0], eps=eps)
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
    "sliding_window": "a sliding window that hides some keys, with padding other than left padding (transformers "
                      "counts the window in positions, padding slots included)",
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



class _ContiguousGradient(torch.autograd.Function):
    """Identity whose gradient is contiguous: torch.cond needs both branches' gradients in the same layout."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# --- Attention --------------------------------------------------------------------------------------------------------


class PatchedModule:
    """A transformers module whose class the patch swaps for a subclass (same parameters, same names; the module
    object, its hooks and registrations kept) that runs Aquila's kernels with the options in ``aquila_options``."""

    family: ClassVar[Family]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Built by a class-patched modeling module: take that patch's options.
        self.aquila_options = self.family.class_options or PatchOptions()


class PatchedAttention(PatchedModule):
    """A family's attention (subclassed with the family's transformers class) whose forward runs Aquila's rotary and
    attention kernels, falling back to transformers' code paths where those do not apply (see the module docstring).
    window_in_config: the layer's sliding window is the config's (Mistral, Phi-3, Mixtral), not the module's own
    ``sliding_window`` attribute (Qwen2, Qwen3, Gemma 2: None on full-attention layers)."""

    window_in_config: ClassVar[bool] = False

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        options = self.aquila_options
        token_shape = hidden_states.shape[:-1]
        query, key, value = self._project(hidden_states, (*token_shape, -1, self.head_dim))

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

    def _project(self, hidden_states, heads_shape):
        """query, key, value [batch, seq, heads, head_dim]: the layout of the projections' output, which the Aquila
        kernels take as is."""
        return tuple(projection(hidden_states).view(heads_shape) for projection in (self.q_proj, self.k_proj,
                                                                                      self.v_proj))

    def _sliding_window(self):
        """transformers' sliding_window of this layer (a query sees itself and the window - 1 keys before), or None."""
        return getattr(self.config if self.window_in_config else self, "sliding_window", None)

    def _softcap(self):
        return getattr(self, "attn_logit_softcapping", None)

    def _kernel_options(self, window=None):
        """The kernel's arguments for this layer's window (when the plan has one) and logit softcapping."""
        options = {}
        if window is not None:
            options["window_size"] = (window - 1, 0)
        if self._softcap() is not None:
            options["softcap"] = self._softcap()
        return options

    def _rotate(self, query, key, position_embeddings, position_ids, options):
        rope = getattr(self.config, "rope_parameters", None) or {}
        plain_rope = (rope.get("rope_type", "default") == "default" and "rope_theta" in rope
                      and rope.get("partial_rotary_factor", 1.0) == 1.0)  # Phi-3 may rotate part of each head only
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
        query, key = self.family.modeling.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query.transpose(1, 2), key.transpose(1, 2)

    def _transformers_attention(self, query, key, value, attention_mask, kwargs):
        """The configured attn_implementation, as the family's attention runs it (with its sliding window and logit
        softcapping): (output [b, s, heads, d], weights)."""
        modeling = self.family.modeling
        interface = modeling.ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                   modeling.eager_attention_forward)
        extra = {name: value for name, value in (("sliding_window", self._sliding_window()),
                                                 ("softcap", self._softcap())) if value is not None}
        return interface(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask,
                         dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **extra,
                         **kwargs)

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
        window = self._sliding_window()
        if attention_mask is None:
            plan = _plan_without_mask(implementation, q_len, kv_len, window)
        elif isinstance(attention_mask, Tensor):
            plan = _plans.plan(attention_mask, batch, q_len, kv_len, implementation, window)
        else:  # flex attention's BlockMask
            plan = _Fallback("attn_implementation")
        if isinstance(plan, _Fallback):
            _count_fallback(plan.reason)
            return None
        _kernel_counts[plan.path] += 1
        if isinstance(plan, _Dense):
            return self._dense(query, key[:, :plan.keys], value[:, :plan.keys], plan.window)
        if isinstance(plan, _Packed):
            flat = [t.reshape(-1, *t.shape[2:]) for t in (query, key, value)]
            return self._varlen(*flat, True, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen,
                                plan.max_seqlen).view(query.shape)
        return self._unpadded(plan, query, key, value, attention_mask, kwargs)

    def _dense(self, query, key, value, window=None):
        return attention(query, key, value, causal=True, scale=self.scaling, backend=self.aquila_options.backend,
                         **self._kernel_options(window))

    def _varlen(self, query, key, value, causal, cu_queries, cu_keys, max_queries, max_keys, window=None):
        if not query.shape[0]:
            return query.new_zeros(query.shape)
        return attention(query, key, value, causal=causal, scale=self.scaling, cu_seqlens_q=cu_queries,
                         cu_seqlens_k=cu_keys, max_seqlen_q=max_queries, max_seqlen_k=max_keys,
                         backend=self.aquila_options.backend, **self._kernel_options(window))

    def _unpadded(self, plan, query, key, value, attention_mask, kwargs):
        """Unpad, attend with the varlen kernel, pad back (see _Varlen)."""
        batch, q_len, heads, head_dim = query.shape
        flat_query = query.reshape(batch * q_len, heads, head_dim)
        flat_key, flat_value = (t[:, :plan.keys].reshape(batch * plan.keys, *t.shape[2:]) for t in (key, value))
        outputs = [self._varlen(flat_query[plan.query_index], flat_key[plan.key_index], flat_value[plan.key_index],
                                True, plan.cu_queries, plan.cu_keys, plan.max_queries, plan.max_keys, plan.window)]
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
            plan = _plan_without_mask(implementation, q_len, kv_len, self._sliding_window())
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
        scale, backend, kernel_options = self.scaling, self.aquila_options.backend, self._kernel_options()

        def kv_cache(query, key, value, attention_mask, lengths, valid):
            return attention_with_kv_cache(query, key, value, lengths, scale=scale, backend=backend,
                                           **kernel_options).reshape(-1)

        def gathered_kv_cache(query, key, value, attention_mask, lengths, valid):
            # Each row's tokens first, in order: the KV-cache kernel reads the first `lengths` keys.
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :, None, None]
            key, value = (t.gather(1, order.expand(t.shape)) for t in (key, value))
            return kv_cache(query, key, value, attention_mask, lengths, valid)

        def kernel(*operands):
            return torch.cond(prefix, kv_cache, gathered_kv_cache, operands)

        return torch.cond(matches, kernel, fallback,
                          (query, key, value, attention_mask, lengths, valid)).view(query.shape)


# --- MLP --------------------------------------------------------------------------------------------------------------
# The gated activation act(gate) * up on Aquila's swiglu / geglu where the module's activation is exactly one of
# theirs; any other activation (gelu_new, relu, ...) keeps transformers' forward.
SILU_ACTIVATIONS = (activations.SiLUActivation, torch.nn.SiLU)
GELU_APPROXIMATIONS = {activations.GELUActivation: "none", activations.GELUTanh: "tanh"}


def _fused_gate(activation, gate, up, backend):
    """act(gate) * up on Aquila's kernel, or None where `activation` is not one the kernels compute."""
    kind = type(activation)
    if kind in SILU_ACTIVATIONS:
        return swiglu(gate, up, backend=backend)
    if kind in GELU_APPROXIMATIONS:
        return geglu(gate, up, approximate=GELU_APPROXIMATIONS[kind], backend=backend)
    return None


def _fuses(activation):
    return type(activation) in SILU_ACTIVATIONS or type(activation) in GELU_APPROXIMATIONS


class PatchedGatedMLP(PatchedModule):
    """A family's MLP, down_proj(act(gate_proj(x)) * up_proj(x)), with the gated activation fused."""

    def forward(self, hidden_states):
        activation = self._activation()
        if not _fuses(activation):
            return super().forward(hidden_states)
        gate, up = self._gate_and_up(hidden_states)
        return self.down_proj(_fused_gate(activation, gate, up, self.aquila_options.backend))

    def _activation(self):
        return self.act_fn

    def _gate_and_up(self, hidden_states):
        return self.gate_proj(hidden_states), self.up_proj(hidden_states)


# --- Loss -------------------------------------------------------------------------------------------------------------


def _fused_causal_lm_loss(hidden, lm_head, labels, *, shift_labels, ignore_index, num_items_in_batch, softcap,
                          backend):
    """transformers' ForCausalLMLoss (token t predicts label t + 1; a mean over counted tokens, or a sum divided by
    num_items_in_batch for gradient accumulation) from the hidden states, without forming the logits; softcap: the
    final logit softcapping transformers applies to the logits first (Gemma 2), or None."""
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
                                softcap=softcap, backend=backend)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _logits_to_keep_is_all(logits_to_keep):
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def _causal_lm_output(model, outputs, loss, attention_mask, model_kwargs):
    return CausalLMOutputWithPast(loss=loss, logits=None, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


def fused_loss_forward(family, module, name, *, model_kwargs=lambda model, kwargs: {}, output=_causal_lm_output):
    """The family's CausalLM forward with the fused linear cross-entropy: in training mode with labels, the loss comes
    from the last hidden states and the returned logits are None; otherwise the original forward runs.

    model_kwargs(model, kwargs): the arguments of the original forward that go to the base model and are taken out of
    kwargs (Mixtral's output_router_logits); output(model, outputs, loss, attention_mask, those arguments): the
    returned output. The function is named `name` in `module`, where the family's module binds it, so that a model
    patched per instance (the forward a partial of it) pickles."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        options = self.__dict__.get("aquila_options") or family.class_options or PatchOptions(cross_entropy=False)
        arguments = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache)
        fused = (options.cross_entropy and self.training and labels is not None
                 and _logits_to_keep_is_all(logits_to_keep))
        if not fused:
            return family.original_forward(self, **arguments, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        extra = model_kwargs(self, kwargs)
        outputs = self.model(**arguments, **extra, **kwargs)
        loss = _fused_causal_lm_loss(outputs.last_hidden_state, self.lm_head, labels,
                                     shift_labels=kwargs.get("shift_labels"),
                                     ignore_index=kwargs.get("ignore_index", IGNORE_INDEX),
                                     num_items_in_batch=kwargs.get("num_items_in_batch"),
                                     softcap=getattr(self.config, "final_logit_softcapping", None),
                                     backend=options.backend)
        return output(self, outputs, loss, attention_mask, extra)

    # As the original: return_dict handled by can_return_tuple, deprecated arguments by transformers' own deprecation
    # wrappers (whose messages name the function "forward" of the model's class).
    forward.__module__, forward.__qualname__ = module, name
    return _with_deprecations_of(family.original_forward, can_return_tuple(forward))


# --- Applying and removing the patch ----------------------------------------------------------------------------------


def checked_options(family, rms_norm, rotary, attention, cross_entropy, mlp, backend):
    """The options of an apply_aquila_kernels_to_<family> call, or a clear error naming the bad argument."""
    flags = dict(rms_norm=rms_norm, rotary=rotary, attention=attention, cross_entropy=cross_entropy,
                 **{family.mlp_flag: mlp})
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{family.op}: {name} must be True or False, got {value!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"{family.op}: backend must be one of {', '.join(BACKENDS)} or None (each device's default), "
                         f"got {backend!r}")
    if backend is not None and attention and backend not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedBackend(f"{family.op}: {backend} has no training attention kernel: use backend=None (each "
                                 "device's default), or attention=False")
    return PatchOptions(rms_norm, rotary, attention, cross_entropy, mlp, backend)


def _refuse_wrapped_forward(family, name, module):
    # accelerate's dispatch hooks (device_map with offloading) replace a module's forward per instance; a swapped
    # module or class would silently lose them, or never run.
    if "forward" in module.__dict__:
        raise ValueError(f"{family.op}: {name or 'the model'}'s forward is replaced on the instance (accelerate "
                         "hooks?): apply the patch before dispatching the model to devices")


def _swap_class(family, part, name, module, patched, options):
    """Swapping the class keeps the module object, its parameters, hooks and registrations; only forward changes.
    The Aquila classes add no parameters or buffers."""
    _refuse_wrapped_forward(family, name, module)
    module.__class__ = family.patched[part] if patched else family.originals[part]
    module.aquila_options = options


def _patch_instance(family, model, options):
    if options.cross_entropy and type(model).forward not in (family.original_forward, family.fused_forward):
        raise ValueError(f"{family.op}: {type(model).__name__} overrides {family.causal_lm.__name__}.forward, whose "
                         "loss the patch replaces: pass cross_entropy=False")
    norms = (family.originals["norm"], family.patched["norm"])
    for name, module in list(model.named_modules()):
        if isinstance(module, norms):
            if isinstance(module, family.patched["norm"]) == options.rms_norm:
                if options.rms_norm:  # patched before: only the backend may change
                    module.backend = options.backend
                continue
            _refuse_wrapped_forward(family, name, module)
            parent_name, _, child_name = name.rpartition(".")
            model.get_submodule(parent_name).register_module(
                child_name, _norm_sharing_weight(family, module, options.rms_norm, options.backend))
        elif isinstance(module, family.originals["attention"]):
            _swap_class(family, "attention", name, module, options.rotary or options.attention, options)
        elif isinstance(module, family.originals["mlp"]):
            _swap_class(family, "mlp", name, module, options.mlp, options)
    if options.cross_entropy:
        if getattr(model.__dict__.get("forward"), "func", None) is not family.fused_forward:
            _refuse_wrapped_forward(family, "", model)
        # On the instance only: an instance attribute shadows the class's forward for this model (nn.Module.__call__
        # looks up self.forward). A partial of a module-level function, not a bound method: both follow the model
        # through copy.deepcopy, but only the partial pickles (torch.save of the whole model).
        model.forward = functools.partial(family.fused_forward, model)
    elif getattr(model.__dict__.get("forward"), "func", None) is family.fused_forward:
        del model.forward  # re-applied without the loss: back to the class's forward
    model.aquila_options = options
    return model


def _set_classes(family, options):
    """Installs in the family's modeling module the classes (and the CausalLM forward) for `options`, transformers'
    own for None."""
    family.class_options = options
    switched_on = dict(norm=options is not None and options.rms_norm,
                       attention=options is not None and (options.rotary or options.attention),
                       mlp=options is not None and options.mlp)
    for part, class_name in family.class_names.items():
        setattr(family.modeling, class_name, family.patched[part] if switched_on[part] else family.originals[part])
    fused = options is not None and options.cross_entropy
    family.causal_lm.forward = family.fused_forward if fused else family.original_forward


def apply_to(family, model, options):
    """apply_aquila_kernels_to_<family>'s work, on its checked options."""
    causal_lm = family.causal_lm
    if model is None or (isinstance(model, type) and issubclass(model, causal_lm)):
        _set_classes(family, options)
        return None
    if not isinstance(model, causal_lm):
        kind = model.__name__ if isinstance(model, type) else type(model).__name__
        hint = " (a PEFT wrapper: pass model.get_base_model())" if hasattr(model, "get_base_model") else ""
        raise TypeError(f"{family.op}: expected a transformers {causal_lm.__name__} (instance or class) or None, got "
                        f"{kind}{hint}")
    return _patch_instance(family, model, options)


def remove_from(family):
    """Undoes the family's class-level patch: its modeling module builds transformers' own modules again and the
    CausalLM forward is the original. Models built while the patch was on keep their Aquila modules (they remain
    correct)."""
    _set_classes(family, None)


# --- The families -----------------------------------------------------------------------------------------------------
# Each module defines its family on the shared pieces above (hence imported last).

from .gemma import (  # noqa: E402
    AquilaGemmaAttention,
    AquilaGemmaMLP,
    AquilaGemmaRMSNorm,
    apply_aquila_kernels_to_gemma,
    remove_aquila_kernels_from_gemma,
)
from .gemma2 import (  # noqa: E402
    AquilaGemma2Attention,
    AquilaGemma2MLP,
    AquilaGemma2RMSNorm,
    apply_aquila_kernels_to_gemma2,
    remove_aquila_kernels_from_gemma2,
)
from .llama import (  # noqa: E402, F401  (transformers' Llama originals: names of the module before the package)
    ORIGINAL_ATTENTION,
    ORIGINAL_CAUSAL_LM_FORWARD,
    ORIGINAL_RMS_NORM,
    AquilaLlamaAttention,
    AquilaLlamaMLP,
    AquilaLlamaRMSNorm,
    apply_aquila_kernels_to_llama,
    aquila_causal_lm_forward,
    remove_aquila_kernels_from_llama,
)
from .mistral import (  # noqa: E402
    AquilaMistralAttention,
    AquilaMistralMLP,
    AquilaMistralRMSNorm,
    apply_aquila_kernels_to_mistral,
    remove_aquila_kernels_from_mistral,
)
from .mixtral import (  # noqa: E402
    AquilaMixtralAttention,
    AquilaMixtralExperts,
    AquilaMixtralRMSNorm,
    apply_aquila_kernels_to_mixtral,
    remove_aquila_kernels_from_mixtral,
)
from .phi3 import (  # noqa: E402
    AquilaPhi3Attention,
    AquilaPhi3MLP,
    AquilaPhi3RMSNorm,
    apply_aquila_kernels_to_phi3,
    remove_aquila_kernels_from_phi3,
)
from .qwen2 import (  # noqa: E402
    AquilaQwen2Attention,
    AquilaQwen2MLP,
    AquilaQwen2RMSNorm,
    apply_aquila_kernels_to_qwen2,
    remove_aquila_kernels_from_qwen2,
)
from .qwen3 import (  # noqa: E402
    AquilaQwen3Attention,
    AquilaQwen3MLP,
    AquilaQwen3RMSNorm,
    apply_aquila_kernels_to_qwen3,
    remove_aquila_kernels_from_qwen3,
)

__all__ = ["FALLBACK_REASONS", "fallback_counts", "kernel_counts", "reset_counts",
           "AquilaGemmaAttention", "AquilaGemmaMLP", "AquilaGemmaRMSNorm", "apply_aquila_kernels_to_gemma",
           "remove_aquila_kernels_from_gemma", "AquilaGemma2Attention", "AquilaGemma2MLP", "AquilaGemma2RMSNorm",
           "apply_aquila_kernels_to_gemma2", "remove_aquila_kernels_from_gemma2", "AquilaLlamaAttention",
           "AquilaLlamaMLP", "AquilaLlamaRMSNorm", "apply_aquila_kernels_to_llama",
           "remove_aquila_kernels_from_llama", "AquilaMistralAttention", "AquilaMistralMLP", "AquilaMistralRMSNorm",
           "apply_aquila_kernels_to_mistral", "remove_aquila_kernels_from_mistral", "AquilaMixtralAttention",
           "AquilaMixtralExperts", "AquilaMixtralRMSNorm", "apply_aquila_kernels_to_mixtral",
           "remove_aquila_kernels_from_mixtral", "AquilaPhi3Attention", "AquilaPhi3MLP", "AquilaPhi3RMSNorm",
           "apply_aquila_kernels_to_phi3", "remove_aquila_kernels_from_phi3", "AquilaQwen2Attention",
           "AquilaQwen2MLP", "AquilaQwen2RMSNorm", "apply_aquila_kernels_to_qwen2",
           "remove_aquila_kernels_from_qwen2", "AquilaQwen3Attention", "AquilaQwen3MLP", "AquilaQwen3RMSNorm",
           "apply_aquila_kernels_to_qwen3", "remove_aquila_kernels_from_qwen3"]
