"""Distributed engines: how the model is spread over processes, and what that changes for the trainer.

- single: one process.
- ddp: DistributedDataParallel, every process holding the whole model and optimizer.
- fsdp: PyTorch FSDP2 `fully_shard` on every decoder block and on the root. zero_stage 3 frees each block's gathered
  parameters after its forward (ZeRO-3); zero_stage 2 keeps them until the backward (ZeRO-2: sharded gradients and
  optimizer state, parameters gathered once per step). In bf16 (GPU, or CPU: gloo all-gathers bf16) the parameters
  are gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy), the master weights and optimizer state
  staying fp32 shards; the compute runs under autocast with an fp32 residual stream, as with the other engines.
- bmtrain: BMTrain's ZeRO-3 (aquila/train/bmtrain_engine.py; CUDA + NCCL only, verified only where it can run).

Launch with torchrun: `torchrun --nproc-per-node 8 -m aquila.cli pretrain --config ...`. Processes talk over nccl on
GPU and gloo on CPU.
"""

import contextlib
import dataclasses
import datetime
import gc
import os
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_processes(engine: str = "auto", seed: int = 0) -> Processes:
    """This process's place among those torchrun started (or a lone process), with the process group up (BMTrain
    brings up its own, and torch's with it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if engine == "bmtrain" and cuda:
        from aquila.train import bmtrain_engine

        bmtrain_engine.init(seed)
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Processes(rank, world_size, local_rank, device)


def resolve_engine(engine: str, processes: Processes) -> str:
    if engine == "auto":
        return "fsdp" if processes.world_size > 1 else "single"
    if engine == "single" and processes.world_size > 1:
        raise ValueError(f"engine single runs one process, but {processes.world_size} were started; use ddp or fsdp")
    if engine == "bmtrain":
        if processes.device.type != "cuda":
            raise ValueError("engine bmtrain needs CUDA GPUs and NCCL (BMTrain has no CPU path); use fsdp or ddp")
        from aquila.train import bmtrain_engine

        bmtrain_engine.import_bmtrain()
    return engine


def wrap(model: nn.Module, engine: str, zero_stage: int, processes: Processes, compute_dtype: torch.dtype
         ) -> nn.Module:
    """The model as the engine trains it (the module itself for single)."""
    if engine == "single":
        return model
    if engine == "ddp":
        ids = [processes.local_rank] if processes.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if engine == "bmtrain":
        from aquila.train import bmtrain_engine

        return bmtrain_engine.wrap(model)
    if engine == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(processes.device.type, (processes.world_size,))
        # Half-precision compute runs under autocast as with the other engines: the policy gathers the parameters in
        # compute_dtype but leaves the blocks' inputs alone (cast_forward_inputs would round the residual stream to
        # bf16 at every block), and the embeddings gathered in bf16 start the residual stream in fp32, as autocast's
        # fp32 embeddings do (fused_add_rms_norm then keeps the sums in fp32).
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        reshard = zero_stage == 3
        if compute_dtype is not None:
            model.tok_embeddings.register_forward_hook(lambda module, args, output: output.float())
        for block in model.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        return fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    raise ValueError(f"wrap: unknown engine {engine!r}")


class Optimization(Protocol):
    """The optimizer as the trainer drives it, whatever the engine: per optimizer step set_lr, backward on each
    micro-batch's loss, clip_gradients, then step; and the training state for checkpoints."""

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of every parameter group."""

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulates the gradients of loss (scaled where the precision needs loss scaling)."""

    def clip_gradients(self, max_norm: float) -> float:
        """Clips the gradients to a global norm of max_norm (0: no clipping); returns the norm before clipping, inf
        or nan when a gradient is not finite."""

    def step(self, apply: bool) -> None:
        """Updates the weights (unless apply is False: a skipped step) and clears the gradients."""

    def state_dict(self) -> dict:
        """The small state beside the sharded one (loss scale), as JSON-able values."""

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict returned."""

    def save_sharded(self, directory: str) -> None:
        """Writes model and optimizer state into directory, each process its own part (every process calls it)."""

    def load_sharded(self, directory: str) -> None:
        """Reads back what save_sharded wrote."""

    def full_model_state(self) -> dict:
        """Every parameter of the model, gathered on the CPU."""


def optimization(engine: str, model: nn.Module, parameter_groups: list, config, dtype: torch.dtype,
                 device: torch.device) -> Optimization:
    if engine == "bmtrain":
        from aquila.train.bmtrain_engine import BMTrainOptimization

        return BMTrainOptimization(model, parameter_groups, config, dtype)
    return TorchOptimization(model, parameter_groups, config, dtype, device)


def no_gradient_sync(model: nn.Module, engine: str, last_micro_batch: bool):
    """DDP reduces gradients once per optimizer step, on the last micro-batch. FSDP reduce-scatters every
    micro-batch's gradients into the sharded accumulators, which keeps gradient memory sharded (ZeRO-2/3)."""
    if engine == "ddp" and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(value: torch.Tensor, processes: Processes) -> torch.Tensor:
    if processes.world_size > 1:
        dist.all_reduce(value)
    return value


def barrier(processes: Processes) -> None:
    if processes.world_size > 1:
        dist.barrier()


def close(processes: Processes) -> None:
    if processes.world_size > 1 and dist.is_initialized():
        # The training's garbage first: FSDP's modules sit in reference cycles that hold process groups, and a gloo
        # group left for the interpreter's exit can be torn down with its worker threads joinable (an abort).
        gc.collect()
        dist.destroy_process_group()


class TorchOptimization(Optimization):
    """AdamW over fp32 master weights (FSDP shards them), with dynamic loss scaling for fp16, and the training state
    in torch.distributed.checkpoint's sharded format."""

    def __init__(self, model: nn.Module, parameter_groups: list, config, dtype: torch.dtype, device: torch.device):
        self.model = model
        # fused: one multi-threaded kernel for every parameter; torch's default CPU path takes ~100x longer.
        self.optimizer = torch.optim.AdamW(parameter_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.eps, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.parameters = [p for group in parameter_groups for p in group["params"]]

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def clip_gradients(self, max_norm: float) -> float:
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, max_norm or float("inf"))
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def step(self, apply: bool) -> None:
        if apply:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def save_sharded(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        _quiet_dcp(dcp.save, {"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)

    def load_sharded(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from aquila.train.safe_dcp import SafeFileSystemReader, SafeLoadPlanner

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        _quiet_dcp(dcp.load, state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner())
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def full_model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _quiet_dcp(call, *args, **kwargs):
    # DCP warns that it runs in a single process whenever no process group exists: that is the intent here.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        return call(*args, **kwargs)
