"""One projection of the decoding step on its own (csrc/kernels.h's DecodeProjection, aquila._C.decode_projection):
what a prompt's prefill ends with (Aquila.forward_with_cache with last_only, through native_decode.output_logits).

Each weight form the step takes (dense fp32 and bf16; int8; int4 symmetric and asymmetric at group sizes that take
each vector width and at one that none divides) at batch 0, 1, 3 and 5 (the loops read each weight row for up to 4
inputs at once), at odd widths and at ones the vector loops fill, with and without each rounding of the inputs, is
compared with float64 on the same (rounded) inputs. Then the model's use of it: the last position's logits of a prompt,
fp32 as a step's, the fields remade when the output projection changes, the module path where the step cannot run,
and the refusals by name."""

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

# name: (bits or None for dense, group_size, symmetric, cols)
WEIGHTS = {"dense-wide": (None, None, True, 128), "dense-odd": (None, None, True, 36),
           "int8-wide": (8, None, True, 128), "int8-odd": (8, None, True, 36),
           "int4-g128-sym": (4, 128, True, 256), "int4-g128-asym": (4, 128, False, 256),
           "int4-g64-asym": (4, 64, False, 128), "int4-g32-sym": (4, 32, True, 128),
           "int4-g6-sym-odd": (4, 6, True, 36)}
ROWS = 97  # the vocabulary of the tests' models: no multiple of any block of rows


