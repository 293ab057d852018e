import pytest
import torch

from aquila.kernels import UnsupportedBackend, cross_entropy, linear_cross_entropy, reference
from aquila.kernels.cross_entropy import IMPLEMENTATIONS, CrossEntropyOutput, _row_losses
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
    loss, *_ = _row_losses(logits, targets, None, torch.ones(2), grad, -100, 0.0, 0.0, 0.0, False, backend)
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



# --- Class weights, the z-loss term and the token accuracy ------------------------------------------------------------


def weighted_reference(logits, targets, class_weights=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                       softcap=None, reduction="mean", num_tokens=None):
    """(loss, z-loss term, token accuracy) in float64 for logits [..., V]: torch's F.cross_entropy with weight and
    label smoothing, plus z_loss * lse^2 per counted token, unweighted; 'mean' divides the ce by the counted targets'
    weight sum and the z-loss by their number, both by num_tokens when given."""
    z = logits.double().reshape(-1, logits.shape[-1])
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    flat = targets.reshape(-1)
    counted = flat != ignore_index
    weight = None if class_weights is None else class_weights.double()
    ce = torch.nn.functional.cross_entropy(z, flat, weight=weight, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, reduction="none")
    z_rows = z_loss * torch.logsumexp(z, -1).square() * counted
    correct = (z.argmax(-1) == flat) & counted
    if reduction == "none":
        return (ce + z_rows).view(targets.shape), z_rows.view(targets.shape), correct.view(targets.shape)
    accuracy = correct.sum() / counted.sum()
    if reduction == "sum":
        return ce.sum() + z_rows.sum(), z_rows.sum(), accuracy
    if num_tokens is not None:
        return (ce.sum() + z_rows.sum()) / num_tokens, z_rows.sum() / num_tokens, accuracy
    torch_mean = torch.nn.functional.cross_entropy(z, flat, weight=weight, ignore_index=ignore_index,
                                                   label_smoothing=label_smoothing)
    return torch_mean + z_rows.sum() / counted.sum(), z_rows.sum() / counted.sum(), accuracy


def loss_scale(logits, targets, class_weights, reduction, num_tokens=None, softcap=None, **_):
    """The largest magnitude a reduced loss sums: each counted token's lse times the largest |weight|, over the
    divisor (for the tolerance: a token's loss is lse - z_t, with fp32 errors relative to lse)."""
    z = logits.double().reshape(-1, logits.shape[-1])
    z = softcap * torch.tanh(z / softcap) if softcap else z
    flat = targets.reshape(-1)
    counted = flat != -100
    weight = 1.0 if class_weights is None else class_weights.abs().max().item()
    rows = (torch.logsumexp(z, -1).abs() + 1) * counted * max(weight, 1.0)
    if reduction == "none":
        return rows.max().item()
    if reduction == "sum":
        return rows.sum().item()
    divisor = num_tokens or (counted.sum().item() if class_weights is None else
                             abs(class_weights.double()[flat[counted]].sum().item()))
    return rows.sum().item() / max(divisor, 1e-30)


def random_class_weights(vocab, device, negative=False):
    weights = torch.rand(vocab, device=device) * 1.75 + 0.25
    if negative:
        weights[::3] *= -1
    return weights


