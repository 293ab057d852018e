"""The trainer, shared by pretraining and SFT: a Trainer builds a run from its config and steps it.

Semantics (FlagAI got several of these wrong):
- The loss of an optimizer step is the mean over every target token of all its micro-batches on all processes:
  each micro-batch's summed loss is divided by that global count (counted before the forward passes), so gradient
  accumulation over k micro-batches equals one batch k times larger, and 2 processes equal 1 with the same global
  batch.
- Gradients are clipped once per optimizer step, by their global norm; the learning rate (linear warm-up, then cosine
  to min_lr_ratio of the peak) is set once per optimizer step; norms and biases get no weight decay.
- Precision (aquila/train/precision.py): bf16 autocast (FSDP: bf16 parameter gathers, fp32 gradient reduction) with
  fp32 master weights and AdamW state, on GPU and on CPUs with AMX-BF16 or AVX512-BF16 (auto), fp32 on other CPUs;
  fp16 (GPU only) with dynamic loss scaling. A step whose loss or gradient norm is not finite is skipped
  (no update) and logged; max_nonfinite_steps of them in a row stop the run with a message.
- SIGTERM or Ctrl-C: the step in flight finishes, a checkpoint is written, the run exits cleanly (a second Ctrl-C
  aborts at once).
- One run per output directory at a time (a lock), and a fresh run never into an earlier one's: --resume continues
  it, --overwrite replaces it (aquila/train/run_directory.py). A resumed run is the run its checkpoint was saved by:
  keys that change what it trains on or what a step is (RUN_DEFINING_KEYS, the global batch) must match, unless
  allow_config_change.
"""

import contextlib
import dataclasses
import math
import os
import signal
from collections.abc import Callable
from typing import Optional

import torch

from aquila import IGNORE_INDEX
from aquila.data import demo_file
from aquila.data.tokenizer import Tokenizer
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila
from aquila.train import engine as engines
from aquila.train.checkpoint import Checkpoints, ConfigChangedError
from aquila.train.checkpoint import resolve as resolve_checkpoint
from aquila.train.config import DEFAULT_STEPS, TrainConfig
from aquila.train.data import TrainingData, make_data, to_device
from aquila.train.metrics import MetricsLog, MetricsWindow, flops_per_token, memory_mb, peak_flops, plot
from aquila.train.precision import resolve_precision
from aquila.train.run_directory import RunLock, check_earlier_run, remove_earlier_run

# What a resumed run must share with its checkpoint's, beside the global batch: the data and its order, the model,
# the tokens of a sample. (The budget, learning rate and intervals may change on resume.)
RUN_DEFINING_KEYS = ("kind", "model", "model_overrides", "tokenizer", "train_data", "corpus", "sft_data",
                     "valid_fraction", "seq_len", "seed")


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
    """Set by SIGTERM or the first Ctrl-C; Trainer.fit checks it between steps."""

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


@dataclasses.dataclass(frozen=True)
class StepResult:
    loss: float  # the mean over the step's target tokens on all processes
    grad_norm: float  # the global gradient norm before clipping
    lr: float


