"""Attention: Aquila's kernels against the torch eager composition (softmax(QK^T)V with the scores materialised, as
transformers' "eager" attention does), torch.compile of it, and torch's scaled_dot_product_attention (on GPU its flash
backend; the baseline of the ratios) in the same run, forward and forward+backward, in TFLOP/s (4 B H N^2 D, halved
when causal, x2.5 for the backward) and as a fraction of the machine's measured matmul rate; and generation against a
KV cache, in bytes of cache read per second as a fraction of the measured read bandwidth. Each runs in fp32 and bf16 on
CPU, in bf16 on GPU, every contender in the same precision.

Sliding-window attention (window_size as Mistral's and Gemma 2's layers use it) and softcapped attention (Gemma 2's
attention logit softcapping), causal, forward and forward+backward, against the same contenders given the same
masking: SDPA with the equivalent boolean mask (the baseline; SDPA has no softcapping, so for the softcap the eager
composition is the baseline), the eager composition with that mask and the tanh softcap, and torch.compile of it. Each
contender's forward is first checked, in fp32 and outside the timing, against the eager composition in float64 on the
same inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from aquila.kernels import attention, attention_with_kv_cache, backend


def sdpa(q, k, v, causal, flash_only=True, mask=None):
    """torch's SDPA on the [batch, seq, heads, d] layout; on GPU restricted to its flash backend for training, which
    takes no mask: with a boolean `mask` (True: attend) torch picks the backend."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = k.shape[1] != q.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa).transpose(1, 2)
    if q.is_cuda and flash_only:
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2)


def eager_attention(q, k, v, causal, mask=None, softcap=0.0):
    """The composition transformers' eager attention runs: key/value heads repeated for GQA, the full score matrix,
    softcap * tanh(scores / softcap) when softcap > 0 (Gemma 2's), the causal mask or the boolean `mask` (True:
    attend), softmax in fp32 (in float64 for float64 inputs)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if causal and mask is None:
        seq_q, seq_k = scores.shape[-2:]
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # float64 stays float64: the check's reference
    return (scores.to(softmax_dtype).softmax(-1).to(q.dtype) @ v).transpose(1, 2)


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


SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping


def sliding_window_mask(seq, window, device):
    """Causal attention over the last `window` keys, the query's own included, as a boolean mask (True: attend): query
    i sees key j iff i - window < j <= i, as the kernels' window_size=(window - 1, 0) and Mistral's sliding_window."""
    offsets = torch.arange(seq, device=device)[:, None] - torch.arange(seq, device=device)
    return (offsets >= 0) & (offsets < window)


def masked_implementations(device, mask, window_size, softcap):
    """Every contender computing one causal attention with a window (`mask` for the torch contenders, `window_size`
    for Aquila's; None and (-1, -1) without one) and a softcap (0: none). SDPA has no softcapping: it runs only
    without one."""
    impls = {"torch eager": lambda q, k, v: eager_attention(q, k, v, True, mask, softcap),
             "torch.compile": lambda q, k, v: compiled_attention(q, k, v, True, mask, softcap)}
    if not softcap:
        impls["torch sdpa"] = lambda q, k, v: sdpa(q, k, v, True, mask=mask)
    name = {"cpu": "cpu", "cuda": "triton"}[device]
    impls[f"aquila {name}"] = lambda q, k, v: attention(q, k, v, causal=True, window_size=window_size,
                                                         softcap=softcap, backend=name)
    return impls


def masked_attention_benchmark(measure, device, dtype, dtype_name, impl, fn, mask, softcap, shape, backward, flops,
                               what):
    """Times fn(q, k, v) (a masked_implementations contender, given mask and softcap) on [batch, seq, heads,
    head_dim] inputs, as test_attention does. In fp32 its forward is first checked, outside the timing, against the
    eager composition in float64 on the same inputs: fp32 sums over a few thousand keys agree with it to about 1e-6,
    and a wrong window or cap moves outputs by far more than the tolerance."""
    batch, seq, heads, head_dim = shape
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    grad = torch.randn_like(q)
    if dtype == torch.float32 and not backward:
        expected = eager_attention(q.double(), k.double(), v.double(), True, mask, softcap)
        torch.testing.assert_close(fn(q, k, v).double(), expected, rtol=1e-4, atol=1e-5)

    def step():
        out = fn(q, k, v)
        if backward:
            out.backward(grad)
            q.grad = k.grad = v.grad = None

    label = f"{what} {'fwd+bwd' if backward else 'fwd'} {batch}x{heads}x{seq}x{head_dim}, {dtype_name}"
    measure(label, impl, step, flops=flops * (3.5 if backward else 1.0), memory=True, rounds=5, dtype=dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq", [1024, 2048])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_sliding_window_attention(measure, device, quick, dtype, dtype_name, impl, seq, backward):
    """Causal attention over a window of W keys: W = 256 on CPU (sequence 1024 and 2048), 1024 on GPU (2048 and
    4096). FLOPs count the visible score entries only: query i sees min(i + 1, W) keys, N W - W (W - 1) / 2 in all
    for N >= W, each costing 4 D FLOPs (QK^T and PV) per head and row of the batch, x3.5 with the backward."""
    if quick and seq > 1024:
        pytest.skip("quick mode runs one size")
    batch, heads, head_dim = (4, 32, 128) if device == "cuda" else (1, 8, 128)
    seq = 128 if quick else (seq * 2 if device == "cuda" else seq)
    window = 32 if quick else (1024 if device == "cuda" else 256)
    mask = sliding_window_mask(seq, window, device)
    fn = masked_implementations(device, mask, (window - 1, 0), 0.0).get(impl)
    if fn is None:
        pytest.skip(f"{impl} does not run on {device}")
    visible = seq * window - window * (window - 1) // 2
    masked_attention_benchmark(measure, device, dtype, dtype_name, impl, fn, mask, 0.0, (batch, seq, heads, head_dim),
                               backward, 4 * batch * heads * visible * head_dim, f"sliding-window attention W={window}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("seq", [1024, 2048])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_softcapped_attention(measure, device, quick, dtype, dtype_name, impl, seq, backward):
    """Causal attention with the scores capped to 50 tanh(s / 50), in test_attention's shapes; FLOPs as its causal
    case (4 B H N^2 D / 2, x3.5 with the backward; the tanh not counted). Without SDPA, which has no softcapping:
    the eager composition is the baseline."""
    if quick and seq > 1024:
        pytest.skip("quick mode runs one size")
    batch, heads, head_dim = (4, 32, 128) if device == "cuda" else (1, 8, 128)
    seq = 128 if quick else (seq * 2 if device == "cuda" else seq)
    fn = masked_implementations(device, None, (-1, -1), SOFTCAP).get(impl)
    if fn is None:
        reason = "SDPA has no softcapping" if impl == "torch sdpa" else f"{impl} does not run on {device}"
        pytest.skip(reason)
    masked_attention_benchmark(measure, device, dtype, dtype_name, impl, fn, None, SOFTCAP,
                               (batch, seq, heads, head_dim), backward, 2 * batch * heads * seq * seq * head_dim,
                               f"softcapped attention causal cap={SOFTCAP:g}")


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