def check_options_against_reference(logits, targets, backend, reduction="mean", class_weights=None, **options):
    """Loss, z-loss term, token accuracy and the logits' gradient against float64, with both flags set."""
    leaf = logits.clone().requires_grad_()
    out = cross_entropy(leaf, targets, reduction=reduction, class_weights=class_weights, return_z_loss=True,
                        return_token_accuracy=True, backend=backend, **options)
    exact = logits.double().requires_grad_()
    expected, expected_z, expected_accuracy = weighted_reference(exact, targets, class_weights, reduction=reduction,
                                                                 **options)
    assert isinstance(out, CrossEntropyOutput)
    assert out.loss.dtype == torch.float32 and out.loss.shape == expected.shape
    assert not out.z_loss.requires_grad and not out.token_accuracy.requires_grad
    scale = max(loss_scale(logits, targets, class_weights, reduction, **options), expected.abs().max().item())
    assert_matches_reference(out.loss, expected.detach(), "loss", scale=scale)
    assert_matches_reference(out.z_loss, expected_z.detach(), "z-loss term", scale=scale)
    if reduction == "none":
        assert out.token_accuracy.dtype == torch.bool
        assert torch.equal(out.token_accuracy, expected_accuracy)
    else:
        torch.testing.assert_close(out.token_accuracy, expected_accuracy.float(), equal_nan=True)
    grad_output = torch.randn_like(expected)
    out.loss.backward(grad_output.float())
    expected.backward(grad_output)
    assert leaf.grad.dtype == logits.dtype
    assert_matches_reference(leaf.grad, exact.grad, "grad logits")


def options_problem(rows, vocab, dtype, device, ignored=(1,)):
    """make_problem with some targets made the argmax, so that the token accuracy is neither 0 nor 1."""
    logits, targets = make_problem(rows, vocab, dtype, device, ignored)
    hits = torch.arange(0, rows, 3, device=device)
    logits[hits, targets[hits].clamp(min=0)] = (logits.float().max(-1).values[hits] + 2).to(dtype)
    return logits, targets


