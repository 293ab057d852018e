"""Test set-up shared by every test.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter, which must be switched on before any
module defining a kernel is imported, hence here. With a GPU (scripts/gpu_check.sh) they compile for real.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import bilingual_sample_texts


@pytest.fixture(autouse=True, scope="session")
def own_tuning_directory(tmp_path_factory):
    """The decoding step's tuned prefetch distances (aquila.model.native_decode) go to the run's own directory, not
    the user's cache."""
    previous = os.environ.get("AQUILA_CACHE_DIR")
    os.environ["AQUILA_CACHE_DIR"] = str(tmp_path_factory.mktemp("aquila-cache"))
    yield
    if previous is None:
        del os.environ["AQUILA_CACHE_DIR"]
    else:
        os.environ["AQUILA_CACHE_DIR"] = previous


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


@pytest.fixture(scope="session")
def small_tokenizer():
    from aquila.data.tokenizer import Tokenizer

    return Tokenizer.train(bilingual_sample_texts(), vocab_size=520, show_progress=False)
