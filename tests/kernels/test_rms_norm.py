import functools

import pytest
import torch

from aquila.kernels import RMSNorm, UnsupportedBackend, fused_add_rms_norm, reference, rms_norm
from tests.helpers import backend_params
from tests.tolerance import assert_matches_reference

# One row, odd and non-power-of-two widths, a 3-D batch, the widest rows, and Aquila-7B's widths (4096, 11008).
SHAPES = [(1, 1), (3, 1000), (7, 4099), (2, 3, 64), (1, 16384), (5, 4096), (2, 11008)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, dtype, device, residual):
    x = torch.randn(shape, device=device).to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(dtype)
    res = torch.randn(shape, device=device).to(dtype) if residual else None
    return x, weight, res


def run(x, weight, residual, backend, eps=1e-5):
    if residual is None:
        return rms_norm(x, weight, eps, backend=backend), None
    return fused_add_rms_norm(x, residual, weight, eps, backend=backend)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_forward_matches_float64_reference(backend, device, dtype, shape, residual):
    x, weight, res = make_inputs(shape, dtype, device, residual)
    out, res_out = run(x, weight, res, backend)
    if residual:
        assert_matches_reference(res_out, x.double() + res.double(), "x + residual")
        # The norm is of the sum as stored (rounded once to the dtype), as the next block sees it.
        expected = reference.rms_norm(res_out.double(), weight.double(), 1e-5)
    else:
        expected = reference.rms_norm(x.double(), weight.double(), 1e-5)
    assert out.dtype == dtype
    assert_matches_reference(out, expected)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (7, 4099), (2, 3, 64), (37, 256)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradients_match_autograd_of_float64_reference(backend, device, dtype, shape, residual):
    x, weight, res = make_inputs(shape, dtype, device, residual)
    grad_out = torch.randn(shape, device=device).to(dtype)
    grad_sum = torch.randn(shape, device=device).to(dtype) if residual else None
    leaves = [t.clone().requires_grad_() for t in (x, weight) + ((res,) if residual else ())]
    out, res_out = run(*leaves[:2], leaves[2] if residual else None, backend)
    torch.autograd.backward([out, res_out] if residual else [out], [grad_out, grad_sum] if residual else [grad_out])

    # The reference normalises the stored sum; its gradient flows back to x and residual alike.
    exact = [t.double().requires_grad_() for t in (x, weight)]
    normalised = exact[0] if not residual else res_out.detach().double().requires_grad_()
    expected_out = reference.rms_norm(normalised, exact[1], 1e-5)
    expected_out.backward(grad_out.double())
    expected_grad_x = normalised.grad + (grad_sum.double() if residual else 0)
    # grad x = rstd * (grad_out * weight - x_hat * mean(...)): its terms can cancel, so the fp32 error is relative to
    # the largest of them.
    rstd = normalised.detach().pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    terms = (rstd * grad_out.double() * weight.double()).abs().max().item()
    assert_matches_reference(leaves[0].grad, expected_grad_x, "grad x",
                             scale=max(terms, expected_grad_x.abs().max().item()))
    assert_matches_reference(leaves[1].grad, exact[1].grad, "grad weight")
    if residual:
        assert torch.equal(leaves[2].grad, leaves[0].grad), "grad residual == grad x"


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("options", [dict(offset=1.0), dict(weight=None), dict(weight=None, offset=0.5),
                                     dict(casting_mode="llama"), dict(casting_mode="llama", offset=1.0)], ids=str)
def test_gemma_llama_and_weightless_options(backend, device, dtype, residual, options):
    """Gemma's offset (x / rms * (1 + w)), no weight, and Llama's casting (x / rms rounded to the dtype before the
    weight; the backward is that of the formula without the rounding), values and gradients, against float64
    references of the same formulas."""
    options = dict(options)
    x, weight, res = make_inputs((5, 300), dtype, device, residual)
    weight = options.pop("weight", weight)
    offset, llama = options.get("offset", 0.0), options.get("casting_mode") == "llama"
    leaves = [t.clone().requires_grad_() for t in (x, weight) if t is not None]
    call = fused_add_rms_norm if residual else rms_norm
    out = call(*leaves[:1], *([res] if residual else []), leaves[1] if weight is not None else None, 1e-5,
               backend=backend, **options)
    stored_sum = out[1].detach() if residual else None
    out = out[0] if residual else out
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    h = stored_sum.double() if residual else x.double()  # the norm is of the sum as stored
    exact = [h.requires_grad_()] + ([weight.double().requires_grad_()] if weight is not None else [])
    normalised = exact[0] * exact[0].pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    scale = offset + (exact[1] if weight is not None else 1.0)
    expected = normalised * scale
    if llama:  # the value of the rounded normalised x; the gradients are those of the formula without the rounding
        expected = expected + ((normalised.to(dtype).double() - normalised) * scale).detach()
    expected.backward(grad_out.double())
    assert out.dtype == dtype
    assert_matches_reference(out, expected.detach())
    rstd = h.detach().pow(2).mean(-1, keepdim=True).add(1e-5).rsqrt()
    scale = offset + (weight.double().abs().max().item() if weight is not None else 1.0)
    terms = (rstd * grad_out.double()).abs().max().item() * scale
    assert_matches_reference(leaves[0].grad, exact[0].grad, "grad x",
                             scale=max(terms, exact[0].grad.abs().max().item()))
    if weight is not None:
        assert_matches_reference(leaves[1].grad, exact[1].grad, "grad weight")