ALL_OPTIONS = {"weighted": {}, "weighted+smoothing+zloss": {"label_smoothing": 0.1, "z_loss": 1e-3},
               "weighted+smoothing+zloss+softcap": {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 8.0}}


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [2, 50, 4099])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", list(ALL_OPTIONS), ids=str)
def test_class_weights_z_loss_and_accuracy_match_float64_torch(backend, device, dtype, vocab, reduction, options):
    options = ALL_OPTIONS[options]
    if backend == "cuda":
        with pytest.raises(UnsupportedBackend, match="has no .*class weights"):
            cross_entropy(*make_problem(3, vocab, dtype, device), class_weights=torch.ones(vocab, device=device),
                          backend=backend)
        return
    logits, targets = options_problem(7, vocab, dtype, device)
    check_options_against_reference(logits, targets, backend, reduction, random_class_weights(vocab, device),
                                    **options)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_return_flags_without_class_weights(backend, device, reduction):
    """The z-loss term and the token accuracy alone (the CUDA kernel has the former and refuses the latter)."""
    logits, targets = options_problem(9, 301, torch.float32, device, ignored=(1, 4))
    if backend == "cuda":
        out = cross_entropy(logits, targets, z_loss=1e-3, return_z_loss=True, backend=backend)
        assert out.token_accuracy is None
        with pytest.raises(UnsupportedBackend, match="has no token accuracy"):
            cross_entropy(logits, targets, return_token_accuracy=True, backend=backend)
        return
    check_options_against_reference(logits, targets, backend, reduction, label_smoothing=0.05, z_loss=1e-3)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_negative_and_zero_class_weights_as_torch(backend, device):
    """torch allows any weights; so do these (the mean divides by a weight sum that negative weights shrink)."""
    logits, targets = options_problem(8, 77, torch.float32, device)
    weights = random_class_weights(77, device, negative=True)
    weights[targets[0]] = 0.0
    check_options_against_reference(logits, targets, backend, "mean", weights, label_smoothing=0.2, z_loss=1e-4)
    check_options_against_reference(logits, targets, backend, "none", weights, label_smoothing=0.2)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_row(backend, device, reduction):
    logits, targets = options_problem(1, 4099, torch.float32, device, ignored=())
    check_options_against_reference(logits, targets, backend, reduction, random_class_weights(4099, device),
                                    label_smoothing=0.1, z_loss=1e-3, softcap=20.0)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_all_tokens_ignored_with_class_weights(backend, device):
    """As F.cross_entropy: a mean over nothing is nan (so is the accuracy), a sum is 0; the gradients are 0."""
    logits = torch.randn(3, 33, device=device, requires_grad=True)
    targets = torch.full((3,), -100, device=device)
    weights = random_class_weights(33, device)
    for reduction, expected in (("mean", float("nan")), ("sum", 0.0)):
        out = cross_entropy(logits, targets, class_weights=weights, z_loss=1e-3, reduction=reduction,
                            return_z_loss=True, return_token_accuracy=True, backend=backend)
        for value in (out.loss, out.z_loss):
            torch.testing.assert_close(value, torch.tensor(expected, device=device), equal_nan=True)
        assert out.token_accuracy.isnan()
        out.loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))
    out = cross_entropy(logits, targets, class_weights=weights, reduction="none", return_token_accuracy=True,
                        backend=backend)
    assert not out.token_accuracy.any() and torch.equal(out.loss, torch.zeros(3, device=device))


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_token_accuracy_takes_the_first_of_tied_maxima(backend, device):
    """torch.argmax's rule, across the Triton kernel's blocks and the C++ kernel's chunks (4096 and 2048 columns)."""
    logits = torch.zeros(3, 4099, device=device)
    logits[:, [7, 2050, 4097]] = 5.0
    out = cross_entropy(logits, torch.tensor([7, 2050, 4097], device=device), reduction="none",
                        return_token_accuracy=True, backend=backend)
    assert out.token_accuracy.tolist() == [True, False, False]


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_num_tokens_divides_the_weighted_loss_and_the_z_loss(backend, device):
    """Micro-batches with num_tokens = the step's weight sum add up to the one big batch's weighted cross-entropy."""
    logits, targets = make_problem(12, 77, torch.float32, device, ignored=(1, 2, 9))
    weights = random_class_weights(77, device)
    weight_sum = float(weights[targets[targets != -100]].sum())
    whole = logits.clone().requires_grad_()
    cross_entropy(whole, targets, class_weights=weights, label_smoothing=0.1, backend=backend).backward()
    parts = logits.clone().requires_grad_()
    for rows in (slice(0, 5), slice(5, 12)):
        cross_entropy(parts[rows], targets[rows], class_weights=weights, label_smoothing=0.1, num_tokens=weight_sum,
                      backend=backend).backward()
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-6, atol=1e-7)
    check_options_against_reference(logits, targets, backend, "mean", weights, z_loss=1e-2, num_tokens=5.5)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_z_loss_is_unweighted_and_keeps_its_own_mean(backend, device):
    """Scaling every class weight leaves a 'mean' loss and its z-loss term unchanged (as in torch and Liger)."""
    logits, targets = make_problem(6, 40, torch.float32, device)
    weights = random_class_weights(40, device)
    one, many = (cross_entropy(logits, targets, class_weights=w, z_loss=1e-2, return_z_loss=True, backend=backend)
                 for w in (weights, 8 * weights))
    torch.testing.assert_close(many.loss, one.loss)
    unweighted = cross_entropy(logits, targets, z_loss=1e-2, return_z_loss=True, backend=backend)
    torch.testing.assert_close(one.z_loss, unweighted.z_loss)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_class_weights_with_inplace_backward(backend, device):
    logits, targets = make_problem(5, 301, torch.float32, device)
    weights = random_class_weights(301, device)
    options = dict(class_weights=weights, label_smoothing=0.2, z_loss=1e-3, backend=backend)
    expected = logits.clone().requires_grad_()
    cross_entropy(expected, targets, **options).backward()
    source = logits.clone().requires_grad_()
    cross_entropy(source * 1.0, targets, inplace_backward=True, **options).backward()
    torch.testing.assert_close(source.grad, expected.grad)


