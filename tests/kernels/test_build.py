"""The native extensions: built, importable, and failing cleanly where they cannot run."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from aquila.kernels import backend

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_cpu_extension_is_built():
    assert backend.cpu_extension is not None, "aquila._C missing: pip install -e ."


NVCC_PRESENT = bool(shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))


@pytest.mark.skipif(os.environ.get("AQUILA_CUDA") == "0" or not NVCC_PRESENT,
                    reason="no nvcc (or AQUILA_CUDA=0): the CUDA extension is not built here")
def test_cuda_extension_is_built_when_nvcc_is_present():
    assert backend.cuda_extension is not None, "nvcc is here but aquila._cuda is missing: pip install -e ."


@pytest.mark.skipif(backend.cuda_extension is None or torch.cuda.is_available(),
                    reason="checks the error on a machine with the CUDA extension but no GPU")
def test_cuda_kernel_without_a_gpu_raises_instead_of_crashing():
    with pytest.raises(RuntimeError, match="aquila CUDA kernel"):
        backend.cuda_extension.rms_norm_forward(RMS_NORM_FORWARD_NULLS, 0)


# Every field of RmsNormForward (csrc/kernels.h): null pointers, one row of 4.
RMS_NORM_FORWARD_NULLS = {"x": 0, "x_row_stride": 4, "residual": 0, "residual_row_stride": 0, "weight": 0, "out": 0,
                          "residual_out": 0, "rstd": 0, "rows": 1, "hidden": 4, "eps": 1e-6, "dtype": 0}


@pytest.mark.parametrize("extension", ["cpu", "cuda"])
@pytest.mark.parametrize("change, words", [(lambda d: d.pop("rstd"), "rms_norm_forward: missing argument 'rstd'"),
                                            (lambda d: d.update(rsdt=0), "rms_norm_forward: unknown argument 'rsdt'")])
def test_native_arguments_are_read_by_name(extension, change, words):
    """The dict convention of csrc/bind.h: a missing or misspelt field is a KeyError naming it, before any launch."""
    module = backend.cpu_extension if extension == "cpu" else backend.cuda_extension
    if module is None:
        pytest.skip(f"aquila's {extension} extension is not built")
    fields = dict(RMS_NORM_FORWARD_NULLS)
    change(fields)
    with pytest.raises(KeyError, match=words):
        module.rms_norm_forward(fields, 1)


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Every Triton configuration, compiled ahead of time for both targets, within their shared memory, with the
    attention forward on tensor cores (wgmma at sm_90, mma at sm_80)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "kernels", "triton_compile_check.py")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 failed the checks" in result.stdout
