import pytest
import torch

from aquila.kernels import LayerNorm, UnsupportedBackend, layer_norm
from tests.helpers import backend_params
from tests.tolerance import assert_matches_reference

# One row, odd and non-power-of-two widths, a 3-D batch, a chunked row (wider than the Triton block), Aquila-7B's
# width, and enough elements for the CPU kernels to run on several threads (backend.PARALLEL_GRAIN).
SHAPES = [(1, 1), (3, 1000), (7, 4099), (2, 3, 64), (2, 9000), (5, 4096), (9, 4099)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Which of weight and bias are given: both, weight only (bias=False), neither (elementwise_affine=False).
AFFINE = {"affine": (True, True), "no-bias": (True, False), "plain": (False, False)}


def make_inputs(shape, dtype, device, with_weight=True, with_bias=True):
    # A mean far from 0 against the spread: a one-pass variance (mean(x^2) - mean^2) would lose digits to it.
    x = (3 + torch.randn(shape, device=device)).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype) if with_weight else None
    bias = torch.randn(shape[-1], device=device).to(dtype) if with_bias else None
    return x, weight, bias


def exact_layer_norm(x, weight, bias, eps=1e-5):
    """The float64 reference, differentiable, of the inputs as given (float64 leaves pass through, others are
    copied). The formula itself rather than F.layer_norm, whose float64 backward is not exact (a 1-wide row's weight
    gradient comes out near 1e-15, not 0)."""
    xd = x.double()
    deviation = xd - xd.mean(-1, keepdim=True)
    out = deviation * (deviation.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    if weight is not None:
        out = out * weight.double()
    return out if bias is None else out + bias.double()


def grad_x_scale(x, grad_out, weight, eps=1e-5):
    """grad x = rstd * (g - mean(g) - x_hat * mean(g * x_hat)), g = grad_out * weight: its terms can cancel, so the
    fp32 error is relative to the largest of them (in float64)."""
    variance, mean = torch.var_mean(x.double(), -1, correction=0, keepdim=True)
    rstd = (variance + eps).rsqrt()
    x_hat = (x.double() - mean) * rstd
    g = grad_out.double() * (weight.double() if weight is not None else 1.0)
    terms = (rstd * g, rstd * g.mean(-1, keepdim=True), rstd * x_hat * (g * x_hat).mean(-1, keepdim=True))
    return max(term.abs().max().item() for term in terms)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("affine", AFFINE)
def test_forward_matches_float64_reference(backend, device, dtype, shape, affine):
    x, weight, bias = make_inputs(shape, dtype, device, *AFFINE[affine])
    out = layer_norm(x, weight, bias, 1e-5, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches_reference(out, exact_layer_norm(x, weight, bias))


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (7, 4099), (2, 3, 64), (37, 256), (2, 9000), (9, 4099)],
                         ids=str)
@pytest.mark.parametrize("affine", AFFINE)
def test_gradients_match_autograd_of_float64_reference(backend, device, dtype, shape, affine):
    x, weight, bias = make_inputs(shape, dtype, device, *AFFINE[affine])
    grad_out = torch.randn(shape, device=device).to(dtype)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, weight, bias)]
    layer_norm(*leaves, 1e-5, backend=backend).backward(grad_out)

    exact = [None if t is None else t.double().requires_grad_() for t in (x, weight, bias)]
    exact_layer_norm(*exact).backward(grad_out.double())
    scale = max(grad_x_scale(x, grad_out, weight), exact[0].grad.abs().max().item())
    assert_matches_reference(leaves[0].grad, exact[0].grad, "grad x", scale=scale)
    for name, leaf, reference in (("grad weight", leaves[1], exact[1]), ("grad bias", leaves[2], exact[2])):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_matches_reference(leaf.grad, reference.grad, name)


@pytest.mark.parametrize("backend, device", backend_params())
def test_parameters_in_another_dtype(backend, device):
    """fp32 weight and bias with bf16 activations (mixed precision): computed with the fp32 parameters, whose
    gradients stay fp32."""
    x = torch.randn(4, 96, device=device).bfloat16()
    weight = torch.randn(96, device=device, requires_grad=True)
    bias = torch.randn(96, device=device, requires_grad=True)
    out = layer_norm(x, weight, bias, backend=backend)
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, exact_layer_norm(x, weight.detach(), bias.detach()))
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32


@pytest.mark.parametrize("backend, device", backend_params())
def test_empty_rows(backend, device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    weight = torch.randn(64, device=device, requires_grad=True)
    bias = torch.randn(64, device=device, requires_grad=True)
    out = layer_norm(x, weight, bias, backend=backend)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))
    assert x.grad.shape == (0, 64)


@pytest.mark.parametrize("backend, device", backend_params())
def test_constant_rows_normalise_to_the_bias(backend, device):
    """A row with no spread: x - mean is exactly 0, so the output is the bias and grad x is finite."""
    x = torch.full((3, 50), 7.25, device=device, requires_grad=True)
    weight = torch.randn(50, device=device, requires_grad=True)
    bias = torch.randn(50, device=device)
    out = layer_norm(x, weight, bias, backend=backend)
    assert torch.equal(out, bias.expand(3, 50))
    out.backward(torch.randn(3, 50, device=device))
    assert torch.isfinite(x.grad).all() and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("backend, device", backend_params())
