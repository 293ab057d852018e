"""Mistral (MistralForCausalLM): Llama with a sliding window on every layer (config.sliding_window, None for none)."""

from typing import Optional

from transformers.models.mistral import modeling_mistral

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

MISTRAL = Family("mistral", modeling_mistral, modeling_mistral.MistralForCausalLM, norm="MistralRMSNorm",
                 attention="MistralAttention", mlp="MistralMLP", mlp_flag="swiglu")


class AquilaMistralRMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with MistralRMSNorm's constructor and attribute names."""

    family = MISTRAL


class AquilaMistralAttention(PatchedAttention, MISTRAL.originals["attention"]):
    """MistralAttention on Aquila's rotary and attention kernels, its window the config's."""

    family = MISTRAL
    window_in_config = True


class AquilaMistralMLP(PatchedGatedMLP, MISTRAL.originals["mlp"]):
    """MistralMLP with its SwiGLU on Aquila's swiglu."""

    family = MISTRAL


aquila_mistral_causal_lm_forward = fused_loss_forward(MISTRAL, __name__, "aquila_mistral_causal_lm_forward")
MISTRAL.define(aquila_mistral_causal_lm_forward, norm=AquilaMistralRMSNorm, attention=AquilaMistralAttention,
               mlp=AquilaMistralMLP)


def apply_aquila_kernels_to_mistral(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                    cross_entropy: bool = True, swiglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' MistralForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; swiglu: the MLP's gated activation)."""
    options = checked_options(MISTRAL, rms_norm, rotary, attention, cross_entropy, swiglu, backend)
    return apply_to(MISTRAL, model, options)


def remove_aquila_kernels_from_mistral():
    """Undoes the class-level patch of modeling_mistral and MistralForCausalLM.forward."""
    remove_from(MISTRAL)
