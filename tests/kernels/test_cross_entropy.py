import pytest
import torch

from aquila.kernels import UnsupportedBackend, cross_entropy, linear_cross_entropy, reference
from aquila.kernels.cross_entropy import _row_losses
from tests.helpers import backend_params
from tests.tolerance import assert_matches_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Tiny, odd, not a multiple of the Triton block (4096), Aquila's 100008, and the largest asked for.
VOCABS = [2, 50, 4099, 100008]
OPTIONS = {"plain": {}, "smoothing+zloss": {"label_smoothing": 0.1, "z_loss": 1e-3}}


def make_problem(rows, vocab, dtype, device, ignored=(1,)):
    logits = (3 * torch.randn(rows, vocab, device=device)).to(dtype)
    targets = torch.randint(0, vocab, (rows,), device=device)
    for row in ignored:
        if row < rows:
            targets[row] = -100
    return logits, targets


def check_against_reference(logits, targets, backend, reduction="mean", grad_output=None, **options):
    leaf = logits.clone().requires_grad_()
    loss = cross_entropy(leaf, targets, reduction=reduction, backend=backend, **options)
    exact = logits.double().requires_grad_()
    expected = reference.cross_entropy(exact, targets, reduction=reduction, **options)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    # A token's loss is lse - z_t: its fp32 error is relative to lse, not to the (possibly tiny) difference.
    counted = targets != options.get("ignore_index", -100)
    lse = (torch.logsumexp(exact.detach(), -1).abs() * counted).flatten()
    lse_scale = {"none": lse.max(), "sum": lse.sum(), "mean": lse.sum() / counted.sum().clamp(min=1)}[reduction]
    assert_matches_reference(loss, expected, "loss", scale=max(lse_scale.item(), expected.abs().max().item()))
    grad_output = torch.randn_like(expected) if grad_output is None else grad_output
    loss.backward(grad_output.float())
    expected.backward(grad_output.double())
    assert leaf.grad.dtype == logits.dtype
    assert_matches_reference(leaf.grad, exact.grad, "grad logits")


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(OPTIONS), ids=str)
def test_matches_float64_reference(backend, device, dtype, vocab, reduction, options):
    logits, targets = make_problem(3 if vocab > 5000 else 9, vocab, dtype, device)
    check_against_reference(logits, targets, backend, reduction, **OPTIONS[options])


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [50, 4099])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3}], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_softcapped_logits(backend, device, dtype, vocab, options, inplace):
    """Gemma 2's final logit softcapping, 30 * tanh(x / 30), with logits spread far past the cap; the CUDA kernel
    lacks it and says so."""
    logits, targets = make_problem(9, vocab, dtype, device)
    logits = (logits.float() * 20).to(dtype)
    if backend == "cuda":
        with pytest.raises(UnsupportedBackend, match="has no softcapping"):
            cross_entropy(logits, targets, softcap=30.0, backend=backend)
        return
    if not inplace:
        check_against_reference(logits, targets, backend, softcap=30.0, **options)
        return
    overwritten = logits.clone().requires_grad_() * 1.0  # a non-leaf the kernel may overwrite
    loss = cross_entropy(overwritten, targets, softcap=30.0, inplace_backward=True, backend=backend, **options)
    loss.backward()
    exact = logits.double().requires_grad_()
    expected = reference.cross_entropy(exact, targets, softcap=30.0, **options)
    expected.backward()
    assert_matches_reference(loss, expected.detach(), "loss", scale=30.0)
    assert_matches_reference(overwritten, exact.grad, "grad written over the logits")


@pytest.mark.parametrize("backend, device", backend_params())
def test_largest_vocabulary(backend, device):
    logits, targets = make_problem(2, 262144, torch.float32, device, ignored=())
    check_against_reference(logits, targets, backend, "sum")


