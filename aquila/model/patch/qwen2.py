"""Qwen2 (Qwen2ForCausalLM): Llama with q/k/v biases (the projections' own) and optional sliding-window layers
(use_sliding_window: the layers from max_window_layers on), whose window is the attention module's sliding_window."""

from typing import Optional

from transformers.models.qwen2 import modeling_qwen2

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

QWEN2 = Family("qwen2", modeling_qwen2, modeling_qwen2.Qwen2ForCausalLM, norm="Qwen2RMSNorm",
               attention="Qwen2Attention", mlp="Qwen2MLP", mlp_flag="swiglu")


class AquilaQwen2RMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with Qwen2RMSNorm's constructor and attribute names."""

    family = QWEN2


class AquilaQwen2Attention(PatchedAttention, QWEN2.originals["attention"]):
    """Qwen2Attention on Aquila's rotary and attention kernels."""

    family = QWEN2


class AquilaQwen2MLP(PatchedGatedMLP, QWEN2.originals["mlp"]):
    """Qwen2MLP with its SwiGLU on Aquila's swiglu."""

    family = QWEN2


aquila_qwen2_causal_lm_forward = fused_loss_forward(QWEN2, __name__, "aquila_qwen2_causal_lm_forward")
QWEN2.define(aquila_qwen2_causal_lm_forward, norm=AquilaQwen2RMSNorm, attention=AquilaQwen2Attention,
             mlp=AquilaQwen2MLP)


def apply_aquila_kernels_to_qwen2(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                  cross_entropy: bool = True, swiglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' Qwen2ForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; swiglu: the MLP's gated activation)."""
    options = checked_options(QWEN2, rms_norm, rotary, attention, cross_entropy, swiglu, backend)
    return apply_to(QWEN2, model, options)


def remove_aquila_kernels_from_qwen2():
    """Undoes the class-level patch of modeling_qwen2 and Qwen2ForCausalLM.forward."""
    remove_from(QWEN2)
