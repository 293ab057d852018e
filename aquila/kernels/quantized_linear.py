"""Linear layers with weight-only quantized weights: int8 per output channel, int4 in groups along the input.

    out = x W^T + bias,   W [out_features, in_features] held as
      bits 8:  qweight int8 [out, in], scales fp32 [out]                          W[o, i] = q[o, i] * scales[o]
      bits 4:  qweight uint8 [out, in // 2], input column 2k in the low nibble of byte k and 2k + 1 in the high one;
               scales fp32 [out, in // group_size]; zeros uint8 [out, in // group_size], or None when symmetric
               W[o, i] = (nibble[o, i] - zero) * scales[o, g],   g = i // group_size, zero = zeros[o, g] or 8

as aquila/model/quantize.py's QuantizedLinear holds them (group_size even, dividing in_features). x [..., in] in fp32,
fp16 or bf16; the output is in x's dtype (autocast's under autocast, as torch's linear). Every backend accumulates in
fp32 and rounds once to the output's dtype, and only the torch reference ever holds the dequantized W. The weights
are frozen: the op is differentiable in x, grad_x = grad_out W (computed by the same kind of kernel, reading the
quantized weights), and in bias, never in qweight, scales or zeros.

Numerics: the kernels dequantize int4 weights exactly as the reference does ((nibble - zero) * scale, one fp32
rounding) or, equivalently in exact arithmetic, apply the scale to a sum of x times the integers (int8's row scale,
Triton's per-group scale on tensor cores), so they differ from the float64 reference only by fp32 accumulation error.

Backends (the table below): the C++ CPU kernels (csrc/cpu/quantized.cpp: a GEMV for decoding that streams each row of
W once for all the rows of x, a cache-blocked GEMM for prefill, the transposed product for grad_x; all dequantizing in
vector registers), the Triton kernels (aquila/kernels/triton/quantized_linear.py: dequantization in the tile loop,
tl.dot with fp32 accumulation), and the torch reference, which dequantizes to fp32 and calls F.linear.

One exception on CPU, for prefill: bf16 x of at least DEQUANTIZED_MATMUL_ROWS rows (no bias), on a CPU whose bf16
matmul is native (AVX512-BF16, AMX: aquila._C.cpu_isa() == "avx512_bf16"). There the kernels' fp32 products, bound
by dequantizing in registers, run at about a third of torch's bf16 matmul (measured on an AMD EPYC with AVX512-BF16:
about 100 against 300 GFLOP/s at 64 x 4096 x 11008), so W is dequantized once into bf16 (csrc/cpu/quantized.cpp's
quantized_dequantize, the fp32 product rounded once more, to bf16: as a bf16 model holds its weights) and multiplied
by torch's bf16 matmul (fp32 accumulation), a chunk of W's rows at a time through one buffer that stays in cache.
There, for a 4096 x 11008 layer, dequantizing costs what the kernels spend on 5 or 6 rows, and the copy is faster from
about 10 rows on (2.3x-2.4x at 32 rows, 4.4x-4.6x at 256); the threshold leaves a margin for CPUs whose matmul gains
less. The gradient keeps the kernels.

int8_inputs (inference only): x is first rounded to int8 as the decoding step rounds a quantized projection's input
(round_inputs_to_int8: blocks of INPUT_BLOCK columns, one scale each, as llama.cpp's Q8_0 activations), and the
product is then that of the rounded x. On a CPU with AVX512-VNNI, for 16 rows or more whose blocks lie within the
weights' groups, the CPU backend multiplies integers: a GEMM on vpdpbusd with 16 rows of x in the lanes of a vector
and each 4 weights broadcast to them (csrc/cpu/quantized.cpp), 64 products an instruction where bf16's vdpbf16ps does
32; where the CPU also has AMX-INT8 (aquila._C.cpu_amx()), the same GEMM on AMX tiles, 16 rows of W by 16 rows of x
over a block of 32 columns an instruction. Measured on the AMD EPYC above (AVX512-VNNI, no AMX, 2 threads), bf16 x at
Aquila-7B's widths and 16 to 1024 rows, alternating in one process (benchmarks/results/quantized-prefill-2026-12-07.md,
medians of 7): int8 1.32x-1.83x and int4 g128 1.32x-1.72x torch's bf16 matmul of the dense weights, and 1.5x-3.6x the
path above (an earlier run: 1.20x-1.58x, 1.02x-1.64x and 1.2x-3.2x). On a 2-core Xeon with AMX, where torch's bf16
matmul runs on AMX too (quantized-prefill-amx-2026-12-08 and -08b): the tiles ran int8 at 2.0x-2.8x that matmul at
16 rows, 1.1x-1.4x at 64 and 0.54x-0.74x from 256 rows, int4 g128 at 1.3x-1.5x, 0.83x-1.05x and 0.39x-0.58x, where
the vpdpbusd GEMM on that CPU (AQUILA_CPU_ISA=avx512, quantized-prefill-vnni-on-amx-2026-12-08) ran 0.19x-0.98x and
0.19x-1.28x. Elsewhere (fewer rows, other CPUs, other widths) the rounded x feeds the fp32 kernels. The model's
prefill takes int8 inputs where its decoding step does (aquila.model.quantize.int8_inputs, Aquila.forward_with_cache).
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backend as _backend
from .backend import Implementation, Implementations
from .triton import quantized_linear as triton_quantized_linear

BITS = (4, 8)
WEIGHT_DTYPES = {8: torch.int8, 4: torch.uint8}
SYMMETRIC_ZERO = 8  # a symmetric int4 value q is stored as the nibble q + 8


def dequantize(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: Optional[int],
               dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense weight [out, in] in `dtype` (float32: each weight rounded once; float64: exact)."""
    if bits == 8:
        return qweight.to(dtype) * scales.to(dtype)[:, None]
    nibbles = torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], 2 * qweight.shape[1]).to(dtype)
    zero = SYMMETRIC_ZERO if zeros is None else zeros.to(dtype).repeat_interleave(group_size, dim=1)
    return (nibbles - zero) * scales.to(dtype).repeat_interleave(group_size, dim=1)


