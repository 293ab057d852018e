import pytest
import torch

from aquila.kernels import apply_rotary, reference, rotary_embedding
from tests.helpers import backend_params
from tests.tolerance import assert_matches_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (batch, seq, heads, head_dim): one element pair, odd lengths, the head dims of LLaMA-family models.
SHAPES = [(1, 1, 1, 2), (2, 17, 3, 64), (1, 5, 4, 128), (1, 9, 2, 80), (1, 3, 2, 256), (3, 1, 5, 96)]


def positions_for(kind, batch, seq, device):
    if kind == "offset":
        return None, 1000
    if kind == "ids":  # one sequence's position ids, e.g. a packed row restarting at each document
        return torch.tensor([i % 7 for i in range(seq)], device=device, dtype=torch.int32), 0
    if kind == "batch-ids":  # per-sequence positions, far out along the context (large angles)
        return torch.randint(0, 100_000, (batch, seq), device=device), 0
    return None, 0


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("positions", ["arange", "offset", "ids", "batch-ids"])
def test_forward_matches_float64_reference(backend, device, dtype, shape, interleaved, positions):
    x = torch.randn(shape, device=device).to(dtype)
    ids, offset = positions_for(positions, shape[0], shape[1], device)
    out = rotary_embedding(x, ids, offset=offset, interleaved=interleaved, backend=backend)
    expected = reference.rotary(x.double(), ids, offset, interleaved=interleaved)
    assert out.dtype == dtype
    assert_matches_reference(out, expected)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
def test_gradients_match_autograd_of_float64_reference(backend, device, dtype, interleaved):
    x = torch.randn(2, 7, 3, 64, device=device).to(dtype).requires_grad_()
    ids = torch.randint(0, 5000, (2, 7), device=device)
    grad_out = torch.randn(2, 7, 3, 64, device=device).to(dtype)
    rotary_embedding(x, ids, theta=500000.0, interleaved=interleaved, backend=backend).backward(grad_out)
    exact = x.detach().double().requires_grad_()
    reference.rotary(exact, ids, theta=500000.0, interleaved=interleaved).backward(grad_out.double())
    assert_matches_reference(x.grad, exact.grad, "grad x")


def scaled_table(batch, seq, head_dim, device, per_sequence):
    """A caller's cos/sin table as a scaled RoPE makes one: Llama-3-style per-frequency scaling of the angles and a
    YaRN-style magnitude on cos and sin; per sequence (multimodal position ids) or shared."""
    half = head_dim // 2
    inv_freq = reference.inverse_frequencies(head_dim, 500000.0, device) / torch.linspace(1, 8, half, device=device,
                                                                                         dtype=torch.float64)
    positions = torch.randint(0, 4096, (batch if per_sequence else 1, seq), device=device).double()
    angles = positions[..., None] * inv_freq
    magnitude = 1.0 + 0.1 * torch.rand(half, device=device, dtype=torch.float64)
    return (angles.cos() * magnitude).float(), (angles.sin() * magnitude).float()


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate-half", "interleaved"])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["shared", "per-sequence"])
def test_a_callers_cos_sin_table(backend, device, dtype, shape, interleaved, per_sequence):
    """Values and gradients with the caller's tables: the rotation with their cos and sin (in fp32, as given), and
    its backward the rotation by the opposite sin."""
    batch, seq, _, head_dim = shape
    cos, sin = scaled_table(batch, seq, head_dim, device, per_sequence)
    x = torch.randn(shape, device=device).to(dtype).requires_grad_()
    grad_out = torch.randn(shape, device=device).to(dtype)
    out = rotary_embedding(x, interleaved=interleaved, cos=cos if per_sequence else cos[0],
                           sin=sin if per_sequence else sin[0], backend=backend)
    out.backward(grad_out)
    exact = x.detach().double().requires_grad_()
    expected = reference.rotary(exact, interleaved=interleaved, cos=cos.double(), sin=sin.double())
    expected.backward(grad_out.double())
    assert out.dtype == dtype
    assert_matches_reference(out, expected.detach())
    assert_matches_reference(x.grad, exact.grad, "grad x")


@pytest.mark.parametrize("backend, device", backend_params())
def test_gqa_q_and_k_with_different_head_counts(backend, device):
    q, k = torch.randn(2, 11, 8, 64, device=device), torch.randn(2, 11, 2, 64, device=device)
    q_out, k_out = apply_rotary(q, k, offset=5, backend=backend)
    assert_matches_reference(q_out, reference.rotary(q.double(), offset=5))
    assert_matches_reference(k_out, reference.rotary(k.double(), offset=5))


