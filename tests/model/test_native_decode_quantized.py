"""The one-call C++ decoding step on weight-only quantized models: int8, int4 symmetric and asymmetric at group sizes
that take each vector width of the step (128: 16 lanes, 64: 8, 32: 4 on AVX-512) and at ones no vector step divides
(the loop over each group's bytes), with the output projection kept or quantized, fp32 and bf16 embeddings, norms and
cache, at batch 1, 3 and 5 (the step reads each weight for up to 4 inputs at once). Each step's logits are compared
with a float64 step computed from the same weights (the quantized ones dequantized) and attending to the keys and
values as the cache holds them, at the tolerance tests/tolerance.py derives for fp32 outputs; the new keys and values
with their exact values at the cache dtype's; in fp32, the module path gives the same logits to fp32's tolerance and
the same greedy tokens. The narrower ISA paths
run the same comparisons in fresh processes. bf16 steps whose dense projections take bf16 inputs (vdpbf16ps) are
checked here too, against float64 steps with and without that rounding."""

import math
import os
import subprocess
import sys

import pytest
import torch

from aquila.kernels import backend as _backend
from aquila.kernels.quantized_linear import round_inputs_to_int8
from aquila.model import native_decode
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila, KVCache
from aquila.model.quantize import QuantizedLinear, quantize_model
from tests.tolerance import assert_matches_reference

pytestmark = pytest.mark.skipif(_backend.cpu_extension is None, reason="the CPU extension (aquila._C) is not built")

# dim 128 and hidden 384: every group size up to 128 divides every linear's input.
WIDE = AquilaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=128, max_seq_len=64)
# Widths that are no multiple of any vector width (dim 64, hidden 176: groups of 16 at most).
TINY = AquilaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)
# Odd widths (dim 36, hidden 50, head dim 12, interleaved rotary, one kv head): int8's step tails, int4 groups of 2.
ODD = AquilaConfig(dim=36, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=50, vocab_size=97, max_seq_len=64,
                   rope_interleaved=True)

# name: (config, bits, group_size, symmetric)
KINDS = {"int8": (WIDE, 8, None, True), "int4-g128-sym": (WIDE, 4, 128, True), "int4-g64-asym": (WIDE, 4, 64, False),
         "int4-g32-sym": (WIDE, 4, 32, True), "int4-g16-asym": (TINY, 4, 16, False), "int8-odd": (ODD, 8, None, True),
         "int4-g2-sym-odd": (ODD, 4, 2, True)}
# The output projection's forms: output_bits given the blocks' bits.
OUTPUTS = {"dense-output": lambda bits: None, "output-as-blocks": lambda bits: bits, "int8-output": lambda bits: 8}
# Each kind with each form of output projection (an int8 one differs from the blocks' for int4 kinds only).
KINDS_AND_OUTPUTS = [(kind, output) for kind, (_, bits, _, _) in KINDS.items() for output in OUTPUTS
                     if not (output == "int8-output" and bits == 8)]
# Kinds only the int8_inputs tests take (asymmetric groups that the vpdpbusd loops take).
INT8_INPUT_ONLY_KINDS = {"int4-g128-asym": (WIDE, 4, 128, False)}


def quantized_model(kind, output, dtype):
    """The model of KINDS[kind] quantized, its output projection as OUTPUTS[output] says, in dtype."""
    config, bits, group_size, symmetric = {**KINDS, **INT8_INPUT_ONLY_KINDS}[kind]
    torch.manual_seed(0)
    model = Aquila(config).eval()
    with torch.no_grad():  # norms away from 1, so that a norm weight read wrongly shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return quantize_model(model, bits, group_size, symmetric, OUTPUTS[output](bits)).to(dtype)


def dense_float64(linear):
    return linear.dequantize(torch.float64) if isinstance(linear, QuantizedLinear) else linear.weight.double()


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight.double()


