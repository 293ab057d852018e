"""The BMTrain engine: FlagAI's original distributed backend, kept thin.

Requirements: CUDA GPUs, NCCL and `pip install bmtrain` (1.0.x; wheels exist for Python 3.10/3.11 built against
CUDA 11, and its source build supports sm_61..sm_80 only). It cannot run on a machine without a GPU, so this module
is verified only where BMTrain runs: on the project's CPU machines it is import-checked and its refusal tested, nothing
more. FSDP2 (`engine: fsdp`) is the default and the tested path.

What it uses of BMTrain 1.0: `bmt.init_distributed` (NCCL communicator, seeded), `bmt.BMTrainModelWrapper` (every
parameter becomes a ZeRO-3 `DistributedParameter`, each decoder block a `bmt.Block`), `bmt.optim.AdamOffloadOptimizer`
(fp32 Adam state on the host), `bmt.optim.OptimManager` (loss scaling, gradient clipping, the step), and
`bmt.save` / `bmt.load` for weights. The optimizer state is saved per process with torch.save beside the weights.
"""

import os

import torch
from torch import nn

from aquila.train.engine import Optimization


def import_bmtrain():
    try:
        import bmtrain
    except ImportError as error:
        raise ValueError(f"engine bmtrain needs the bmtrain package on a CUDA machine ({error}); "
                         "use engine fsdp, which needs nothing beyond torch") from None
    return bmtrain


def init(seed: int) -> None:
    import_bmtrain().init_distributed(seed=seed)


def wrap(model: nn.Module) -> nn.Module:
    return import_bmtrain().BMTrainModelWrapper(model)


class BMTrainOptimization(Optimization):
    """The counterpart of engine.TorchOptimization on BMTrain's optimizer manager."""

    def __init__(self, model: nn.Module, parameter_groups: list, config, dtype: torch.dtype):
        bmt = import_bmtrain()
        self.bmt, self.model = bmt, model
        self.optimizer = bmt.optim.AdamOffloadOptimizer(parameter_groups, lr=config.lr,
                                                        betas=(config.adam_beta1, config.adam_beta2), eps=config.eps)
        # fp16 needs loss scaling; bf16 and fp32 do not.
        self.manager = bmt.optim.OptimManager(loss_scale=2.0 ** 15 if dtype == torch.float16 else None)
        self.manager.add_optimizer(self.optimizer)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.manager.backward(loss)

    def clip_gradients(self, max_norm: float) -> float:
        return float(self.manager.clip_grad_norm(self.optimizer.param_groups, max_norm or float("inf")))

    def step(self, apply: bool) -> None:
        if apply:
            self.manager.step()
        self.manager.zero_grad()

    def state_dict(self) -> dict:
        return {"loss_scale": float(getattr(self.manager, "loss_scale", 1.0) or 1.0)}

    def load_state_dict(self, state: dict) -> None:
        if getattr(self.manager, "loss_scale", None):
            self.manager.loss_scale = state["loss_scale"]

    def save_sharded(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.bmt.save(self.model, os.path.join(directory, "model.pt"))
        torch.save(self.optimizer.state_dict(), os.path.join(directory, f"optimizer-{self.bmt.rank()}.pt"))

    def load_sharded(self, directory: str) -> None:
        self.bmt.load(self.model, os.path.join(directory, "model.pt"))
        state = torch.load(os.path.join(directory, f"optimizer-{self.bmt.rank()}.pt"), weights_only=True)
        self.optimizer.load_state_dict(state)

    def full_model_state(self) -> dict:
        return {name: tensor.cpu() for name, tensor in self.model.state_dict().items()}
