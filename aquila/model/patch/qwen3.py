"""Qwen3 (Qwen3ForCausalLM): Qwen2 without the q/k/v biases, with an RMSNorm over each head of the queries and keys
before the rotary (q_norm, k_norm: Qwen3RMSNorm modules, so on Aquila's rms_norm with the other norms)."""

from typing import Optional

from transformers.models.qwen3 import modeling_qwen3

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

QWEN3 = Family("qwen3", modeling_qwen3, modeling_qwen3.Qwen3ForCausalLM, norm="Qwen3RMSNorm",
               attention="Qwen3Attention", mlp="Qwen3MLP", mlp_flag="swiglu")


class AquilaQwen3RMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with Qwen3RMSNorm's constructor and attribute names (the layers' norms and the per-head
    q_norm, k_norm)."""

    family = QWEN3


class AquilaQwen3Attention(PatchedAttention, QWEN3.originals["attention"]):
    """Qwen3Attention on Aquila's rotary and attention kernels, the per-head q/k norms applied in the projections'
    layout."""

    family = QWEN3

    def _project(self, hidden_states, heads_shape):
        query, key, value = super()._project(hidden_states, heads_shape)
        return self.q_norm(query), self.k_norm(key), value


class AquilaQwen3MLP(PatchedGatedMLP, QWEN3.originals["mlp"]):
    """Qwen3MLP with its SwiGLU on Aquila's swiglu."""

    family = QWEN3


aquila_qwen3_causal_lm_forward = fused_loss_forward(QWEN3, __name__, "aquila_qwen3_causal_lm_forward")
QWEN3.define(aquila_qwen3_causal_lm_forward, norm=AquilaQwen3RMSNorm, attention=AquilaQwen3Attention,
             mlp=AquilaQwen3MLP)


def apply_aquila_kernels_to_qwen3(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                  cross_entropy: bool = True, swiglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' Qwen3ForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; swiglu: the MLP's gated activation)."""
    options = checked_options(QWEN3, rms_norm, rotary, attention, cross_entropy, swiglu, backend)
    return apply_to(QWEN3, model, options)


def remove_aquila_kernels_from_qwen3():
    """Undoes the class-level patch of modeling_qwen3 and Qwen3ForCausalLM.forward."""
    remove_from(QWEN3)
