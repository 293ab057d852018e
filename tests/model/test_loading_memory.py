"""Peak resident memory while loading and quantizing: within the loaded model's own size plus a stated margin.

Each measurement runs in a fresh process: imports done and a first (meta) model built, the resident-set high-water
mark is reset (/proc/self/clear_refs), the checkpoint loaded, and VmHWM read. The checkpoint is a few hundred MB
(about 142M parameters, 272 MiB in bf16, in two shards), so that a second copy of the weights, of a shard or of the
embedding table in float32 would show.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from aquila.model.checkpoint import (
    CHUNK_ELEMENTS,
    REMAP_BYTES,
    huge_page_span,
    load,
    random_tensors,
    save_hf,
    save_random_hf,
)
from aquila.model.config import AquilaConfig
from aquila.model.quantize import Quantization

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")

CONFIG = AquilaConfig(dim=1024, n_layers=6, n_heads=16, vocab_size=32000, multiple_of=256)
# What loading may hold beyond the model: a chunk of rows in flight (CHUNK_ELEMENTS elements, 16 MiB in float64 while
# it is quantized) with its conversions, and the allocator's slack (freed chunks it keeps between the model's
# tensors): 6 chunks in float64, 96 MiB. Measured: 7 MiB (bf16), 33-41 MiB (int4), 29-49 MiB (the quantize
# command).
MARGIN = 6 * CHUNK_ELEMENTS * 8
MEASURE = """
import json, sys
import torch
from aquila.cli import main
from aquila.model.checkpoint import load
from aquila.model.config import AquilaConfig
from aquila.model.model import Aquila
from aquila.model.quantize import Quantization, quantize_model

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

with torch.device("meta"):  # what a first model imports, before the baseline
    quantize_model(Aquila(AquilaConfig(dim=64, n_layers=1, n_heads=1, vocab_size=8, multiple_of=64)), 4, 64)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
baseline = status("VmRSS")
action, source, bits, dest = sys.argv[1:5]
if action == "load":
    model = load(source, dtype=torch.bfloat16, quantize=Quantization(int(bits)) if bits != "none" else None)
else:
    main(["quantize", source, dest, "--bits", bits])
    model = load(dest, dtype=torch.bfloat16)
size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"peak": status("VmHWM") - baseline, "model": size}))
"""


def measure(*arguments) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, *arguments], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("memory") / "hf")
    save_random_hf(CONFIG, directory, max_shard_bytes=200 * 2**20)
    return directory


def within(measured, margin, what):
    peak, model = measured["peak"], measured["model"]
    print(f"{what}: peak {peak / 2**20:.1f} MiB above the baseline for a model of {model / 2**20:.1f} MiB")
    assert peak <= model + margin, (f"{what}: peak {peak / 2**20:.1f} MiB above the baseline, more than the model's "
                                    f"{model / 2**20:.1f} MiB + {margin / 2**20:.0f} MiB")


@pytest.mark.parametrize("bits", ["none", "4"], ids=["bf16", "int4"])
def test_loading_bf16_safetensors_stays_within_the_model_size(hf_checkpoint, bits):
    measured = measure("load", hf_checkpoint, bits, "-")
    bf16_bytes = CONFIG.num_parameters() * 2
    if bits == "none":
        assert measured["model"] == bf16_bytes
    else:
        assert measured["model"] < 0.65 * bf16_bytes  # the int4 linears: about a quarter of their bf16 bytes
    within(measured, MARGIN, f"loading bf16 safetensors ({'bf16' if bits == 'none' else 'int4 g128'})")


def test_the_quantize_command_stays_within_the_quantized_size(hf_checkpoint, tmp_path):
    within(measure("quantize", hf_checkpoint, "8", str(tmp_path / "int8")), MARGIN, "aquila quantize --bits 8")


def test_loading_a_flagai_bin_file_stays_within_the_model_size(tmp_path):
    """A .bin file is mapped afresh after every REMAP_BYTES read: at most that much of the file is resident."""
    torch.save(dict(random_tensors(CONFIG)), tmp_path / "pytorch_model.bin")
    values = {"dim": CONFIG.dim, "n_layers": CONFIG.n_layers, "n_heads": CONFIG.n_heads,
              "vocab_size": CONFIG.vocab_size, "multiple_of": CONFIG.multiple_of}
    (tmp_path / "config.json").write_text(json.dumps(values))
    within(measure("load", str(tmp_path), "none", "-"), MARGIN + REMAP_BYTES, "loading a bf16 .bin file")


def vm_flags_at(address: int) -> list[str]:
    """The VmFlags of the mapping of this process holding `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header: start-end perms ...
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError(f"no mapping of this process holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="needs Linux's THP")
@pytest.mark.parametrize("bits", ["none", "8"], ids=["bf16", "int8"])
def test_loaded_weights_ask_for_huge_pages(hf_checkpoint, bits, tmp_path):
    """Every weight spanning whole 2 MiB pages lies in memory advised MADV_HUGEPAGE (VmFlags "hg"), for a stored bf16
    checkpoint, one quantized while loading and a quantized one as stored."""
    quantize = Quantization(int(bits)) if bits != "none" else None
    sources = [(hf_checkpoint, quantize)]
    if quantize is not None:
        save_hf(load(hf_checkpoint, dtype=torch.bfloat16, quantize=quantize), str(tmp_path / "quantized"))
        sources.append((str(tmp_path / "quantized"), None))
    for source, on_load in sources:
        model = load(source, dtype=torch.bfloat16, quantize=on_load)
        spans = {name: huge_page_span(tensor) for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
        spanning = {name: start for name, (start, end) in spans.items() if end > start}  # name: its first whole page
        expected = {"tok_embeddings.weight", "output.weight" if bits == "none" else "output.qweight"}
        if bits == "none":
            expected |= {f"layers.{i}.feed_forward.w{j}.weight" for i in range(CONFIG.n_layers) for j in (1, 2, 3)}
        assert expected <= set(spanning), sorted(expected - set(spanning))
        for name, inside in spanning.items():
            assert "hg" in vm_flags_at(inside), f"{source}: {name} was not placed on huge pages"