INPUT_BLOCK = 32  # columns per scale of inputs rounded to int8 (the decoding step's int8_inputs)


def round_inputs_to_int8(x: Tensor) -> Tensor:
    """x [..., in] as the decoding step's int8_inputs takes it (csrc/kernels.h's DecodeStep), in float64: x in fp32,
    in blocks of INPUT_BLOCK columns from the first (the last may be shorter), d = max |x| / 127 in fp32 and
    q = x / d rounded to nearest (ties to even) within +-127 (past it only where d is subnormal); then d q, exactly.
    A block with d = 0 is all zeros."""
    x = x.float()
    out = torch.empty(x.shape, dtype=torch.float64, device=x.device)
    for first in range(0, x.shape[-1], INPUT_BLOCK):
        block = x[..., first:first + INPUT_BLOCK]
        d = block.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, torch.round(block / d).clamp(-127, 127), torch.zeros_like(block))
        out[..., first:first + INPUT_BLOCK] = q.double() * d.double()
    return out


# --- Implementations ------------------------------------------------------------------------------------------------
# forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, out) fills out [rows, out_features] (x's
# dtype) for x [rows >= 1, in_features] with unit last stride (rounded to int8 first with int8_inputs); zeros None for
# 8 bits and symmetric int4, bias fp32 [out_features] or None, group_size 0 for 8 bits; None where int8_inputs is
# not implemented (Triton). backward(grad_out, qweight, scales, zeros, bits, group_size, grad_x) fills grad_x
# [rows, in_features] for grad_out [rows >= 1, out_features] with unit last stride. Weights contiguous.


def _torch_forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, out):
    x = round_inputs_to_int8(x).float() if int8_inputs else x.float()
    out.copy_(F.linear(x, dequantize(qweight, scales, zeros, bits, group_size), bias))


