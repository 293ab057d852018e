"""Every op under torch.autocast and with inputs of mixed float dtypes, forward and backward, against float64.

The rule (docs/numerics.md): attention and linear_cross_entropy run in autocast's dtype under autocast; every op runs
in the common dtype of its inputs otherwise; fused_add_rms_norm keeps the sum in the wider dtype and returns the
normalised output in x's. Each case compares with the float64 reference computed on the inputs as the op casts them,
at the tolerance of the output's dtype, and checks each gradient's dtype is its input's.
"""

import pytest
import torch

from aquila.kernels import (
    apply_rotary,
    attention,
    attention_with_kv_cache,
    cross_entropy,
    fused_add_rms_norm,
    linear_cross_entropy,
    reference,
    rms_norm,
)
from tests.helpers import backend_params
from tests.kernels.test_attention import assert_as_accurate_as_torch
from tests.tolerance import assert_matches_reference

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
CPU_BACKENDS = [p for p in backend_params() if p.values[1] == "cpu"]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def exact_leaves(*tensors, cast=None):
    """float64 copies of the inputs as the op sees them (cast to `cast`, when given, first)."""
    return [(t if cast is None else t.to(cast)).detach().double().requires_grad_() for t in tensors]


def check_gradients(inputs, exact_inputs, names, computed=FP32):
    """Each input's gradient has its dtype, and is as exact as the coarser of that dtype and the one the op computed
    in (a gradient through a bf16 computation carries bf16's rounding, whatever dtype it lands in)."""
    for name, t, e in zip(names, inputs, exact_inputs):
        assert t.grad.dtype == t.dtype, f"grad {name}: {t.grad.dtype}, not its input's {t.dtype}"
        coarser = max(t.dtype, computed, key=lambda dtype: torch.finfo(dtype).eps)
        assert_matches_reference(t.grad.to(coarser), e.grad, f"grad {name}")


def upstream(out):
    """A random gradient for `out`, in out's dtype as autograd delivers it."""
    return torch.randn(out.shape).to(out.dtype)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("x_dtype, residual_dtype, weight_dtype",
                         [(BF16, FP32, FP32), (FP16, FP32, BF16), (FP32, BF16, FP32), (FP16, BF16, FP32)], ids=str)
def test_fused_add_rms_norm_keeps_the_stream_in_the_wider_dtype(backend, device, x_dtype, residual_dtype,
                                                                  weight_dtype):
    x, residual, weight = leaves(torch.randn(3, 5, 72).to(x_dtype), torch.randn(3, 5, 72).to(residual_dtype),
                                 (1 + 0.1 * torch.randn(72)).to(weight_dtype))
    out, stream = fused_add_rms_norm(x, residual, weight, 1e-5, backend=backend)
    wide = torch.promote_types(x_dtype, residual_dtype)
    assert out.dtype == x_dtype and stream.dtype == wide
    ex, er, ew = exact_leaves(x, residual, weight)
    exact_stream = (ex + er).to(wide).double()  # the stream is stored in the wide dtype before it is normalised
    exact_out = reference.rms_norm(exact_stream, ew, 1e-5)
    assert_matches_reference(out, exact_out, "out")
    assert_matches_reference(stream, exact_stream, "stream")
    grad_out, grad_stream = upstream(out), upstream(stream)
    torch.autograd.backward((out, stream), (grad_out, grad_stream))
    # The float64 gradient of the same computation, the stream's rounding left out (it has no derivative).
    exact = reference.rms_norm(ex + er, ew, 1e-5)
    ((exact * grad_out.double()).sum() + ((ex + er) * grad_stream.double()).sum()).backward()
    check_gradients((x, residual, weight), (ex, er, ew), ("x", "residual", "weight"))


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_rms_norm_and_rotary_run_in_their_inputs_dtypes(backend, device, autocast):
    x, weight = leaves(torch.randn(4, 64).to(BF16), torch.randn(64))
    q, k = leaves(torch.randn(2, 6, 4, 32).to(BF16), torch.randn(2, 6, 2, 32))
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = rms_norm(x, weight, backend=backend)
        q_out, k_out = apply_rotary(q, k, offset=3, backend=backend)
    assert (out.dtype, q_out.dtype, k_out.dtype) == (BF16, BF16, FP32)
    ex, ew, eq, ek = exact_leaves(x, weight, q, k)
    assert_matches_reference(out, reference.rms_norm(ex, ew), "rms_norm")
    assert_matches_reference(k_out, reference.rotary(ek, offset=3), "rotary k")
    grads = [upstream(t) for t in (out, q_out, k_out)]
    torch.autograd.backward((out, q_out, k_out), grads)
    exact_outs = (reference.rms_norm(ex, ew), reference.rotary(eq, offset=3), reference.rotary(ek, offset=3))
    torch.autograd.backward(exact_outs, [g.double() for g in grads])
    check_gradients((x, weight, q, k), (ex, ew, eq, ek), ("x", "weight", "q", "k"))


