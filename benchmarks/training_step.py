"""One contender of the whole-training-step benchmark, run by torchrun in each of its processes (benchmarks/
test_training_step.py launches it). Every contender trains the same LLaMA-shaped model from the same seed on the same
random batches, with the same global batch, AdamW settings and clipping, for warm-up steps then timed steps, and the
main process prints one JSON line: the precision, seconds per step, tokens/s, the largest peak memory of any process,
the loss, the number of parameters and the dtype they train in. --same-batch trains every step on the first batch: a
check that a contender learns, its loss falling from about ln(vocab) as it memorizes the batch.

Contenders:
- aquila: Aquila's model on its fused kernels (RMSNorm + residual, rotary, flash attention, linear cross-entropy),
  FSDP2 with ZeRO-2 (reshard_after_forward=False), fused AdamW: what `aquila pretrain` runs; or (--engine ddp) the
  same under DDP.
- deepspeed: transformers' LlamaForCausalLM with eager attention and its eager loss under DeepSpeed ZeRO stage 2 (on
  CPU with DS_ACCELERATOR=cpu, over gloo), the stack FlagAI users were pointed to. Its optimizer is torch's fused
  AdamW, the same as ours (DeepSpeed's CPU Adam needs a compiled op), so the comparison is of everything else.
- compile: the same transformers model with SDPA attention, torch.compile'd, under DDP, fused AdamW.
- megatron: Megatron-core's LLaMA-shaped GPTModel under its DDP with its distributed optimizer (--engine distopt) or
  its plain one (--engine ddp), torch's fused AdamW inside (benchmarks/megatron_step.py).

--precision fp32 trains everything in fp32. --precision bf16 trains each contender the way its own stack does mixed
precision, on CPU as on GPU; every one keeps fp32 master weights and fp32 AdamW state, and they differ in what they
hold in bf16 and in what precision they reduce gradients:
- aquila: as its trainer (aquila/train/trainer.py, aquila/train/engine.py wrap): fp32 parameters; the forward under
  torch.autocast(bf16), so the matmuls, attention and the fused loss run in bf16 while the residual stream stays
  fp32. FSDP2 gathers the parameters in bf16 and reduce-scatters the gradients in fp32 (its MixedPrecisionPolicy);
  DDP all-reduces the fp32 gradients of the fp32 parameters.
- deepspeed: its config's "bf16": {"enabled": true}, nothing else changed: DeepSpeed casts the model to bf16 and its
  ZeRO-2 optimizer (DeepSpeedZeroOptimizer, which handles bf16 itself at stage 2; its separate BF16_Optimizer wrapper
  is for stages 0 and 1) keeps each process's shard of fp32 master weights, on which torch's fused AdamW steps.
  Gradients are bf16 and reduced in bf16 (its default communication_data_type), then widened into the fp32 shard.
  Both wrappers run on CPU with torch's fused AdamW (the CPU accelerator reports bf16 support).
- compile: fp32 parameters, the compiled forward under torch.autocast("cpu" or "cuda", bf16), DDP all-reducing fp32
  gradients: the torch recipe.
- megatron: bf16=True: bf16 parameters (params_dtype) behind its Float16Module, fp32 gradient buffers
  (grad_reduce_in_fp32, reduced in fp32), fp32 main params in its optimizer (Float16OptimizerWithFloat16Params; with
  the distributed optimizer, sharded over the processes) copied back into the bf16 parameters after each step.
On a CPU without AMX or AVX512-BF16, every bf16 matmul converts to fp32 and back (about 20x slower than fp32 on
AVX2-only hosts, aquila/train/precision.py): the bf16 runs are measured there all the same, every contender alike.
"""

import argparse
import contextlib
import gc
import json
import os
import resource
import time

import torch
import torch.distributed as dist

# Each contender's engines, its default first.
ENGINES = {"aquila": ("fsdp", "ddp"), "megatron": ("distopt", "ddp"), "deepspeed": ("zero2",), "compile": ("ddp",)}


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def llama_config(args, attention):
    import transformers

    return transformers.LlamaConfig(hidden_size=args.dim, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, num_key_value_heads=args.heads,
                                    intermediate_size=args.ffn, vocab_size=args.vocab, rms_norm_eps=1e-5,
                                    max_position_embeddings=args.seq, use_cache=False, tie_word_embeddings=False,
                                    attn_implementation=attention)