def _torch_backward(grad_out, qweight, scales, zeros, bits, group_size, grad_x):
    grad_x.copy_(grad_out.float() @ dequantize(qweight, scales, zeros, bits, group_size))


DEQUANTIZED_MATMUL_ROWS = 32
DEQUANTIZED_CHUNK_BYTES = 4 << 20  # W is dequantized this much at a time, into one buffer that stays in cache


def dequantizes_for_matmul(x: Tensor, bias: Optional[Tensor], int8_inputs: bool = False) -> bool:
    """Whether the CPU backend multiplies x [rows, in] (on the CPU) by a bf16 copy of W rather than by the kernels
    (the module's docstring)."""
    return (x.shape[0] >= DEQUANTIZED_MATMUL_ROWS and x.dtype == torch.bfloat16 and bias is None
            and not int8_inputs and _backend.cpu_bf16_products())


def cpu_dequantize(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: Optional[int],
                   out: Tensor) -> Tensor:
    """dequantize() into out [out_features, in_features] (fp32, fp16 or bf16, contiguous, on the CPU) on the CPU
    kernel: each weight's fp32 value, rounded once to out's dtype."""
    _backend.call_native("cpu", "quantized_dequantize", out, qweight=qweight, scales=scales, zeros=zeros, out=out,
                         in_features=out.shape[1], out_features=out.shape[0], bits=bits,
                         group_size=group_size or 0, dtype=out.dtype)
    return out


def _dequantized_matmul(x, qweight, scales, zeros, bits, group_size, out):
    """out = x W^T through bf16 copies of W's rows, a chunk at a time (a buffer reused, not W's size allocated and
    faulted in per call)."""
    in_features = x.shape[1]
    chunk = max(1, DEQUANTIZED_CHUNK_BYTES // (in_features * x.element_size()))
    buffer = torch.empty(min(chunk, out.shape[1]), in_features, dtype=x.dtype)
    for start in range(0, out.shape[1], chunk):
        stop = min(start + chunk, out.shape[1])
        weight = cpu_dequantize(qweight[start:stop], scales[start:stop], None if zeros is None else zeros[start:stop],
                                bits, group_size, buffer[:stop - start])
        out[:, start:stop] = x @ weight.T


def _cpu_forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, out):
    rows, in_features = x.shape
    if dequantizes_for_matmul(x, bias, int8_inputs):
        _dequantized_matmul(x, qweight, scales, zeros, bits, group_size, out)
        return
    _backend.call_native(
        "cpu", "quantized_linear", x, work=(rows + out.shape[1]) * in_features, x=x, x_row_stride=x.stride(0),
        qweight=qweight, scales=scales, zeros=zeros, bias=bias, out=out, rows=rows, in_features=in_features,
        out_features=out.shape[1], bits=bits, group_size=group_size, dtype=x.dtype, int8_inputs=int8_inputs)


def _cpu_backward(grad_out, qweight, scales, zeros, bits, group_size, grad_x):
    rows, in_features = grad_x.shape
    _backend.call_native(
        "cpu", "quantized_linear_backward", grad_x, work=(rows + grad_out.shape[1]) * in_features,
        grad_out=grad_out, grad_out_row_stride=grad_out.stride(0), qweight=qweight, scales=scales, zeros=zeros,
        grad_x=grad_x, rows=rows, in_features=in_features, out_features=grad_out.shape[1], bits=bits,
        group_size=group_size, dtype=grad_x.dtype)


def _triton_forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, out):
    triton_quantized_linear.forward(x, qweight, scales, zeros, bias, bits, group_size, out)


def _triton_limits(int8_inputs):
    return "does not round inputs to int8 (int8_inputs, a CPU path)" if int8_inputs else None