@pytest.mark.parametrize("backend, device", backend_params())
def test_hugging_face_layout_view_keeps_its_layout(backend, device):
    """[batch, heads, seq, head_dim] goes in transposed, without a copy, and comes out in the same layout."""
    x_hf = torch.randn(2, 4, 9, 32, device=device, requires_grad=True)
    out = rotary_embedding(x_hf.transpose(1, 2), backend=backend)
    assert out.stride() == x_hf.transpose(1, 2).stride()
    assert_matches_reference(out, reference.rotary(x_hf.detach().double().transpose(1, 2)))
    out.sum().backward()
    exact = x_hf.detach().double().requires_grad_()
    reference.rotary(exact.transpose(1, 2)).sum().backward()
    assert_matches_reference(x_hf.grad, exact.grad, "grad x")


@pytest.mark.parametrize("backend, device", backend_params())
def test_sequence_offsets_beyond_32_bits(backend, device):
    """Tokens 2^31 elements apart: every offset must be computed in 64 bits."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # 4 GiB of storage, only two tokens touched
    stride = 2**31 + 128
    storage = torch.empty(stride + 2 * 64, dtype=torch.float16, device=device)
    x = storage.as_strided((1, 2, 2, 64), (2 * stride, stride, 64, 1))
    x.copy_(torch.randn(1, 2, 2, 64, device=device))
    out = rotary_embedding(x, offset=7, interleaved=True, backend=backend)
    assert_matches_reference(out, reference.rotary(x.double(), offset=7, interleaved=True))


@pytest.mark.parametrize("backend, device", backend_params())
def test_empty_and_three_dimensional_inputs(backend, device):
    assert rotary_embedding(torch.randn(0, 3, 2, 8, device=device), backend=backend).shape == (0, 3, 2, 8)
    x = torch.randn(6, 2, 16, device=device)  # [seq, heads, head_dim]
    assert_matches_reference(rotary_embedding(x, offset=3, backend=backend), reference.rotary(x.double(), offset=3))


@pytest.mark.parametrize("call, error, words", [
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 7)), ValueError, "head_dim .* must be even"),
    (lambda: rotary_embedding(torch.randn(3, 8)), ValueError, "x must be \\[batch, seq, heads, head_dim\\]"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8).int()), TypeError, "x must have one of"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8), torch.zeros(4, dtype=torch.long)), ValueError,
     "positions must have shape \\(3,\\) or \\(2, 3\\)"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8), torch.zeros(3)), TypeError, "positions must have one of"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8), torch.zeros(3, dtype=torch.long), offset=2), ValueError,
     "positions or offset, not both"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8), torch.zeros(3, dtype=torch.long, device="meta")), ValueError,
     "positions must be on cpu"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8), theta=0.0), ValueError, "theta must be a number > 0"),
    (lambda: rotary_embedding(torch.randn(2, 3, 4, 8), offset=1.5), TypeError, "offset must be an int"),
    (lambda: apply_rotary(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 16)), ValueError,
     "q and k must agree in every dimension but heads"),
    (lambda: rotary_embedding(torch.randn(1, 3, 2, 8), cos=torch.ones(3, 4)), ValueError, "both cos and sin"),
    (lambda: rotary_embedding(torch.randn(1, 3, 2, 8), cos=torch.ones(3, 8), sin=torch.ones(3, 8)), ValueError,
     r"cos must have shape \(3, 4\)"),
    (lambda: rotary_embedding(torch.randn(1, 3, 2, 8), offset=2, cos=torch.ones(3, 4), sin=torch.ones(3, 4)),
     ValueError, "or a cos/sin table, not both"),
    (lambda: rotary_embedding(torch.randn(1, 3, 2, 8), cos=torch.ones(3, 4, requires_grad=True),
                              sin=torch.ones(3, 4)), ValueError, "cos requires grad"),
])
def test_bad_input_gets_a_clear_error(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_an_offset_past_exact_positions_is_named():
    with pytest.raises(ValueError, match=r"offset must be within \+-2\*\*53 .*got 18446744073709551616"):
        rotary_embedding(torch.randn(1, 2, 1, 8), offset=2**64)


@pytest.mark.parametrize("backend, device", backend_params())
@pytest.mark.parametrize("start", [2**24 - 3, 2**31 + 7, 10**12 + 1], ids=["2^24", "2^31", "1e12"])
def test_large_positions_keep_their_angle(backend, device, start):
    """Positions past fp32's exact integers (2^24) and int32's range: the angle is still exact."""
    x = torch.randn(1, 4, 2, 16, device=device)
    positions = torch.arange(start, start + 4, device=device)
    expected = reference.rotary(x.double(), positions)
    assert_matches_reference(rotary_embedding(x, positions, backend=backend), expected)
    assert_matches_reference(rotary_embedding(x, offset=start, backend=backend), expected)