def same_as_cast_by_hand(op, inputs, cast):
    """Under autocast `op` gives, bit for bit, what it gives on inputs cast to `cast` by hand (whose accuracy the op's
    own tests check), and its gradients reach the uncast inputs in their dtypes."""
    by_autocast, by_hand = leaves(*inputs), leaves(*(t.to(cast) for t in inputs))
    with torch.autocast("cpu", dtype=cast):
        out = op(*by_autocast)
    expected = op(*by_hand)
    assert out.dtype == expected.dtype and torch.equal(out, expected)
    grad = upstream(out)
    out.backward(grad)
    expected.backward(grad)
    for t, hand in zip(by_autocast, by_hand):
        assert t.grad.dtype == t.dtype and torch.equal(t.grad, hand.grad.to(t.dtype))


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_attention_in_the_common_dtype_of_mixed_inputs(backend, device):
    q, k, v = leaves(torch.randn(2, 9, 4, 32).to(BF16), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32))
    out = attention(q, k, v, causal=True, backend=backend)
    assert out.dtype == FP32
    exact = exact_leaves(q, k, v)
    sequences = [(0, 9, 0, 9), (9, 9, 9, 9)]
    exact_out = reference.attention(*(t.reshape(-1, *t.shape[2:]) for t in exact), sequences, 32 ** -0.5,
                                    causal=True)[0].view(q.shape)
    assert_matches_reference(out, exact_out, "out")
    grad_out = upstream(out)
    out.backward(grad_out)
    exact_out.backward(grad_out.double())
    check_gradients((q, k, v), exact, "qkv")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_attention_under_autocast_runs_in_its_dtype(backend):
    qkv = (torch.randn(2, 9, 4, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32))
    same_as_cast_by_hand(lambda q, k, v: attention(q, k, v, causal=True, backend=backend), qkv, BF16)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_linear_cross_entropy_in_the_common_dtype_of_mixed_inputs(backend, device):
    hidden, weight = leaves(torch.randn(2, 7, 48).to(BF16), torch.randn(130, 48) * 0.1)
    targets = torch.randint(0, 130, (2, 7))
    loss = linear_cross_entropy(hidden, weight, targets, backend=backend)
    eh, ew = exact_leaves(hidden, weight)
    exact = reference.cross_entropy(eh @ ew.T, targets)
    assert_matches_reference(loss, exact, "loss")
    loss.backward()
    exact.backward()
    check_gradients((hidden, weight), (eh, ew), ("hidden", "weight"))


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
def test_linear_cross_entropy_under_autocast_is_a_bf16_matmul(backend, device):
    targets = torch.randint(0, 130, (2, 7))
    same_as_cast_by_hand(lambda h, w: linear_cross_entropy(h, w, targets, backend=backend),
                         (torch.randn(2, 7, 48), torch.randn(130, 48) * 0.1), BF16)


@pytest.mark.parametrize("backend, device", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=str)
def test_cross_entropy_under_autocast_keeps_its_logits_dtype(backend, device, dtype):
    (logits,) = leaves(torch.randn(6, 90).to(dtype))
    targets = torch.randint(0, 90, (6,))
    with torch.autocast("cpu", dtype=BF16):
        loss = cross_entropy(logits * 1.0, targets, backend=backend)
    (exact,) = exact_leaves(logits)
    expected = reference.cross_entropy(exact, targets)
    assert_matches_reference(loss, expected, "loss")
    loss.backward()
    expected.backward()
    check_gradients((logits,), (exact,), ("logits",))


def test_the_kv_cache_op_casts_q_to_the_caches_dtype():
    """Held to attention's bf16 criterion (tests/kernels/test_attention.py): bf16 products round the probabilities."""
    q = torch.randn(1, 1, 2, 16)
    cache = torch.randn(1, 8, 2, 16).to(BF16)
    with torch.autocast("cpu", dtype=BF16):
        out = attention_with_kv_cache(q, cache, cache, torch.tensor([5]))
    assert out.dtype == BF16
    exact, same_dtype = (reference.attention(q.to(BF16).to(dtype)[0], cache.to(dtype)[0], cache.to(dtype)[0],
                                             [(0, 1, 0, 5)], 16 ** -0.5, causal=True, upcast=dtype == torch.float64)[0]
                         for dtype in (torch.float64, BF16))
    assert_as_accurate_as_torch(out[0], exact, same_dtype, "out")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_a_backward_called_under_autocast_computes_what_the_forward_promised(backend):
    """The kernels and the torch backends run with autocast off: a backward under autocast changes nothing."""
    q, k, v = (torch.randn(1, 12, 2, 16) for _ in range(3))
    grads = []
    for autocast in (False, True):
        inputs = leaves(q, k, v)
        out = attention(*inputs, causal=True, backend=backend)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            out.sum().backward()
        grads.append([t.grad for t in inputs])
    for plain, under_autocast in zip(*grads):
        assert torch.equal(plain, under_autocast)