IMPLEMENTATIONS = Implementations(
    "quantized_linear",
    triton=Implementation(_triton_forward, triton_quantized_linear.backward, limits=_triton_limits),
    cpu=Implementation(_cpu_forward, _cpu_backward),
    torch=Implementation(_torch_forward, _torch_backward),
)


def _in_features(qweight, bits):
    return qweight.shape[1] * (2 if bits == 4 else 1)


@_backend.autocast_off
def _forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, backend):
    """x: (rows, in_features) with unit last stride. Returns out (rows, out_features) in x's dtype."""
    out = torch.empty((x.shape[0], qweight.shape[0]), dtype=x.dtype, device=x.device)
    if out.numel():
        with _backend.on_device(x):
            IMPLEMENTATIONS[backend].forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, out)
    return out


@_backend.autocast_off
def _backward(grad_out, qweight, scales, zeros, bits, group_size, backend):
    grad_x = torch.empty((grad_out.shape[0], _in_features(qweight, bits)), dtype=grad_out.dtype,
                         device=grad_out.device)
    if not grad_out.numel():
        return grad_x.zero_()
    with _backend.on_device(grad_out):
        IMPLEMENTATIONS[backend].backward(grad_out, qweight, scales, zeros, bits, group_size, grad_x)
    return grad_x


# --- torch.library ops (opaque to torch.compile, with fake implementations) and autograd ------------------------------


@torch.library.custom_op("aquila::quantized_linear", mutates_args=())
def _forward_op(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bias: Optional[Tensor],
                bits: int, group_size: int, int8_inputs: bool, backend: str) -> Tensor:
    return _forward(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, backend)


@_forward_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, int8_inputs, backend):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("aquila::quantized_linear_backward", mutates_args=())
def _backward_op(grad_out: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                 group_size: int, backend: str) -> Tensor:
    return _backward(_backend.with_unit_stride(grad_out), qweight, scales, zeros, bits, group_size, backend)


@_backward_op.register_fake
def _(grad_out, qweight, scales, zeros, bits, group_size, backend):
    return grad_out.new_empty((grad_out.shape[0], _in_features(qweight, bits)))


class QuantizedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, bias, bits, group_size, backend):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.options = (bits, group_size, backend)
        return _forward_op(x, qweight, scales, zeros, bias, bits, group_size, False, backend)

    @staticmethod
    def backward(ctx, grad_out):
        qweight, scales, zeros = ctx.saved_tensors
        grad_x = _backward_op(grad_out, qweight, scales, zeros, *ctx.options) if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.sum(0, dtype=torch.float32) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, None, grad_bias, None, None, None


# --- Public API -----------------------------------------------------------------------------------------------------