def test_flags_off_return_the_plain_loss_tensor():
    logits, targets = make_problem(4, 20, torch.float32, "cpu")
    assert isinstance(cross_entropy(logits, targets, class_weights=torch.ones(20)), torch.Tensor)
    out = cross_entropy(logits, targets, return_z_loss=True)
    assert isinstance(out, CrossEntropyOutput) and out.token_accuracy is None and out.z_loss == 0


def test_cuda_kernel_refusals_name_what_it_lacks():
    limits = IMPLEMENTATIONS["cuda"].limits
    assert limits(softcap=0.0, class_weights=False, token_accuracy=False) is None
    assert limits(softcap=0.0, class_weights=True, token_accuracy=True) == (
        "has no class weights or token accuracy (the Triton kernel has)")


@pytest.mark.parametrize("call, error, words", [
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), class_weights=torch.ones(4)), ValueError,
     r"class_weights must have shape \(5,\)"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), class_weights=torch.ones(1, 5)), ValueError,
     r"class_weights must have shape \(5,\)"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), class_weights=torch.ones(5, dtype=torch.long)),
     TypeError, "class_weights must have one of the dtypes"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), class_weights=[1.0] * 5), TypeError,
     "class_weights must be a torch.Tensor"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]), class_weights=torch.ones(5, device="meta")),
     ValueError, "class_weights must be on cpu"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 1]),
                           class_weights=torch.ones(5, requires_grad=True)), ValueError,
     "class_weights get no gradient"),
    (lambda: linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 1]),
                                  class_weights=torch.ones(4)), ValueError, r"class_weights must have shape \(5,\)"),
])
def test_bad_class_weights_get_a_clear_error(call, error, words):
    with pytest.raises(error, match=words):
        call()


def unfused_outputs(h, weight, targets, b=None, class_weights=None, **options):
    logits = h @ weight.T if b is None else torch.addmm(b, h, weight.T)
    return weighted_reference(logits, targets, class_weights, **options)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("softcap", [None, 6.0], ids=["uncapped", "softcapped"])
def test_linear_class_weights_z_loss_and_accuracy(backend, device, reduction, chunk_size, softcap):
    h, weight, b, targets = linear_problem(23, 40, 131, torch.float32, device, bias=True)
    weight = weight * 3
    weights = random_class_weights(131, device)
    options = dict(reduction=reduction, label_smoothing=0.05, z_loss=1e-3, softcap=softcap)
    grad_output = torch.randn(23, device=device) if reduction == "none" else torch.tensor(1.3, device=device)
    leaves = [t.clone().requires_grad_() for t in (h, weight, b)]
    out = linear_cross_entropy(leaves[0], leaves[1], targets, leaves[2], class_weights=weights, return_z_loss=True,
                               return_token_accuracy=True, chunk_size=chunk_size, backend=backend, **options)
    out.loss.backward(grad_output)
    exact_leaves = [t.double().requires_grad_() for t in (h, weight, b)]
    expected, expected_z, expected_accuracy = unfused_outputs(exact_leaves[0], exact_leaves[1], targets,
                                                              exact_leaves[2], weights, **options)
    expected.backward(grad_output.double())
    scale = expected.abs().max().item() * 8
    assert_matches_reference(out.loss, expected.detach(), "loss", scale=scale)
    assert_matches_reference(out.z_loss, expected_z.detach(), "z-loss term", scale=scale)
    if reduction == "none":
        assert torch.equal(out.token_accuracy, expected_accuracy)
    else:
        torch.testing.assert_close(out.token_accuracy, expected_accuracy.float())
    for name, leaf, exact in zip(["grad hidden", "grad weight", "grad bias"], leaves, exact_leaves):
        assert_matches_reference(leaf.grad, exact.grad, name, scale=exact.grad.abs().max().item() * 8)


