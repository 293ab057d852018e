"""Weight-only quantization (aquila/model/quantize.py): the round trip's error bound checked exactly in float64, the
scale rule, the int4 packing, the errors, QuantizedLinear against a float64 reference, and quantized Aquila models
through the loss, the KV-cache path and generation."""

import pytest
import torch
import torch.nn.functional as F

from aquila import kernels
from aquila.model import native_decode
from aquila.model.config import AquilaConfig
from aquila.model.generate import Sampling, generate
from aquila.model.model import Aquila, KVCache
from aquila.model.quantize import (
    Quantization,
    QuantizedLinear,
    dequantize_tensor,
    int8_inputs,
    linears_to_quantize,
    quantization_of,
    quantize_model,
    quantize_tensor,
    unpack_int4,
)
from tests.tolerance import assert_matches_reference

# (bits, group_size, symmetric)
LAYOUTS = [(8, None, True), (4, 128, True), (4, 128, False), (4, 32, True), (4, 32, False), (4, 2, False)]
LAYOUT_IDS = ["int8", "int4-g128-sym", "int4-g128-asym", "int4-g32-sym", "int4-g32-asym", "int4-g2-asym"]
# Awkward shapes: one row, in_features equal to the group size, odd out_features, many groups.
SHAPES = [(1, 256), (7, 128), (33, 512), (2, 1024)]
QMAX = {(8, True): 127, (4, True): 7, (4, False): 15}


def random_weight(shape, kind, dtype=torch.float32):
    """Weights of several kinds: Gaussian, heavy-tailed with outliers, tiny, huge, with zero and constant groups,
    all of one sign."""
    out, inp = shape
    w = torch.randn(out, inp, dtype=torch.float64)
    if kind == "outliers":
        w = torch.distributions.StudentT(2.0).sample((out, inp)).double()
        w[0, 0] = 50.0
    elif kind == "tiny":
        w *= 1e-38  # subnormal float32 values: scales that round to 0 without the rounding up
    elif kind == "huge":
        w *= 1e37
    elif kind == "zeros-and-constants":
        w[:, :64] = 0.0  # a zero group (int4 g32/g2), part of a row (int8, g128)
        w[:, 64:96] = 0.75  # a constant group
        w[-1] = 0.0  # a zero row
    elif kind == "one-sign":
        w = w.abs() + 3.0
    return w.to(dtype)


def per_element_scale(scales, bits, group_size, in_features):
    scales = scales.double()
    return scales[:, None].expand(-1, in_features) if bits == 8 else scales.repeat_interleave(group_size, dim=1)


