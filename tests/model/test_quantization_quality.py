"""scripts/quantization_quality.py's measurements on a small random model: the decoding step's perplexity equals the
forward pass's on the same documents (fp32: both to fp32's tolerance of the float64 loss), and the int8-input
rounding it reports is the step's own."""

import math

import pytest
import torch

from aquila.kernels import backend as _backend
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila
from aquila.model.quantize import quantize_model
from tests.helpers import load_script

pytestmark = pytest.mark.skipif(_backend.cpu_extension is None, reason="the CPU extension (aquila._C) is not built")

CONFIG = AquilaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=128, max_seq_len=64)


def documents():
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, CONFIG.vocab_size, (length,), generator=generator).tolist() for length in (2, 9, 17)]


def forward_loss(model, docs):
    """The mean next-token loss of the documents through the forward pass, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            logits = model(torch.tensor([doc[:-1]]))[0].double()
            total -= logits.log_softmax(-1).gather(-1, torch.tensor(doc[1:])[:, None]).sum().item()
            count += len(doc) - 1
    return total / count


def test_step_perplexity_is_the_forward_pass_perplexity():
    script = load_script("quantization_quality")
    torch.manual_seed(0)
    model = Aquila(CONFIG).eval()
    docs = documents()
    measured = script.step_perplexity(model, docs, int8_inputs=False)
    assert measured["tokens"] == sum(len(doc) - 1 for doc in docs)
    assert measured["loss"] == pytest.approx(forward_loss(model, docs), rel=1e-5)
    assert measured["perplexity"] == pytest.approx(math.exp(measured["loss"]), rel=1e-12)


def test_step_perplexity_with_int8_inputs_differs_by_the_rounding():
    """int8 inputs move the quantized model's loss, by little: the rounding is measured, not hidden."""
    script = load_script("quantization_quality")
    torch.manual_seed(0)
    model = quantize_model(Aquila(CONFIG).eval(), 8)
    docs = documents()
    fp32_inputs = script.step_perplexity(model, docs, int8_inputs=False)
    int8_inputs = script.step_perplexity(model, docs, int8_inputs=True)
    assert fp32_inputs["loss"] == pytest.approx(forward_loss(model, docs), rel=1e-5)
    assert int8_inputs["loss"] != fp32_inputs["loss"]
    assert int8_inputs["loss"] == pytest.approx(fp32_inputs["loss"], rel=1e-2)


def test_a_negative_step_document_count_is_refused_by_name(capsys):
    script = load_script("quantization_quality")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["runs/none", "--step-documents", "-1"])
    assert exit_info.value.code == 2
    assert "--step-documents must be >= 0, got -1" in capsys.readouterr().err
