"""Gated linear units (swiglu, geglu) against float64 references: values and gradients, every backend and dtype."""

import pytest
import torch

from aquila.kernels import geglu, reference, swiglu
from tests.helpers import backend_params
from tests.tolerance import assert_matches_reference

# One element, odd widths, a 3-D batch, more than one Triton block per row, Aquila-7B's MLP width.
SHAPES = [(1, 1), (3, 1000), (7, 4099), (2, 3, 64), (2, 1500), (3, 11008)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (name, call, activation code of reference.glu)
ACTIVATIONS = [("swiglu", lambda g, u, b: swiglu(g, u, backend=b), 0),
               ("geglu", lambda g, u, b: geglu(g, u, backend=b), 1),
               ("geglu-tanh", lambda g, u, b: geglu(g, u, approximate="tanh", backend=b), 2)]


def inputs(shape, dtype, device, spread=3.0):
    return [(spread * torch.randn(shape, device=device)).to(dtype) for _ in range(2)]


def exact(gate, up, activation):
    return reference.glu(gate.double(), up.double(), activation)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name, call, activation", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_forward_matches_float64_reference(backend, device, dtype, shape, name, call, activation):
    gate, up = inputs(shape, dtype, device)
    out = call(gate, up, backend)
    assert out.dtype == dtype and out.shape == gate.shape
    assert_matches_reference(out, exact(gate, up, activation), name)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (2, 3, 64), (2, 1500)], ids=str)
@pytest.mark.parametrize("name, call, activation", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_gradients_match_autograd_of_float64_reference(backend, device, dtype, shape, name, call, activation):
    gate, up = inputs(shape, dtype, device)
    grad_out = torch.randn(shape, device=device).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (gate, up)]
    call(*leaves, backend).backward(grad_out)
    exact_leaves = [t.double().requires_grad_() for t in (gate, up)]
    exact(*exact_leaves, activation).backward(grad_out.double())
    for leaf, expected, what in zip(leaves, exact_leaves, ("gate", "up")):
        assert leaf.grad.dtype == dtype
        assert_matches_reference(leaf.grad, expected.grad, f"{name} grad {what}")


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("name, call, activation", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_extreme_gates_stay_finite_and_exact(backend, device, name, call, activation):
    """Gates far out in both tails: sigmoid and tanh are formed without overflow; values and gradients still match."""
    gate = torch.tensor([[-1e4, -200.0, -88.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 88.0, 200.0, 1e4]], device=device)
    up = torch.linspace(-2, 2, gate.shape[1], device=device)[None]
    leaves = [t.clone().requires_grad_() for t in (gate, up)]
    out = call(*leaves, backend)
    out.backward(torch.ones_like(out))
    exact_leaves = [t.double().requires_grad_() for t in (gate, up)]
    expected = exact(*exact_leaves, activation)
    expected.backward(torch.ones_like(expected))
    assert_matches_reference(out, expected.detach(), name)
    for leaf, reference_leaf, what in zip(leaves, exact_leaves, ("gate", "up")):
        assert_matches_reference(leaf.grad, reference_leaf.grad, f"{name} grad {what}")


@pytest.mark.parametrize("backend, device", backend_params())
def test_halves_of_one_projection_are_read_in_place(backend, device):
    """gate and up as the two halves of a fused [.., 2 * hidden] projection: strided rows, no copy needed."""
    fused = torch.randn(2, 5, 2 * 300, device=device)
    gate, up = fused[..., :300], fused[..., 300:]
    assert_matches_reference(swiglu(gate, up, backend=backend), exact(gate, up, 0))


def test_mixed_dtypes_compute_in_the_common_one():
    gate = torch.randn(4, 64)
    up = torch.randn(4, 64).to(torch.bfloat16)
    out = swiglu(gate, up)
    assert out.dtype == torch.float32
    assert_matches_reference(out, exact(gate, up, 0))


def test_empty_inputs_give_empty_outputs_and_gradients():
    gate, up = (torch.randn(0, 8, requires_grad=True) for _ in range(2))
    out = swiglu(gate, up)
    out.sum().backward()
    assert out.shape == (0, 8) and gate.grad.shape == (0, 8) and up.grad.shape == (0, 8)


@pytest.mark.parametrize("call, error, words", [
    (lambda: swiglu(torch.randn(2, 3), torch.randn(2, 4)), ValueError, "swiglu: up must have shape"),
    (lambda: swiglu(torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 3)), TypeError, "swiglu: gate must have"),
    (lambda: geglu(torch.randn(2, 3), [1.0]), TypeError, "geglu: up must be a torch.Tensor"),
    (lambda: geglu(torch.randn(2, 3), torch.randn(2, 3), approximate="erf"), ValueError, "approximate must be"),
    (lambda: swiglu(torch.randn(2, 3), torch.randn(2, 3), backend="cuda"), ValueError, "swiglu: cuda has no"),
])
def test_bad_input_gets_a_clear_error(call, error, words):
    with pytest.raises(error, match=words):
        call()
