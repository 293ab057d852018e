"""Aquila's fused kernels, usable on their own in any model.

Every op picks an implementation from its table (see :mod:`aquila.kernels.backend`): the Triton or CUDA C++ kernels
on GPU, the C++ CPU kernels, or the pure-torch reference. The training ops are differentiable, and every op is
registered with torch.library so that torch.compile traces through it without a graph break.
"""

from .attention import attention, attention_with_kv_cache
from .backend import BACKENDS, UnsupportedBackend
from .cross_entropy import CrossEntropyOutput, cross_entropy, linear_cross_entropy
from .glu import geglu, swiglu
from .layer_norm import LayerNorm, layer_norm
from .quantized_linear import quantized_linear
from .rms_norm import RMSNorm, fused_add_rms_norm, rms_norm
from .rotary import apply_rotary, rotary_embedding

__all__ = ["BACKENDS", "CrossEntropyOutput", "LayerNorm", "RMSNorm", "UnsupportedBackend", "apply_rotary", "attention",
           "attention_with_kv_cache", "cross_entropy", "fused_add_rms_norm", "geglu", "layer_norm",
           "linear_cross_entropy", "quantized_linear", "rms_norm", "rotary_embedding", "swiglu"]
