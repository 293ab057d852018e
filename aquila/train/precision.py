"""Which precision a run trains in, and why.

- fp32: everything in fp32.
- bf16: fp32 parameters (master weights) and AdamW state; the compute under torch.autocast in bf16 (single, DDP),
  or, with FSDP, parameters gathered in bf16 and gradients reduced in fp32 (MixedPrecisionPolicy). On GPU and CPU.
- fp16: as bf16 with dynamic loss scaling; GPU only. On CPU no matmul path makes fp16 fast outside AMX-FP16 hosts
  (oneDNN's fp16 without it is emulated, the CPU kernels run fp16 scalar) and bf16 has fp32's range without loss
  scaling: use bf16.
- auto: bf16 on GPU. On CPU bf16 where the CPU has bf16 instructions (AMX-BF16 or AVX512-BF16), else fp32: without
  them every bf16 matmul converts to fp32 and back and runs slower than fp32 itself (~20x on AVX2-only hosts).
"""

import dataclasses
import functools
from typing import Optional

import torch

from aquila import host

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
NO_BF16 = "this CPU has no AMX or AVX512-BF16, where bf16 is slower than fp32"


def _torch_probe(name: str) -> Optional[bool]:
    """torch.cpu's ISA check of that name (torch >= 2.3: _is_amx_tile_supported, _is_avx512_bf16_supported), None
    where this torch lacks it or it fails."""
    probe = getattr(getattr(torch, "cpu", None), name, None)
    if probe is None:
        return None
    try:
        return bool(probe())
    except Exception:  # a probe that cannot answer is no answer
        return None


@functools.cache
def cpu_bf16_isa() -> Optional[str]:
    """The bf16 instructions of this CPU that make bf16 matmuls faster than fp32: "AMX-BF16", "AVX512-BF16" or None.

    Asks torch's own dispatch checks first (cpuinfo, which also sees whether the OS enabled AMX's tile state), and
    /proc/cpuinfo's flags (amx_bf16, avx512_bf16) where this torch has no such check."""
    flags = None
    amx = _torch_probe("_is_amx_tile_supported")
    if amx is None:
        flags = host.cpu_flags()
        amx = flags is not None and "amx_bf16" in flags
    if amx:
        return "AMX-BF16"
    avx512 = _torch_probe("_is_avx512_bf16_supported")
    if avx512 is None:
        flags = host.cpu_flags() if flags is None else flags
        avx512 = flags is not None and "avx512_bf16" in flags
    return "AVX512-BF16" if avx512 else None


@dataclasses.dataclass(frozen=True)
class Precision:
    dtype: torch.dtype
    reason: str  # why this precision: "auto: this CPU has AVX512-BF16", "configured", ...

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    def header(self) -> str:
        """The run header's precision line."""
        what = ("everything in fp32" if self.dtype == torch.float32 else
                f"{self.name} compute over fp32 master weights and AdamW state")
        return f"precision {self.name} ({self.reason}): {what}"


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The dtype a run computes in, for its configured precision (auto, fp32, bf16, fp16) on device, with the reason
    for the run header. fp32 and bf16 mean exactly that on every device; fp16 on CPU is refused."""
    if precision not in ("auto", *DTYPES):
        raise ValueError(f"precision must be one of auto, {', '.join(DTYPES)}; got {precision!r}")
    if device.type != "cpu":
        if precision == "auto":
            return Precision(torch.bfloat16, f"auto: on {device.type.upper()}")
        return Precision(DTYPES[precision], "configured")
    isa = cpu_bf16_isa()
    if precision == "auto":
        if isa is None:
            return Precision(torch.float32, f"auto: {NO_BF16}")
        return Precision(torch.bfloat16, f"auto: this CPU has {isa}")
    if precision == "fp16":
        raise ValueError("precision fp16 needs a GPU: on CPU fp16 matmuls are emulated (slower than fp32) and need "
                         "loss scaling; train in bf16 (same speed-up where the CPU has AMX or AVX512-BF16, fp32's "
                         "range) or fp32, or precision: auto to choose")
    if precision == "bf16":
        note = f"this CPU has {isa}" if isa else f"warning: {NO_BF16}; precision auto would choose fp32"
        return Precision(torch.bfloat16, f"configured; {note}")
    return Precision(torch.float32, "configured" + (f"; this CPU has {isa}: precision auto would choose bf16"
                                                    if isa else ""))
