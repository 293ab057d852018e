"""Helpers shared by several test modules (fixtures stay in the conftest files)."""

import importlib.util
import json
import os
import pathlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# Without a GPU the Triton kernels run on CPU tensors, under the interpreter.
DEVICE_BACKENDS = [("cpu", "cpu"), ("torch", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu"), ("cuda", "cuda"),
                   ("torch", "cuda")]
TINY_MODEL = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 520, "multiple_of": 16,
              "max_seq_len": 64}


def load_script(name):
    """scripts/<name>.py as a module (the scripts are run by path, not imported from a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def backend_params():
    """(backend, device) pairs to test. Those on CUDA are marked gpu and skipped without one (and without the
    extension they need), so a CPU run lists what it could not check."""
    # Imported here, at collection, after tests/conftest.py has switched on Triton's interpreter where needed.
    from aquila.kernels import backend

    params = []
    for name, device in DEVICE_BACKENDS:
        marks = [pytest.mark.gpu] if device == "cuda" else []
        if device == "cuda" and not HAS_CUDA:
            marks.append(pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh)"))
        elif name == "cuda" and backend.cuda_extension is None:
            marks.append(pytest.mark.skip(reason="aquila._cuda is not built (no nvcc at install)"))
        elif name == "triton" and not backend.HAS_TRITON:
            marks.append(pytest.mark.skip(reason="triton is not installed"))
        params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params



def with_dtypes(params):
    """(backend, device, dtype) for each (backend, device) of params, in fp32, fp16 and bf16. Triton's interpreter gets
    bf16 tl.dot wrong (triton#11584), so bf16 Triton is tested on the GPU only."""
    expanded = []
    for param in params:
        backend, device = param.values
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if not (backend == "triton" and device == "cpu" and dtype == torch.bfloat16):
                expanded.append(pytest.param(backend, device, dtype, id=f"{param.id}-{str(dtype)[6:]}",
                                             marks=param.marks))
    return expanded


def bilingual_sample_texts() -> list[str]:
    """A small bilingual + code training set for test tokenizers: CPython's own sources and classical Chinese."""
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"
    english = "The quick brown fox jumps over the lazy dog. Tokenizers split text into pieces the model can learn."
    code_dir = pathlib.Path(os.__file__).parent
    code = [(code_dir / name).read_text(encoding="utf-8") for name in ("os.py", "json/decoder.py")]
    return [poem, english] * 50 + code


def tiny_overrides(inputs, output_dir, **changes) -> list[str]:
    """Command-line overrides for a training run of seconds: the TINY_MODEL on tests/train's tiny_run_inputs."""
    values = {"model_overrides": json.dumps(TINY_MODEL), "tokenizer": str(inputs / "tokenizer"),
              "corpus": str(inputs / "train.jsonl"), "valid_corpus": str(inputs / "valid.jsonl"), "seq_len": 32,
              "batch_size": 4, "steps": 6, "log_interval": 1, "eval_interval": 3, "save_interval": 0,
              "eval_batches": 2, "output_dir": str(output_dir), "progress": False, "lr": 3e-3, "warm_up": 2,
              **changes}
    return [item for name, value in values.items() for item in (f"--{name}", str(value))]