def rotate(x, positions, config):
    """x [batch, heads, head_dim] rotated by each sequence's position, in float64."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / config.head_dim)
    angle = positions.double()[:, None, None] * inv_freq
    if config.rope_interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    r1, r2 = x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()
    return torch.stack((r1, r2), -1).flatten(-2) if config.rope_interleaved else torch.cat((r1, r2), -1)


def reference_step(model, tokens, k_cache, v_cache, lengths, stored, bf16_inputs=False, int8_inputs=False):
    """float64 logits [batch, vocab] of one decoding step of tokens [batch], as the C++ step computes it: the weights'
    exact values (quantized ones dequantized), float64 activations (with bf16_inputs, the dense projections' inputs
    rounded to bf16; with int8_inputs, the quantized ones' rounded to int8). k_cache, v_cache: float64 [n_layers,
    batch, max_len, kv_heads, head_dim], written at `lengths` (not advanced) with stored(layer, k, v), the new keys and
    values [batch, kv_heads, head_dim] as the cache keeps them (rounded to its dtype)."""
    c = model.config
    batch, rows = tokens.shape[0], torch.arange(tokens.shape[0])

    def project(h, linear):
        if bf16_inputs and not isinstance(linear, QuantizedLinear):
            h = h.to(torch.bfloat16).double()
        if int8_inputs and isinstance(linear, QuantizedLinear):
            h = round_inputs_to_int8(h)
        return h @ dense_float64(linear).T
    x = model.tok_embeddings.weight.double()[tokens]
    residual = torch.zeros_like(x)
    for index, layer in enumerate(model.layers):
        attention, ff = layer.attention, layer.feed_forward
        residual = residual + x
        h = rms_norm(residual, layer.attention_norm.weight, c.norm_eps)
        q = rotate(project(h, attention.wq).view(batch, c.n_heads, c.head_dim), lengths, c)
        k = rotate(project(h, attention.wk).view(batch, c.kv_heads, c.head_dim), lengths, c)
        v = project(h, attention.wv).view(batch, c.kv_heads, c.head_dim)
        k_cache[index, rows, lengths], v_cache[index, rows, lengths] = stored(index, k, v)
        attended = torch.empty(batch, c.n_heads, c.head_dim, dtype=torch.float64)
        for b in range(batch):
            keys = k_cache[index, b, :lengths[b] + 1].repeat_interleave(c.n_heads // c.kv_heads, dim=1)
            values = v_cache[index, b, :lengths[b] + 1].repeat_interleave(c.n_heads // c.kv_heads, dim=1)
            scores = torch.einsum("hd,jhd->hj", q[b], keys) / math.sqrt(c.head_dim)
            attended[b] = torch.einsum("hj,jhd->hd", scores.softmax(-1), values)
        x = project(attended.view(batch, -1), attention.wo)
        residual = residual + x
        h = rms_norm(residual, layer.ffn_norm.weight, c.norm_eps)
        gate, up = project(h, ff.w1), project(h, ff.w3)
        x = project(gate * torch.sigmoid(gate) * up, ff.w2)
    return project(rms_norm(residual + x, model.norm.weight, c.norm_eps), model.output)


def prefilled_caches(model, batch, dtype):
    """A cache prefilled through the modules with prompts of different lengths, a copy of it, and its float64 copy."""
    config = model.config
    cache = KVCache(config, batch, 16, dtype=dtype)
    generator = torch.Generator().manual_seed(batch)
    with torch.no_grad():
        for row in range(batch):
            prompt = torch.randint(0, config.vocab_size, (1, 2 + 3 * row % 7), generator=generator)
            model.forward_with_cache(prompt, cache.sequence(row), last_only=True)
    copy = KVCache(config, batch, 16, dtype=dtype)
    copy.k.copy_(cache.k), copy.v.copy_(cache.v), copy.lengths.copy_(cache.lengths)
    return cache, copy, (cache.k.double(), cache.v.double())


def stored_in(cache, lengths):
    """stored(layer, k, v) for reference_step: the new keys and values as `cache` holds them at `lengths`, after
    checking them against their exact values at the cache dtype's tolerance. The reference attends to what the cache
    holds: a value within an fp32 error of a rounding tie may round either way."""
    def stored(index, k, v):
        rows = torch.arange(lengths.shape[0])
        k_cached, v_cached = cache.k[index, rows, lengths], cache.v[index, rows, lengths]
        assert_matches_reference(k_cached, k, f"layer {index}'s new keys")
        assert_matches_reference(v_cached, v, f"layer {index}'s new values")
        return k_cached.double(), v_cached.double()
    return stored


def held_in(cache, lengths):
    """stored(layer, k, v) for reference_step: the new keys and values as `cache` holds them at `lengths`, unchecked
    (where the step's inputs are rounded, a rounding that flipped shows in them too)."""
    rows = torch.arange(lengths.shape[0])
    return lambda index, k, v: (cache.k[index, rows, lengths].double(), cache.v[index, rows, lengths].double())


def check_steps(kind, output, dtype, batch, steps=3):
    model = quantized_model(kind, output, dtype)
    assert any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert isinstance(model.output, QuantizedLinear) == (output != "dense-output")
    native_cache, module_cache, (k64, v64) = prefilled_caches(model, batch, dtype)
    step = native_decode.decoder(model, native_cache, bf16_inputs=False, int8_inputs=False)
    assert step is not None, "the native step should take this model"
    tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(7))
    initial_lengths = native_cache.lengths.tolist()
    for _ in range(steps):
        lengths = native_cache.lengths.long()
        native = step(tokens[:, None])
        assert native.shape == (batch, 1, model.config.vocab_size) and native.dtype == torch.float32
        expected = reference_step(model, tokens, k64, v64, lengths, stored_in(native_cache, lengths))
        assert_matches_reference(native[:, 0], expected, "native logits")
        torch.testing.assert_close(native_cache.k.double(), k64, rtol=0, atol=0)  # no other position written
        torch.testing.assert_close(native_cache.v.double(), v64, rtol=0, atol=0)
        if dtype == torch.float32:  # the modules compute in the model's dtype: in fp32, to fp32's tolerance too
            with torch.no_grad():
                modules = model.forward_with_cache(tokens[:, None], module_cache)  # the module path
            assert_matches_reference(modules[:, -1], expected, "module logits")
            assert native[:, 0].argmax(-1).tolist() == modules[:, -1].argmax(-1).tolist()
        assert native[:, 0].argmax(-1).tolist() == expected.argmax(-1).tolist()
        tokens = expected.argmax(-1)
    assert native_cache.lengths.tolist() == [n + steps for n in initial_lengths]


