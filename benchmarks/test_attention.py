"""Attention: Aquila's kernels against the torch eager composition (softmax(QK^T)V with the scores materialised, as
transformers' "eager" attention does), torch.compile of it, and torch's scaled_dot_product_attention (on GPU its flash
backend; the baseline of the ratios) in the same run, forward and forward+backward, in TFLOP/s (4 B H N^2 D, halved
when causal, x2.5 for the backward) and as a fraction of the machine's measured matmul rate; and generation against a
KV cache, in bytes of cache read per second as a fraction of the measured read bandwidth. Each runs in fp32 and bf16 on
CPU, in bf16 on GPU, every contender in the same precision.
"""

import pytest
import torch
import torch.nn.functional as F

from aquila.kernels import attention, attention_with_kv_cache, backend


def sdpa(q, k, v, causal, flash_only=True):
    """torch's SDPA on the [batch, seq, heads, d] layout; on GPU restricted to its flash backend for training."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda and flash_only:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2)


def eager_attention(q, k, v, causal):
    """The composition transformers' eager attention runs: key/value heads repeated for GQA, the full score matrix,
    the causal mask, softmax in fp32."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        seq_q, seq_k = scores.shape[-2:]
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.float().softmax(-1).to(q.dtype) @ v).transpose(1, 2)


compiled_attention = torch.compile(eager_attention)


def implementations(device):
    # Insertion order matters: the summary takes the last baseline recorded for an op, SDPA.
    impls = {"torch eager": eager_attention, "torch.compile": compiled_attention, "torch sdpa": sdpa}
    names = {"cpu": ["cpu"], "cuda": ["triton"]}[device]
    for name in names:
        impls[f"aquila {name}"] = lambda q, k, v, causal, name=name: attention(q, k, v, causal=causal, backend=name)
    return impls


IMPLS = ["torch eager", "torch.compile", "torch sdpa", "aquila cpu", "aquila triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq", [1024, 2048])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_attention(measure, device, quick, dtype, dtype_name, impl, seq, causal, backward):
    fn = implementations(device).get(impl)
    if fn is None:
        pytest.skip(f"{impl} does not run on {device}")
    if quick and seq > 1024:
        pytest.skip("quick mode runs one size")
    batch, heads, head_dim = (4, 32, 128) if device == "cuda" else (1, 8, 128)
    seq = 128 if quick else (seq * 2 if device == "cuda" else seq)  # GPU: 2048 and 4096
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    grad = torch.randn_like(q)

    def step():
        out = fn(q, k, v, causal)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0) * (3.5 if backward else 1.0)
    label = (f"attention {'causal' if causal else 'full'} {'fwd+bwd' if backward else 'fwd'} "
             f"{batch}x{heads}x{seq}x{head_dim}, {dtype_name}")
    measure(label, impl, step, flops=flops, memory=True, rounds=5, dtype=dtype)


@pytest.mark.parametrize("impl", ["torch eager", "torch.compile", "torch sdpa", "aquila"])
def test_decode_attention(measure, device, quick, dtype, dtype_name, impl):
    """One new token per sequence against a 4096-token cache, 16 sequences (GQA 4:1 on CPU to keep it short)."""
    batch, cache, heads_q, heads_k, head_dim = (2, 256, 8, 2, 128) if quick else (
        (16, 4096, 32, 8, 128) if device == "cuda" else (16, 4096, 8, 2, 128))
    q = torch.randn(batch, 1, heads_q, head_dim, device=device, dtype=dtype)
    k_cache, v_cache = (torch.randn(batch, cache, heads_k, head_dim, device=device, dtype=dtype) for _ in range(2))
    lengths = torch.full((batch,), cache, dtype=torch.int32, device=device)
    if impl == "aquila":
        step = lambda: attention_with_kv_cache(q, k_cache, v_cache, lengths)
        impl = "aquila " + ("cuda" if device == "cuda" and backend.cuda_extension is not None else
                            "triton" if device == "cuda" else "cpu")
    elif impl == "torch sdpa":
        step = lambda: sdpa(q, k_cache, v_cache, causal=False, flash_only=False)
    else:
        fn = eager_attention if impl == "torch eager" else compiled_attention
        step = lambda: fn(q, k_cache, v_cache, False)
    moved = 2 * k_cache.numel() * k_cache.element_size()  # the cache's keys and values, read once
    measure(f"decode attention {batch}x{cache} cache, heads {heads_q}/{heads_k}, {dtype_name}", impl, step, moved,
            rounds=15, dtype=dtype, reads_only=True)
