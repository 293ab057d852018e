"""Which precision a run trains in (aquila/train/precision.py): auto's choice by the CPU's bf16 instructions, the
explicit values, and the run header's reason."""

import pytest
import torch

from aquila import host
from aquila.train import precision
from aquila.train.precision import cpu_bf16_isa, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture
def isa(monkeypatch):
    """Sets what cpu_bf16_isa reports."""
    def set_isa(value):
        monkeypatch.setattr(precision, "cpu_bf16_isa", lambda: value)

    return set_isa


@pytest.mark.parametrize("found", ["AMX-BF16", "AVX512-BF16"])
def test_auto_picks_bf16_where_the_cpu_has_bf16_instructions(isa, found):
    isa(found)
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype == torch.bfloat16 and chosen.reason == f"auto: this CPU has {found}"
    assert chosen.header() == (f"precision bf16 (auto: this CPU has {found}): bf16 compute over fp32 master weights "
                               "and AdamW state")


def test_auto_picks_fp32_where_the_cpu_has_none(isa):
    isa(None)
    chosen = resolve_precision("auto", CPU)
    assert chosen.dtype == torch.float32
    assert chosen.header() == ("precision fp32 (auto: this CPU has no AMX or AVX512-BF16, where bf16 is slower than "
                               "fp32): everything in fp32")


@pytest.mark.parametrize("found", ["AVX512-BF16", None])
def test_fp32_and_bf16_mean_exactly_that_on_any_cpu(isa, found):
    isa(found)
    fp32, bf16 = resolve_precision("fp32", CPU), resolve_precision("bf16", CPU)
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    if found:
        assert fp32.reason == "configured; this CPU has AVX512-BF16: precision auto would choose bf16"
        assert bf16.reason == "configured; this CPU has AVX512-BF16"
    else:
        assert fp32.reason == "configured"
        assert bf16.reason.startswith("configured; warning: this CPU has no AMX or AVX512-BF16, where bf16 is slower")


def test_fp16_on_cpu_is_refused_with_the_reason(isa):
    isa("AMX-BF16")
    with pytest.raises(ValueError, match="precision fp16 needs a GPU: on CPU fp16 matmuls are emulated"):
        resolve_precision("fp16", CPU)


def test_a_gpu_keeps_its_rules():
    cuda = torch.device("cuda", 0)
    assert resolve_precision("auto", cuda).dtype == torch.bfloat16
    assert resolve_precision("fp16", cuda).dtype == torch.float16
    assert resolve_precision("fp32", cuda).dtype == torch.float32


def test_the_detection_asks_torch_first_then_proc_cpuinfo(monkeypatch, tmp_path):
    reader = host.cpu_flags

    def detect(probes, flags):
        cpuinfo = tmp_path / "cpuinfo"
        line = f"flags\t\t: fpu sse2 {' '.join(flags)}\n" if flags is not None else ""
        cpuinfo.write_text("processor\t: 0\n" + line)
        monkeypatch.setattr(precision, "_torch_probe", lambda name: probes.get(name))
        monkeypatch.setattr(host, "cpu_flags", lambda: reader(str(cpuinfo)))
        cpu_bf16_isa.cache_clear()
        try:
            return cpu_bf16_isa()
        finally:
            cpu_bf16_isa.cache_clear()

    amx, avx512 = "_is_amx_tile_supported", "_is_avx512_bf16_supported"
    assert detect({amx: True, avx512: True}, []) == "AMX-BF16"
    assert detect({amx: False, avx512: True}, ["amx_bf16"]) == "AVX512-BF16"  # torch's answer wins
    assert detect({amx: False, avx512: False}, ["avx512_bf16"]) is None
    assert detect({}, ["avx2", "avx512f", "avx512_bf16"]) == "AVX512-BF16"  # a torch without the checks
    assert detect({}, ["amx_tile", "amx_bf16", "avx512_bf16"]) == "AMX-BF16"
    assert detect({}, ["avx2", "avx512f"]) is None
    assert detect({}, None) is None  # no flags line (not x86 Linux): no bf16 claimed
    cpu_bf16_isa.cache_clear()


def test_this_hosts_detection_agrees_with_its_cpu_flags():
    flags = host.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo flags")
    expected = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    assert cpu_bf16_isa() == expected
