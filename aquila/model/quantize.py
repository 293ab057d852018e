"""Weight-only quantization of the model's linear layers: int8 per output channel, int4 in groups along the input.

A QuantizedLinear holds, for a weight W [out_features, in_features]:

    qweight   8 bits: int8 [out, in], q in [-127, 127]
              4 bits: uint8 [out, in // 2], input column 2k in the low nibble, column 2k + 1 in the high nibble
    scales    8 bits: float32 [out]; 4 bits: float32 [out, in // group_size]
    zeros     4 bits asymmetric only: uint8 [out, in // group_size], values 0..15 (None otherwise)

    W[o, i] = q[o, i] * scales[o]                                   8 bits (symmetric)
    W[o, i] = (nibble[o, i] - 8) * scales[o, i // group_size]        4 bits symmetric (nibbles 1..15)
    W[o, i] = (nibble[o, i] - zeros[o, g]) * scales[o, g]            4 bits asymmetric, g = i // group_size

with the attributes bits, group_size (None for 8 bits: one scale per output row), symmetric, in_features and
out_features. in_features must be a multiple of group_size, which must be even. These buffers are the interface of
the native int8/int4 matmul, aquila.kernels.quantized_linear, which takes them as they are (quantized_linear(x, layer)
below): the weights are dequantized in registers, never materialised.

Quantization is round-to-nearest. The scale of a row (8 bits) or group (4 bits) is its absolute maximum over 127 or 7
(symmetric), or (max - min) / 15 over the range widened to include 0 (asymmetric, the zero point being
round(-min / scale)), rounded up to float32. The division runs in float64, so every element is within half a scale of
its dequantized value, exactly: |W - dequantize(quantize(W))| <= scale / 2 (the tests check it in float64). A row or
group of zeros gets scale 0 and dequantizes to 0. A NaN or infinite weight is refused: it has no quantization.

quantize_model replaces the linears of an Aquila in place: q/k/v/o and the SwiGLU's w1/w2/w3 in every block, and the
output projection as output_bits says: 8 (the default) in int8 per output channel, whatever the blocks' bits, as
llama.cpp keeps its Q4_0 files' output in 6 bits; 4 (int4 blocks only) in the blocks' int4; None in the model's dtype
(bf16 for a bf16 model). It is the one layer whose error goes straight into the logits, and 5.6% of Aquila-7B's
parameters: in bf16, 0.82 of the 4.3 GB an int4 g128 decoding step reads. A shared embedding table (tie_embeddings) is
never quantized, so neither is an output tied to it. Embeddings and norms are never quantized.
"""

import contextlib
import contextvars
import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from aquila import kernels

BITS = (4, 8)
DEFAULT_GROUP_SIZE = 128
# The largest |q| of symmetric quantization, and the largest nibble of asymmetric: scale = absmax / QMAX[bits].
SYMMETRIC_QMAX = {8: 127, 4: 7}
ASYMMETRIC_QMAX = 15
INT4_OFFSET = 8  # a symmetric int4 value q is stored as the nibble q + 8


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How to quantize a model: bits 8 (per output channel, symmetric) or 4 (group_size input columns per scale,
    symmetric or not); output_bits for the output projection: 8 (int8 per output channel), 4 (as the int4 blocks) or
    None (kept in the model's dtype)."""

    bits: int
    group_size: Optional[int] = None  # None: DEFAULT_GROUP_SIZE for 4 bits; 8 bits has no groups
    symmetric: bool = True
    output_bits: Optional[int] = 8

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"Quantization: bits must be 4 or 8, got {self.bits!r}")
        if self.bits == 8:
            if self.group_size is not None:
                raise ValueError(f"Quantization: 8 bits quantize per output channel; group_size applies to 4 bits "
                                 f"only, got {self.group_size!r}")
            if not self.symmetric:
                raise ValueError("Quantization: 8 bits are symmetric only")
        else:
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            check_group_size(self.group_size, "Quantization")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"Quantization: symmetric must be a bool, got {self.symmetric!r}")
        if self.output_bits not in (None, *BITS) or isinstance(self.output_bits, bool):
            raise ValueError(f"Quantization: output_bits must be 8, 4 or None (kept in the model's dtype), got "
                             f"{self.output_bits!r}")
        if self.output_bits == 4 and self.bits != 4:
            raise ValueError("Quantization: output_bits=4 quantizes the output projection as the int4 blocks; int8 "
                             "blocks take output_bits 8 or None")

    def describe(self) -> str:
        """int8, or int4 g128 sym / asym, then the output projection's form: "int4 g128 sym, output int8"."""
        blocks = "int8" if self.bits == 8 else f"int4 g{self.group_size} {'sym' if self.symmetric else 'asym'}"
        return f"{blocks}, output {'dense' if self.output_bits is None else f'int{self.output_bits}'}"

    def output_layout(self) -> Optional[tuple[int, Optional[int], bool]]:
        """(bits, group_size, symmetric) of the output projection; None when it stays dense."""
        if self.output_bits is None:
            return None
        return (8, None, True) if self.output_bits == 8 else (self.bits, self.group_size, self.symmetric)


