"""Attention against the explicit softmax(QK^T)V in float64. Criterion (flash-attn's): the kernel's error is at most
twice the error of the same computation done by torch in the kernel's dtype, plus a floor of 4 fp32 ulps of the
largest value, or of 1 where the values come from cancelling O(1) terms (a different but equally good summation order
may land a few roundings either side of torch's). Every grid runs over SCORINGS: the causal mask, sliding windows
and softcapping, alone and together."""

import os
import subprocess
import sys

import pytest
import torch

from aquila.kernels import attention, attention_with_kv_cache, reference
from aquila.kernels import backend as _backend
from tests.helpers import backend_params, with_dtypes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_as_accurate_as_torch(actual, expected, torch_same_dtype, name):
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    floor = 4 * torch.finfo(torch.float32).eps * max(1.0, expected.abs().max().item())
    ours, theirs = error(actual, expected), error(torch_same_dtype, expected)
    assert ours <= 2 * theirs + floor, f"{name}: error {ours:.3g} > 2 x torch's {theirs:.3g} + {floor:.3g}"


def run(fn, tensors, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [leaf.grad for leaf in leaves]


def check(q, k, v, sequences, causal, backend, api, scale=None, grads=True, window_size=(-1, -1), softcap=0.0):
    """Runs `api` (our op on q, k, v) and compares it, and its gradients, with float64 and with torch in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    packed = lambda t: t.reshape(-1, *t.shape[-2:])

    def explicit(upcast):
        return lambda *t: reference.attention(*map(packed, t), sequences, scale, causal, upcast, window_size,
                                              softcap)[0].view(q.shape)

    grad_out = torch.randn(q.shape, device=q.device)
    if not grads:
        with torch.no_grad():
            ours = [api(q, k, v)]
            exact = [explicit(True)(*(t.double() for t in (q, k, v)))]
            same_dtype = [explicit(False)(q, k, v)]
    else:
        ours = run(api, (q, k, v), grad_out)
        exact = run(explicit(True), [t.double() for t in (q, k, v)], grad_out.double())
        same_dtype = run(explicit(False), (q, k, v), grad_out)
    for name, a, e, t in zip(["out", "grad q", "grad k", "grad v"], ours, exact, same_dtype):
        assert a.shape == e.shape and a.dtype == q.dtype, name
        assert_as_accurate_as_torch(a, e, t, name)


# The cuda backend of attention is the decoding kernel only (attention_with_kv_cache).
TRAINING_BACKENDS = [p for p in backend_params() if p.values[0] != "cuda"]

# name: (causal, window_size, softcap). Mistral's sliding_window 8 is (7, 0) with causal; two-sided windows; windows
# of 0 (on the left; on both sides, where each query sees only its own position) and wider than any sequence here;
# Gemma 2's softcapping (at 2, where tanh bends scores of the tests' size), alone and with a window.
SCORINGS = {"full": (False, (-1, -1), 0.0), "causal": (True, (-1, -1), 0.0), "sliding": (True, (7, 0), 0.0),
            "window": (False, (5, 3), 0.0), "left-0": (False, (0, 2), 0.0), "window-0": (False, (0, 0), 0.0),
            "wide": (True, (5000, -1), 0.0),
            "softcap": (False, (-1, -1), 2.0), "sliding-softcap": (True, (7, 0), 2.0),
            "left-only-softcap": (False, (4, -1), 2.0)}
# The grid over every shape and dtype takes the plain masks and both options together (test_every_scoring takes
# each alone).
MAIN_SCORINGS = ("full", "causal", "sliding-softcap")


def scoring_params(names=tuple(SCORINGS)):
    return [pytest.param(*SCORINGS[name], id=name) for name in names]


def api_call(causal, window_size, softcap, backend, **options):
    return lambda *t: attention(*t, causal=causal, window_size=window_size, softcap=softcap, backend=backend,
                                **options)



# (batch, seq_q, seq_k, heads_q, heads_k, head_dim): one token, odd lengths, q_len < k_len, every head dim, GQA 1/4/8.
SHAPES = [(1, 1, 1, 1, 1, 64), (2, 17, 17, 4, 4, 80), (1, 128, 128, 8, 1, 96), (2, 17, 40, 8, 2, 128),
          (1, 3, 33, 4, 1, 256), (1, 50, 50, 2, 2, 72)]


@pytest.mark.parametrize("backend, device, dtype", with_dtypes(TRAINING_BACKENDS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal, window_size, softcap", scoring_params(MAIN_SCORINGS))
def test_batched(backend, device, dtype, shape, causal, window_size, softcap):
    batch, seq_q, seq_k, heads_q, heads_k, head_dim = shape
    q = torch.randn(batch, seq_q, heads_q, head_dim, device=device).to(dtype)
    k, v = (torch.randn(batch, seq_k, heads_k, head_dim, device=device).to(dtype) for _ in range(2))
    sequences = [(b * seq_q, seq_q, b * seq_k, seq_k) for b in range(batch)]
    check(q, k, v, sequences, causal, backend, api_call(causal, window_size, softcap, backend),
          window_size=window_size, softcap=softcap)


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 23, 23, 4, 2, 48), (1, 9, 70, 4, 1, 64), (1, 70, 9, 2, 2, 32)], ids=str)
@pytest.mark.parametrize("causal, window_size, softcap", scoring_params())
def test_every_scoring(backend, device, shape, causal, window_size, softcap):
    """Every masking and softcap of SCORINGS, fp32: odd lengths, GQA/MQA, more keys than queries and more queries
    than keys (queries whose window holds no key)."""
    batch, seq_q, seq_k, heads_q, heads_k, head_dim = shape
    q = torch.randn(batch, seq_q, heads_q, head_dim, device=device)
    k, v = (torch.randn(batch, seq_k, heads_k, head_dim, device=device) for _ in range(2))
    sequences = [(b * seq_q, seq_q, b * seq_k, seq_k) for b in range(batch)]
    seen = reference.attention_visible(seq_q, seq_k, causal, window_size).sum(1)
    # Values only where a row sees no key (no gradient defined in float64's reference: see
    # test_rows_that_see_no_key_pass_no_gradient), or where every row sees one key: P = 1 has dS = 0 exactly, which
    # the flash backward's P (dP - delta) gets as the rounding of a difference of terms of size |dO| |V|, not 1.
    check(q, k, v, sequences, causal, backend, api_call(causal, window_size, softcap, backend),
          grads=bool((seen > 0).all() and (seen > 1).any()), window_size=window_size, softcap=softcap)


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 113, 203, 6, 1, 64), (2, 256, 512, 6, 1, 32), (2, 108, 256, 6, 2, 32)], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_group_gradients_as_accurate_as_torchs(backend, device, shape, causal):
    """MQA/GQA cases of flash-attn's own test grid, fp32: dK and dV sum over every query of every head of a group,
    the longest sums in attention."""
    batch, seq_q, seq_k, heads_q, heads_k, head_dim = shape
    q = torch.randn(batch, seq_q, heads_q, head_dim, device=device)
    k, v = (torch.randn(batch, seq_k, heads_k, head_dim, device=device) for _ in range(2))
    sequences = [(b * seq_q, seq_q, b * seq_k, seq_k) for b in range(batch)]
    check(q, k, v, sequences, causal, backend, lambda *t: attention(*t, causal=causal, backend=backend))


# Long sequences with a window of a few key blocks, which the kernels cross block by block.
LONG_SCORINGS = {"full": (False, (-1, -1), 0.0), "causal": (True, (-1, -1), 0.0),
                 "sliding-softcap": (True, (299, 0), 30.0), "window": (False, (100, 77), 0.0)}


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
@pytest.mark.parametrize("seq, head_dim", [(1000, 64), (2049, 128)])
@pytest.mark.parametrize("causal, window_size, softcap", [pytest.param(*v, id=k) for k, v in LONG_SCORINGS.items()])
def test_long_sequences(backend, device, seq, head_dim, causal, window_size, softcap):
    q, k, v = (torch.randn(1, seq, 1, head_dim, device=device) for _ in range(3))
    check(q, k, v, [(0, seq, 0, seq)], causal, backend, api_call(causal, window_size, softcap, backend),
          window_size=window_size, softcap=softcap)


@pytest.mark.parametrize("backend, device", [p for p in TRAINING_BACKENDS if p.values[0] != "torch"])
def test_windows_skip_the_key_blocks_outside_them(backend, device):
    """The kernels never touch a key block that lies wholly outside every window of a query block: NaN keys and
    values there (which a kernel that only masked them would multiply by 0, giving NaN) change no bit of the output
    or of the other keys' gradients, and their own gradients are 0. 64 queries at the end of 700 keys, a causal
    window of 32 (Mistral's sliding_window 33): the keys before 576 are out of every block's reach."""
    q = torch.randn(1, 64, 4, 64, device=device)
    k, v = (torch.randn(1, 700, 2, 64, device=device) for _ in range(2))
    poisoned = [t.clone() for t in (k, v)]
    for t in poisoned:
        t[:, :512] = float("nan")
    call = api_call(True, (32, 0), 0.0, backend)
    grad_out = torch.randn(q.shape, device=device)
    ours, clean = run(call, (q, *poisoned), grad_out), run(call, (q, k, v), grad_out)
    assert torch.equal(ours[0], clean[0]) and torch.equal(ours[1], clean[1])
    for grad, clean_grad in zip(ours[2:], clean[2:]):
        assert torch.equal(grad[:, 512:], clean_grad[:, 512:])
        assert torch.equal(grad[:, :512], torch.zeros_like(grad[:, :512]))
    check(q, k, v, [(0, 64, 0, 700)], True, backend, call, window_size=(32, 0))


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
@pytest.mark.parametrize("causal, window_size, softcap", scoring_params(("full", "causal", "sliding-softcap")))
def test_packed_sequences_do_not_attend_across_documents(backend, device, causal, window_size, softcap):
    lengths = [1, 17, 128, 4, 60]  # a length-1 document among them
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    total = cu[-1].item()
    q = torch.randn(total, 8, 64, device=device)
    k, v = (torch.randn(total, 2, 64, device=device) for _ in range(2))
    sequences = [(start, n, start, n) for start, n in zip(cu[:-1].tolist(), lengths)]
    check(q, k, v, sequences, causal, backend, api_call(causal, window_size, softcap, backend, cu_seqlens_q=cu),
          window_size=window_size, softcap=softcap)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("window_size, softcap", [((-1, -1), 0.0), ((100, -1), 0.0), ((6, 0), 2.0)],
                         ids=["causal", "sliding", "sliding-softcap"])
def test_kv_cache_with_different_lengths(backend, device, new_tokens, window_size, softcap):
    batch, max_len, heads_q, heads_k, head_dim = 3, 300, 8, 2, 128
    q = torch.randn(batch, new_tokens, heads_q, head_dim, device=device)
    k_cache, v_cache = (torch.randn(batch, max_len, heads_k, head_dim, device=device) for _ in range(2))
    lengths = torch.tensor([new_tokens, 257, 300], dtype=torch.int32, device=device)
    sequences = [(b * new_tokens, new_tokens, b * max_len, n) for b, n in enumerate(lengths.tolist())]
    check(q, k_cache, v_cache, sequences, True, backend,
          lambda *t: attention_with_kv_cache(*t, lengths, backend=backend, window_size=window_size, softcap=softcap),
          grads=False, window_size=window_size, softcap=softcap)


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
@pytest.mark.parametrize("causal, window_size, softcap", scoring_params(("causal", "sliding-softcap")))
def test_more_queries_than_keys_leaves_unseeing_rows_at_zero(backend, device, causal, window_size, softcap):
    """Bottom-right alignment with q_len > k_len: the first q_len - k_len queries see no key."""
    q = torch.randn(1, 6, 2, 64, device=device)
    k, v = (torch.randn(1, 4, 2, 64, device=device) for _ in range(2))
    out = attention(q, k, v, causal=causal, window_size=window_size, softcap=softcap, backend=backend)
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))
    check(q, k, v, [(0, 6, 0, 4)], causal, backend, api_call(causal, window_size, softcap, backend), grads=False,
          window_size=window_size, softcap=softcap)


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
def test_rows_that_see_no_key_pass_no_gradient(backend, device):
    """A window can leave a query no key: with window (0, 0) each query sees only the key at its own position, and
    of 7 queries over 4 keys (bottom-right aligned) queries 0-2 sit before the first key. Their outputs are 0, and a
    gradient on them flows nowhere."""
    q = torch.randn(1, 7, 2, 32, device=device, requires_grad=True)
    k, v = (torch.randn(1, 4, 2, 32, device=device, requires_grad=True) for _ in range(2))
    out = attention(q, k, v, window_size=(0, 0), softcap=2.0, backend=backend)
    grad_out = torch.randn_like(out)
    grad_out[:, 3:] = 0  # only the rows that see no key carry a gradient
    out.backward(grad_out)
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert all(torch.equal(t.grad, torch.zeros_like(t.grad)) for t in (q, k, v))


@pytest.mark.parametrize("backend, device", TRAINING_BACKENDS)
def test_backward_is_deterministic(backend, device):
    q = torch.randn(2, 70, 8, 64, device=device, requires_grad=True)
    k, v = (torch.randn(2, 70, 2, 64, device=device, requires_grad=True) for _ in range(2))
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        attention(q, k, v, causal=True, backend=backend).square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_custom_scale():
    q, k, v = (torch.randn(1, 9, 2, 32) for _ in range(3))
    check(q, k, v, [(0, 9, 0, 9)], False, None, lambda *t: attention(*t, scale=0.3), scale=0.3)


def window_error(**options):
    return lambda: attention(*(torch.randn(1, 4, 2, 16) for _ in range(3)), **options)


@pytest.mark.parametrize("call, error, words", [
    (lambda: attention(torch.randn(1, 4, 3, 64), torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 64)), ValueError,
     r"query heads \(3\) must be a multiple of the key/value heads \(2\)"),
    (lambda: attention(*(torch.randn(1, 4, 2, 320) for _ in range(3))), ValueError, "head_dim must be between"),
    (lambda: attention(torch.randn(1, 4, 2, 64), torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 64)), ValueError,
     "same head_dim"),
    (lambda: attention(torch.randn(1, 4, 2, 64), torch.ones(1, 4, 2, 64, dtype=torch.int32), torch.randn(1, 4, 2, 64)),
     TypeError, "k must have one of the dtypes"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3)), cu_seqlens_q=torch.tensor([1, 5])), ValueError,
     "cu_seqlens_q must start at 0, never decrease and end at the number of tokens"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3)), cu_seqlens_q=torch.tensor([0, 4, 3, 5])),
     ValueError, "never decrease"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3)), cu_seqlens_q=torch.tensor([0, 4])), ValueError,
     r"end at the number of tokens \(5\)"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3)), cu_seqlens_q=torch.tensor([0., 5.])), TypeError,
     "cu_seqlens_q must have one of"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3)), cu_seqlens_q=torch.tensor([0, 2, 5]),
                       max_seqlen_q=2), ValueError, r"max_seqlen_q must be an int >= the longest sequence \(3\)"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3))), ValueError, "batched inputs are"),
    (lambda: attention_with_kv_cache(torch.randn(2, 1, 2, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16),
                                     torch.tensor([3, 9])), ValueError, "cache_seqlens must be between 0 and"),
    (lambda: attention(*(torch.randn(1, 4, 2, 16) for _ in range(3)), backend="cuda"), ValueError,
     "attention: cuda has no attention kernel"),
    (window_error(window_size=(-2, 0)), ValueError, r"window_size must be a pair \(left, right\) of ints >= -1"),
    (window_error(window_size=4), ValueError, "window_size must be a pair"),
    (window_error(window_size=(4, 0, 1)), ValueError, "window_size must be a pair"),
    (window_error(window_size=(4.0, 0)), ValueError, r"window_size .* got \(4.0, 0\)"),
    (window_error(window_size=(True, 0)), ValueError, "window_size must be a pair"),
    (window_error(softcap=-1.0), ValueError, r"softcap must be a finite number >= 0 \(0: no softcapping\), got -1.0"),
    (window_error(softcap=float("inf")), ValueError, "softcap must be a finite number >= 0"),
    (window_error(softcap="50"), ValueError, "softcap must be a finite number >= 0"),
    (lambda: attention_with_kv_cache(torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16),
                                     torch.tensor([3]), window_size=(-3, -1)), ValueError,
     "attention_with_kv_cache: window_size must be a pair"),
    (lambda: attention_with_kv_cache(torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16),
                                     torch.tensor([3]), softcap=float("nan")), ValueError,
     "attention_with_kv_cache: softcap must be a finite number >= 0"),
])
def test_bad_input_gets_a_clear_error(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_narrower_cpu_paths(isa, dtype):
    """The CPU attention has a path per ISA level (csrc/cpu/common.h): bf16 products on AVX512-BF16, and fp32 tilings
    for AVX-512, AVX2 and the baseline. The widest this machine has runs in the other tests; force each narrower one
    in a fresh process (the choice is made once per process), forward and backward, by the criterion of
    test_batched, split and unsplit backward alike (one kv head, then eight), with and without a sliding window and
    softcap."""
    script = f"""
import sys
sys.path.insert(0, {REPO!r})
import torch
from aquila.kernels import attention
from aquila.kernels import backend
from tests.kernels.test_attention import check
torch.manual_seed(0)
for heads_k, window_size, softcap in ((1, (-1, -1), 0.0), (8, (-1, -1), 0.0), (1, (20, 0), 2.0), (8, (9, 0), 0.0)):
    q = torch.randn(2, 70, 8, 80).to(torch.{dtype})
    k, v = (torch.randn(2, 70, heads_k, 80).to(torch.{dtype}) for _ in range(2))
    check(q, k, v, [(0, 70, 0, 70), (70, 70, 70, 70)], True, "cpu",
          lambda *t: attention(*t, causal=True, window_size=window_size, softcap=softcap, backend="cpu"),
          window_size=window_size, softcap=softcap)
print(backend.cpu_extension.cpu_isa())
"""
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "AQUILA_CPU_ISA": isa},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    levels = ["baseline", "avx2", "avx512", "avx512_bf16"]
    assert levels.index(result.stdout.split()[-1]) <= levels.index(isa), result.stdout


def test_an_unknown_cpu_isa_is_named():
    script = """
import torch
from aquila.kernels import attention
q = torch.randn(1, 4, 1, 8)
try:
    attention(q, q, q, backend="cpu")
except ValueError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, "AQUILA_CPU_ISA": "avx9"},
                            capture_output=True, text=True, timeout=300)
    assert "AQUILA_CPU_ISA=avx9 is not one of avx512_bf16, avx512, avx2, baseline" in result.stdout, (
        result.stdout + result.stderr)


