"""Training configuration: FlagAI's Aquila-pretrain.yaml keys, plus what FlagAI left to launch scripts.

A YAML file (or nothing: the defaults are the demo run), then `--key value` overrides from the command line. Unknown
keys are an error in both, naming the key and listing the known ones: FlagAI ignored a misspelt key silently.
"""

import dataclasses
import typing
from collections.abc import Sequence
from typing import Any, Optional

import yaml

from aquila.files import write_text_atomically

ENGINES = ("auto", "single", "ddp", "fsdp", "bmtrain")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KINDS = ("pretrain", "sft")
BUDGETS = ("steps", "train_tokens", "epochs")
DEFAULT_STEPS = 600  # the demo run's length when no budget is given
INVOCATION_KEYS = ("overwrite", "allow_config_change")  # how to start this run, not what the run is
# Keys that existed once, with what to do instead: their configs get that, not a bare "unknown key".
REMOVED_KEYS = {"num_workers": "removed: the data is read by the training process itself, without loader workers; "
                               "delete the key"}


@dataclasses.dataclass
class TrainConfig:
    # --- FlagAI's keys -----------------------------------------------------------------------------------------------
    batch_size: int = 16  # sequences per micro-batch per process
    gradient_accumulation_steps: int = 1
    lr: float = 2e-3
    warm_up: float = 0.05  # below 1: a fraction of the optimizer steps (FlagAI's meaning); from 1: a number of steps
    save_interval: int = 200  # optimizer steps between checkpoints; 0: only at the end
    log_interval: int = 10
    eval_interval: int = 100
    epochs: Optional[float] = None  # passes over the training data; instead of steps / train_tokens
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 1234
    # --- ours ------------------------------------------------------------------------------------------------------
    kind: str = "pretrain"  # or sft
    model: str = "demo"  # a preset name, or a checkpoint directory to start from (required for SFT)
    model_overrides: dict = dataclasses.field(default_factory=dict)  # AquilaConfig fields changed from the preset
    tokenizer: Optional[str] = None  # directory; None: the model checkpoint's, else the bundled demo tokenizer
    train_data: list = dataclasses.field(default_factory=list)  # [prefix, weight, prefix, weight, ...] or [prefix]
    valid_data: list = dataclasses.field(default_factory=list)
    valid_fraction: float = 0.0  # held-out documents from train_data when valid_data is empty
    corpus: Optional[str] = None  # jsonl(.gz) text tokenized on first use when train_data is empty (demo corpus)
    valid_corpus: Optional[str] = None
    sft_data: Optional[str] = None  # FlagAI conversation jsonl (kind: sft); None: the demo conversations
    seq_len: int = 256
    steps: Optional[int] = None  # optimizer steps; or train_tokens, or epochs; none of them: DEFAULT_STEPS
    train_tokens: Optional[int] = None
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr
    precision: str = "auto"  # auto: bf16 on GPU and on CPUs with AMX-BF16 or AVX512-BF16, else fp32
    engine: str = "auto"  # auto: fsdp with several processes, else single
    zero_stage: int = 2  # fsdp: 2 keeps parameters gathered after forward, 3 reshards them
    activation_checkpointing: bool = False
    output_dir: str = "runs/demo"
    keep_checkpoints: int = 2
    eval_batches: int = 8
    max_nonfinite_steps: int = 5  # consecutive skipped steps before the run stops
    peak_tflops: Optional[float] = None  # per device, for MFU; None: measured matmul rate on CPU, 989 on H100/H200
    tensorboard: bool = False
    progress: bool = True
    # --- this invocation only (not saved with the run) ---------------------------------------------------------------
    overwrite: bool = False  # replace an earlier run in output_dir (its checkpoints and metrics are deleted)
    allow_config_change: bool = False  # resume although keys that change the run's meaning differ from its checkpoint

    def __post_init__(self):
        def need(condition, message):
            if not condition:
                raise ValueError(f"TrainConfig: {message}")

        for name in ("batch_size", "gradient_accumulation_steps", "seq_len", "log_interval", "eval_interval",
                     "eval_batches", "max_nonfinite_steps"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(self.warm_up >= 0, f"warm_up must be >= 0, got {self.warm_up}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.save_interval >= 0 and self.keep_checkpoints >= 1, "save_interval must be >= 0 and "
             "keep_checkpoints >= 1")
        need(0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)")
        need(self.clip_grad >= 0, f"clip_grad must be >= 0 (0: no clipping), got {self.clip_grad}")
        need(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        need(self.engine in ENGINES, f"engine must be one of {ENGINES}, got {self.engine!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.zero_stage in (2, 3), f"zero_stage must be 2 or 3, got {self.zero_stage!r}")
        need(0 <= self.valid_fraction < 1, f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        budgets = [name for name in BUDGETS if getattr(self, name) is not None]
        need(len(budgets) <= 1, f"give one of steps, train_tokens and epochs, not {budgets}")
        for name in budgets:
            need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        need(len(self.train_data) != 1 or isinstance(self.train_data[0], str), "train_data holds prefixes")

    @classmethod
    def load(cls, path: Optional[str] = None, overrides: Sequence[str] = ()) -> "TrainConfig":
        """The YAML file's values (relative paths in it are relative to the file), then overrides: a list like
        ["--lr", "1e-4", "--steps", "20"]."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, encoding="utf-8") as handle:
                loaded = yaml.safe_load(handle) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
            cls._check_keys(loaded, f"{path}")
            values.update(loaded)
        overridden = cls._parse_overrides(overrides)
        if any(name in overridden for name in BUDGETS):  # a budget on the command line replaces the file's
            for name in BUDGETS:
                values.pop(name, None)
        values.update(overridden)
        return cls(**cls._coerced(values))

    @classmethod
    def _check_keys(cls, values: dict, where: str) -> None:
        known = {field.name for field in dataclasses.fields(cls)}
        removed = sorted(set(values) & set(REMOVED_KEYS))
        if removed:
            raise ValueError(f"{where}: {removed[0]}: {REMOVED_KEYS[removed[0]]}")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; the known keys are {sorted(known)}")

    @classmethod
    def _parse_overrides(cls, overrides: Sequence[str]) -> dict:
        hints = typing.get_type_hints(cls)
        values, items = {}, list(overrides)
        while items:
            flag = items.pop(0)
            if not flag.startswith("--"):
                raise ValueError(f"override {flag!r}: expected --key value")
            name, text = flag[2:], None
            if "=" in name:
                name, text = name.split("=", 1)
            name = name.replace("-", "_")
            if name in REMOVED_KEYS:
                raise ValueError(f"override --{name}: {REMOVED_KEYS[name]}")
            if name not in hints:
                raise ValueError(f"override --{name}: unknown key; the known keys are {sorted(hints)}")
            if text is None:
                if hints[name] is bool and (not items or items[0].startswith("--")):
                    text = "true"  # a boolean key alone is a flag: --overwrite
                elif items:
                    text = items.pop(0)
                else:
                    raise ValueError(f"override --{name}: missing its value")
            # YAML parses the value, so "true", "[a, 1, b, 2]" and "null" mean what they would in the file.
            values[name] = yaml.safe_load(text)
        return values

    @classmethod
    def _coerced(cls, values: dict) -> dict:
        """Numbers as the fields want them: PyYAML reads 1e-4 (no dot) as a string, and 3 where a float is due."""
        hints = typing.get_type_hints(cls)
        out = dict(values)
        for name, value in values.items():
            wanted = [t for t in typing.get_args(hints[name]) or (hints[name],) if t in (int, float)]
            if not wanted or value is None or isinstance(value, bool):
                continue
            if wanted[0] is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            try:
                out[name] = wanted[0](value) if wanted[0] is float or isinstance(value, (str, float)) else value
            except ValueError:
                raise ValueError(f"TrainConfig: {name} must be a {wanted[0].__name__}, got {value!r}") from None
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_dict(self) -> dict:
        """The run's values, without how this invocation starts it (INVOCATION_KEYS)."""
        return {name: value for name, value in self.to_dict().items() if name not in INVOCATION_KEYS}

    def save(self, path: str) -> None:
        """The run's config as YAML, which `--config` loads back (INVOCATION_KEYS left out: reusing the file must not
        overwrite a run)."""
        write_text_atomically(path, yaml.safe_dump(self.run_dict(), sort_keys=False, allow_unicode=True))