def _check_weights(op, qweight, scales, zeros, bits, group_size, symmetric, in_features, device):
    """Checks the quantized tensors against x's in_features; returns out_features."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{op}: bits must be 4 or 8, got {bits!r}")
    _backend.check_tensor(op, "qweight", qweight, dtypes=None, device=device)
    if qweight.dtype != WEIGHT_DTYPES[bits]:
        raise TypeError(f"{op}: qweight must be {WEIGHT_DTYPES[bits]} for {bits} bits, got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[0] == 0:
        raise ValueError(f"{op}: qweight must be 2-D [out_features >= 1, ...], got shape {tuple(qweight.shape)}")
    out_features = qweight.shape[0]
    if bits == 8:
        if group_size is not None:
            raise ValueError(f"{op}: 8 bits have one scale per output feature; group_size is for 4 bits only, got "
                             f"{group_size!r}")
        if zeros is not None or symmetric is False:
            raise ValueError(f"{op}: 8 bits are symmetric: zeros must be None")
        if qweight.shape[1] != in_features:
            raise ValueError(f"{op}: qweight must have shape ({out_features}, {in_features}) (in_features from x), "
                             f"got {tuple(qweight.shape)}")
        _backend.check_tensor(op, "scales", scales, dtypes=(torch.float32,), device=device, shape=(out_features,))
        return out_features
    if in_features % 2 or qweight.shape[1] != in_features // 2:
        raise ValueError(f"{op}: 4-bit qweight packs two input features per byte: x's last dimension must be even and "
                         f"qweight must have shape ({out_features}, {in_features // 2}) for in_features "
                         f"{in_features}, got {tuple(qweight.shape)}")
    if group_size is None or isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or (
            group_size % 2):
        raise ValueError(f"{op}: 4 bits need group_size, an even int >= 2, got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"{op}: in_features ({in_features}) must be a multiple of group_size ({group_size})")
    groups = (out_features, in_features // group_size)
    _backend.check_tensor(op, "scales", scales, dtypes=(torch.float32,), device=device, shape=groups)
    if zeros is None:
        if symmetric is False:
            raise ValueError(f"{op}: asymmetric 4-bit weights need zeros (uint8 {groups}), got None")
    else:
        if symmetric is True:
            raise ValueError(f"{op}: symmetric 4-bit weights take no zeros (their zero is {SYMMETRIC_ZERO}), got a "
                             "zeros tensor")
        _backend.check_tensor(op, "zeros", zeros, dtypes=(torch.uint8,), device=device, shape=groups)
    return out_features


def quantized_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor] = None, *, bits: int,
                     group_size: Optional[int] = None, bias: Optional[Tensor] = None,
                     symmetric: Optional[bool] = None, int8_inputs: bool = False,
                     backend: Optional[str] = None) -> Tensor:
    """x @ W^T + bias for x [..., in_features] (fp32, fp16 or bf16) and W quantized (this module's docstring):
    bits 8 (group_size None, zeros None) or bits 4 (group_size given; zeros for asymmetric weights). symmetric, when
    given, is checked against zeros. bias [out_features] in any float dtype, or None. Returns [..., out_features] in
    x's dtype (autocast's under autocast). Differentiable in x and bias; the quantized tensors are frozen.
    int8_inputs: x rounded to int8 first (round_inputs_to_int8; the module's docstring), for inference only (no
    gradient), on the CPU and torch backends."""
    op = "quantized_linear"
    _backend.check_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last (in_features) dimension, got shape {tuple(x.shape)}")
    if symmetric is not None and not isinstance(symmetric, bool):
        raise ValueError(f"{op}: symmetric must be a bool or None, got {symmetric!r}")
    if not isinstance(int8_inputs, bool):
        raise ValueError(f"{op}: int8_inputs must be a bool, got {int8_inputs!r}")
    out_features = _check_weights(op, qweight, scales, zeros, bits, group_size, symmetric, x.shape[-1], x.device)
    if bias is not None:
        _backend.check_tensor(op, "bias", bias, device=x.device, shape=(out_features,))
    if torch.is_grad_enabled() and scales.requires_grad:
        raise ValueError(f"{op}: scales requires grad, but the quantized weights are frozen: gradients flow to x and "
                         "bias only (detach scales, or set its requires_grad to False)")
    # A matmul at heart: in autocast's dtype under autocast, as torch's linear; else in x's dtype.
    cast = _backend.autocast_dtype(x)
    if cast is not None:
        x = x.to(cast)
    backward = _backend.needs_backward(x, bias)
    if int8_inputs and backward:
        raise ValueError(f"{op}: int8_inputs rounds x for inference and has no gradient: call it under "
                         "torch.no_grad(), or on x and bias that do not require grad")
    backend = _backend.resolve(IMPLEMENTATIONS, x, backend, op=op, backward=backward, int8_inputs=int8_inputs)
    rows = _backend.as_rows(x)
    weights = [qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous()]
    bias = None if bias is None else bias.float().contiguous()
    group_size = 0 if bits == 8 else group_size
    if _backend.direct_call(backward):
        out = _forward(rows, *weights, bias, bits, group_size, int8_inputs, backend)
    else:
        out = QuantizedLinearFunction.apply(rows, *weights, bias, bits, group_size, backend)
    return out.view(*x.shape[:-1], out_features)
