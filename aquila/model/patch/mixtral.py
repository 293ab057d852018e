"""Mixtral (MixtralForCausalLM): Mistral's attention (a sliding window on every layer, the config's) with a sparse
mixture of SwiGLU experts. transformers 5 stores the experts' weights as 3-D tensors (MixtralExperts: gate_up_proj
[experts, 2 x intermediate, hidden], down_proj) and runs them, by default, as grouped matmuls over the tokens sorted by
expert (config._experts_implementation "grouped_mm"; or "batched_mm"), both of which call the experts' _apply_gate on
the gate_up output of every (token, expert) pair: Aquila's swiglu runs there, between the two grouped matmuls, which
stay transformers'. The "eager" expert loop computes its activation inline and keeps it. The fused loss adds the
router's load-balancing loss as transformers does (output_router_logits)."""

from typing import Optional

from transformers.modeling_outputs import MoeCausalLMOutputWithPast
from transformers.models.mixtral import modeling_mixtral

from . import (
    Family,
    PatchedAttention,
    PatchedModule,
    PatchedRMSNorm,
    _fused_gate,
    _fuses,
    apply_to,
    checked_options,
    fused_loss_forward,
    remove_from,
)

MIXTRAL = Family("mixtral", modeling_mixtral, modeling_mixtral.MixtralForCausalLM, norm="MixtralRMSNorm",
                 attention="MixtralAttention", mlp="MixtralExperts", mlp_flag="swiglu")


class AquilaMixtralRMSNorm(PatchedRMSNorm):
    """Aquila's RMSNorm with MixtralRMSNorm's constructor and attribute names."""

    family = MIXTRAL


class AquilaMixtralAttention(PatchedAttention, MIXTRAL.originals["attention"]):
    """MixtralAttention on Aquila's rotary and attention kernels, its window the config's."""

    family = MIXTRAL
    window_in_config = True


class AquilaMixtralExperts(PatchedModule, MIXTRAL.originals["mlp"]):
    """MixtralExperts whose gating (silu(gate) * up of each selected pair) runs on Aquila's swiglu."""

    family = MIXTRAL

    def _apply_gate(self, gate_up_out):
        if not _fuses(self.act_fn):
            return super()._apply_gate(gate_up_out)
        gate, up = gate_up_out.chunk(2, dim=-1)
        return _fused_gate(self.act_fn, gate, up, self.aquila_options.backend)


def _router_arguments(model, kwargs):
    requested = kwargs.pop("output_router_logits", None)
    return {"output_router_logits": model.config.output_router_logits if requested is None else requested}


def _moe_output(model, outputs, loss, attention_mask, arguments):
    aux_loss = None
    if arguments["output_router_logits"]:
        aux_loss = modeling_mixtral.load_balancing_loss_func(outputs.router_logits, model.num_experts,
                                                             model.num_experts_per_tok, attention_mask)
        loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
    return MoeCausalLMOutputWithPast(loss=loss, aux_loss=aux_loss, logits=None, cache=outputs.cache,
                                     hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                     router_logits=outputs.router_logits)


aquila_mixtral_causal_lm_forward = fused_loss_forward(MIXTRAL, __name__, "aquila_mixtral_causal_lm_forward",
                                                      model_kwargs=_router_arguments, output=_moe_output)
MIXTRAL.define(aquila_mixtral_causal_lm_forward, norm=AquilaMixtralRMSNorm, attention=AquilaMixtralAttention,
               mlp=AquilaMixtralExperts)


def apply_aquila_kernels_to_mixtral(model=None, *, rms_norm: bool = True, rotary: bool = True, attention: bool = True,
                                    cross_entropy: bool = True, swiglu: bool = True, backend: Optional[str] = None):
    """Runs transformers' MixtralForCausalLM on Aquila's fused kernels, as apply_aquila_kernels_to_llama does a Llama
    (same arguments; swiglu: the experts' gated activation, under the grouped_mm and batched_mm expert
    implementations)."""
    options = checked_options(MIXTRAL, rms_norm, rotary, attention, cross_entropy, swiglu, backend)
    return apply_to(MIXTRAL, model, options)


def remove_aquila_kernels_from_mixtral():
    """Undoes the class-level patch of modeling_mixtral and MixtralForCausalLM.forward."""
    remove_from(MIXTRAL)
