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
                          "residual_out": 0, "rstd": 0, "rows": 1, "hidden": 4, "eps": 1e-6, "round_normalized": False,
                          "dtype": 0}


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


def _compile_check(*arguments, timeout=600):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, os.path.join(REPO, "tests", "kernels", "triton_compile_check.py"),
                           *arguments], env=env, capture_output=True, text=True, timeout=timeout)


def test_triton_kernels_compile_for_sm80_and_sm90():
    """Every Triton kernel as the launchers launch it (the CI set of cases), compiled for both targets under a
    stand-in driver: within their shared memory as launched, no spill in 16-bit kernels, fp32 within its budget, the
    attention forward on tensor cores (wgmma at sm_90, mma at sm_80). Under 5 minutes on 2 cores."""
    result = _compile_check("--workers", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 failed the checks" in result.stdout


def test_compile_check_fails_on_a_spill_and_on_too_much_shared_memory():
    """The check catches what it is for: tests/kernels/bad_kernels.py has a kernel that spills and one that needs
    more shared memory than an H100 gives a block, launched through their own launchers."""
    result = _compile_check("--modules", "tests.kernels.bad_kernels", "--targets", "90", "--workers", "1")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("_spilling_kernel") and "SPILLS" in line for line in lines), result.stdout
    assert any(line.startswith("_shared_memory_kernel") and "shared memory" in line and "232448" in line
               for line in lines), result.stdout
    assert "2 failed the checks" in result.stdout


GPU_WHEELS = os.path.join(REPO, "scripts", "gpu_wheels.txt")
WHEEL_LIMIT = 50 * 1024 * 1024


def _wheel_list():
    with open(GPU_WHEELS) as f:
        return [line.split() for line in f if line.strip() and not line.lstrip().startswith("#")]


def test_gpu_wheels_are_pinned_explicit_and_within_50_mib():
    """scripts/gpu_check.sh installs each wheel of scripts/gpu_wheels.txt with --no-deps: every one pinned, for
    CPython 3.12 on manylinux x86_64 (or pure Python), with deepspeed's and pydantic's dependencies listed; the listed
    sizes, and the files in .wheels/ where present, within 50 MiB."""
    entries = _wheel_list()
    names = {requirement.split("==")[0].lower() for requirement, *_ in entries}
    assert all("==" in requirement for requirement, *_ in entries)
    assert {"pybind11", "ninja", "setuptools", "deepspeed", "pydantic", "pydantic-core", "annotated-types",
            "typing-inspection", "hjson", "msgpack", "py-cpuinfo", "psutil", "einops", "liger-kernel"} <= names
    assert not names & {"torch", "triton"} and not any(n.startswith("nvidia") for n in names)
    for _, _, wheel, *_ in entries:
        assert wheel.endswith(".whl") and ("-py3-none-any" in wheel or "manylinux" in wheel and
                                           ("cp312-cp312" in wheel or "abi3" in wheel or "py3-none" in wheel)), wheel
    assert sum(int(size) for _, size, *_ in entries) <= WHEEL_LIMIT
    shipped = [os.path.join(REPO, ".wheels", wheel) for _, _, wheel, *_ in entries]
    assert sum(os.path.getsize(p) for p in shipped if os.path.exists(p)) <= WHEEL_LIMIT


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_gpu_check_dry_run_prints_the_plan():
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for words in ("tests and benchmarks", "compute-sanitizer --tool memcheck", "racecheck", "total listed",
                  "limit 50 MiB", "deepspeed==0.19.8"):
        assert words in result.stdout