@pytest.mark.parametrize("backend, device", backend_params())
def test_confident_prediction_keeps_its_true_class_gradient(backend, device):
    """p_t - 1 with p_t close to 1, in bf16: computed in fp32, rounded once, not cancelled to 0."""
    logits = torch.zeros(2, 1000, device=device)
    logits[:, 7] = 12.0  # p_7 = 1 - 999 e^-12 ~ 1 - 6e-3
    check_against_reference(logits.bfloat16(), torch.tensor([7, 7], device=device), backend, "sum")


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("reduction, expected", [("mean", float("nan")), ("sum", 0.0)])
def test_all_tokens_ignored(backend, device, reduction, expected):
    logits = torch.randn(4, 33, device=device, requires_grad=True)
    targets = torch.full((4,), -100, device=device)
    loss = cross_entropy(logits, targets, reduction=reduction, backend=backend)
    torch.testing.assert_close(loss, torch.tensor(expected, device=device), equal_nan=True)
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend, device", backend_params())
def test_num_tokens_makes_accumulation_equal_one_big_batch(backend, device):
    logits, targets = make_problem(12, 77, torch.float32, device, ignored=(1, 2, 9))
    counted = int((targets != -100).sum())
    whole = logits.clone().requires_grad_()
    cross_entropy(whole, targets, backend=backend).backward()
    parts = logits.clone().requires_grad_()
    for rows in (slice(0, 5), slice(5, 12)):  # micro-batches of unequal sizes, as after packing
        cross_entropy(parts[rows], targets[rows], num_tokens=counted, backend=backend).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend, device", backend_params())
def test_inplace_backward(backend, device):
    logits, targets = make_problem(5, 301, torch.float32, device)
    expected = logits.clone().requires_grad_()
    cross_entropy(expected, targets, label_smoothing=0.2, backend=backend).backward()
    source = logits.clone().requires_grad_()
    produced = source * 1.0  # a non-leaf whose memory the gradient may take over
    loss = cross_entropy(produced, targets, label_smoothing=0.2, inplace_backward=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(source.grad, expected.grad)
    torch.testing.assert_close(produced.detach(), expected.grad)  # the logits now hold their gradient


def test_inplace_backward_leaves_autograd_to_refuse_later_users_of_the_logits():
    x = torch.randn(3, 10, requires_grad=True)
    logits = x * 2
    penalty = (logits * logits).sum()  # another node that saved the logits for its backward
    loss = cross_entropy(logits, torch.tensor([1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + penalty).backward()


@pytest.mark.parametrize("backend, device", backend_params())
def test_batched_shapes(backend, device):
    logits, targets = make_problem(2 * 7, 129, torch.float32, device)
    logits, targets = logits.view(2, 7, 129), targets.view(2, 7)
    loss = cross_entropy(logits, targets, reduction="none", backend=backend)
    assert loss.shape == (2, 7)
    check_against_reference(logits, targets, backend, "none")


@pytest.mark.parametrize("backend, device", backend_params())
def test_row_offsets_beyond_32_bits(backend, device):
    torch.utils.deterministic.fill_uninitialized_memory = False  # 4 GiB of storage, only two rows touched
    vocab, stride = 300, 2**31 + 64
    storage = torch.empty(stride + vocab, dtype=torch.float16, device=device)
    logits = storage.as_strided((2, vocab), (stride, 1))
    logits.copy_(torch.randn(2, vocab, device=device))
    check_against_reference(logits, torch.tensor([3, 299], device=device), backend, "sum")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_out_of_range_target_gives_nan_in_the_kernels(backend):
    """What the GPU kernels do with a target that Python cannot afford to check there (it does on CPU)."""
    if backend == "triton":
        pytest.importorskip("triton")
    logits = torch.randn(3, 20)
    targets = torch.tensor([4, 20, -100])
    grad = torch.empty_like(logits)
    loss, _ = _row_losses(logits, targets, torch.ones(1), grad, -100, 0.0, 0.0, 0.0, backend)
    assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0
    assert grad[0].isfinite().all() and grad[1].isnan().all() and (grad[2] == 0).all()


@pytest.mark.parametrize("call, error, words", [
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 5, 1])), ValueError,
     r"targets must be in \[0, 5\) or ignore_index \(-100\); targets\[1\] is 5 \(position in the flattened"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, -1, 1])), ValueError, r"targets\[1\] is -1"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0.0, 1.0, 1.0])), TypeError, "targets must have one of"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1])), ValueError, r"targets must have shape \(3,\)"),
    (lambda: cross_entropy(torch.randn(3, 0), torch.tensor([0, 1, 1])), ValueError, "non-empty last"),
    (lambda: cross_entropy(torch.randn(3, 5).double(), torch.tensor([0, 1, 1])), TypeError,
     "logits must have one of"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), reduction="avg"), ValueError,
     "reduction must be one of"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), label_smoothing=1.5), ValueError,
     r"label_smoothing must be in \[0, 1\]"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), z_loss=-1.0), ValueError, "z_loss must be"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), num_tokens=0), ValueError,
     "num_tokens must be a number > 0"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), reduction="sum", num_tokens=4), ValueError,
     "needs reduction='mean'"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 3), torch.tensor([0, 1, 1])), ValueError,
     r"weight must have shape \(vocab, 4\)"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.ones(5, 4, dtype=torch.int64), torch.tensor([0, 1, 1])),
     TypeError, "weight must have one of the dtypes"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 1]), torch.randn(4)),
     ValueError, r"bias must have shape \(5,\)"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 9])), ValueError,
     r"targets\[2\] is 9"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 1]), chunk_size=0),
     ValueError, "chunk_size must be a positive int"),
    (lambda: cross_entropy(torch.randn(2, 5), torch.zeros(2, dtype=torch.long), softcap=0.0), ValueError,
     "softcap must be None or a finite number > 0"),
    (lambda: linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long),
                                  softcap=float("inf")), ValueError, "softcap must be None"),
])
def test_bad_input_gets_a_clear_error(call, error, words):
    with pytest.raises(error, match=words):
        call()


