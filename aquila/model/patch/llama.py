"""Llama (LlamaForCausalLM): the family the patch was written for; every piece is the shared one (see
aquila.model.patch)."""

from typing import Optional

from transformers.models.llama import modeling_llama

from . import (
    Family,
    PatchedAttention,
    PatchedGatedMLP,
    PatchedRMSNorm,
    apply_to,
    checked_options,
    fused_loss_forward,
    remove_from,
)

LLAMA = Family("llama", modeling_llama, modeling_llama.LlamaForCausalLM, norm="LlamaRMSNorm",
               attention="LlamaAttention", mlp="LlamaMLP", mlp_flag="swiglu")
ORIGINAL_RMS_NORM = LLAMA.originals["norm"]
ORIGINAL_ATTENTION = LLAMA.originals["attention"]
ORIGINAL_MLP = LLAMA.originals["mlp"]
ORIGINAL_CAUSAL_LM_FORWARD = LLAMA.original_forward


class AquilaLlamaRMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with LlamaRMSNorm's constructor and attribute names."""

    family = LLAMA


class AquilaLlamaAttention(PatchedAttention, ORIGINAL_ATTENTION):
    """LlamaAttention on Aquila's rotary and attention kernels."""

    family = LLAMA


class AquilaLlamaMLP(PatchedGatedMLP, ORIGINAL_MLP):
    """LlamaMLP with its SwiGLU on Aquila's swiglu."""

    family = LLAMA


aquila_causal_lm_forward = fused_loss_forward(LLAMA, __name__, "aquila_causal_lm_forward")
LLAMA.define(aquila_causal_lm_forward, norm=AquilaLlamaRMSNorm, attention=AquilaLlamaAttention, mlp=AquilaLlamaMLP)


def apply_aquila_kernels_to_llama(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                  cross_entropy: bool = True, swiglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' LlamaForCausalLM on Aquila's fused kernels.

    model: a LlamaForCausalLM instance (patched in place, and returned); or None / the LlamaForCausalLM class, to patch
        transformers' modeling_llama for models built afterwards (returns None; see remove_aquila_kernels_from_llama).
    rms_norm, rotary, attention, cross_entropy, swiglu: which parts to swap (each falls back to transformers' code
        where the kernel does not apply; see aquila.model.patch's docstring).
    backend: the Aquila backend for every op ("triton", "cpu", "torch"; "cuda" only with attention=False), or None for
        each device's default.
    Applying again replaces the options (a part switched off is restored); parameters are never copied.
    """
    options = checked_options(LLAMA, rms_norm, rotary, attention, cross_entropy, swiglu, backend)
    return apply_to(LLAMA, model, options)


def remove_aquila_kernels_from_llama():
    """Undoes the class-level patch: modeling_llama builds transformers' own modules again and LlamaForCausalLM.forward
    is the original. Models built while the patch was on keep their Aquila modules (they remain correct)."""
    remove_from(LLAMA)
