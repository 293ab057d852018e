"""Phi-3 (Phi3ForCausalLM): Llama with the q/k/v projections fused into qkv_proj and the MLP's gate and up projections
into gate_up_proj (both split into views, no copies), an optional sliding window on every layer (the config's), and
RoPE that may rotate only part of each head (partial_rotary_factor < 1: transformers' rotation)."""

from typing import Optional

from transformers.models.phi3 import modeling_phi3

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

PHI3 = Family("phi3", modeling_phi3, modeling_phi3.Phi3ForCausalLM, norm="Phi3RMSNorm", attention="Phi3Attention",
              mlp="Phi3MLP", mlp_flag="swiglu")


class AquilaPhi3RMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with Phi3RMSNorm's constructor and attribute names."""

    family = PHI3


class AquilaPhi3Attention(PatchedAttention, PHI3.originals["attention"]):
    """Phi3Attention on Aquila's rotary and attention kernels, reading q, k and v as views of qkv_proj's output."""

    family = PHI3
    window_in_config = True

    def _project(self, hidden_states, heads_shape):
        query_size = self.config.num_attention_heads * self.head_dim
        key_size = self.num_key_value_heads * self.head_dim
        qkv = self.qkv_proj(hidden_states).split([query_size, key_size, key_size], dim=-1)
        return tuple(t.view(heads_shape) for t in qkv)


class AquilaPhi3MLP(PatchedGatedMLP, PHI3.originals["mlp"]):
    """Phi3MLP with its SwiGLU on Aquila's swiglu, gate and up the two halves of gate_up_proj's output."""

    family = PHI3

    def _activation(self):
        return self.activation_fn

    def _gate_and_up(self, hidden_states):
        return self.gate_up_proj(hidden_states).chunk(2, dim=-1)


aquila_phi3_causal_lm_forward = fused_loss_forward(PHI3, __name__, "aquila_phi3_causal_lm_forward")
PHI3.define(aquila_phi3_causal_lm_forward, norm=AquilaPhi3RMSNorm, attention=AquilaPhi3Attention, mlp=AquilaPhi3MLP)


def apply_aquila_kernels_to_phi3(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                 cross_entropy: bool = True, swiglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' Phi3ForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; swiglu: the MLP's gated activation)."""
    options = checked_options(PHI3, rms_norm, rotary, attention, cross_entropy, swiglu, backend)
    return apply_to(PHI3, model, options)


def remove_aquila_kernels_from_phi3():
    """Undoes the class-level patch of modeling_phi3 and Phi3ForCausalLM.forward."""
    remove_from(PHI3)