def test_cache_lengths_are_checked_before_the_cast_to_int32():
    q, cache = torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=r"cache_seqlens must be between 0 and the cache length 8, got \[4294967299\]"):
        attention_with_kv_cache(q, cache, cache, torch.tensor([2**32 + 3]))


@pytest.mark.parametrize("call, words", [
    (lambda: attention(*(torch.randn(1, 4, 2, 16, device="meta") for _ in range(3))), "q is on the meta device"),
    (lambda: attention(*(torch.randn(5, 2, 16) for _ in range(3)), cu_seqlens_q=torch.tensor([0, 5], device="meta")),
     "cu_seqlens_q is on the meta device"),
    (lambda: attention(*(torch.randn(1, 4, 2, 16) for _ in range(3)), scale="big"),
     "scale must be a finite number, got 'big'"),
    (lambda: attention(*(torch.randn(1, 4, 2, 16) for _ in range(3)), scale=float("nan")),
     "scale must be a finite number, got nan"),
    (lambda: attention_with_kv_cache(torch.randn(1, 1, 2, 16), torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16),
                                     torch.tensor([3]), scale=True), "scale must be a finite number, got True"),
], ids=["meta", "meta-cu_seqlens", "scale-str", "scale-nan", "scale-bool"])
def test_unusable_arguments_are_named(call, words):
    with pytest.raises(ValueError, match=words):
        call()