def test_module_options():
    x = torch.randn(3, 64)
    gemma = RMSNorm(64, offset=1.0)  # weights stored as w - 1: zeros start at a scale of 1
    assert torch.equal(gemma.weight, torch.zeros(64))
    assert torch.equal(gemma(x), rms_norm(x, torch.ones(64)))
    plain = RMSNorm(64, elementwise_affine=False)
    assert plain.weight is None and not list(plain.parameters())
    assert torch.equal(plain(x), rms_norm(x, torch.ones(64)))
    assert "casting_mode=gemma" in repr(gemma)


@pytest.mark.parametrize("backend, device", backend_params())
def test_weight_in_another_dtype(backend, device):
    """fp32 weights with bf16 activations (mixed precision): computed with the fp32 weights."""
    x = torch.randn(4, 96, device=device).bfloat16()
    weight = torch.randn(96, device=device, requires_grad=True)
    out = rms_norm(x, weight, backend=backend)
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, reference.rms_norm(x.double(), weight.double()))
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend, device", backend_params())
def test_empty_rows(backend, device):
    x = torch.randn(0, 64, device=device, requires_grad=True)
    weight = torch.randn(64, device=device, requires_grad=True)
    out = rms_norm(x, weight, backend=backend)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


@pytest.mark.parametrize("backend, device", backend_params())
def test_row_offsets_beyond_32_bits(backend, device):
    """Rows 2^31 elements apart: every row offset must be computed in 64 bits."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # 4 GiB of storage, only the two rows touched
    hidden, stride = 96, 2**31 + 64
    storage = torch.empty(stride + hidden, dtype=torch.float16, device=device)
    x = storage.as_strided((2, hidden), (stride, 1))
    x.copy_(torch.randn(2, hidden, device=device))
    weight = torch.randn(hidden, device=device)
    leaf = x.detach().requires_grad_()
    out = rms_norm(leaf, weight, backend=backend)
    assert_matches_reference(out, reference.rms_norm(x.double(), weight.double()))
    out.backward(torch.ones_like(out))
    exact = x.double().requires_grad_()
    reference.rms_norm(exact, weight.double()).backward(torch.ones(2, hidden, dtype=torch.float64, device=device))
    assert_matches_reference(leaf.grad, exact.grad, "grad x")


@pytest.mark.parametrize("backend, device", backend_params())
def test_backward_is_deterministic(backend, device):
    x = torch.randn(33, 300, device=device, requires_grad=True)
    weight = torch.randn(300, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        x.grad = weight.grad = None
        rms_norm(x, weight, backend=backend).pow(2).sum().backward()
        grads.append((x.grad.clone(), weight.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_module_matches_function():
    layer = RMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(layer.weight)
    x, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    assert torch.equal(layer(x), rms_norm(x, layer.weight, 1e-5))
    out, new_residual = layer(x, residual)
    expected, expected_residual = fused_add_rms_norm(x, residual, layer.weight, 1e-5)
    assert torch.equal(out, expected) and torch.equal(new_residual, expected_residual)


def test_non_contiguous_input_is_handled():
    x = torch.randn(64, 10).t()  # last dimension strided
    weight = torch.randn(64)
    assert_matches_reference(rms_norm(x, weight), reference.rms_norm(x.double(), weight.double()))


@pytest.mark.parametrize("call, error, words", [
    (lambda: rms_norm(torch.ones(2, 4, dtype=torch.int32), torch.ones(4)), TypeError, "x must have one of"),
    (lambda: rms_norm(torch.ones(2, 4, dtype=torch.float64), torch.ones(4)), TypeError, "x must have one of"),
    (lambda: rms_norm([1.0, 2.0], torch.ones(2)), TypeError, "x must be a torch.Tensor"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(5)), ValueError, "weight must have shape (4,)"),
    (lambda: rms_norm(torch.ones(2, 0), torch.ones(0)), ValueError, "non-empty last (hidden) dimension"),
    (lambda: rms_norm(torch.ones(()), torch.ones(1)), ValueError, "non-empty last (hidden) dimension"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), eps=-1.0), ValueError, "eps must be a number >= 0"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), backend="cudnn"), ValueError, "backend must be one of"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4), backend="cuda"), UnsupportedBackend,
     "cuda runs on CUDA tensors, not on cpu"),
    (lambda: rms_norm(torch.ones(2, 4), torch.ones(4, device="meta")), ValueError, "weight must be on cpu"),
    (lambda: fused_add_rms_norm(torch.ones(2, 4), torch.ones(2, 5), torch.ones(4)), ValueError,
     "residual must have shape (2, 4)"),
    (lambda: fused_add_rms_norm(torch.ones(2, 4), torch.ones(2, 4, dtype=torch.int32), torch.ones(4)), TypeError,
     "residual must have one of the dtypes"),
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), casting_mode="fp32"), ValueError,
     "casting_mode must be one of"),
    (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), offset="1"), ValueError, "offset must be a finite number"),
])
def test_bad_input_gets_a_clear_error(call, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_weight_on_another_device():
    with pytest.raises(ValueError, match="weight must be on cuda"):
        rms_norm(torch.ones(2, 4, device="cuda"), torch.ones(4))


def _gradient_buffers(call, x, grad_out):
    """Runs call(x) -> (out, [residual stream]) with hooks: (the buffer of out's incoming gradient, the buffer of the
    gradient that reaches x). x flows through a multiply so that its gradient is seen before any accumulation."""
    seen = {}

    def recorder(name):
        def hook(grad):
            seen[name] = grad.data_ptr()
        return hook

    scaled = x * 1.0
    scaled.register_hook(recorder("x"))
    outputs = call(scaled)
    outputs[0].register_hook(recorder("out"))
    # out * grad_out: the multiply's backward makes a new contiguous gradient, used by nothing else.
    loss = (outputs[0] * grad_out).sum() + sum(stream.float().square().sum() for stream in outputs[1:])
    loss.backward()
    return seen["out"], seen["x"]


def _rms_norm_of(h, weight, **options):
    return (rms_norm(h, weight, 1e-5, **options),)


def _fused_add_rms_norm_of(h, residual, weight, **options):
    return fused_add_rms_norm(h, residual, weight, 1e-5, **options)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 4099), (2, 3, 64), (1, 16384), (9, 4099)], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_inplace_backward_writes_grad_x_over_grad_out(backend, device, dtype, shape, residual):
    """With inplace_backward the gradient reaching x is the output's incoming gradient's own buffer, and every
    gradient equals the allocating backward's exactly."""
    x, weight, res = make_inputs(shape, dtype, device, residual)
    grad_out = torch.randn(shape, device=device).to(dtype)
    grads = {}
    for inplace in (False, True):
        leaves = [t.clone().requires_grad_() for t in (x, weight) + ((res,) if residual else ())]
        options = dict(inplace_backward=inplace, backend=backend)
        if residual:
            call = functools.partial(_fused_add_rms_norm_of, residual=leaves[2], weight=leaves[1], **options)
        else:
            call = functools.partial(_rms_norm_of, weight=leaves[1], **options)
        out_buffer, x_buffer = _gradient_buffers(call, leaves[0], grad_out)
        assert (x_buffer == out_buffer) == inplace
        grads[inplace] = [leaf.grad for leaf in leaves]
    for allocated, overwritten in zip(grads[False], grads[True]):
        assert torch.equal(allocated, overwritten)


