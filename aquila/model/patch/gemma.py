"""Gemma (GemmaForCausalLM): RMSNorm scaling by 1 + weight with all of it in fp32 (Aquila's offset=1.0 and "gemma"
casting), a GeGLU MLP (gelu_pytorch_tanh: Aquila's geglu with approximate="tanh"), and embeddings scaled by
sqrt(hidden_size) (transformers' GemmaTextScaledWordEmbedding, not patched)."""

from typing import Optional

from transformers.models.gemma import modeling_gemma

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

GEMMA = Family("gemma", modeling_gemma, modeling_gemma.GemmaForCausalLM, norm="GemmaRMSNorm",
               attention="GemmaAttention", mlp="GemmaMLP", mlp_flag="geglu")


class AquilaGemmaRMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with GemmaRMSNorm's constructor and attribute names: the scale is 1 + weight (zeros
    at init)."""

    family = GEMMA
    weight_offset = 1.0


class AquilaGemmaAttention(PatchedAttention, GEMMA.originals["attention"]):
    """GemmaAttention on Aquila's rotary and attention kernels."""

    family = GEMMA


class AquilaGemmaMLP(PatchedGatedMLP, GEMMA.originals["mlp"]):
    """GemmaMLP with its GeGLU (tanh-approximated gelu) on Aquila's geglu."""

    family = GEMMA


aquila_gemma_causal_lm_forward = fused_loss_forward(GEMMA, __name__, "aquila_gemma_causal_lm_forward")
GEMMA.define(aquila_gemma_causal_lm_forward, norm=AquilaGemmaRMSNorm, attention=AquilaGemmaAttention,
             mlp=AquilaGemmaMLP)


def apply_aquila_kernels_to_gemma(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                  cross_entropy: bool = True, geglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' GemmaForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; geglu: the MLP's gated activation)."""
    options = checked_options(GEMMA, rms_norm, rotary, attention, cross_entropy, geglu, backend)
    return apply_to(GEMMA, model, options)


def remove_aquila_kernels_from_gemma():
    """Undoes the class-level patch of modeling_gemma and GemmaForCausalLM.forward."""
    remove_from(GEMMA)
