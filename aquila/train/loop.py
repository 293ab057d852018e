"""The training loop, shared by pretraining and SFT.

Semantics (FlagAI got several of these wrong):
- The loss of an optimizer step is the mean over every target token of all its micro-batches on all processes:
  each micro-batch's summed loss is divided by that global count (counted before the forward passes), so gradient
  accumulation over k micro-batches equals one batch k times larger, and 2 processes equal 1 with the same global
  batch.
- Gradients are clipped once per optimizer step, by their global norm; the learning rate (linear warm-up, then cosine
  to min_lr_ratio of the peak) is set once per optimizer step; norms and biases get no weight decay.
- Precision: fp32 on CPU; on GPU bf16 autocast (FSDP: bf16 parameter gathers, fp32 gradient reduction) with fp32 master
  weights and AdamW state; fp16 with dynamic loss scaling. A step whose loss or gradient norm is not finite is skipped
  (no update) and logged; max_nonfinite_steps of them in a row stop the run with a message.
- SIGTERM or Ctrl-C: the step in flight finishes, a checkpoint is written, the run exits cleanly (a second Ctrl-C
  aborts at once).
"""

import contextlib
import math
import os
import resource
import signal
import time
from typing import Callable, Optional

import torch

from aquila.data.tokenizer import Tokenizer
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila
from aquila.train import engine as engines
from aquila.train.checkpoint import Checkpoints, resolve as resolve_checkpoint
from aquila.train.config import DEFAULT_STEPS, TrainConfig
from aquila.data import demo_file
from aquila.train.data import make_data, to_device
from aquila.train.metrics import MetricsLog, flops_per_token, peak_flops, plot


class NonFiniteLossError(RuntimeError):
    pass


def learning_rate(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warm-up over the first warm-up steps, then cosine decay to min_lr_ratio * lr at the last step."""
    warmup = config.warm_up if config.warm_up >= 1 else config.warm_up * total_steps
    warmup = int(round(warmup))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - 1 - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear layers, embeddings) only: never on norm weights or biases."""
    decayed = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def load_tokenizer(config: TrainConfig) -> Tokenizer:
    if config.tokenizer:
        return Tokenizer.load(config.tokenizer)
    if os.path.isdir(config.model):
        return Tokenizer.load(resolve_checkpoint(config.model))
    return Tokenizer.load(demo_file("tokenizer"))


def build_model(config: TrainConfig, tokenizer: Tokenizer, device: torch.device) -> Aquila:
    """A fresh model of a preset (its weights drawn from the seed, identical on every process), or the weights of a
    checkpoint directory (SFT, continued pretraining)."""
    if os.path.isdir(config.model):
        from aquila.model.checkpoint import load

        if config.model_overrides:
            raise ValueError("model_overrides apply to presets, not to a checkpoint's model")
        model = load(resolve_checkpoint(config.model), device=device)
    else:
        model_config = AquilaConfig(**{**AquilaConfig.preset(config.model).to_dict(), **config.model_overrides})
        if model_config.max_seq_len < config.seq_len:
            model_config = AquilaConfig(**{**model_config.to_dict(), "max_seq_len": config.seq_len})
        with torch.device("meta"):
            model = Aquila(model_config)
        model.to_empty(device=device)
        torch.manual_seed(config.seed)
        model.init_weights()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary only "
                         f"{model.config.vocab_size}")
    model.activation_checkpointing = config.activation_checkpointing
    return model


def resolve_precision(config: TrainConfig, device: torch.device) -> torch.dtype:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def total_steps(config: TrainConfig, tokens_per_epoch: int, samples_per_epoch: Optional[int],
                global_batch: int) -> int:
    if config.steps is not None:
        return config.steps
    if config.train_tokens is None and config.epochs is None:
        return DEFAULT_STEPS
    if config.train_tokens is not None:
        return max(1, math.ceil(config.train_tokens / (global_batch * config.seq_len)))
    if samples_per_epoch is not None:  # SFT: an epoch is a pass over the packed conversations
        return max(1, math.ceil((config.epochs or 1) * samples_per_epoch / global_batch))
    return max(1, math.ceil((config.epochs or 1) * tokens_per_epoch / (global_batch * config.seq_len)))