@pytest.mark.parametrize("backend, device", backend_params())
def test_inplace_backward_allocates_where_overwriting_is_unsafe(backend, device):
    """An incoming gradient that is not contiguous (the expanded ones of a sum), or that requires grad
    (create_graph), is left alone: the backward allocates grad x as without the option."""
    x = torch.randn(5, 300, device=device)
    weight = torch.randn(300, device=device)
    exact = x.double().requires_grad_()
    reference.rms_norm(exact, weight.double(), 1e-5).sum().backward()
    leaf = x.clone().requires_grad_()
    rms_norm(leaf, weight, 1e-5, inplace_backward=True, backend=backend).sum().backward()  # grad_out: ones, expanded
    assert_matches_reference(leaf.grad, exact.grad, "grad x", scale=1e-5 ** -0.5)

    grad_out = torch.randn(5, 300, device=device, requires_grad=True)
    leaf = x.clone().requires_grad_()
    out = rms_norm(leaf, weight, 1e-5, inplace_backward=True, backend=backend)
    kept = grad_out.detach().clone()
    (grad_x,) = torch.autograd.grad(out, leaf, grad_out, create_graph=True)
    assert torch.equal(grad_out.detach(), kept) and grad_x.data_ptr() != grad_out.data_ptr()


def test_inplace_backward_compiles_in_one_graph():
    """Under torch.compile the option is ignored (graphs take no in-place writes to their inputs): same results."""
    torch._dynamo.reset()

    def block(x, residual, weight):
        normed, stream = fused_add_rms_norm(x, residual, weight, 1e-5, inplace_backward=True)
        return (rms_norm(normed * 3, weight, inplace_backward=True) * normed).sum() + stream.square().mean()

    inputs = [torch.randn(2, 5, 64, requires_grad=True) for _ in range(2)] + [torch.randn(64, requires_grad=True)]
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*inputs), inputs)
    eager_grads = torch.autograd.grad(block(*inputs), inputs)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


def test_module_passes_inplace_backward():
    layer = RMSNorm(64, inplace_backward=True)
    x = torch.randn(3, 64, requires_grad=True)
    out_buffer, x_buffer = _gradient_buffers(lambda h: (layer(h),), x, torch.randn(3, 64))
    assert x_buffer == out_buffer