def test_row_offsets_beyond_32_bits(backend, device):
    """Rows 2^31 elements apart: every row offset must be computed in 64 bits."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # 4 GiB of storage, only the two rows touched
    hidden, stride = 96, 2**31 + 64
    storage = torch.empty(stride + hidden, dtype=torch.float16, device=device)
    x = storage.as_strided((2, hidden), (stride, 1))
    x.copy_(torch.randn(2, hidden, device=device))
    weight, bias = torch.randn(hidden, device=device), torch.randn(hidden, device=device)
    leaf = x.detach().requires_grad_()
    out = layer_norm(leaf, weight, bias, backend=backend)
    assert_matches_reference(out, exact_layer_norm(x, weight, bias))
    out.backward(torch.ones_like(out))
    exact = x.double().requires_grad_()
    exact_layer_norm(exact, weight, bias).backward(torch.ones(2, hidden, dtype=torch.float64, device=device))
    assert_matches_reference(leaf.grad, exact.grad, "grad x", scale=grad_x_scale(x, torch.ones_like(x), weight))


@pytest.mark.parametrize("backend, device", backend_params())
def test_backward_is_deterministic(backend, device):
    x = torch.randn(33, 300, device=device, requires_grad=True)
    weight = torch.randn(300, device=device, requires_grad=True)
    bias = torch.randn(300, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = weight.grad = bias.grad = None
        layer_norm(x, weight, bias, backend=backend).pow(2).sum().backward()
        grads.append((x.grad.clone(), weight.grad.clone(), bias.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_module_is_a_drop_in_for_torch_layer_norm():
    """The same parameters and state dict as torch.nn.LayerNorm, loadable either way, and its results."""
    for options in (dict(), dict(bias=False), dict(elementwise_affine=False)):
        ours, theirs = LayerNorm(48, eps=1e-6, **options), torch.nn.LayerNorm(48, eps=1e-6, **options)
        assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]
        for parameter in theirs.parameters():
            torch.nn.init.normal_(parameter)
        ours.load_state_dict(theirs.state_dict())
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(2, 5, 48)
        torch.testing.assert_close(ours(x), theirs(x))
    assert LayerNorm((64,)).normalized_shape == (64,)
    assert "elementwise_affine=True" in repr(LayerNorm(8))


def test_module_matches_function():
    layer = LayerNorm(48, eps=1e-6)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 5, 48)
    assert torch.equal(layer(x), layer_norm(x, layer.weight, layer.bias, 1e-6))


def test_non_contiguous_input_is_handled():
    x = torch.randn(64, 10).t()  # last dimension strided
    weight, bias = torch.randn(64), torch.randn(64)
    assert_matches_reference(layer_norm(x, weight, bias), exact_layer_norm(x, weight, bias))


def test_cuda_backend_is_refused_cleanly():
    """There is no CUDA C++ LayerNorm (Triton serves GPUs): naming it says so and names the others."""
    with pytest.raises(UnsupportedBackend, match="cuda has no layer_norm kernel; use .*backend=None"):
        layer_norm(torch.ones(2, 4), backend="cuda")


@pytest.mark.parametrize("call, error, words", [
    (lambda: layer_norm(torch.ones(2, 4, dtype=torch.int32)), TypeError, "x must have one of"),
    (lambda: layer_norm(torch.ones(2, 4, dtype=torch.float64)), TypeError, "x must have one of"),
    (lambda: layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
    (lambda: layer_norm(torch.ones(2, 4), torch.ones(5)), ValueError, "weight must have shape (4,)"),
    (lambda: layer_norm(torch.ones(2, 4), torch.ones(4), torch.ones(3)), ValueError, "bias must have shape (4,)"),
    (lambda: layer_norm(torch.ones(2, 4), None, torch.ones(4, dtype=torch.int64)), TypeError,
     "bias must have one of the dtypes"),
    (lambda: layer_norm(torch.ones(2, 4), torch.ones(4, device="meta")), ValueError, "weight must be on cpu"),
    (lambda: layer_norm(torch.ones(2, 0)), ValueError, "non-empty last (hidden) dimension"),
    (lambda: layer_norm(torch.ones(())), ValueError, "non-empty last (hidden) dimension"),
    (lambda: layer_norm(torch.ones(2, 4), eps=-1.0), ValueError, "eps must be a number >= 0"),
    (lambda: layer_norm(torch.ones(2, 4), eps="1e-5"), ValueError, "eps must be a number >= 0"),
    (lambda: layer_norm(torch.ones(2, 4), backend="cudnn"), ValueError, "backend must be one of"),
    (lambda: LayerNorm((4, 8)), ValueError, "normalized_shape must be the hidden size"),
    (lambda: LayerNorm(0), ValueError, "normalized_shape must be the hidden size"),
])
def test_bad_input_gets_a_clear_error(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_in_one_graph_forward_and_backward(compiler):
    torch._dynamo.reset()

    def block(x, weight, bias):
        return layer_norm(x, weight, bias).square().sum() + layer_norm(x * 2, None, None).sum()

    inputs = [torch.randn(2, 5, 64, requires_grad=True), torch.randn(64, requires_grad=True),
              torch.randn(64, requires_grad=True)]
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    grads = torch.autograd.grad(compiled(*inputs), inputs)
    eager_grads = torch.autograd.grad(block(*inputs), inputs)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bias_on_another_device():
    with pytest.raises(ValueError, match="bias must be on cuda"):
        layer_norm(torch.ones(2, 4, device="cuda"), torch.ones(4, device="cuda"), torch.ones(4))