# --- Fused linear cross-entropy ---------------------------------------------------------------------------------------


def linear_problem(tokens, hidden, vocab, dtype, device, bias):
    h = torch.randn(tokens, hidden, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    targets = torch.randint(0, vocab, (tokens,), device=device)
    targets[::5] = -100
    return h, weight, b, targets


def run_linear(fn, h, weight, b, targets, grad_output, **options):
    leaves = [t.clone().requires_grad_() for t in (h, weight) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], targets, leaves[2] if b is not None else None, **options)
    loss.backward(grad_output.to(loss.dtype))
    return [loss.detach()] + [leaf.grad for leaf in leaves]


def unfused(h, weight, targets, b=None, **options):
    logits = h @ weight.T if b is None else torch.addmm(b, h, weight.T)
    return reference.cross_entropy(logits, targets, **options)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_linear_matches_float64_reference(backend, device, reduction, bias, chunk_size):
    h, weight, b, targets = linear_problem(23, 40, 131, torch.float32, device, bias)
    options = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-3)
    grad_output = torch.randn(23, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
    ours = run_linear(linear_cross_entropy, h, weight, b, targets, grad_output, chunk_size=chunk_size,
                      backend=backend, **options)
    exact = run_linear(unfused, h.double(), weight.double(), None if b is None else b.double(), targets,
                       grad_output.double(), **options)
    for name, actual, expected in zip(["loss", "grad hidden", "grad weight", "grad bias"], ours, exact):
        # Matmuls of 40 and of 23 products in fp32 feed these: an fp32 error relative to the largest term.
        assert_matches_reference(actual, expected, name, scale=expected.abs().max().item() * 8)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_softcapped(backend, device, reduction):
    h, weight, b, targets = linear_problem(23, 40, 131, torch.float32, device, bias=True)
    weight = weight * 40  # logits well past the cap
    options = dict(reduction=reduction, softcap=15.0)
    if backend == "cuda":
        with pytest.raises(UnsupportedBackend, match="has no softcapping"):
            linear_cross_entropy(h, weight, targets, b, backend=backend, **options)
        return
    grad_output = torch.randn(23, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
    ours = run_linear(linear_cross_entropy, h, weight, b, targets, grad_output, chunk_size=7, backend=backend,
                      **options)
    exact = run_linear(unfused, h.double(), weight.double(), b.double(), targets, grad_output.double(), **options)
    for name, actual, expected in zip(["loss", "grad hidden", "grad weight", "grad bias"], ours, exact):
        assert_matches_reference(actual, expected, name, scale=expected.abs().max().item() * 8)


@pytest.mark.parametrize("backend, device", backend_params())
def test_linear_bf16_is_as_accurate_as_the_unfused_bf16_computation(backend, device):
    """flash-attn's criterion: against float64, the error of the fused op is at most twice that of torch's own
    unfused bf16 computation (plus an fp32-sized floor)."""
    h, weight, b, targets = linear_problem(29, 64, 257, torch.bfloat16, device, bias=True)
    grad_output = torch.tensor(1.0, device=device)
    ours = run_linear(linear_cross_entropy, h, weight, b, targets, grad_output, chunk_size=8, backend=backend)
    torch_bf16 = run_linear(lambda *a: torch.nn.functional.cross_entropy((a[0] @ a[1].T + a[3]).float(), a[2]), h,
                            weight, b, targets, grad_output)
    exact = run_linear(unfused, h.double(), weight.double(), b.double(), targets, grad_output.double())
    for name, actual, baseline, expected in zip(["loss", "grad hidden", "grad weight", "grad bias"], ours,
                                                torch_bf16, exact):
        error = (actual.double() - expected).abs().max().item()
        baseline_error = (baseline.double() - expected).abs().max().item()
        floor = 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        assert error <= 2 * baseline_error + floor, f"{name}: {error:.3g} vs unfused bf16 {baseline_error:.3g}"


@pytest.mark.parametrize("backend, device", backend_params())
def test_linear_all_tokens_ignored(backend, device):
    h, weight, b, targets = linear_problem(6, 8, 11, torch.float32, device, bias=False)
    targets[:] = -100
    grads = run_linear(linear_cross_entropy, h, weight, None, targets, torch.tensor(1.0, device=device),
                       reduction="sum", backend=backend)
    assert grads[0] == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])


