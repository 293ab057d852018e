"""The ops are torch.library custom ops with fake implementations inside autograd Functions: torch.compile must
trace a block using them in one graph (fullgraph=True fails on any graph break) and give the eager results."""

import pytest
import torch

from aquila.kernels import (
    attention,
    cross_entropy,
    fused_add_rms_norm,
    linear_cross_entropy,
    rms_norm,
    rotary_embedding,
)


def block(x, residual, weight, positions):
    normed, residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    q = rotary_embedding(normed.view(*normed.shape[:-1], 4, 16), positions, interleaved=True)
    return rms_norm(q.flatten(-2), weight).sum() + residual.square().mean()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_in_one_graph_forward_and_backward(compiler):
    torch._dynamo.reset()
    inputs = [torch.randn(2, 5, 64, requires_grad=True), torch.randn(2, 5, 64, requires_grad=True),
              torch.randn(64, requires_grad=True), torch.arange(5).repeat(2, 1)]
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs[:3])
    eager_inputs = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    eager_loss = block(*eager_inputs)
    eager_grads = torch.autograd.grad(eager_loss, eager_inputs[:3])
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_compiles_in_one_graph(inplace):
    torch._dynamo.reset()

    def loss_fn(hidden, weight, targets):
        logits = hidden @ weight.T
        return cross_entropy(logits, targets, label_smoothing=0.1, inplace_backward=inplace) + linear_cross_entropy(
            hidden, weight, targets, z_loss=1e-4)

    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets = torch.tensor([1, 5, -100, 39, 0, 7])
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    eager_loss = loss_fn(hidden, weight, targets)
    eager_grads = torch.autograd.grad(eager_loss, (hidden, weight))
    torch.testing.assert_close(loss, eager_loss)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_attention_compiles_in_one_graph():
    torch._dynamo.reset()

    def block(q, k, v):
        return attention(q, k, v, causal=True).square().sum()

    q = torch.randn(2, 9, 4, 32, requires_grad=True)
    k, v = (torch.randn(2, 9, 2, 32, requires_grad=True) for _ in range(2))
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    eager_grads = torch.autograd.grad(block(q, k, v), (q, k, v))
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)
