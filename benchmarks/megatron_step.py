"""Megatron-core's contender of the whole-training-step benchmark (benchmarks/training_step.py builds it): the
original Aquila was trained with Megatron + DeepSpeed ZeRO-2, so this is the seed's own baseline.

A LLaMA-shaped GPTModel from Megatron-core's local layer spec (its own modules, no Transformer Engine or Apex):
RMSNorm, SwiGLU, rotary over halves (Hugging Face's layout, as Aquila's default), fused QKV, no biases, separate input
embedding and output layer. Under Megatron's DistributedDataParallel (contiguous gradient buffers, bucketed
reductions overlapped with backward) with either its distributed optimizer (optimizer states, and in bf16 the fp32
main params, sharded over the processes; gradients reduce-scattered and parameters all-gathered: ZeRO-1 with ZeRO-2's
communication, the full gradient buffer kept on every process) or its plain optimizer (gradients all-reduced). In
bf16 (args.precision, on CPU as on GPU) it trains as Megatron does with bf16=True: bf16 parameters (params_dtype)
behind its Float16Module (which casts floating-point inputs to bf16 and the per-token loss back to fp32); gradients
accumulated and reduced in fp32 (grad_reduce_in_fp32, Megatron's --accumulate-allreduce-grads-in-fp32); fp32 main
params and AdamW state in its optimizer (Float16OptimizerWithFloat16Params, or the distributed optimizer's fp32
shards), copied into the bf16 parameters after each step. Aquila instead keeps fp32 parameters and computes in bf16
under autocast; both reduce gradients in fp32. No part of this needs more than the shims below on CPU.
Megatron's training loop, in one function: zero the gradient buffers, forward, backward, finish the gradient sync,
the optimizer's step with clipping.

The same optimizer as the other contenders: Megatron-core falls back to torch's AdamW without Transformer Engine or
Apex, and its parameter groups are told fused=True, as torch_step's AdamW; weight decay 0.1 on every parameter
(Megatron would leave norms and biases out by default). Megatron's clipping is its own code (the global L2 norm from
the local multi-tensor fallbacks), to 1.0.

Megatron-core assumes CUDA in places that have nothing to do with the model's math; on CPU, cuda_on_cpu() points
those at the CPU, in this process only (the library never sees it):
- torch.cuda.current_device(), the device of its gradient buffers and rotary frequencies: the CPU;
- device="cuda" written out in tensor factories (the causal attention mask, the optimizer's found-inf flag, the norm
  of the clipping): the CPU;
- tensor.type() == "torch.cuda.FloatTensor" (or "torch.cuda.BFloat16Tensor"), how its optimizers and clipping
  tell fp32 parameters from bf16 ones, which get fp32 main params: a CPU tensor reports the CUDA name of its type;
- the CUDA RNG state that model_parallel_cuda_manual_seed seeds and its RNG tracker forks (weight init, dropout
  regions): the CPU generator's.
"""

import logging

import torch


def cuda_on_cpu():
    """Megatron-core's CUDA assumptions pointed at the CPU (see the module's docstring)."""
    from megatron.core.tensor_parallel import random

    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu

    def on_cpu(factory):
        def make(*args, **kwargs):
            if str(kwargs.get("device")).startswith("cuda"):
                kwargs["device"] = cpu
            return factory(*args, **kwargs)

        return make

    for name in ("tensor", "zeros", "ones"):
        setattr(torch, name, on_cpu(getattr(torch, name)))

    tensor_type = torch.Tensor.type

    def cuda_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return tensor_type(self).replace("torch.", "torch.cuda.", 1)
        return tensor_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_type
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # With one generator for both, the tracker's check that initializing weights under its fork leaves the CPU
    # generator alone fails by construction, once per weight: the warning says nothing here.
    logging.getLogger(random.__name__).setLevel(logging.ERROR)


def build(args, device, engine):
    """(step function returning the loss, model) for Megatron-core's GPTModel under its DDP and, for engine "distopt",
    its distributed optimizer; "ddp", its plain optimizer."""
    if engine not in ("distopt", "ddp"):
        raise ValueError(f"megatron: unknown engine {engine!r} (distopt or ddp)")
    if device.type == "cpu":
        cuda_on_cpu()
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer import TransformerConfig

    parallel_state.initialize_model_parallel()  # tensor and pipeline parallel 1: data parallel over every process
    model_parallel_cuda_manual_seed(0)
    bf16 = args.precision == "bf16"
    config = TransformerConfig(num_layers=args.layers, hidden_size=args.dim, num_attention_heads=args.heads,
                               ffn_hidden_size=args.ffn, normalization="RMSNorm", layernorm_epsilon=1e-5,
                               gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                               add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
                               init_method_std=0.02, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=args.vocab,
                     max_sequence_length=args.seq, position_embedding_type="rope", rotary_base=10000,
                     share_embeddings_and_output_weights=False)
    if bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    sharded = engine == "distopt"
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                               use_distributed_optimizer=sharded)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
                        clip_grad=1.0, bf16=bf16, use_distributed_optimizer=sharded),
        [model], config_overrides={})
    for inner in optimizer.chained_optimizers:
        for group in inner.optimizer.param_groups:
            group["fused"] = True

    def step(tokens, targets):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = model(tokens, None, None, labels=targets).float().mean()
        loss.backward()
        finalize_model_grads([model])
        optimizer.step()
        return loss.detach()

    return step, model