def check_group_size(group_size, owner: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"{owner}: group_size must be an even int >= 2, got {group_size!r}")


class QuantizedTensor(NamedTuple):
    qweight: Tensor
    scales: Tensor
    zeros: Optional[Tensor]  # asymmetric int4 only


def quantized_shapes(out_features: int, in_features: int, bits: int, group_size: Optional[int],
                     symmetric: bool) -> dict:
    """{buffer: (dtype, shape)} of a quantized [out_features, in_features] weight (no zeros when symmetric)."""
    if bits == 8:
        return {"qweight": (torch.int8, (out_features, in_features)), "scales": (torch.float32, (out_features,))}
    groups = in_features // group_size
    shapes = {"qweight": (torch.uint8, (out_features, in_features // 2)),
              "scales": (torch.float32, (out_features, groups))}
    if not symmetric:
        shapes["zeros"] = (torch.uint8, (out_features, groups))
    return shapes


def _check_layout(owner: str, out_features: int, in_features: int, bits: int, group_size: Optional[int],
                  symmetric: bool) -> None:
    if bits not in BITS:
        raise ValueError(f"{owner}: bits must be 4 or 8, got {bits!r}")
    if bits == 8:
        if not symmetric:
            raise ValueError(f"{owner}: 8 bits are symmetric only")
        return
    check_group_size(group_size, owner)
    if in_features % group_size:
        raise ValueError(f"{owner}: in_features ({in_features}) must be a multiple of group_size ({group_size})")


def _scales_rounded_up(scales: Tensor) -> Tensor:
    """float64 scales as float32 no smaller than them, so that no value quantizes beyond the range."""
    rounded = scales.to(torch.float32)
    return torch.where(rounded.double() < scales, torch.nextafter(rounded, torch.tensor(float("inf"))), rounded)


def quantize_tensor(weight: Tensor, bits: int, group_size: Optional[int] = DEFAULT_GROUP_SIZE,
                    symmetric: bool = True, name: str = "weight") -> QuantizedTensor:
    """The quantized form of a weight [out_features, in_features] (any float dtype; float64 is rounded to float32
    first). group_size is ignored for 8 bits. name appears in the errors (a layer's, a checkpoint tensor's)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize: {name} must be a 2-D float tensor, got {weight.dtype} of shape "
                         f"{tuple(weight.shape)}")
    out_features, in_features = weight.shape
    _check_layout(f"quantize: {name}", out_features, in_features, bits, group_size, symmetric)
    # float64, and our own copy: divided in place below. float16 and bfloat16 widen exactly.
    w = weight.detach().to(torch.float32 if weight.dtype == torch.float64 else weight.dtype).to(torch.float64,
                                                                                                copy=True)
    rows = w.view(out_features, 1, in_features) if bits == 8 else w.view(out_features, -1, group_size)
    high, low = rows.amax(-1), rows.amin(-1)  # NaN where a group has one
    if not (torch.isfinite(high).all() and torch.isfinite(low).all()):
        raise ValueError(f"quantize: {name} has NaN or infinite values, which have no quantization")
    if symmetric:
        scales = _scales_rounded_up(torch.maximum(high, -low) / SYMMETRIC_QMAX[bits])
        zeros = None
    else:
        low.clamp_(max=0.0)  # the range includes 0
        scales = _scales_rounded_up((high.clamp_(min=0.0) - low) / ASYMMETRIC_QMAX)
    divisor = scales.double().clamp_(min=torch.finfo(torch.float64).tiny)  # a scale of 0: all zeros, which stay 0
    q = rows.div_(divisor.unsqueeze(-1)).round_()
    if symmetric:
        # |q| <= QMAX by the scale's rounding up; the clamp only guards the conversion.
        q.clamp_(-SYMMETRIC_QMAX[bits], SYMMETRIC_QMAX[bits])
        if bits == 8:
            return QuantizedTensor(w.to(torch.int8), scales.view(out_features), None)
        q += INT4_OFFSET
    else:
        zeros = torch.round(-low / divisor)  # in [0, 15]
        q += zeros.unsqueeze(-1)
        q.clamp_(0, ASYMMETRIC_QMAX)  # only at a value exactly half a step beyond the range: still within scale / 2
        zeros = zeros.to(torch.uint8)
    nibbles = w.to(torch.uint8)
    return QuantizedTensor(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales, zeros)


def unpack_int4(qweight: Tensor) -> Tensor:
    """uint8 [out, in // 2] -> the nibbles as uint8 [out, in] (column 2k from the low nibble, 2k + 1 the high)."""
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).view(qweight.shape[0], -1)


def dequantize_tensor(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                      group_size: Optional[int] = DEFAULT_GROUP_SIZE, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense weight [out, in] in dtype (computed in float32, or float64 when dtype is float64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if bits == 8:
        return (qweight.to(compute) * scales.to(compute).unsqueeze(-1)).to(dtype)
    values = unpack_int4(qweight).to(compute)
    out_features, in_features = values.shape
    grouped = values.view(out_features, -1, group_size)
    grouped -= INT4_OFFSET if zeros is None else zeros.to(compute).unsqueeze(-1)
    grouped *= scales.to(compute).unsqueeze(-1)
    return values.to(dtype)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with a weight-only quantized weight (buffers and attributes: the module's docstring).
    Built empty (to be filled by quantization or by loading a quantized checkpoint), or from a weight with
    from_weight."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: Optional[int] = DEFAULT_GROUP_SIZE,
                 symmetric: bool = True, device=None):
        super().__init__()
        group_size = None if bits == 8 else group_size
        _check_layout("QuantizedLinear", out_features, in_features, bits, group_size, symmetric)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        shapes = quantized_shapes(out_features, in_features, bits, group_size, symmetric)
        for buffer in ("qweight", "scales", "zeros"):
            if buffer in shapes:
                dtype, shape = shapes[buffer]
                self.register_buffer(buffer, torch.zeros(shape, dtype=dtype, device=device))
            else:
                self.register_buffer(buffer, None)

    @classmethod
    def from_weight(cls, weight: Tensor, bits: int, group_size: Optional[int] = DEFAULT_GROUP_SIZE,
                    symmetric: bool = True, name: str = "weight") -> "QuantizedLinear":
        """The quantized layer of a weight [out, in]; on the meta device, an empty one of its shape."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bits, group_size, symmetric, device=weight.device)
        if weight.device.type != "meta":
            layer.qweight, layer.scales, layer.zeros = quantize_tensor(weight, bits, group_size, symmetric, name)
        return layer

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16), .half() and the like cast every floating-point buffer: the scales stay float32,
        # as the format has them (the integer buffers are never cast).
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:
            self.scales = self.scales.float()
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_tensor(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return quantized_linear(x, self, int8_inputs=_int8_inputs.get())

    def extra_repr(self) -> str:
        groups = "per output channel" if self.bits == 8 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {groups}, "
                f"symmetric={self.symmetric}")


def quantized_linear(x: Tensor, layer: QuantizedLinear, int8_inputs: bool = False) -> Tensor:
    """x @ W^T for a QuantizedLinear, on aquila.kernels.quantized_linear: the weights dequantized in registers, never
    materialised. int8_inputs: x rounded to int8 first (inference only)."""
    return kernels.quantized_linear(x, layer.qweight, layer.scales, layer.zeros, bits=layer.bits,
                                    group_size=layer.group_size, symmetric=layer.symmetric, int8_inputs=int8_inputs)


_int8_inputs = contextvars.ContextVar("aquila_int8_inputs", default=False)


@contextlib.contextmanager
def int8_inputs(enabled: bool = True):
    """Within it, every QuantizedLinear takes its input rounded to int8 (aquila.kernels.quantized_linear's
    int8_inputs: blocks of 32 columns, one scale each, as the decoding step's int8_inputs), for inference: a call
    that needs a gradient is refused. The model's prefill (Aquila.forward_with_cache) enters it where the decoding
    step would round its inputs too."""
    if not isinstance(enabled, bool):
        raise ValueError(f"int8_inputs: enabled must be a bool, got {enabled!r}")
    token = _int8_inputs.set(enabled)
    try:
        yield
    finally:
        _int8_inputs.reset(token)


def linears_to_quantize(model: nn.Module, quantize_output: bool = True) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the linears quantize_model replaces: every nn.Linear but the output projection unless
    quantize_output, or when it shares the embedding table (which is never quantized)."""
    shared = getattr(getattr(model, "tok_embeddings", None), "weight", None)
    chosen = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if name == "output" and (not quantize_output or module.weight is shared):
            continue
        chosen.append((name, module))
    return chosen


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity in tensor (amax and amin propagate NaN: two reductions, no tensor of flags)."""
    return bool(torch.isfinite(tensor.amax()) and torch.isfinite(tensor.amin())) if tensor.numel() else True


def quantize_model(model: nn.Module, bits: int, group_size: Optional[int] = DEFAULT_GROUP_SIZE,
                   symmetric: bool = True, output_bits: Optional[int] = 8) -> nn.Module:
    """Replaces the model's linears with QuantizedLinear in place (which ones: linears_to_quantize; the output
    projection as output_bits says, Quantization's) and returns the model. Every layer is checked before any is
    replaced, so an error leaves the model as it was. On the meta device the layers are empty, ready for a
    checkpoint's quantized tensors. group_size is ignored for 8 bits."""
    group_size = None if bits == 8 else group_size
    spec = Quantization(bits, group_size, symmetric, output_bits)  # validates the arguments
    layers = [(name, linear, spec.output_layout() if name == "output" else (bits, spec.group_size, symmetric))
              for name, linear in linears_to_quantize(model, quantize_output=output_bits is not None)]
    for name, linear, (layer_bits, layer_group_size, _) in layers:
        if linear.bias is not None:
            raise ValueError(f"quantize_model: layer {name!r} has a bias; QuantizedLinear has none")
        if layer_bits == 4 and linear.in_features % layer_group_size:
            raise ValueError(f"quantize_model: layer {name!r} has {linear.in_features} input features, not a "
                             f"multiple of group_size {layer_group_size}")
        if linear.weight.device.type != "meta" and not all_finite(linear.weight.detach()):
            raise ValueError(f"quantize: {name}.weight has NaN or infinite values, which have no quantization")
    for name, linear, layout in layers:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, QuantizedLinear.from_weight(linear.weight, *layout, name=f"{name}.weight"))
    return model


def quantization_of(model: nn.Module) -> Optional[Quantization]:
    """How the model's linears are quantized (None when none is); a ValueError when its blocks' layers disagree, or
    when the output projection is quantized in a form Quantization cannot describe."""
    output = getattr(model, "output", None)
    layers = {(m.bits, m.group_size, m.symmetric) for m in model.modules()
              if isinstance(m, QuantizedLinear) and m is not output}
    if not layers:
        if isinstance(output, QuantizedLinear):
            raise ValueError("the model's output projection is quantized but none of its blocks' linears is; a "
                             "checkpoint describes quantized blocks")
        return None
    if len(layers) > 1:
        raise ValueError(f"the model's linears are quantized in several ways {sorted(layers, key=str)}; a checkpoint "
                         "describes one")
    bits, group_size, symmetric = layers.pop()
    if not isinstance(output, QuantizedLinear):
        return Quantization(bits, group_size, symmetric, output_bits=None)
    spec = Quantization(bits, group_size, symmetric, output_bits=output.bits)
    output_layout = (output.bits, output.group_size, output.symmetric)
    if spec.output_layout() != output_layout:
        raise ValueError(f"the model's output projection is quantized as {output_layout}, which is neither int8 nor "
                         f"its blocks' {(bits, group_size, symmetric)}")
    return spec