class Trainer:
    """One run, built from its config: tokenizer, data, model wrapped by its engine, optimization, checkpoints and
    metrics. fit() steps it from the first step (or the newest checkpoint) to the last; train_step, evaluate,
    save_checkpoint and load_checkpoint are its parts."""

    def __init__(self, config: TrainConfig, processes: engines.Processes, log: Callable[[str], None]):
        self.config, self.processes, self.log = config, processes, log
        self.engine = engines.resolve_engine(config.engine, processes)
        self.device = processes.device
        os.makedirs(config.output_dir, exist_ok=True)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config)
        self.data: TrainingData = make_data(config, self.tokenizer, processes)
        self.global_batch = config.batch_size * config.gradient_accumulation_steps * processes.world_size
        self.total_steps = total_steps(config, self.data.tokens_per_epoch, self.data.samples_per_epoch,
                                       self.global_batch)
        self.data.build(self.total_steps * self.global_batch)
        if self.data.description:
            log(self.data.description)

        self.model = build_model(config, self.tokenizer, self.device)
        self.data.check_vocabulary(self.model.config.vocab_size)
        self.precision = resolve_precision(config.precision, self.device)
        self.dtype = self.precision.dtype
        self.wrapped = engines.wrap(self.model, self.engine, config.zero_stage, processes,
                                    None if self.dtype == torch.float32 else self.dtype)
        self.optimization = engines.optimization(self.engine, self.wrapped,
                                                 parameter_groups(self.wrapped, config.weight_decay), config,
                                                 self.dtype, self.device)
        self.checkpoints = Checkpoints(config.output_dir, processes, config.keep_checkpoints)
        if processes.is_main:
            self.checkpoints.recover(log)
        engines.barrier(processes)
        self.step = 0  # optimizer steps done
        self.skipped_in_a_row = 0
        self.metrics = MetricsLog(config.output_dir, processes.is_main, config.tensorboard, log)
        self.flops_per_token = flops_per_token(self.model.config, config.seq_len)
        self.peak_flops, self.peak_source = peak_flops(self.device, config.peak_tflops, self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def forward_backward(self, micro_batches: list[dict]) -> torch.Tensor:
        """The forward and backward passes of one optimizer step's micro-batches (their gradients accumulated); returns
        this process's part of the step's loss."""
        local_tokens = sum(int((batch["targets"] != IGNORE_INDEX).sum()) for batch in micro_batches)
        global_tokens = engines.all_reduce_sum(torch.tensor(float(local_tokens), device=self.device), self.processes)
        # Each process divides by its share of the global count: the engines average gradients over processes.
        share = max(float(global_tokens), 1.0) / self.processes.world_size
        step_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with engines.no_gradient_sync(self.wrapped, self.engine, last), self.autocast():
                loss = self.wrapped(batch["tokens"], batch["targets"], positions=batch["positions"],
                                    cu_seqlens=batch["cu_seqlens"], num_tokens=share)
            self.optimization.backward(loss)
            step_loss += loss.detach().float()
        return step_loss

    def train_step(self) -> StepResult:
        """Optimizer step number self.step, which it then counts. A step whose loss or gradient norm is not finite
        changes no weight; max_nonfinite_steps of them in a row raise NonFiniteLossError."""
        config, step = self.config, self.step
        lr = learning_rate(step, self.total_steps, config)
        self.optimization.set_lr(lr)
        micro_batches = [to_device(self.data.batch(step, micro_batch), self.device)
                         for micro_batch in range(config.gradient_accumulation_steps)]
        step_loss = self.forward_backward(micro_batches)
        grad_norm = self.optimization.clip_gradients(config.clip_grad)
        loss = float(engines.all_reduce_sum(step_loss, self.processes)) / self.processes.world_size
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        self.optimization.step(apply=finite)
        self.step = step + 1
        if finite:
            self.skipped_in_a_row = 0
            return StepResult(loss, grad_norm, lr)
        self.skipped_in_a_row += 1
        self.log(f"step {step}: non-finite loss {loss} or gradient norm {grad_norm}: update skipped "
                 f"({self.skipped_in_a_row} in a row)")
        self.metrics.write({"kind": "skipped", "step": step, "loss": loss, "grad_norm": grad_norm})
        if self.skipped_in_a_row >= config.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient (last loss {loss}); "
                f"stopping. Lower lr, raise warm_up, or use bf16 instead of fp16; the last good checkpoint is in "
                f"{self.checkpoints.directory}")
        return StepResult(loss, grad_norm, lr)

    @torch.no_grad()
    def evaluate(self) -> Optional[dict]:
        """Loss, perplexity and token count on the validation data (None without any), over all processes."""
        if not self.data.has_validation:
            return None
        self.wrapped.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.data.valid_batches():
            batch = to_device(batch, self.device)
            with self.autocast():
                summed = self.wrapped(batch["tokens"], batch["targets"], positions=batch["positions"],
                                      cu_seqlens=batch["cu_seqlens"], num_tokens=1.0)
            total += torch.stack([summed.double(), (batch["targets"] != IGNORE_INDEX).sum().double()])
        self.wrapped.train()
        loss_sum, count = engines.all_reduce_sum(total, self.processes).tolist()
        loss = loss_sum / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count)}

    def save_checkpoint(self) -> str:
        """A checkpoint of the steps done so far (every process calls this); returns its directory."""
        state = {"skipped_in_a_row": self.skipped_in_a_row, "optimization": self.optimization.state_dict(),
                 "total_steps": self.total_steps, "global_batch": self.global_batch, "config": self.config.run_dict()}
        return self.checkpoints.save(self.step, self.optimization, state, self.model.config, self.tokenizer)

    def load_checkpoint(self) -> None:
        """Continues from the newest loadable checkpoint of the output directory, if it has one."""
        state = self.checkpoints.load_latest(self.optimization, self.log, self.check_same_run)
        if state is None:
            self.log(f"no checkpoint in {self.checkpoints.directory}: starting from scratch")
            return
        self.step, self.skipped_in_a_row = state["step"], state["skipped_in_a_row"]
        self.optimization.load_state_dict(state["optimization"])
        self.log(f"resumed from {state['path']} at step {self.step}")

    def check_same_run(self, trainer_state: dict, path: str) -> None:
        """Raises ConfigChangedError when the checkpoint's run differs from this one in a key that changes its
        meaning (RUN_DEFINING_KEYS, the global batch); with allow_config_change, logs the differences instead."""
        saved = trainer_state.get("config")
        if saved is None:
            self.log(f"{path} predates stored configs: its run's settings cannot be compared with this one's")
            return
        changes = [f"{key}: {saved[key]!r} -> {getattr(self.config, key)!r}" for key in RUN_DEFINING_KEYS
                   if key in saved and saved[key] != getattr(self.config, key)]
        if trainer_state.get("global_batch", self.global_batch) != self.global_batch:
            changes.append(f"global batch (batch_size x gradient_accumulation_steps x processes): "
                           f"{trainer_state['global_batch']} -> {self.global_batch}")
        if not changes:
            return
        if self.config.allow_config_change:
            self.log(f"warning: resuming {path} with changed settings (allow_config_change): {'; '.join(changes)}")
            return
        raise ConfigChangedError(f"cannot resume {path}: its run was configured differently: {'; '.join(changes)}. "
                                 "Resume with its values, or give --allow-config-change to go on with these")

    def fit(self, resume: bool = False) -> dict:
        """Trains to the last step, or until SIGTERM or Ctrl-C, then writes a checkpoint; returns a summary (steps,
        losses, checkpoint path, ...)."""
        config = self.config
        if config.overwrite and self.processes.is_main:
            remove_earlier_run(config.output_dir, self.log)
        engines.barrier(self.processes)
        if resume:
            self.load_checkpoint()
        if self.processes.is_main:
            config.save(os.path.join(config.output_dir, "config.yaml"))
        self.log(self.precision.header())
        self.log(f"{self.engine} on {self.processes.world_size} x {self.device.type}, {self.precision.name}: "
                 f"{self.model.config.num_parameters() / 1e6:.1f}M parameters, {self.total_steps} steps of "
                 f"{self.global_batch} x {config.seq_len} tokens (MFU against {self.peak_flops / 1e12:.2f} TFLOP/s "
                 f"per device, {self.peak_source})")
        progress = None
        if self.processes.is_main and config.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                            mininterval=0.5)
        losses, window = [], MetricsWindow()
        with StopFlag() as stop:
            while self.step < self.total_steps:
                result = self.train_step()
                losses.append(result.loss)
                window.add(result.loss, self.global_batch * config.seq_len)
                if self._due(config.log_interval):
                    record = self._train_record(result, window)
                    self.metrics.write(record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                                             lr=f"{result.lr:.1e}", refresh=False)
                    window = MetricsWindow()
                if progress is not None:
                    progress.update(1)
                with window.paused():  # evaluation and saving do not count against training throughput
                    if self._due(config.eval_interval):
                        self._evaluate_and_report()
                    if stop.requested:
                        self.log(f"stop requested: saving a checkpoint at step {self.step}, then exiting")
                        break
                    if config.save_interval and self.step % config.save_interval == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
        if progress is not None:
            progress.close()
        path = self.save_checkpoint()
        self.metrics.close()
        summary = {"steps": self.step, "total_steps": self.total_steps, "losses": losses, "checkpoint": path,
                   "metrics": self.metrics.path, "interrupted": self.step < self.total_steps}
        if self.processes.is_main and os.path.isfile(self.metrics.path):
            try:
                summary["plot"] = plot(self.metrics.path, os.path.join(config.output_dir, "loss.png"), self.log)
            except ValueError as error:  # the checkpoint is saved: a metrics file that cannot be drawn fails no run
                self.log(f"warning: no loss curve: {error}")
        self.log(f"checkpoint: {path}" + (f"\nloss curve: {summary['plot']}" if "plot" in summary else ""))
        return summary

    def _due(self, interval: int) -> bool:
        """Whether the step just done is one of every interval, or the last."""
        return self.step % interval == 0 or self.step == self.total_steps

    def _train_record(self, result: StepResult, window: MetricsWindow) -> dict:
        tokens_per_s = window.tokens_per_s()
        return {"kind": "train", "step": self.step, "loss": window.mean_loss(), "lr": result.lr,
                "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.processes.world_size),
                "memory_mb": memory_mb(self.device), "tokens": self.step * self.global_batch * self.config.seq_len}

    def _evaluate_and_report(self) -> None:
        result = self.evaluate()
        if result is not None:
            self.metrics.write({"kind": "valid", "step": self.step, **result})
            self.log(f"step {self.step}: validation loss {result['loss']:.4f}, perplexity {result['perplexity']:.1f}")


def train(config: TrainConfig, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs the configured training; returns a summary (steps, losses, checkpoint path, ...). The main process holds
    the output directory's lock throughout."""
    processes = engines.init_processes(config.engine, config.seed)
    log = log if processes.is_main else (lambda message: None)
    try:
        os.makedirs(config.output_dir, exist_ok=True)
        with RunLock(config.output_dir, log) if processes.is_main else contextlib.nullcontext():
            check_earlier_run(config.output_dir, resume, config.overwrite)
            return Trainer(config, processes, log).fit(resume)
    finally:
        engines.close(processes)