def autocast(device, bf16):
    """bf16 compute for the forward, as Aquila's trainer runs it (Trainer.autocast); nothing in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def torch_step(model, loss_of):
    """forward, backward, clipping at 1.0 and a fused AdamW step, as the trainer does."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step(tokens, targets):
        loss = loss_of(tokens, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def build(args, device, world):
    """(step function returning the loss, model) for the contender."""
    torch.manual_seed(0)
    bf16 = args.precision == "bf16"
    if args.impl == "aquila":
        from aquila.model.config import AquilaConfig
        from aquila.model.model import Aquila
        from aquila.train.engine import Processes, wrap

        config = AquilaConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn,
                              vocab_size=args.vocab, max_seq_len=args.seq)
        model = Aquila(config).to(device)
        processes = Processes(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), device)
        # As the trainer: fp32 parameters, wrapped with the compute dtype (FSDP2 gathers them in bf16 and reduces
        # gradients in fp32; DDP ignores it), the forward under autocast.
        model = wrap(model, args.engine, 2, processes, torch.bfloat16 if bf16 else None)

        def loss_of(tokens, targets):
            with autocast(device, bf16):
                return model(tokens, targets)

        return torch_step(model, loss_of), model
    if args.impl == "megatron":
        import megatron_step

        return megatron_step.build(args, device, args.engine)
    import transformers

    if args.impl == "deepspeed":
        import deepspeed

        model = transformers.LlamaForCausalLM(llama_config(args, "eager")).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
            "train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": bf16}, "steps_per_print": 10**9, "wall_clock_breakdown": False})

        def step(tokens, targets):
            loss = engine(input_ids=tokens, labels=targets).loss
            engine.backward(loss)
            engine.step()
            return loss

        return step, model
    if args.impl == "compile":
        model = transformers.LlamaForCausalLM(llama_config(args, "sdpa")).to(device)
        model = torch.nn.parallel.DistributedDataParallel(model)
        compiled = torch.compile(model)

        def loss_of(tokens, targets):
            with autocast(device, bf16):
                return compiled(input_ids=tokens, labels=targets).loss

        return torch_step(model, loss_of), model
    raise ValueError(f"unknown contender {args.impl!r} (one of {', '.join(ENGINES)})")


def main():
    parser = argparse.ArgumentParser()
    for name, default in (("dim", 512), ("layers", 4), ("heads", 8), ("ffn", 1376), ("vocab", 32000),
                          ("batch", 2), ("seq", 512), ("warmup", 2), ("steps", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--impl", required=True, choices=list(ENGINES))
    parser.add_argument("--precision", required=True, choices=("fp32", "bf16"),
                        help="fp32, or bf16 as each contender's own stack trains in it (see the module's docstring)")
    parser.add_argument("--same-batch", action="store_true", help="train every step on the first batch")
    parser.add_argument("--engine", help="aquila: fsdp (default) or ddp; megatron: distopt (its distributed "
                                          "optimizer, default) or ddp; deepspeed: zero2; compile: ddp")
    args = parser.parse_args()
    engines = ENGINES[args.impl]
    args.engine = args.engine or engines[0]
    if args.engine not in engines:
        parser.error(f"--engine {args.engine}: {args.impl} runs under {' or '.join(engines)}")
    for name in ("dim", "layers", "heads", "ffn", "vocab", "batch", "seq", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    step, model = build(args, device, world)
    parameters = sum(parameter.numel() for parameter in model.parameters())  # FSDP's DTensors count whole
    # The dtype the model's parameters train in, as built (DeepSpeed and Megatron cast theirs to bf16 in bf16).
    parameter_dtypes = sorted({str(parameter.dtype).removeprefix("torch.") for parameter in model.parameters()})
    del model
    generator = torch.Generator().manual_seed(1 + rank)  # each process its own share of the global batch
    count = args.warmup + args.steps
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator)
               for _ in range(1 if args.same_batch else count)]
    if args.same_batch:
        batches *= count
    losses = []
    for index, batch in enumerate(batches):
        if index == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
        tokens, targets = batch[:, :-1].to(device), batch[:, 1:].to(device)
        losses.append(float(step(tokens, targets).detach()))
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.tensor([float(peak_memory_bytes(device))])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"impl": args.impl, "precision": args.precision, "seconds_per_step": seconds,
                          "processes": world,
                          "tokens_per_s": world * args.batch * args.seq / seconds, "peak_memory_bytes": peak.item(),
                          "losses": losses, "parameters": parameters,
                          "parameter_dtypes": parameter_dtypes}))
    # The model, its optimizer and FSDP's state (in reference cycles that hold process groups) go before the
    # process groups do: left to the interpreter's exit, a gloo group can be torn down with its worker threads
    # joinable (an abort).
    del step
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
