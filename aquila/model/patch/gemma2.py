"""Gemma 2 (Gemma2ForCausalLM): Gemma (its RMSNorm with 1 + weight in fp32, GeGLU MLP, scaled embeddings) plus norms
before and after the MLP (pre_feedforward_layernorm, post_feedforward_layernorm: Gemma2RMSNorm modules, so on Aquila's
rms_norm with the others), attention logit softcapping (attn_logit_softcapping, on the kernel's softcap where it has
one), sliding-window layers alternating with full ones (the module's sliding_window), queries scaled by
query_pre_attn_scalar^-0.5 (the module's scaling, which the kernel takes), and final logit softcapping, which the fused
loss applies (linear_cross_entropy's softcap)."""

from typing import Optional

from transformers.models.gemma2 import modeling_gemma2

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

GEMMA2 = Family("gemma2", modeling_gemma2, modeling_gemma2.Gemma2ForCausalLM, norm="Gemma2RMSNorm",
               attention="Gemma2Attention", mlp="Gemma2MLP", mlp_flag="geglu")


class AquilaGemma2RMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with Gemma2RMSNorm's constructor and attribute names: the scale is 1 + weight (zeros
    at init)."""

    family = GEMMA2
    weight_offset = 1.0


class AquilaGemma2Attention(PatchedAttention, GEMMA2.originals["attention"]):
    """Gemma2Attention on Aquila's rotary and attention kernels."""

    family = GEMMA2


class AquilaGemma2MLP(PatchedGatedMLP, GEMMA2.originals["mlp"]):
    """Gemma2MLP with its GeGLU (tanh-approximated gelu) on Aquila's geglu."""

    family = GEMMA2


aquila_gemma2_causal_lm_forward = fused_loss_forward(GEMMA2, __name__, "aquila_gemma2_causal_lm_forward")
GEMMA2.define(aquila_gemma2_causal_lm_forward, norm=AquilaGemma2RMSNorm, attention=AquilaGemma2Attention,
             mlp=AquilaGemma2MLP)


def apply_aquila_kernels_to_gemma2(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                  cross_entropy: bool = True, geglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' Gemma2ForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; geglu: the MLP's gated activation)."""
    options = checked_options(GEMMA2, rms_norm, rotary, attention, cross_entropy, geglu, backend)
    return apply_to(GEMMA2, model, options)


def remove_aquila_kernels_from_gemma2():
    """Undoes the class-level patch of modeling_gemma2 and Gemma2ForCausalLM.forward."""
    remove_from(GEMMA2)