@pytest.mark.parametrize("backend, device", [p for p in backend_params() if p.values[0] != "cuda"])
def test_linear_bf16_with_class_weights(backend, device):
    """bf16 hidden states and lm_head: against float64 on the same bf16 inputs, at most twice the error of torch's
    unfused bf16 computation with the same class weights (plus an fp32-sized floor)."""
    h, weight, b, targets = linear_problem(29, 64, 257, torch.bfloat16, device, bias=True)
    weights = random_class_weights(257, device)
    options = dict(label_smoothing=0.1, z_loss=1e-3)
    ours = run_linear(lambda *a, **o: linear_cross_entropy(*a, **o, class_weights=weights, chunk_size=8,
                                                           backend=backend, **options),
                      h, weight, b, targets, torch.tensor(1.0, device=device))
    torch_bf16 = run_linear(lambda hh, ww, tt, bb: weighted_reference((hh @ ww.T + bb).float(), tt, weights,
                                                                     **options)[0].float(),
                            h, weight, b, targets, torch.tensor(1.0, device=device))
    exact = run_linear(lambda *a: unfused_outputs(*a, class_weights=weights, **options)[0], h.double(),
                       weight.double(), b.double(), targets, torch.tensor(1.0, dtype=torch.float64, device=device))
    for name, actual, baseline, expected in zip(["loss", "grad hidden", "grad weight", "grad bias"], ours,
                                                torch_bf16, exact):
        error = (actual.double() - expected).abs().max().item()
        baseline_error = (baseline.double() - expected).abs().max().item()
        floor = 64 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        assert error <= 2 * baseline_error + floor, f"{name}: {error:.3g} vs unfused bf16 {baseline_error:.3g}"


@pytest.mark.parametrize("inplace", [False, True], ids=["grad", "inplace"])
def test_options_compile_in_one_graph(inplace):
    """Class weights and both flags through torch.compile (fullgraph), forward and backward, as in eager."""
    torch._dynamo.reset()
    weights = random_class_weights(40, "cpu")

    def loss_fn(hidden, weight, targets):
        logits = hidden @ weight.T
        dense = cross_entropy(logits, targets, class_weights=weights, label_smoothing=0.1, z_loss=1e-3,
                              inplace_backward=inplace, return_z_loss=True, return_token_accuracy=True)
        fused = linear_cross_entropy(hidden, weight, targets, class_weights=weights, z_loss=1e-4, softcap=5.0,
                                     return_z_loss=True, return_token_accuracy=True, chunk_size=4)
        per_token = linear_cross_entropy(hidden, weight, targets, class_weights=weights, reduction="none",
                                         return_token_accuracy=True)
        loss = dense.loss + fused.loss + per_token.loss.sum()
        return loss, dense.z_loss + fused.z_loss, dense.token_accuracy, per_token.token_accuracy

    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    targets = torch.tensor([1, 5, -100, 39, 0, 7])
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    outputs = compiled(hidden, weight, targets)
    grads = torch.autograd.grad(outputs[0], (hidden, weight))
    eager = loss_fn(hidden, weight, targets)
    eager_grads = torch.autograd.grad(eager[0], (hidden, weight))
    for output, eager_output in zip(outputs, eager):
        torch.testing.assert_close(output, eager_output)
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("field", ["class_weights", "argmax"])
def test_cuda_kernel_refuses_class_weights_and_argmax_when_called_directly(field):
    """The C++ side of the backend table's refusal, checked before any launch (so without a GPU too)."""
    from aquila.kernels.backend import cuda_extension

    if cuda_extension is None:
        pytest.skip("aquila._cuda is not built")
    fields = {"logits": 1, "logits_row_stride": 4, "targets": 1, "class_weights": 0, "loss": 1, "lse": 1,
              "argmax": 0, "grad": 0, "grad_row_stride": 0, "grad_scale": 0, "rows": 1, "vocab": 4,
              "ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": 0.0, "dtype": 0, field: 1}
    with pytest.raises(ValueError, match="has no class weights or argmax"):
        cuda_extension.cross_entropy(fields, 0)