@pytest.mark.parametrize("make, words", [
    (lambda: torch.randn(4, 7, requires_grad=True), "would overwrite leaf logits"),
    (lambda: torch.randn(1, 7, requires_grad=True)[0:1].expand(4, 7), "rows do not overlap in memory"),
    (lambda: torch.tanh(torch.randn(4, 7, requires_grad=True)), "logits that TanhBackward0 saved"),
], ids=["leaf", "expanded", "saved-by-producer"])
def test_inplace_backward_refuses_logits_whose_overwriting_would_change_other_values(make, words):
    with pytest.raises(ValueError, match=words):
        cross_entropy(make(), torch.randint(0, 7, (4,)), inplace_backward=True)


def test_inplace_backward_overwrites_only_when_a_gradient_is_needed():
    base = torch.randn(4, 7, requires_grad=True)
    targets = torch.randint(0, 7, (4,))
    with torch.no_grad():
        logits = base * 2
        kept = logits.clone()
        cross_entropy(logits, targets, inplace_backward=True)
    assert torch.equal(logits, kept)
    logits = base * 2
    loss = cross_entropy(logits, targets, inplace_backward=True)
    expected = torch.softmax(kept, -1) - torch.nn.functional.one_hot(targets, 7)
    torch.testing.assert_close(logits.detach(), expected / 4)  # the mean's gradient, written over the logits
    loss.backward()
    torch.testing.assert_close(base.grad, 2 * expected / 4)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "z_loss": 1e-4}], ids=["plain", "smoothed"])
def test_a_confident_predictions_gradient_keeps_its_digits(backend, device, dtype, options):
    """p_t - 1 with p_t near 1 (down to 1e-7): the target's gradient against float64, relative to its own size."""
    vocab, rows = 1000, 8
    logits = torch.randn(rows, vocab, device=device)
    targets = torch.randint(0, vocab, (rows,), device=device)
    logits[torch.arange(rows), targets] += torch.linspace(8, 22, rows, device=device)
    logits = logits.to(dtype)
    ours = logits.clone().requires_grad_()
    cross_entropy(ours, targets, reduction="sum", backend=backend, **options).backward()
    exact = logits.double().requires_grad_()
    reference.cross_entropy(exact, targets, reduction="sum", **options).backward()
    at_targets = (torch.arange(rows, device=device), targets)
    # The largest magnitude involved in each is its own: the others' probabilities sum to it.
    for row, (actual, expected) in enumerate(zip(ours.grad[at_targets], exact.grad[at_targets])):
        assert_matches_reference(actual, expected, f"target gradient of row {row}", scale=expected.abs().item())
