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

* Rotary: Aquila's kernel computes plain RoPE (``rope_type == "default"``) from the position ids. Scaled RoPE
  variants (linear, dynamic, yarn, llama3, ...), or a call without ``position_ids``, use transformers' cos/sin.
* Attention: Aquila's kernel runs when the mask is plain causal: None, or a materialised 4-D mask equal to the causal
  mask aligned to the last query (what transformers builds from an all-ones ``attention_mask``, with or without a
  KV cache). Padding, packed sequences (position ids restarting), sliding windows, static caches (whose key tensors are
  longer than the filled part), attention dropout in training, ``output_attentions``, flash-attention varlen kwargs or
  a non-causal config run transformers' attention for the configured ``attn_implementation`` instead.
  A transformers ``DynamicCache`` (the default in ``generate``) is supported by the kernels: the cached keys are
  exactly the sequence's, and the causal mask is aligned bottom-right as with a cache.
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
for the fallback. torch.compile of a patched model is not covered by the tests (the mask check reads the mask).
"""

import dataclasses
import functools
import weakref
from typing import Optional

import torch
from torch import Tensor

from aquila import IGNORE_INDEX
from aquila.kernels import RMSNorm, apply_rotary, attention, linear_cross_entropy
from aquila.kernels.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from aquila.kernels.attention import MAX_HEAD_DIM
from aquila.kernels.backend import BACKENDS, FLOAT_DTYPES, UnsupportedBackend

try:
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.models.llama import modeling_llama
    from transformers.utils import can_return_tuple
except ImportError as error:  # transformers is an optional dependency of aquila
    raise ImportError("aquila.model.patch needs transformers: pip install transformers") from error

__all__ = ["AquilaLlamaAttention", "AquilaLlamaRMSNorm", "apply_aquila_kernels_to_llama",
           "remove_aquila_kernels_from_llama"]

# transformers' own classes and forward, captured once at import, so that patching twice never wraps a patch and
# removing the patch restores exactly these.
ORIGINAL_RMS_NORM = modeling_llama.LlamaRMSNorm
ORIGINAL_ATTENTION = modeling_llama.LlamaAttention
ORIGINAL_CAUSAL_LM_FORWARD = modeling_llama.LlamaForCausalLM.forward
LlamaForCausalLM = modeling_llama.LlamaForCausalLM

# Keyword arguments with which transformers hands pre-computed packed-sequence boundaries to flash attention.
VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


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


# --- Attention --------------------------------------------------------------------------------------------------------


class _MaskVerdict:
    """Remembers whether the last mask checked was plain causal. Every layer of one forward receives the same mask
    object, so the check (a comparison over the whole mask, and a host sync on GPU) runs once per forward, not once per
    layer. A weak reference: a mask that is gone can never match a new one that reuses its address."""

    def __init__(self):
        self._last = (None, None, False)  # (weakref to the mask, (q_len, kv_len), verdict), replaced as one tuple

    def is_plain_causal(self, mask, q_len, kv_len):
        if mask is None:
            # transformers skips the mask when q_len == kv_len (causal, any alignment) or q_len == 1 (sees every
            # key) and nothing is padded. A None mask with 1 < q_len < kv_len is the prefill of a static cache,
            # aligned top-left: not what the kernel computes.
            return q_len == kv_len or q_len == 1
        if not isinstance(mask, Tensor):  # a flex-attention BlockMask, or anything else: let transformers run it
            return False
        reference, sizes, verdict = self._last
        if reference is not None and reference() is mask and sizes == (q_len, kv_len):
            return verdict
        verdict = _mask_is_plain_causal(mask, q_len, kv_len)
        self._last = (weakref.ref(mask), (q_len, kv_len), verdict)
        return verdict


def _mask_is_plain_causal(mask, q_len, kv_len):
    """True when a materialised mask (4-D boolean "may attend", or additive float) is exactly the causal mask of
    q_len queries that are the last of kv_len keys, for every batch row and head."""
    if mask.dim() != 4 or tuple(mask.shape[-2:]) != (q_len, kv_len):
        return False  # a 2-D padding mask (flash attention's form) is only passed when something is padded
    query_positions = torch.arange(q_len, device=mask.device)[:, None] + (kv_len - q_len)
    allowed = (torch.arange(kv_len, device=mask.device)[None, :] <= query_positions).expand(mask.shape)
    if mask.dtype == torch.bool:
        return torch.equal(mask, allowed)
    if not mask.is_floating_point():
        return False
    # Additive: exactly 0 where allowed, and so negative elsewhere that the softmax weight is exactly 0 (transformers
    # writes the dtype's minimum; -inf also qualifies).
    blocked_enough = mask <= torch.finfo(mask.dtype).min / 2
    return torch.equal(mask == 0, allowed) and bool((allowed | blocked_enough).all())


_mask_verdict = _MaskVerdict()


class AquilaLlamaAttention(ORIGINAL_ATTENTION):
    """transformers' LlamaAttention (same parameters, same names) whose forward runs Aquila's rotary and attention
    kernels, falling back to transformers' code paths where those do not apply (see the module docstring)."""

    def __init__(self, config, layer_idx):
        super().__init__(config, layer_idx)
        # Built by a class-patched modeling_llama: take that patch's options.
        self.aquila_options = class_patch_options or PatchOptions()

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if cache is None and "past_key_values" in kwargs:  # transformers' deprecated name for the cache
            cache = kwargs.pop("past_key_values")
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

        if options.attention and self._kernel_can_attend(query, key, attention_mask, cache, kwargs):
            output = attention(query, key, value, causal=True, scale=self.scaling, backend=options.backend)
            weights = None
        else:
            interface = modeling_llama.ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, modeling_llama.eager_attention_forward)
            output, weights = interface(self, query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                        attention_mask, dropout=self.attention_dropout if self.training else 0.0,
                                        scaling=self.scaling, **kwargs)
        output = output.reshape(*token_shape, -1).contiguous()
        return self.o_proj(output), weights

    def _rotate(self, query, key, position_embeddings, position_ids, options):
        rope = getattr(self.config, "rope_parameters", None) or {}
        plain_rope = rope.get("rope_type", "default") == "default" and "rope_theta" in rope
        if options.rotary and plain_rope and isinstance(position_ids, Tensor):
            # The kernel computes cos/sin itself from the positions, in fp32 with an exact angle.
            return apply_rotary(query, key, position_ids, theta=float(rope["rope_theta"]), interleaved=False,
                                backend=options.backend)
        # Scaled RoPE variants (or no position ids): transformers' cos/sin, through the module-level function so that
        # whatever is installed there (the original or another library's) runs, in its own [b, h, s, d] layout.
        cos, sin = position_embeddings
        query, key = modeling_llama.apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query.transpose(1, 2), key.transpose(1, 2)

    def _kernel_can_attend(self, query, key, attention_mask, cache, kwargs):
        """Whether Aquila's causal attention computes exactly what transformers' would here."""
        if self.training and self.attention_dropout > 0:
            return False  # the kernel has no dropout
        if kwargs.get("output_attentions") or getattr(self.config, "output_attentions", False):
            return False  # the kernel never forms the attention weights
        if any(kwargs.get(name) is not None for name in VARLEN_KWARGS):
            return False
        if not (getattr(self.config, "is_causal", True) and self.is_causal):
            return False
        if query.dtype not in FLOAT_DTYPES or not 1 <= query.shape[-1] <= MAX_HEAD_DIM:
            return False
        q_len, kv_len = query.shape[1], key.shape[1]
        if cache is not None:
            # The kernel attends to every key it is given: only right when the cache returned exactly the filled
            # positions (a DynamicCache), not a static or sliding buffer.
            try:
                if cache.get_seq_length(self.layer_idx) != kv_len:
                    return False
            except (ValueError, IndexError, AttributeError):
                return False
        return _mask_verdict.is_plain_causal(attention_mask, q_len, kv_len)


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


@can_return_tuple
def aquila_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                             inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """LlamaForCausalLM.forward with the fused linear cross-entropy: in training mode with labels, the loss comes
    from the last hidden states and returned logits are None; otherwise the original forward runs."""
    if cache is None and "past_key_values" in kwargs:  # transformers' deprecated name for the cache
        cache = kwargs.pop("past_key_values")
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