def weight_and_reference(name, dtype):
    """(the linear as the model would hold it, its exact values in float64 [ROWS, cols])."""
    bits, group_size, symmetric, cols = WEIGHTS[name]
    weight = torch.randn(ROWS, cols, generator=torch.Generator().manual_seed(1)) / cols**0.5
    if bits is None:
        linear = torch.nn.Linear(cols, ROWS, bias=False, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
        return linear, linear.weight.double()
    linear = QuantizedLinear.from_weight(weight, bits, group_size, symmetric)
    return linear, linear.dequantize(torch.float64)


def project(linear, x, dtype, bf16_inputs=False, int8_inputs=False, prefetch_bytes=0):
    """decode_projection of x [batch, cols] (fp32) by the linear: out [batch, ROWS] in fp32."""
    out = torch.empty(x.shape[0], ROWS)
    workspace = torch.empty(x.shape)
    _backend.cpu_extension.decode_projection(
        {"weight": native_decode._linear_fields(linear), "in": x.data_ptr(), "out": out.data_ptr(),
         "workspace": workspace.data_ptr(), "batch": x.shape[0], "rows": ROWS, "cols": x.shape[1],
         "prefetch_bytes": prefetch_bytes, "dtype": _backend.DTYPE_CODES[dtype], "bf16_inputs": bf16_inputs,
         "int8_inputs": int8_inputs}, 2)
    return out


def rounded(x, linear, bf16_inputs, int8_inputs):
    """x in float64 as the projection takes it."""
    if isinstance(linear, QuantizedLinear):
        return round_inputs_to_int8(x) if int8_inputs else x.double()
    return x.to(torch.bfloat16).double() if bf16_inputs else x.double()


# (weights' dtype, bf16_inputs, int8_inputs): the roundings that apply to each form (the other flag is ignored).
SETTINGS = {"fp32": (torch.float32, False, False), "bf16": (torch.bfloat16, False, False),
            "bf16-inputs": (torch.bfloat16, True, False), "int8-inputs": (torch.bfloat16, False, True)}


@pytest.mark.parametrize("batch", [0, 1, 3, 5], ids=["batch0", "batch1", "batch3", "batch5"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", WEIGHTS)
def test_the_projection_matches_float64(name, setting, batch):
    dtype, bf16_inputs, int8_inputs = SETTINGS[setting]
    linear, exact = weight_and_reference(name, dtype)
    x = torch.randn(batch, exact.shape[1], generator=torch.Generator().manual_seed(batch))
    out = project(linear, x, dtype, bf16_inputs, int8_inputs)
    assert_matches_reference(out, rounded(x, linear, bf16_inputs, int8_inputs) @ exact.T)


@pytest.mark.parametrize("name", ["dense-wide", "int8-wide", "int4-g128-asym"])
def test_every_prefetch_distance_gives_the_same_bits(name):
    linear, exact = weight_and_reference(name, torch.bfloat16)
    x = torch.randn(3, exact.shape[1])
    first = project(linear, x, torch.bfloat16, bf16_inputs=True, int8_inputs=True)
    for distance in native_decode.PREFETCH_CANDIDATES[1:]:
        assert torch.equal(project(linear, x, torch.bfloat16, True, True, distance), first)


def test_a_nan_stays_in_its_row():
    linear, exact = weight_and_reference("int8-wide", torch.bfloat16)
    x = torch.randn(3, exact.shape[1])
    x[1, 5] = float("nan")
    out = project(linear, x, torch.bfloat16, int8_inputs=True)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("change, words", [
    (dict(prefetch_bytes=-1), "prefetch_bytes is -1, must be >= 0"),
    (dict(rows=0), "needs batch >= 0, rows >= 1 and cols >= 1, got batch 3, rows 0, cols 128"),
    (dict(batch=-2), "needs batch >= 0, rows >= 1 and cols >= 1, got batch -2"),
    (dict(workspace=0), "in, out and workspace must not be null"),
    (dict(weight=dict(format=7)), "decode_projection: unknown weight format code 7"),
    (dict(weight=dict(group_size=48)), "weight: group_size must be even, >= 2 and divide in_features, got 48"),
    (dict(weight=dict(scales=0)), "weight: a quantized linear needs scales"),
    (dict(dtype=_backend.DTYPE_CODES[torch.float16]), r"takes an fp32 or bf16 dtype \(of a dense weight\)"),
    (dict(dtype=_backend.DTYPE_CODES[torch.float32], bf16_inputs=True), "bf16_inputs takes a bf16 step"),
])
def test_the_projection_refuses_bad_fields_by_name(change, words):
    linear, _ = weight_and_reference("int4-g32-sym", torch.float32)
    x, out, workspace = torch.randn(3, 128), torch.empty(3, ROWS), torch.empty(3, 128)
    fields = {"weight": native_decode._linear_fields(linear), "in": x.data_ptr(), "out": out.data_ptr(),
              "workspace": workspace.data_ptr(), "batch": 3, "rows": ROWS, "cols": 128, "prefetch_bytes": 0,
              "dtype": _backend.DTYPE_CODES[torch.float32], "bf16_inputs": False, "int8_inputs": False}
    fields["weight"].update(change.pop("weight", {}))
    fields.update(change)
    with pytest.raises(ValueError, match=words):
        _backend.cpu_extension.decode_projection(fields, 1)


# --- The model's prefill ------------------------------------------------------------------------------------------

CONFIG = AquilaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=ROWS, multiple_of=64, max_seq_len=64)


@pytest.fixture
def hidden_states(monkeypatch):
    """The hidden states each output_logits call is given, and its result."""
    calls = []
    project_last = native_decode.output_logits

    def recording(model, hidden, int8_inputs):
        logits = project_last(model, hidden, int8_inputs)
        calls.append((hidden.clone(), logits))
        return logits
    monkeypatch.setattr(native_decode, "output_logits", recording)
    return calls


def prefill(model, batch=2, length=7):
    prompt = torch.randint(0, ROWS, (batch, length), generator=torch.Generator().manual_seed(3))
    cache = KVCache(CONFIG, batch, 16, dtype=model.tok_embeddings.weight.dtype)
    return model.forward_with_cache(prompt, cache, last_only=True)


def test_a_prompts_last_logits_come_from_the_steps_projection(hidden_states):
    """bf16 model: the last position's logits are the projection's, in fp32 as a step's, of the final norm's output
    (the rest of the prefill unchanged: the module path gives the same logits to bf16's precision)."""
    torch.manual_seed(0)
    model = Aquila(CONFIG).to(torch.bfloat16).eval()
    logits = prefill(model)
    (hidden, returned), = hidden_states
    assert logits is returned and logits.dtype == torch.float32 and logits.shape == (2, 1, ROWS)
    assert_matches_reference(logits, hidden.double() @ model.output.weight.double().T)
    by_modules = model.output(hidden)
    torch.testing.assert_close(logits, by_modules.float(), rtol=2 * 2**-8, atol=2**-8 * by_modules.abs().max().item())


def expected_logits(model, hidden):
    """float64 logits of hidden through the model's output projection, its input rounded to int8 where the prefill
    rounds the quantized linears' inputs."""
    rounds = isinstance(model.output, QuantizedLinear) and native_decode.default_int8_inputs(hidden.dtype)
    weight = (model.output.dequantize(torch.float64) if isinstance(model.output, QuantizedLinear)
              else model.output.weight.double())
    return (round_inputs_to_int8(hidden) if rounds else hidden.double()) @ weight.T


def test_the_projection_follows_a_replaced_output(hidden_states):
    """The fields made for a model are remade when its output projection changes (quantized, cast): never the old
    weights' addresses."""
    torch.manual_seed(0)
    model = Aquila(CONFIG).eval()
    for change in (lambda: None, lambda: quantize_model(model, 8), lambda: model.to(torch.bfloat16)):
        change()
        prefill(model, batch=1)
        hidden, logits = hidden_states[-1]
        assert_matches_reference(logits, expected_logits(model, hidden))


def test_the_module_path_projects_where_the_step_cannot_run(hidden_states):
    """The torch reference backend and fp16 models keep their module's projection (logits in the model's dtype)."""
    torch.manual_seed(0)
    assert prefill(Aquila(CONFIG, backend="torch").eval()).dtype == torch.float32
    assert prefill(Aquila(CONFIG).to(torch.float16).eval()).dtype == torch.float16
    assert [logits for _, logits in hidden_states] == [None, None]
