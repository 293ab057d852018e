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

HAS_CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run on CPU tensors, under the interpreter.
DEVICE_BACKENDS = [("cpu", "cpu"), ("torch", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu"), ("cuda", "cuda"),
                   ("torch", "cuda")]


def backend_params():
    """(backend, device) pairs to test. Those on CUDA are marked gpu and skipped without one (and without the
    extension they need), so a CPU run lists what it could not check."""
    params = []
    for backend, device in DEVICE_BACKENDS:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if device == "cuda" and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh)"))
        elif backend == "cuda" and _backend.cuda_extension is None:
            marks.append(pytest.mark.skip(reason="aquila._cuda is not built (no nvcc at install)"))
        elif backend == "triton" and not _backend.HAS_TRITON:
            marks.append(pytest.mark.skip(reason="triton is not installed"))
        params.append(pytest.param(backend, device, id=f"{backend}-{device}", marks=marks))
    return params


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


def bilingual_sample_texts() -> list[str]:
    """A small bilingual + code training set for test tokenizers: CPython's own sources and classical Chinese."""
    import os

    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    english = "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces the model can learn."
    code_dir = os.path.dirname(os.__file__)
    code = [open(os.path.join(code_dir, name), encoding="utf-8").read() for name in ("os.py", "json/decoder.py")]
    return [poem, english] * 50 + code


@pytest.fixture(scope="session")
def small_tokenizer():
    from aquila.data.tokenizer import Tokenizer

    return Tokenizer.train(bilingual_sample_texts(), vocab_size=520, show_progress=False)