@pytest.mark.skipif(not _backend.HAS_TRITON, reason="triton is not installed")
def test_the_triton_grid_launches_any_batch():
    """A packed batch of 4,096 documents at 32 heads (131,072 sequence-head pairs) fits the grid's unlimited axis 0;
    only the blocks along one sequence go on axis 1, whose CUDA limit is 65,535."""
    from aquila.kernels.triton.attention import MAX_GRID_Y, grid

    assert grid(4096 * 32, 2048, 128) == (131072, 16)
    assert grid(1, MAX_GRID_Y * 64, 64) == (1, MAX_GRID_Y)
    with pytest.raises(ValueError, match="sequences of up to"):
        grid(1, MAX_GRID_Y * 64 + 1, 64)


def test_the_cuda_decode_kernel_gives_way_for_head_dims_it_lacks():
    """It needs head_dim % 8 == 0: other head dims go to the next entry of the table (Triton on GPU)."""
    from aquila.kernels.attention import KV_CACHE_IMPLEMENTATIONS

    cuda = KV_CACHE_IMPLEMENTATIONS["cuda"]
    assert cuda.limits(head_dim=128) is None
    assert cuda.limits(head_dim=72) is None
    assert "multiple of 8" in cuda.limits(head_dim=60)
    assert list(KV_CACHE_IMPLEMENTATIONS)[:2] == ["cuda", "triton"]
