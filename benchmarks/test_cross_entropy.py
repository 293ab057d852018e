"""Cross-entropy over Aquila's 100,008-token vocabulary, and the fused linear cross-entropy (lm_head + loss):
Aquila's kernels against F.cross_entropy (eager and torch.compile) in the same run, time and extra peak memory.

Effective bandwidth for cross-entropy counts the logits read once (a fraction of the read bandwidth) and, with the
backward, their gradient written once (of the copy bandwidth). The linear cross-entropy is matmul-bound: its rate is
counted in FLOP/s (three N x V x H products), against the matmul rate of its dtype. Each runs in fp32 and bf16 on CPU,
in bf16 on GPU, every contender in the same precision (the loss itself computed in fp32 by all).
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from aquila.kernels import backend, cross_entropy, linear_cross_entropy

VOCAB = 100008


def eager_cross_entropy(logits, targets):
    return F.cross_entropy(logits.float(), targets)


def eager_linear_cross_entropy(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


@functools.cache
def compiled(fn):
    return torch.compile(fn)


def aquila_backends(device):
    if device == "cpu":
        return {"aquila cpu": "cpu"}
    names = {"aquila triton": "triton"}
    if backend.cuda_extension is not None:
        names["aquila cuda"] = "cuda"
    return names


IMPLS = ["torch eager", "torch.compile", "liger", "aquila cpu", "aquila triton", "aquila cuda"]


def liger_losses(device):
    """Liger-Kernel's cross-entropy and fused linear cross-entropy as (logits, targets) and (hidden, weight, targets)
    functions. GPU only (Triton on CUDA); a benchmark extra, carried to the GPU machine as a wheel."""
    if device != "cuda":
        pytest.skip("Liger-Kernel runs on CUDA only")
    pytest.importorskip("liger_kernel", reason="pip install liger-kernel (pure Python + Triton)")
    from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss()
    return LigerCrossEntropyLoss(), lambda hidden, weight, targets: fused(weight, hidden, targets)


def pick(device, impl, eager, aquila):
    if impl == "torch eager":
        return eager
    if impl == "torch.compile":
        return compiled(eager)
    if impl == "liger":
        plain, fused = liger_losses(device)
        return plain if eager is eager_cross_entropy else fused
    choice = aquila_backends(device).get(impl)
    if choice is None:
        pytest.skip(f"{impl} does not run on {device}")
    return functools.partial(aquila, backend=choice)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_cross_entropy(measure, device, quick, dtype, dtype_name, impl, backward):
    tokens = 64 if quick else (8192 if device == "cuda" else 1024)
    fn = pick(device, impl, eager_cross_entropy, cross_entropy)
    logits = torch.randn(tokens, VOCAB, device=device, dtype=dtype, requires_grad=backward)
    targets = torch.randint(0, VOCAB, (tokens,), device=device)

    def step():
        loss = fn(logits, targets)
        if backward:
            loss.backward()
            logits.grad = None

    # The forward reads the logits (and writes a loss per row); the backward also writes their gradient.
    moved = logits.numel() * logits.element_size() * (2 if backward else 1)
    measure(f"cross_entropy {'fwd+bwd' if backward else 'fwd'} {tokens}x{VOCAB}, {dtype_name}", impl, step, moved,
            memory=True, dtype=dtype, reads_only=not backward)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunks", ["default chunks", "hidden-sized chunks"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_linear_cross_entropy(measure, device, quick, dtype, dtype_name, impl, chunks, backward):
    """The issue's shape on GPU (N=8192, H=4096, bf16); on 2 CPU cores a smaller N and H. The Aquila op runs
    with its default chunks and with the leanest ones (chunk logits about as large as the hidden states)."""
    tokens, hidden = (64, 256) if quick else ((8192, 4096) if device == "cuda" else (512, 1024))
    if chunks != "default chunks" and not impl.startswith("aquila"):
        pytest.skip("chunks are Aquila's")
    fn = pick(device, impl, eager_linear_cross_entropy, linear_cross_entropy)
    if chunks != "default chunks":
        impl = f"{impl}, lean"
        fn = functools.partial(fn, chunk_size=64 * math.ceil(tokens * hidden / VOCAB / 64))
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=backward)
    weight = (torch.randn(VOCAB, hidden, device=device) / hidden**0.5).to(dtype).requires_grad_(backward)
    targets = torch.randint(0, VOCAB, (tokens,), device=device)

    def step():
        loss = fn(h, weight, targets)
        if backward:
            loss.backward()
            h.grad = weight.grad = None

    label = f"linear_cross_entropy {'fwd+bwd' if backward else 'fwd'} {tokens}x{hidden}x{VOCAB}, {dtype_name}"
    measure(label, impl, step, flops=(3 if backward else 1) * 2 * tokens * hidden * VOCAB, memory=True, rounds=5,
            dtype=dtype)