@pytest.mark.parametrize("bits, group_size, symmetric", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["gaussian", "outliers", "tiny", "huge", "zeros-and-constants", "one-sign"])
def test_every_element_is_within_half_a_scale_exactly(bits, group_size, symmetric, shape, kind):
    """|w - dequantize(quantize(w))| <= scale / 2 for every element, in float64 (exact here: products of a 4- or
    8-bit integer and a float32 scale, and their differences from float32 weights, are float64 numbers), with the
    buffers the interface promises."""
    if kind == "zeros-and-constants" and group_size == 128 and shape[1] == 128:
        pytest.skip("the constant and zero columns are one group here; covered by the other shapes")
    out_features, in_features = shape
    w = random_weight(shape, kind)
    q = quantize_tensor(w, bits, group_size, symmetric)
    groups = 1 if bits == 8 else in_features // group_size
    if bits == 8:
        assert q.qweight.dtype == torch.int8 and q.qweight.shape == shape
        assert q.scales.dtype == torch.float32 and q.scales.shape == (out_features,)
        assert q.qweight.abs().max() <= 127
    else:
        assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (out_features, in_features // 2)
        assert q.scales.dtype == torch.float32 and q.scales.shape == (out_features, groups)
        if symmetric:
            assert unpack_int4(q.qweight).min() >= 1  # nibble 0 (q = -8) is never used: the range is symmetric
    if symmetric:
        assert q.zeros is None
    else:
        assert q.zeros.dtype == torch.uint8 and q.zeros.shape == (out_features, groups) and q.zeros.max() <= 15
    assert torch.isfinite(q.scales).all() and (q.scales >= 0).all()
    exact = w.double()
    dense = dequantize_tensor(*q, bits, group_size, dtype=torch.float64)
    scale = per_element_scale(q.scales, bits, group_size, in_features)
    error = (exact - dense).abs()
    worst = (error - scale / 2).argmax()
    assert (error <= scale / 2).all(), (f"element {worst.item()}: error {error.flatten()[worst].item():.6g} > half "
                                        f"its scale {scale.flatten()[worst].item() / 2:.6g}")
    assert (dense[exact == 0] == 0).all()  # both grids hold 0 exactly (the asymmetric range includes it)
    if kind == "zeros-and-constants":
        assert (dense[-1] == 0).all() and (q.scales[-1] == 0).all()  # a zero row: scale 0, no NaN


@pytest.mark.parametrize("bits, group_size, symmetric", LAYOUTS, ids=LAYOUT_IDS)
def test_the_scale_is_the_smallest_float32_that_covers_the_range(bits, group_size, symmetric):
    """scale >= range / QMAX, and the float32 just below it is not (checked in float64, where the products of a
    float32 and a small integer are exact)."""
    w = random_weight((9, 256), "outliers")
    scales = quantize_tensor(w, bits, group_size, symmetric).scales.double().reshape(9, -1)
    rows = w.double().view(9, scales.shape[1], -1)
    if symmetric:
        needed = rows.abs().amax(-1)
    else:
        needed = rows.amax(-1).clamp(min=0) - rows.amin(-1).clamp(max=0)
    qmax = QMAX[(bits, symmetric)]
    below = torch.nextafter(scales.float(), torch.tensor(0.0)).double()
    assert (scales * qmax >= needed).all()
    assert (below * qmax < needed).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_input_dtypes_quantize_their_float32_values(dtype):
    w = random_weight((4, 128), "gaussian", dtype)
    q = quantize_tensor(w, 4, 64, False)
    reference = quantize_tensor(w.float(), 4, 64, False)
    for actual, expected in zip(q, reference):
        assert torch.equal(actual, expected)


def test_int4_packing_puts_even_columns_in_the_low_nibble():
    """Weights on the grid of scale 1 (absmax 7): the nibbles are q + 8, column 2k in the low nibble."""
    w = torch.tensor([[-7.0, 7.0, 0.0, 1.0, -1.0, 3.0]])
    q = quantize_tensor(w, 4, 6, symmetric=True)
    assert q.scales.tolist() == [[1.0]]
    # nibbles 1, 15, 8, 9, 7, 11 -> bytes 0xF1, 0x98, 0xB7
    assert q.qweight.tolist() == [[0xF1, 0x98, 0xB7]]
    assert unpack_int4(q.qweight).tolist() == [[1, 15, 8, 9, 7, 11]]
    # Hand-made buffers dequantize by the documented formulas.
    qweight = torch.tensor([[0x21, 0xF0]], dtype=torch.uint8)  # nibbles 1, 2, 0, 15
    scales = torch.tensor([[0.5, 2.0]])
    zeros = torch.tensor([[1, 3]], dtype=torch.uint8)
    assert dequantize_tensor(qweight, scales, None, 4, 2).tolist() == [[-3.5, -3.0, -16.0, 14.0]]
    assert dequantize_tensor(qweight, scales, zeros, 4, 2).tolist() == [[0.0, 0.5, -6.0, 24.0]]
    int8 = torch.tensor([[-127, 5], [3, 0]], dtype=torch.int8)
    assert dequantize_tensor(int8, torch.tensor([0.5, 2.0]), None, 8).tolist() == [[-63.5, 2.5], [6.0, 0.0]]


@pytest.mark.parametrize("bits, group_size, symmetric", LAYOUTS, ids=LAYOUT_IDS)
def test_float32_dequantization_is_the_float64_value_rounded(bits, group_size, symmetric):
    q = quantize_tensor(random_weight((5, 256), "outliers"), bits, group_size, symmetric)
    expected = dequantize_tensor(*q, bits, group_size, dtype=torch.float64)
    assert_matches_reference(dequantize_tensor(*q, bits, group_size), expected, "dequantized")
    bf16 = dequantize_tensor(*q, bits, group_size, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert_matches_reference(bf16, expected, "dequantized to bf16")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(value):
    w = torch.randn(3, 128)
    w[2, 77] = value
    with pytest.raises(ValueError, match=r"^quantize: layers.0.wq.weight has NaN or infinite values, which have no "
                                         r"quantization$"):
        quantize_tensor(w, 4, 64, name="layers.0.wq.weight")
    model = Aquila(AquilaConfig(dim=64, n_layers=1, n_heads=2, vocab_size=50, multiple_of=16))
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight[0, 0] = value
    with pytest.raises(ValueError, match=r"quantize: layers.0.feed_forward.w2.weight has NaN or infinite values"):
        quantize_model(model, 8)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing replaced


@pytest.mark.parametrize("call, message", [
    (lambda: quantize_tensor(torch.randn(4, 96), 4, 64), r"quantize: weight: in_features \(96\) must be a multiple "
                                                         r"of group_size \(64\)"),
    (lambda: quantize_tensor(torch.randn(4, 96), 4, 3), r"quantize: weight: group_size must be an even int >= 2, "
                                                        r"got 3"),
    (lambda: quantize_tensor(torch.randn(4, 96), 3), r"quantize: weight: bits must be 4 or 8, got 3"),
    (lambda: quantize_tensor(torch.randn(4, 96), 8, symmetric=False), r"quantize: weight: 8 bits are symmetric only"),
    (lambda: quantize_tensor(torch.randn(96), 8), r"quantize: weight must be a 2-D float tensor, got torch.float32 "
                                                  r"of shape \(96,\)"),
    (lambda: quantize_tensor(torch.ones(2, 4, dtype=torch.int32), 8), r"must be a 2-D float tensor, got torch.int32"),
    (lambda: QuantizedLinear(100, 8, 4, 64), r"QuantizedLinear: in_features \(100\) must be a multiple of group_size "
                                             r"\(64\)"),
    (lambda: Quantization(4, 0), r"Quantization: group_size must be an even int >= 2, got 0"),
    (lambda: Quantization(8, 128), r"Quantization: 8 bits quantize per output channel; group_size applies to 4 bits"),
    (lambda: Quantization(2), r"Quantization: bits must be 4 or 8, got 2"),
])
def test_bad_layouts_are_refused_by_name(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_group_size_that_does_not_divide_a_layer_names_it_and_changes_nothing():
    model = Aquila(AquilaConfig(dim=128, n_layers=1, n_heads=2, vocab_size=50, ffn_dim=320))
    with pytest.raises(ValueError, match=r"^quantize_model: layer 'layers.0.feed_forward.w2' has 320 input features, "
                                         r"not a multiple of group_size 128$"):
        quantize_model(model, 4, 128)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


@pytest.mark.parametrize("bits, group_size, symmetric", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_matches_a_float64_reference(bits, group_size, symmetric, dtype):
    weight = random_weight((33, 256), "gaussian")
    layer = QuantizedLinear.from_weight(weight, bits, group_size, symmetric)
    assert (layer.bits, layer.group_size, layer.symmetric, layer.in_features, layer.out_features) == (
        bits, group_size, symmetric, 256, 33)
    assert {name for name, b in layer.named_buffers()} == ({"qweight", "scales"} | ({"zeros"} if not symmetric else
                                                                                    set()))
    x = torch.randn(3, 5, 256).to(dtype)
    dense = layer.dequantize(torch.float64)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, 33)
    # The layer runs aquila.kernels.quantized_linear: the weights dequantized exactly in fp32 and the sums in fp32,
    # one rounding to x's dtype; the fp32 error is relative to the products' magnitude.
    expected = x.double() @ dense.T
    assert_matches_reference(out, expected, "x @ W^T", scale=(x.double().abs() @ dense.abs().T).max().item())


@pytest.mark.parametrize("bits, group_size, symmetric", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_kernels_quantized_linear_takes_the_layers_buffers_as_they_are(bits, group_size, symmetric, backend):
    """aquila.kernels.quantized_linear, the native op for this interface, computes what the layer's reference path
    does from its buffers and attributes unchanged (the hand-over point: quantize.quantized_linear)."""
    from aquila.kernels import backend as kernel_backends
    from aquila.kernels import quantized_linear as kernel

    if backend == "cpu" and kernel_backends.cpu_extension is None:
        pytest.skip("the CPU extension is not built")
    layer = QuantizedLinear.from_weight(random_weight((33, 256), "outliers"), bits, group_size, symmetric)
    x = torch.randn(5, 256)
    out = kernel(x, layer.qweight, layer.scales, layer.zeros, bits=layer.bits, group_size=layer.group_size,
                 symmetric=layer.symmetric, backend=backend)
    expected = x.double() @ layer.dequantize(torch.float64).T
    scale = (x.double().abs() @ layer.dequantize(torch.float64).abs().T).max().item()
    assert_matches_reference(out, expected, "quantized_linear", scale=scale)
    assert_matches_reference(layer(x), expected, "the layer's reference path", scale=scale)


def test_casting_a_quantized_model_keeps_its_scales_float32():
    model = quantize_model(tiny_model(), 4, 16, symmetric=False).to(torch.bfloat16)
    layer = model.layers[0].attention.wq
    assert (layer.qweight.dtype, layer.scales.dtype, layer.zeros.dtype) == (torch.uint8, torch.float32, torch.uint8)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.half().layers[1].feed_forward.w2.scales.dtype == torch.float32
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float16


def tiny_model(**changes):
    config = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
    torch.manual_seed(0)
    return Aquila(AquilaConfig(**{**config, **changes})).eval()


LINEARS = {"attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
           "feed_forward.w3"}


OUTPUT_FORMS = {8: (8, None, True), 4: (4, 16, False), None: None}  # output_bits: the output's (bits, group, sym)


@pytest.mark.parametrize("output_bits", [8, 4, None], ids=["int8-output", "int4-output", "dense-output"])
def test_quantize_model_replaces_every_block_linear_and_the_output_as_asked(output_bits):
    model = tiny_model()
    quantize_model(model, 4, 16, symmetric=False, output_bits=output_bits)
    quantized = {name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    expected = {f"layers.{i}.{linear}" for i in range(2) for linear in LINEARS} | (set() if output_bits is None else
                                                                                     {"output"})
    assert quantized == expected
    assert not any(isinstance(m, torch.nn.Linear) for name, m in model.named_modules() if name in expected)
    assert all((m.bits, m.group_size, m.symmetric) == (4, 16, False) for name, m in model.named_modules()
               if name in expected and name != "output")
    if output_bits is not None:
        assert (model.output.bits, model.output.group_size, model.output.symmetric) == OUTPUT_FORMS[output_bits]
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)
    assert quantization_of(model) == Quantization(4, 16, symmetric=False, output_bits=output_bits)


def test_the_output_projection_is_int8_by_default():
    spec = Quantization(4)
    assert (spec.output_bits, spec.output_layout(), spec.describe()) == (8, (8, None, True),
                                                                         "int4 g128 sym, output int8")
    assert Quantization(8).describe() == "int8, output int8"
    assert Quantization(8, output_bits=None).describe() == "int8, output dense"
    assert Quantization(4, 32, False, output_bits=4).describe() == "int4 g32 asym, output int4"
    assert Quantization(4, 64, False, output_bits=4).output_layout() == (4, 64, False)
    model = quantize_model(tiny_model(), 8)
    assert (model.output.bits, quantization_of(model)) == (8, Quantization(8))


@pytest.mark.parametrize("spec, message", [
    (lambda: Quantization(8, output_bits=4), r"^Quantization: output_bits=4 quantizes the output projection as the "
                                             r"int4 blocks; int8 blocks take output_bits 8 or None$"),
    (lambda: Quantization(4, output_bits=2), r"^Quantization: output_bits must be 8, 4 or None \(kept in the model's "
                                             r"dtype\), got 2$"),
    (lambda: Quantization(4, output_bits=True), r"output_bits must be 8, 4 or None .*got True$"),
    (lambda: Quantization(4, symmetric=1), r"^Quantization: symmetric must be a bool, got 1$"),
])
def test_bad_output_projection_forms_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        spec()


def test_quantization_of_refuses_an_output_it_cannot_describe():
    model = quantize_model(tiny_model(), 4, 16, output_bits=None)
    model.output = QuantizedLinear.from_weight(torch.randn(97, 64), 4, 32)  # int4, but not as the blocks
    with pytest.raises(ValueError, match=r"output projection is quantized as \(4, 32, True\), which is neither int8 "
                                         r"nor its blocks' \(4, 16, True\)"):
        quantization_of(model)
    dense_blocks = tiny_model()
    dense_blocks.output = QuantizedLinear.from_weight(torch.randn(97, 64), 8)
    with pytest.raises(ValueError, match=r"output projection is quantized but none of its blocks' linears is"):
        quantization_of(dense_blocks)


def test_a_tied_output_stays_with_the_embeddings():
    model = tiny_model(tie_embeddings=True)
    assert [name for name, _ in linears_to_quantize(model, quantize_output=True)] == [
        f"layers.{i}.{linear}" for i in range(2) for linear in
        ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
         "feed_forward.w3")]
    quantize_model(model, 8)
    assert model.output.weight is model.tok_embeddings.weight
    assert quantization_of(model) == Quantization(8, output_bits=None)


# bound: the logits' distance from the unquantized model's, relative. Int8 rounds each weight by up to absmax / 254,
# about 0.6% of a row's norm at these widths; an int8 output projection puts its share straight into the logits.
@pytest.mark.parametrize("spec, bound", [(Quantization(8, output_bits=None), 0.01), (Quantization(8), 0.02),
                                         (Quantization(4, 16, output_bits=None), 0.15), (Quantization(4, 16), 0.15),
                                         (Quantization(4, 16, symmetric=False, output_bits=4), 0.15)],
                         ids=["int8-dense-output", "int8", "int4-g16-sym-dense-output", "int4-g16-sym",
                              "int4-g16-asym-int4-output"])
def test_a_quantized_model_computes_its_dequantized_weights(spec, bound):
    """Logits and loss equal those of a dense model holding the dequantized weights; they stay near the original
    model's."""
    original = tiny_model()
    model = quantize_model(tiny_model(), spec.bits, spec.group_size, spec.symmetric, spec.output_bits)
    dense = tiny_model()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QuantizedLinear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    tokens = torch.randint(0, 97, (2, 13))
    targets = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        logits = model(tokens)
        torch.testing.assert_close(logits, dense(tokens), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens, targets), dense(tokens, targets), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(tokens, targets), F.cross_entropy(logits.reshape(-1, 97), targets.flatten()),
                                   rtol=1e-5, atol=1e-5)
        reference = original(tokens)
    relative = ((logits - reference).norm() / reference.norm()).item()
    assert relative < bound, f"logits {relative:.3g} from the unquantized model's"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_model_decodes_on_the_native_step(dtype):
    """A quantized model takes the one-call C++ step (csrc/cpu/decode.cpp reads the quantized buffers; its own tests
    are in test_native_decode_quantized.py), its cached decoding gives the logits of a full forward, and greedy
    generation (fp32) the tokens of recomputing the whole sequence each step."""
    dense = tiny_model().to(dtype)
    cache = KVCache(dense.config, 1, 32, dtype=dtype)
    if native_decode.decoder(dense, cache) is None:
        pytest.skip("the native decoding step does not run here (no CPU extension)")
    model = quantize_model(dense, 4, 16)
    assert model._native_decoder(cache) is not None
    step = model.decoder(cache)
    tolerance = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    prompt = torch.tensor([[5, 17, 3, 60, 2]])
    with torch.no_grad():
        prefill = model.forward_with_cache(prompt, cache)
        torch.testing.assert_close(prefill, model(prompt), **tolerance)
        token = prefill[:, -1:].argmax(-1)
        logits = step(token)
        # The native step's logits are fp32 (its activations are), the bf16 modules' bf16.
        torch.testing.assert_close(logits[:, -1], model(torch.cat([prompt, token], 1))[:, -1].float(), **tolerance)
    tokens = generate(model, [prompt[0].tolist()], Sampling(max_new_tokens=8))[0]
    assert len(tokens) == 8 and all(0 <= t < 97 for t in tokens)
    if dtype == torch.float32:
        sequence = prompt[0].tolist()
        with torch.no_grad():
            for _ in range(8):
                sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
        assert tokens == sequence[5:]


@pytest.mark.parametrize("forced, dtype", [("1", torch.float32), ("0", torch.bfloat16), (None, torch.bfloat16),
                                           (None, torch.float32)])
def test_a_prefill_rounds_quantized_inputs_where_the_decoding_step_does(monkeypatch, forced, dtype):
    """forward_with_cache's quantized linears take int8 inputs exactly where the decoding step made for the same model
    does (AQUILA_DECODE_INT8_INPUTS, else bf16 on a CPU with VNNI); the training forward never does."""
    if forced is None:
        monkeypatch.delenv(native_decode.INT8_INPUTS_ENV, raising=False)
    else:
        monkeypatch.setenv(native_decode.INT8_INPUTS_ENV, forced)
    model = quantize_model(tiny_model().to(dtype), 4, 16)
    cache = KVCache(model.config, 1, 32, dtype=dtype)
    rounds = native_decode.default_int8_inputs(dtype)
    step = native_decode.decoder(model, cache)
    assert step is None or step.int8_inputs == rounds  # None: no CPU extension, the modules decode (and round alike)
    calls = []
    original = kernels.quantized_linear

    def recording(*args, **kwargs):
        calls.append(kwargs["int8_inputs"])
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "quantized_linear", recording)
    prompt = torch.randint(0, 97, (1, 20))
    model.forward_with_cache(prompt, cache)
    assert len(calls) == 2 * 7 + 1 and set(calls) == {rounds}
    calls.clear()
    with torch.no_grad():
        model(prompt)
    assert len(calls) == 2 * 7 + 1 and set(calls) == {False}


def test_int8_inputs_takes_a_bool():
    with pytest.raises(ValueError, match="int8_inputs: enabled must be a bool, got 1"), int8_inputs(1):
        pass
