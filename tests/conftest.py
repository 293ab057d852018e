"""Test set-up shared by every test.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be switched on before any
module defining a kernel is imported, hence here. With a GPU (scripts/gpu_check.sh) they compile for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aquila.kernels import backend as _backend  # noqa: E402  (after TRITON_INTERPRET)

DEVICE_BACKENDS = [("cpu", "cpu"), ("torch", "cpu")]
if _backend.HAS_TRITON:
    DEVICE_BACKENDS.append(("triton", "cuda" if torch.cuda.is_available() else "cpu"))
if torch.cuda.is_available():
    DEVICE_BACKENDS += [("torch", "cuda")] + ([("cuda", "cuda")] if _backend.cuda_extension is not None else [])


def backend_params():
    """(backend, device) pairs to test, each a pytest param marked gpu when it runs on CUDA."""
    return [pytest.param(b, d, id=f"{b}-{d}", marks=[pytest.mark.gpu] if d == "cuda" else [])
            for b, d in DEVICE_BACKENDS]


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every torch.empty is filled with NaN, so an output element a kernel forgets to write fails the test."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