class StopFlag:
    """Set by SIGTERM or the first Ctrl-C; the loop checks it between steps."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self.previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def evaluate(model, data, processes, autocast) -> Optional[dict]:
    if data.valid is None:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=processes.device)
    for batch in data.valid_batches():
        batch = to_device(batch, processes.device)
        with autocast():
            summed = model(batch["tokens"], batch["targets"], positions=batch["positions"],
                           cu_seqlens=batch["cu_seqlens"], num_tokens=1.0)
        total += torch.stack([summed.double(), (batch["targets"] != -100).sum().double()])
    model.train()
    loss_sum, count = engines.all_reduce_sum(total, processes).tolist()
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs the configured training; returns a summary (steps, losses, checkpoint path, ...)."""
    processes = engines.init_processes(config.engine, config.seed)
    try:
        return _train(config, resume, processes, log if processes.is_main else (lambda message: None))
    finally:
        engines.close(processes)


def _train(config: TrainConfig, resume: bool, processes: engines.Processes, log) -> dict:
    engine = engines.resolve_engine(config.engine, processes)
    device = processes.device
    os.makedirs(config.output_dir, exist_ok=True)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config)
    data = make_data(config, tokenizer, processes)
    global_batch = config.batch_size * config.gradient_accumulation_steps * processes.world_size
    steps = total_steps(config, data.tokens_per_epoch, data.samples_per_epoch, global_batch)
    data.build(steps * global_batch)
    if getattr(data, "description", None):
        log(data.description)

    model = build_model(config, tokenizer, device)
    data.check_vocabulary(model.config.vocab_size)
    dtype = resolve_precision(config, device)
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"precision {config.precision} needs a GPU; on CPU train in fp32 (precision: fp32 or auto)")
    wrapped = engines.wrap(model, engine, config.zero_stage, processes, None if dtype == torch.float32 else dtype)
    if engine == "fsdp" or dtype == torch.float32:  # FSDP casts through its policy; fp32 needs no autocast
        autocast = contextlib.nullcontext
    else:
        autocast = lambda: torch.autocast(device.type, dtype=dtype)  # noqa: E731
    optimization = engines.optimization(engine, wrapped, parameter_groups(wrapped, config.weight_decay), config,
                                        dtype, device)
    checkpoints = Checkpoints(config.output_dir, processes, config.keep_checkpoints)
    start, skipped_in_a_row = 0, 0
    if resume:
        state = checkpoints.load_latest(optimization, log)
        if state is None:
            log(f"no checkpoint in {checkpoints.directory}: starting from scratch")
        else:
            start, skipped_in_a_row = state["step"], state["skipped_in_a_row"]
            optimization.load_state_dict(state["optimization"])
            log(f"resumed from {state['path']} at step {start}")
    if processes.is_main:
        config.save(os.path.join(config.output_dir, "config.yaml"))

    def save_checkpoint(step: int, skipped_in_a_row: int) -> str:
        state = {"skipped_in_a_row": skipped_in_a_row, "optimization": optimization.state_dict(),
                 "total_steps": steps}
        return checkpoints.save(step, optimization, state, model.config, tokenizer)
    metrics = MetricsLog(config.output_dir, processes.is_main, config.tensorboard)
    flops_token = flops_per_token(model.config, config.seq_len)
    peak, peak_source = peak_flops(device, config.peak_tflops)
    log(f"{engine} on {processes.world_size} x {device.type}, {dtype}: {model.config.num_parameters() / 1e6:.1f}M "
        f"parameters, {steps} steps of {global_batch} x {config.seq_len} tokens "
        f"(MFU against {peak / 1e12:.2f} TFLOP/s per device, {peak_source})")

    progress = None
    if processes.is_main and config.progress:
        from tqdm import tqdm

        progress = tqdm(total=steps, initial=start, unit="step", dynamic_ncols=True, mininterval=0.5)
    losses, window = [], {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
    last_step = start
    with StopFlag() as stop:
        for step in range(start, steps):
            lr = learning_rate(step, steps, config)
            optimization.set_lr(lr)
            micro_batches = [to_device(data.batch(step, m), device) for m in range(config.gradient_accumulation_steps)]
            local_tokens = sum(int((b["targets"] != -100).sum()) for b in micro_batches)
            global_tokens = engines.all_reduce_sum(torch.tensor(float(local_tokens), device=device), processes)
            # Each process divides by its share of the global count: the engines average gradients over processes.
            share = max(float(global_tokens), 1.0) / processes.world_size
            step_loss = torch.zeros((), device=device)
            for index, batch in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with engines.no_gradient_sync(wrapped, engine, last), autocast():
                    loss = wrapped(batch["tokens"], batch["targets"], positions=batch["positions"],
                                   cu_seqlens=batch["cu_seqlens"], num_tokens=share)
                optimization.backward(loss)
                step_loss += loss.detach().float()
            grad_norm = optimization.clip_gradients(config.clip_grad)
            step_loss = float(engines.all_reduce_sum(step_loss, processes)) / processes.world_size
            finite = math.isfinite(step_loss) and math.isfinite(grad_norm)
            optimization.step(apply=finite)
            if finite:
                skipped_in_a_row = 0
            else:
                skipped_in_a_row += 1
                log(f"step {step}: non-finite loss {step_loss} or gradient norm {grad_norm}: update skipped "
                    f"({skipped_in_a_row} in a row)")
                metrics.write({"kind": "skipped", "step": step, "loss": step_loss, "grad_norm": grad_norm})
            last_step = step + 1
            losses.append(step_loss)
            if skipped_in_a_row >= config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{skipped_in_a_row} steps in a row had a non-finite loss or gradient (last loss {step_loss}); "
                    f"stopping. Lower lr, raise warm_up, or use bf16 instead of fp16; the last good checkpoint is "
                    f"in {checkpoints.directory}")
            window["loss"] += step_loss if math.isfinite(step_loss) else 0.0
            window["steps"] += 1
            window["tokens"] += global_batch * config.seq_len
            if last_step % config.log_interval == 0 or last_step == steps:
                seconds = time.perf_counter() - window["start"]
                tokens_per_s = window["tokens"] / seconds
                record = {"kind": "train", "step": last_step, "loss": window["loss"] / window["steps"],
                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                          "mfu": tokens_per_s * flops_token / (peak * processes.world_size),
                          "memory_mb": memory_mb(device), "tokens": last_step * global_batch * config.seq_len}
                metrics.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                         lr=f"{lr:.1e}", refresh=False)
                window = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.perf_counter()}
            if progress is not None:
                progress.update(1)
            paused = time.perf_counter()  # evaluation and saving do not count against training throughput
            if last_step % config.eval_interval == 0 or last_step == steps:
                result = evaluate(wrapped, data, processes, autocast)
                if result is not None:
                    metrics.write({"kind": "valid", "step": last_step, **result})
                    log(f"step {last_step}: validation loss {result['loss']:.4f}, perplexity "
                        f"{result['perplexity']:.1f}")
            if stop.requested:
                log(f"stop requested: saving a checkpoint at step {last_step}, then exiting")
                break
            if config.save_interval and last_step % config.save_interval == 0 and last_step < steps:
                save_checkpoint(last_step, skipped_in_a_row)
            window["start"] += time.perf_counter() - paused
    if progress is not None:
        progress.close()
    path = save_checkpoint(last_step, skipped_in_a_row)
    metrics.close()
    summary = {"steps": last_step, "total_steps": steps, "losses": losses, "checkpoint": path,
               "metrics": metrics.path, "interrupted": last_step < steps}
    if processes.is_main and os.path.isfile(metrics.path):
        summary["plot"] = plot(metrics.path, os.path.join(config.output_dir, "loss.png"))
    log(f"checkpoint: {path}" + (f"\nloss curve: {summary['plot']}" if "plot" in summary else ""))
    return summary
