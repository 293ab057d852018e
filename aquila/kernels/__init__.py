"""Aquila's fused kernels, usable on their own in any model.

Every op dispatches on the tensors' device to the Triton or CUDA C++ kernels (GPU), the C++ CPU kernels, or the
pure-torch reference (see :mod:`aquila.kernels.backend`), is differentiable, and is registered with torch.library so
that torch.compile traces through it without a graph break.
"""

from .backend import BACKENDS
from .rms_norm import RMSNorm, fused_add_rms_norm, rms_norm
from .rotary import apply_rotary, rotary_embedding

__all__ = ["BACKENDS", "RMSNorm", "apply_rotary", "fused_add_rms_norm", "rms_norm", "rotary_embedding"]
