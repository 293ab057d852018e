"""RMSNorm (plain and with the residual add), LayerNorm and rotary embedding, forward and forward+backward: Aquila's
kernels against what a model would otherwise run in torch eager (the RMSNorm and rotary compositions, torch's own fused
layer_norm) and torch.compile of it.

Effective bandwidth counts the bytes an op must move at least: each input read once, each output written once (a
fraction of the copy bandwidth). Each runs in fp32 and bf16 on CPU, in bf16 on GPU, every contender in the same
precision.
"""

import functools

import pytest
import torch

from aquila.kernels import backend, fused_add_rms_norm, layer_norm, rms_norm, rotary_embedding

EPS = 1e-6


def eager_rms_norm(x, weight):
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS) * weight).to(x.dtype)


def eager_add_rms_norm(x, residual, weight):
    h = x + residual
    return eager_rms_norm(h, weight), h


def eager_layer_norm(x, weight, bias):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, EPS)


def eager_rotary(q, k, theta=10000.0):
    """Hugging Face's composition: cos/sin from the positions, then x * cos + rotate_half(x) * sin."""
    seq, head_dim = q.shape[1], q.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=q.device).float() / head_dim)
    angles = torch.outer(torch.arange(seq, device=q.device).float(), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos()[:, None, :].to(q.dtype), emb.sin()[:, None, :].to(q.dtype)

    def rotate(x):
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return rotate(q), rotate(k)


def aquila_rotary(q, k):
    return rotary_embedding(q), rotary_embedding(k)


@functools.cache
def compiled(fn):
    return torch.compile(fn)


def implementations(device):
    """(name, rms_norm, add_rms_norm, rotary, layer_norm) for each contender on this device (None where it lacks
    one)."""
    native = [("aquila cpu", "cpu")] if device == "cpu" else [("aquila triton", "triton"), ("aquila cuda", "cuda")]
    impls = [("torch eager", eager_rms_norm, eager_add_rms_norm, eager_rotary, eager_layer_norm),
             ("torch.compile", compiled(eager_rms_norm), compiled(eager_add_rms_norm), compiled(eager_rotary),
              compiled(eager_layer_norm))]
    if device == "cuda":
        impls.append(liger_implementation())
    for name, choice in native:
        if choice == "cuda" and backend.cuda_extension is None:
            continue
        impls.append((name, functools.partial(rms_norm, backend=choice),
                      functools.partial(fused_add_rms_norm, backend=choice),
                      lambda q, k, choice=choice: (rotary_embedding(q, backend=choice),
                                                   rotary_embedding(k, backend=choice)),
                      # No CUDA C++ LayerNorm: Triton serves GPUs.
                      functools.partial(layer_norm, backend=choice) if choice != "cuda" else None))
    return impls


IMPL_NAMES = ["torch eager", "torch.compile", "liger", "aquila cpu", "aquila triton", "aquila cuda"]


def liger_implementation():
    """Liger-Kernel's RMSNorm (the residual add in torch before it) and LayerNorm; Liger has no rotary in this
    [batch, seq, heads, d] layout, so None there. GPU only, a benchmark extra."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        return ("liger", None, None, None, None)

    def liger_rms_norm(x, weight):
        return LigerRMSNormFunction.apply(x, weight, EPS)

    def liger_add_rms_norm(x, residual, weight):
        h = x + residual
        return liger_rms_norm(h, weight), h

    def liger_layer_norm(x, weight, bias):
        return LigerLayerNormFunction.apply(x, weight, bias, EPS)

    return ("liger", liger_rms_norm, liger_add_rms_norm, None, liger_layer_norm)


def pick(device, name):
    for impl in implementations(device):
        if impl[0] == name:
            return impl
    pytest.skip(f"{name} does not run on {device}")


def norm_shapes(quick):
    return [(64, 4096)] if quick else [(8192, 4096), (2048, 11008), (2048, 16384)]


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape_index", [0, 1, 2])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_rms_norm(measure, device, quick, dtype, dtype_name, impl, shape_index, residual, backward):
    shapes = norm_shapes(quick)
    if shape_index >= len(shapes):
        pytest.skip("quick mode runs one size")
    rows, hidden = shapes[shape_index]
    name, plain_fn, residual_fn, _, _ = pick(device, impl)
    if plain_fn is None:
        pytest.skip(f"{impl} is not installed")
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=backward)
    res = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=backward)
    weight = torch.randn(hidden, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(rows, hidden, device=device, dtype=dtype)

    def forward():
        return residual_fn(x, res, weight) if residual else (plain_fn(x, weight),)

    def step():
        outputs = forward()
        if backward:
            torch.autograd.backward(outputs, [grad] * len(outputs))

    # fwd: read x (+ residual), write out (+ x + residual); bwd: read grad(s) and input, write grad x.
    tensors = (4 if residual else 2) + ((4 if residual else 3) if backward else 0)
    label = (f"rms_norm{'+residual' if residual else ''} {'fwd+bwd' if backward else 'fwd'} {rows}x{hidden}, "
             f"{dtype_name}")
    measure(label, name, step, tensors * x.numel() * x.element_size(), dtype=dtype)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape_index", [0, 1, 2])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_layer_norm(measure, device, quick, dtype, dtype_name, impl, shape_index, backward):
    shapes = norm_shapes(quick)
    if shape_index >= len(shapes):
        pytest.skip("quick mode runs one size")
    rows, hidden = shapes[shape_index]
    name, *_, layer_norm_fn = pick(device, impl)
    if layer_norm_fn is None:
        pytest.skip(f"{impl} has no LayerNorm, or is not installed")
    x = torch.randn(rows, hidden, device=device, dtype=dtype, requires_grad=backward)
    weight = torch.randn(hidden, device=device, dtype=dtype, requires_grad=backward)
    bias = torch.randn(hidden, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(rows, hidden, device=device, dtype=dtype)

    def step():
        out = layer_norm_fn(x, weight, bias)
        if backward:
            out.backward(grad)

    # fwd: read x, write out; bwd: read grad and x, write grad x.
    tensors = 2 + (3 if backward else 0)
    label = f"layer_norm {'fwd+bwd' if backward else 'fwd'} {rows}x{hidden}, {dtype_name}"
    measure(label, name, step, tensors * x.numel() * x.element_size(), dtype=dtype)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_rotary(measure, device, quick, dtype, dtype_name, impl, backward):
    batch, seq, heads, head_dim = (1, 128, 32, 128) if quick else (4, 2048, 32, 128)
    name, _, _, rotary_fn, _ = pick(device, impl)
    if rotary_fn is None:
        pytest.skip(f"{impl} has no rotary in this layout, or is not installed")
    q = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    k = torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn_like(q)

    def step():
        outputs = rotary_fn(q, k)
        if backward:
            torch.autograd.backward(outputs, [grad, grad])

    label = f"rotary q+k {'fwd+bwd' if backward else 'fwd'} {batch}x{seq}x{heads}x{head_dim}, {dtype_name}"
    measure(label, name, step, (4 if backward else 2) * 2 * q.numel() * q.element_size(), dtype=dtype)