@pytest.mark.parametrize("batch", [1, 3, 5], ids=["batch1", "batch3", "batch5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind, output", KINDS_AND_OUTPUTS)
def test_native_step_on_quantized_weights_matches_float64(kind, output, dtype, batch):
    check_steps(kind, output, dtype, batch)


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_step_on_quantized_weights_on_narrower_isas(isa):
    """The step is compiled once per ISA; this machine may run AVX-512, so force each narrower one in a fresh process
    (the choice is made once per process) and rerun the comparisons there at batch 5 (a tile of 4 inputs, then 1)."""
    tests = f"{__file__}::test_native_step_on_quantized_weights_matches_float64"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests, "-k", "batch5"]
    result = subprocess.run(command, env={**os.environ, "AQUILA_CPU_ISA": isa}, capture_output=True, text=True,
                            timeout=600)
    count = len(KINDS_AND_OUTPUTS) * 2
    assert result.returncode == 0 and f"{count} passed" in result.stdout, result.stdout + result.stderr


# Dense bf16 models (for bf16_inputs) of widths whose rows hold whole vdpbf16ps vectors (32 bf16) or leave tails.
BF16_CONFIGS = {"wide": WIDE, "tiny": TINY, "odd": ODD}


def bf16_model(name):
    """A dense bf16 model of BF16_CONFIGS[name], or the quantized model `name` (bf16, its output projection dense)."""
    if name not in BF16_CONFIGS:
        return quantized_model(name, "dense-output", torch.bfloat16)
    torch.manual_seed(0)
    model = Aquila(BF16_CONFIGS[name]).eval()
    with torch.no_grad():
        for parameter_name, p in model.named_parameters():
            if "norm" in parameter_name:
                p.uniform_(0.5, 1.5)
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("name", [*BF16_CONFIGS, "int4-g32-sym"])
def test_bf16_inputs_round_each_dense_projection_input(name):
    """bf16_inputs=True: each dense bf16 projection multiplies its input rounded to bf16 (quantized ones keep fp32
    inputs), at batch 1, 3 and 5; checked as check_rounded_inputs says."""
    model = bf16_model(name)

    def make_step(cache):
        step = native_decode.decoder(model, cache, bf16_inputs=True, int8_inputs=False)
        assert step is not None and step.bf16_inputs
        return step
    check_rounded_inputs(model, (1, 3, 5), make_step, {"bf16_inputs": True})


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_bf16_inputs_on_narrower_isas(isa):
    """Without AVX512-BF16 the step widens the rounded inputs to fp32 instead (AVX-512 included, whose run on an
    AVX512-BF16 machine is forced here): the same comparisons, in a fresh process per ISA."""
    tests = f"{__file__}::test_bf16_inputs_round_each_dense_projection_input"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", tests]
    result = subprocess.run(command, env={**os.environ, "AQUILA_CPU_ISA": isa}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and f"{len(BF16_CONFIGS) + 1} passed" in result.stdout, result.stdout + result.stderr


def check_rounded_inputs(model, batches, make_step, rounded_reference, steps=3):
    """The step's logits against two float64 steps, one that rounds the projections' inputs as the step is asked to and
    one that does not. The step's fp32 activations differ from float64's by fp32 rounding, so now and then one lies on
    the other side of a rounding tie and rounds to the neighbouring value, which shifts that row's logits by a part of
    what the rounding does in all: no reference can predict which, so no exact comparison holds for every row. What
    must hold, per row and step: the logits are closer to the rounding reference than to the other (at most half the
    distance between them), and in most rows (the median) they match the rounding one to fp32's precision."""
    ratios = []
    for batch in batches:
        native_cache, _, (k64, v64) = prefilled_caches(model, batch, model.tok_embeddings.weight.dtype)
        step = make_step(native_cache)
        tokens = torch.randint(0, model.config.vocab_size, (batch,), generator=torch.Generator().manual_seed(7))
        for _ in range(steps):
            lengths = native_cache.lengths.long()
            native = step(tokens[:, None])[:, 0].double()
            held = held_in(native_cache, lengths)
            rounded = reference_step(model, tokens, k64, v64, lengths, held, **rounded_reference)
            exact = reference_step(model, tokens, k64.clone(), v64.clone(), lengths, held)
            rounding = (rounded - exact).abs().amax(-1)
            assert (rounding > 100 * 64 * torch.finfo(torch.float32).eps * exact.abs().amax(-1)).all()  # it shows
            ratios += ((native - rounded).abs().amax(-1) / rounding).tolist()
            tokens = rounded.argmax(-1)
    assert max(ratios) <= 0.5, ratios
    assert sorted(ratios)[len(ratios) // 2] <= 1e-3, ratios


# The kinds whose rows the vpdpbusd loops take (int8 rows of 64k, int4 groups of 128k) and ones they leave to the fp32
# kernels on rounded inputs (groups of 64 and 16, rows of 36 and 50).
INT8_INPUT_KINDS = ["int8", "int4-g128-sym", "int4-g128-asym", "int4-g64-asym", "int4-g16-asym", "int8-odd"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", INT8_INPUT_KINDS)
def test_int8_inputs_round_each_quantized_projection_input(kind, dtype):
    """int8_inputs=True: each quantized projection multiplies its input rounded to int8 in blocks of 32
    (round_inputs_to_int8; dense ones, here the output projection, keep fp32 inputs), at batch 1, 3 and 5 (the loops
    read each row for up to 4 inputs); checked as check_rounded_inputs says."""
    model = quantized_model(kind, "dense-output", dtype)

    def make_step(cache):
        step = native_decode.decoder(model, cache, bf16_inputs=False, int8_inputs=True)
        assert step is not None and step.int8_inputs
        return step
    check_rounded_inputs(model, (1, 3, 5), make_step, {"int8_inputs": True})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", ["wide", "odd"])
def test_int8_inputs_round_an_int8_output_projections_input(config, dtype):
    """An int8 output projection (quantize_model's default, here under dense blocks) takes its input rounded to int8
    too: on the vpdpbusd loops at dim 128, on the fp32 kernels at dim 36. Its blocks are dense so that it is the only
    projection that rounds: where quantized blocks round too, a rounding tie met in a block (which check_rounded_inputs
    allows for) moves the output projection's input, and at these small widths that can move the rounding of one of
    its elements, a step as large as all the rounding at once."""
    model = bf16_model(config).float() if dtype == torch.float32 else bf16_model(config)
    model.output = QuantizedLinear.from_weight(model.output.weight.float(), 8)

    def make_step(cache):
        step = native_decode.decoder(model, cache, bf16_inputs=False, int8_inputs=True)
        assert step is not None and step.int8_inputs
        return step
    check_rounded_inputs(model, (1, 3, 5), make_step, {"int8_inputs": True})


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_int8_inputs_on_narrower_isas(isa):
    """Without VNNI (forced here by capping the ISA below AVX-512, in a fresh process) the rounded inputs feed the fp32
    kernels: the same comparisons."""
    tests = [f"{__file__}::test_int8_inputs_round_each_quantized_projection_input",
             f"{__file__}::test_int8_inputs_round_an_int8_output_projections_input"]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    result = subprocess.run(command, env={**os.environ, "AQUILA_CPU_ISA": isa}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and f"{2 * len(INT8_INPUT_KINDS) + 4} passed" in result.stdout, (result.stdout
                                                                                               + result.stderr)


def test_int8_inputs_carry_a_nan_to_the_logits():
    """A block holding a NaN has no scale: its products are NaN, as fp32 inputs would make them, not a silent number."""
    model = quantized_model("int8", "dense-output", torch.float32)
    with torch.no_grad():
        model.tok_embeddings.weight[5, 3] = float("nan")
    cache = KVCache(model.config, 2, 8)
    logits = native_decode.decoder(model, cache, int8_inputs=True)(torch.tensor([[5], [6]]))
    assert logits[0].isnan().all() and logits[1].isfinite().all()


def test_int8_inputs_default_to_bf16_steps_where_the_cpu_multiplies_bytes():
    model = quantized_model("int4-g128-sym", "dense-output", torch.bfloat16)
    step = native_decode.decoder(model, KVCache(model.config, 1, 8, dtype=torch.bfloat16))
    assert step.int8_inputs == _backend.cpu_extension.cpu_vnni()
    fp32 = quantized_model("int8", "dense-output", torch.float32)
    assert not native_decode.decoder(fp32, KVCache(fp32.config, 1, 8)).int8_inputs
    assert native_decode.decoder(fp32, KVCache(fp32.config, 1, 8), int8_inputs=True).int8_inputs
    dense = bf16_model("tiny")
    assert not native_decode.decoder(dense, KVCache(dense.config, 1, 8, dtype=torch.bfloat16)).int8_inputs
    with pytest.raises(ValueError, match="int8_inputs=True takes a model with quantized linears"):
        native_decode.decoder(dense, KVCache(dense.config, 1, 8, dtype=torch.bfloat16), int8_inputs=True)


def test_the_environment_sets_int8_inputs_for_every_step(monkeypatch):
    """AQUILA_DECODE_INT8_INPUTS: for the steps generate() makes; an argument still wins; a dense model is unaffected;
    another value is refused by name."""
    model = quantized_model("int8", "dense-output", torch.bfloat16)
    dense = bf16_model("tiny")
    for value in ("0", "1"):
        monkeypatch.setenv(native_decode.INT8_INPUTS_ENV, value)
        assert model.decoder(KVCache(model.config, 1, 8, dtype=torch.bfloat16)).int8_inputs == (value == "1")
        assert native_decode.decoder(model, KVCache(model.config, 1, 8, dtype=torch.bfloat16),
                                     int8_inputs=value == "0").int8_inputs == (value == "0")
        assert not native_decode.decoder(dense, KVCache(dense.config, 1, 8, dtype=torch.bfloat16)).int8_inputs
    monkeypatch.setenv(native_decode.INT8_INPUTS_ENV, "yes")
    with pytest.raises(ValueError, match="AQUILA_DECODE_INT8_INPUTS must be 1 or 0, got 'yes'"):
        model.decoder(KVCache(model.config, 1, 8, dtype=torch.bfloat16))


def test_bf16_inputs_default_to_where_the_cpu_multiplies_bf16_pairs():
    bf16 = bf16_model("tiny")
    assert native_decode.decoder(bf16, KVCache(bf16.config, 1, 8, dtype=torch.bfloat16)).bf16_inputs == (
        _backend.cpu_extension.cpu_isa() == "avx512_bf16")
    fp32 = quantized_model("int8", "dense-output", torch.float32)
    assert not native_decode.decoder(fp32, KVCache(fp32.config, 1, 8)).bf16_inputs
    with pytest.raises(ValueError, match="bf16_inputs=True takes a bf16 model"):
        native_decode.decoder(fp32, KVCache(fp32.config, 1, 8), bf16_inputs=True)
    arguments, keep_alive = step_arguments(fp32, KVCache(fp32.config, 1, 8))
    with pytest.raises(ValueError, match="bf16_inputs takes a bf16 step"):
        _backend.cpu_extension.decode_step({**arguments, "bf16_inputs": True}, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["int4-fp32", "dense-bf16"])
def test_every_prefetch_distance_gives_the_same_logits(dtype):
    """A prefetch only moves data into cache: rows prefetched at each distance give bit-identical logits (quantized
    rows; dense bf16 ones with bf16 inputs, on vdpbf16ps where the CPU has it)."""
    if dtype == torch.float32:
        model = quantized_model("int4-g64-asym", "output-as-blocks", dtype)
    else:
        model = bf16_model("wide")
    outcomes = []
    for distance in (0, *native_decode.PREFETCH_CANDIDATES, 1 << 20):
        cache = KVCache(model.config, 2, 8, dtype=dtype)
        step = native_decode.decoder(model, cache, prefetch_bytes=distance, bf16_inputs=dtype == torch.bfloat16)
        outcomes.append(torch.cat([step(torch.tensor([[3], [50]])) for _ in range(3)]))
    for outcome in outcomes[1:]:
        assert torch.equal(outcome, outcomes[0])


def test_a_replaced_quantized_buffer_stops_the_step():
    """A QuantizedLinear's buffers are replaced whole (loading, a cast of the scales): a step made before refuses to
    run on them."""
    model = quantized_model("int8", "dense-output", torch.float32)
    cache = KVCache(model.config, 1, 8)
    step = model.decoder(cache)
    step(torch.tensor([[1]]))
    layer = model.layers[1].feed_forward.w2
    layer.scales = layer.scales.clone()
    with pytest.raises(RuntimeError, match="moved"):
        step(torch.tensor([[1]]))


def test_fp16_quantized_models_decode_through_the_modules():
    """The step takes fp32 and bf16 only: an fp16 model with quantized linears keeps the module path."""
    model = quantized_model("int8", "dense-output", torch.float16)
    cache = KVCache(model.config, 1, 8, dtype=torch.float16)
    assert model._native_decoder(cache) is None
    with torch.no_grad():
        assert model.decoder(cache)(torch.tensor([[1]])).dtype == torch.float16


def step_arguments(model, cache):
    c = model.config
    workspace = torch.empty(native_decode.workspace_floats(c, 1, cache.k.shape[2]))
    caches = [(cache.k[i], cache.v[i]) for i in range(c.n_layers)]
    arguments = native_decode._arguments(model, caches, cache.lengths, 1, cache.k.shape[2], workspace, False)
    tokens, logits = torch.zeros(1, dtype=torch.int64), torch.empty(1, c.vocab_size)
    arguments.update(tokens=tokens.data_ptr(), logits=logits.data_ptr(), prefetch_bytes=0)
    return arguments, (workspace, tokens, logits)


@pytest.mark.parametrize("change, words", [
    (dict(format=7), "unknown weight format code 7"),
    (dict(group_size=3), r"layers\[1\]\.wq: group_size must be even, >= 2 and divide in_features, got 3"),
    (dict(group_size=48), r"layers\[1\]\.wq: group_size must be even, >= 2 and divide in_features, got 48"),
    (dict(scales=0), r"layers\[1\]\.wq: a quantized linear needs scales"),
    (dict(weight=0), r"layers\[1\]\.wq: weight is null"),
])
def test_the_step_refuses_a_bad_linear_by_name(change, words):
    model = quantized_model("int4-g32-sym", "dense-output", torch.float32)
    arguments, keep_alive = step_arguments(model, KVCache(model.config, 1, 8))
    arguments["layers"][1]["wq"].update(change)
    with pytest.raises(ValueError, match=words):
        _backend.cpu_extension.decode_step(arguments, 1)
