"""Choosing a backend from an op's table: every (op, backend, direction) either runs or raises UnsupportedBackend,
exactly as the table and the runtime say; AQUILA_BACKEND is a preference, a backend named in the call a demand."""

import pytest
import torch

from aquila.kernels import (
    UnsupportedBackend,
    apply_rotary,
    attention,
    attention_with_kv_cache,
    cross_entropy,
    linear_cross_entropy,
    quantized_linear,
    rms_norm,
    swiglu,
)
from aquila.kernels import backend as _backend
from aquila.kernels.attention import IMPLEMENTATIONS as ATTENTION
from aquila.kernels.attention import KV_CACHE_IMPLEMENTATIONS as ATTENTION_WITH_KV_CACHE
from aquila.kernels.cross_entropy import IMPLEMENTATIONS as CROSS_ENTROPY
from aquila.kernels.glu import IMPLEMENTATIONS as GLU
from aquila.kernels.quantized_linear import IMPLEMENTATIONS as QUANTIZED_LINEAR
from aquila.kernels.rms_norm import IMPLEMENTATIONS as RMS_NORM
from aquila.kernels.rotary import IMPLEMENTATIONS as ROTARY


def _rms_norm(backend, grad):
    x = torch.randn(3, 40, requires_grad=grad)
    return rms_norm(x, torch.ones(40), backend=backend), [x]


def _rotary(backend, grad):
    q = torch.randn(2, 5, 4, 8, requires_grad=grad)
    k = torch.randn(2, 5, 2, 8, requires_grad=grad)
    return sum(t.sum() for t in apply_rotary(q, k, backend=backend)), [q, k]


def _cross_entropy(backend, grad):
    logits = torch.randn(6, 33, requires_grad=grad)
    return cross_entropy(logits * 1.0, torch.randint(0, 33, (6,)), backend=backend), [logits]


def _linear_cross_entropy(backend, grad):
    hidden = torch.randn(6, 16, requires_grad=grad)
    weight = torch.randn(33, 16, requires_grad=grad)
    return linear_cross_entropy(hidden, weight, torch.randint(0, 33, (6,)), backend=backend), [hidden, weight]


def _glu(backend, grad):
    gate, up = (torch.randn(3, 40, requires_grad=grad) for _ in range(2))
    return swiglu(gate, up, backend=backend), [gate, up]


def _attention(backend, grad):
    q, k, v = (torch.randn(2, 7, heads, 16, requires_grad=grad) for heads in (4, 2, 2))
    return attention(q, k, v, causal=True, backend=backend), [q, k, v]


def _attention_with_kv_cache(backend, grad):
    q = torch.randn(2, 1, 4, 16, requires_grad=grad)
    k_cache, v_cache = torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    return attention_with_kv_cache(q, k_cache, v_cache, torch.tensor([9, 4]), backend=backend), [q]


def _quantized_linear(backend, grad):
    x = torch.randn(3, 64, requires_grad=grad)
    qweight = torch.randint(0, 256, (5, 32), dtype=torch.uint8)
    return quantized_linear(x, qweight, torch.rand(5, 2), bits=4, group_size=32, backend=backend), [x]


OPS = {
    "rms_norm": (_rms_norm, RMS_NORM),
    "rotary": (_rotary, ROTARY),
    "cross_entropy": (_cross_entropy, CROSS_ENTROPY),
    "linear_cross_entropy": (_linear_cross_entropy, CROSS_ENTROPY),
    "glu": (_glu, GLU),
    "attention": (_attention, ATTENTION),
    "attention_with_kv_cache": (_attention_with_kv_cache, ATTENTION_WITH_KV_CACHE),
    "quantized_linear": (_quantized_linear, QUANTIZED_LINEAR),
}


def _expected_to_run(table, backend, direction):
    """What the table and this machine promise for a CPU call."""
    implementation = table.get(backend)
    if implementation is None or getattr(implementation, direction) is None:
        return False
    if backend == "triton":
        return _backend.HAS_TRITON and _backend.triton_interpreting()
    if backend == "cpu":
        return _backend.cpu_extension is not None
    return backend == "torch"


@pytest.mark.parametrize("direction", _backend.DIRECTIONS)
@pytest.mark.parametrize("backend", _backend.BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_every_backend_runs_or_refuses_clearly(op, backend, direction):
    call, table = OPS[op]
    grad = direction == "backward"
    if _expected_to_run(table, backend, direction):
        out, inputs = call(backend, grad)
        assert torch.isfinite(out).all()
        if grad:
            out.float().sum().backward()
            assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)
    else:
        with pytest.raises(UnsupportedBackend, match=f"{backend}|not differentiable"):
            call(backend, grad)


@pytest.mark.parametrize("op", OPS)
def test_a_preferred_backend_that_cannot_run_a_call_gives_way(op, monkeypatch):
    """AQUILA_BACKEND=cuda on a CPU tensor (cuda runs CUDA tensors only): the automatic choice runs the call."""
    call, table = OPS[op]
    monkeypatch.setenv("AQUILA_BACKEND", "cuda")
    backward = any(implementation.backward for implementation in table.values())
    out, _ = call(None, backward)
    assert torch.isfinite(out).all()


def test_a_preferred_backend_is_taken_where_it_can_run(monkeypatch):
    x = torch.randn(2, 8)
    monkeypatch.setenv("AQUILA_BACKEND", "torch")
    assert _backend.resolve(RMS_NORM, x, hidden=8) == "torch"
    monkeypatch.delenv("AQUILA_BACKEND")
    assert _backend.resolve(RMS_NORM, x, hidden=8) == "cpu"


def test_an_unknown_preference_is_an_error(monkeypatch):
    monkeypatch.setenv("AQUILA_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="AQUILA_BACKEND must be one of"):
        rms_norm(torch.randn(2, 8), torch.ones(8))


def test_a_demanded_backend_names_what_it_lacks_and_who_can():
    q, k, v = (torch.randn(1, 3, 2, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(UnsupportedBackend,
                       match=r"attention: cuda has no attention kernel; use .*cpu, torch or backend=None"):
        attention(q, k, v, backend="cuda")


def test_the_kv_cache_op_refuses_a_gradient():
    with pytest.raises(UnsupportedBackend, match="attention_with_kv_cache is not differentiable"):
        _attention_with_kv_cache(None, True)


def test_a_new_table_entry_is_all_an_op_needs():
    """resolve reads only the table: an entry's directions, dtypes and limits decide, in the table's order."""
    calls = []
    table = _backend.Implementations(
        "toy",
        cuda=_backend.Implementation(lambda: calls.append("cuda")),
        torch=_backend.Implementation(lambda: calls.append("torch"), dtypes=(torch.float32,),
                                      limits=lambda width: None if width <= 4 else f"takes width <= 4, got {width}"),
        cpu=_backend.Implementation(lambda: calls.append("cpu"), lambda: None))
    x = torch.randn(3)
    assert _backend.resolve(table, x, width=4) == "torch"
    assert _backend.resolve(table, x, width=5) == "cpu"
    assert _backend.resolve(table, x, backward=True, width=4) == "cpu"
    with pytest.raises(UnsupportedBackend, match="toy: torch does not take torch.float16; use cpu or backend=None"):
        _backend.resolve(table, x.half(), "torch", width=1)
    with pytest.raises(UnsupportedBackend, match="toy: torch takes width <= 4, got 9"):
        _backend.resolve(table, x, "torch", width=9)
    with pytest.raises(ValueError, match="unknown backends"):
        _backend.Implementations("toy", metal=_backend.Implementation())
