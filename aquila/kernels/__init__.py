"""Aquila's fused kernels, usable on their own in any model.

Every op dispatches on the tensors' device to the Triton or CUDA C++ kernels (GPU), the C++ CPU kernels, or the
pure-torch reference (see :mod:`aquila.kernels.backend`), is differentiable, and is registered with torch.library so
that torch.compile traces through it without a graph break.
"""

from .attention import attention, attention_with_kv_cache
from .backend import BACKENDS
from .cross_entropy import cross_entropy, linear_cross_entropy
from .rms_norm import RMSNorm, fused_add_rms_norm, rms_norm
from .rotary import apply_rotary, rotary_embedding

__all__ = ["BACKENDS", "RMSNorm", "apply_rotary", "attention", "attention_with_kv_cache", "cross_entropy", "fused_add_rms_norm", "linear_cross_entropy",
           "rms_norm", "rotary_embedding"]
