"""quantized_linear: every backend against float64 (the weights dequantized in float64, then the matmul), for int8 and
int4 weights (symmetric and asymmetric, several group sizes), at awkward shapes, in each dtype; the gradient of x and
of the bias; the argument checks; the CPU's narrower ISA paths; torch.compile."""

import ctypes
import os
import platform
import subprocess
import sys

import pytest
import torch

from aquila.kernels import UnsupportedBackend, quantized_linear
from aquila.kernels import backend as _backend
from aquila.kernels.quantized_linear import (
    DEQUANTIZED_MATMUL_ROWS,
    INPUT_BLOCK,
    cpu_dequantize,
    dequantize,
    dequantizes_for_matmul,
    round_inputs_to_int8,
)
from tests.helpers import backend_params, with_dtypes
from tests.tolerance import assert_matches_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# quantized_linear has no CUDA C++ kernel (on GPU the Triton one runs).
BACKENDS = [p for p in backend_params() if p.values[0] != "cuda"]



# (bits, group_size, asymmetric). Int4 at the default group of 128, 64 and 32 (on AVX-512 the CPU kernels take 16-,
# 8- and 4-lane vectors for them: an int4 step is 8 lanes' worth of columns), and 6, which no vector step divides (the
# CPU's scalar path, Triton's scale per element).
KINDS = {"int8": (8, None, False), "int4-g128-sym": (4, 128, False), "int4-g128-asym": (4, 128, True),
         "int4-g64-asym": (4, 64, True), "int4-g32-sym": (4, 32, False), "int4-g6-asym": (4, 6, True)}
# (x's leading shape, in_features in units, out_features, bias): one row, 1 to 9 rows, a 2-D batch; in_features one
# group, a few groups, many; odd out_features. A unit is a group for int4, and 33 columns for int8 (odd widths, with
# columns left after the kernels' last whole step).
SHAPES = [((1,), 1, 1, False), ((1,), 4, 37, True), ((2,), 1, 16, False), ((3,), 2, 5, True), ((5,), 3, 9, False),
          ((8,), 1, 33, True), ((9,), 2, 7, False), ((2, 3), 2, 12, True)]


def in_features_of(kind, units):
    bits, group_size, _ = KINDS[kind]
    return units * (33 if bits == 8 else group_size)


def make_weights(kind, out_features, in_features, device="cpu"):
    """Random quantized weights: every byte value, scales of a trained layer's size, random zero points."""
    bits, group_size, asymmetric = KINDS[kind]
    if bits == 8:
        qweight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, device=device)
        return qweight, 0.001 + 0.01 * torch.rand(out_features, device=device), None
    qweight = torch.randint(0, 256, (out_features, in_features // 2), dtype=torch.uint8, device=device)
    groups = (out_features, in_features // group_size)
    scales = 0.005 + 0.02 * torch.rand(groups, device=device)
    zeros = torch.randint(0, 16, groups, dtype=torch.uint8, device=device) if asymmetric else None
    return qweight, scales, zeros


def exact_weight(qweight, scales, zeros, bits, group_size):
    """W in float64, unpacked here independently of the code under test."""
    if bits == 8:
        return qweight.double() * scales.double()[:, None]
    nibbles = torch.empty(qweight.shape[0], 2 * qweight.shape[1], dtype=torch.float64, device=qweight.device)
    nibbles[:, 0::2] = (qweight % 16).double()
    nibbles[:, 1::2] = (qweight // 16).double()
    zero = 8.0 if zeros is None else zeros.double().repeat_interleave(group_size, dim=1)
    return (nibbles - zero) * scales.double().repeat_interleave(group_size, dim=1)


def call(x, weights, kind, bias=None, backend=None):
    bits, group_size, asymmetric = KINDS[kind]
    return quantized_linear(x, *weights, bits=bits, group_size=group_size, bias=bias, symmetric=not asymmetric,
                            backend=backend)


def check_forward_and_gradients(kind, leading, in_features, out_features, with_bias, dtype, backend, device):
    bits, group_size, _ = KINDS[kind]
    weights = make_weights(kind, out_features, in_features, device)
    x = torch.randn(*leading, in_features, device=device).to(dtype)
    bias = torch.randn(out_features, device=device) if with_bias else None
    exact = exact_weight(*weights, bits, group_size)

    x_leaf = x.clone().requires_grad_()
    bias_leaf = bias.clone().requires_grad_() if with_bias else None
    out = call(x_leaf, weights, kind, bias_leaf, backend)
    assert out.shape == (*leading, out_features) and out.dtype == dtype
    expected = x.double() @ exact.T + (bias.double() if with_bias else 0)
    assert_matches_reference(out, expected)

    grad_out = torch.randn(out.shape, device=device).to(dtype)
    out.backward(grad_out)
    assert x_leaf.grad.dtype == dtype
    assert_matches_reference(x_leaf.grad, grad_out.double() @ exact, "grad x")
    if with_bias:
        assert_matches_reference(bias_leaf.grad, grad_out.double().reshape(-1, out_features).sum(0), "grad bias")


@pytest.mark.parametrize("backend, device, dtype", with_dtypes(BACKENDS))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(backend, device, dtype, kind, shape):
    leading, units, out_features, with_bias = shape
    check_forward_and_gradients(kind, leading, in_features_of(kind, units), out_features, with_bias, dtype, backend,
                                device)


# Long rows (Aquila-7B's 4096 and 11008 input features: the longest sums) and prefill-sized batches (the CPU kernels
# cut x in panels of 64 rows and, beyond 64K floats a panel, in panels of columns that leave partial sums).
@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.values[0] != "triton"])
@pytest.mark.parametrize("kind", ["int8", "int4-g128-sym", "int4-g128-asym", "int4-g64-asym"])
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 11008, 40), (8, 4096, 19), (130, 4096, 19),
                                                              (67, 1536, 70)], ids=str)
def test_long_rows_and_prefill(backend, device, kind, rows, in_features, out_features):
    if KINDS[kind][0] == 8:
        in_features += 4  # columns after the last whole step
    check_forward_and_gradients(kind, (rows,), in_features, out_features, True, torch.float32, backend, device)


@pytest.mark.parametrize("backend, device", [p for p in BACKENDS if p.values[0] == "triton"])
@pytest.mark.parametrize("kind", ["int8", "int4-g128-asym", "int4-g6-asym"])
def test_triton_prefill_tiles(backend, device, kind):
    """Row counts past the decoding tile (16 rows) and past 64, in fp32 and fp16."""
    for rows, dtype in ((40, torch.float32), (70, torch.float16)):
        check_forward_and_gradients(kind, (rows,), in_features_of(kind, 2), 24, True, dtype, backend, device)


def test_dequantize_is_the_format():
    for kind in KINDS:
        bits, group_size, _ = KINDS[kind]
        weights = make_weights(kind, 7, in_features_of(kind, 3))
        expected = exact_weight(*weights, bits, group_size)
        assert torch.equal(dequantize(*weights, bits, group_size, torch.float64), expected), kind


@pytest.mark.skipif(_backend.cpu_extension is None, reason="aquila._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("out_features, units", [(1, 1), (7, 3), (0, 2)], ids=str)
def test_cpu_dequantize_is_the_reference_bit_for_bit(kind, dtype, out_features, units):
    """The C++ dequantization: each weight's fp32 value as dequantize() computes it, rounded once to the dtype."""
    bits, group_size, _ = KINDS[kind]
    weights = make_weights(kind, out_features, in_features_of(kind, units))
    out = torch.full((out_features, in_features_of(kind, units)), float("nan"), dtype=dtype)  # poisoned
    assert cpu_dequantize(*weights, bits, group_size, out) is out
    assert torch.equal(out, dequantize(*weights, bits, group_size).to(dtype))


@pytest.mark.skipif(_backend.cpu_extension is None, reason="aquila._C is not built")
@pytest.mark.parametrize("kind", ["int8", "int4-g128-asym", "int4-g32-sym", "int4-g6-asym"])
@pytest.mark.parametrize("rows", [DEQUANTIZED_MATMUL_ROWS - 1, DEQUANTIZED_MATMUL_ROWS, 67])
def test_bf16_prefill_through_a_dequantized_copy(kind, rows, monkeypatch):
    """bf16 x of DEQUANTIZED_MATMUL_ROWS rows or more, on a CPU whose bf16 matmul is native: x times a bf16 copy of W
    (its fp32 values rounded once more), made a chunk of rows at a time (5 here: several chunks, the last one short),
    matches the float64 product with that copy to bf16's tolerance; otherwise, and for the gradient, the kernels
    match the exact W."""
    monkeypatch.setattr(sys.modules["aquila.kernels.quantized_linear"], "DEQUANTIZED_CHUNK_BYTES",
                        5 * in_features_of(kind, 2) * 2)
    bits, group_size, _ = KINDS[kind]
    weights = make_weights(kind, 23, in_features_of(kind, 2))
    x = torch.randn(rows, in_features_of(kind, 2)).bfloat16().requires_grad_()
    out = call(x, weights, kind, backend="cpu")
    through_copy = dequantizes_for_matmul(x, None)
    assert through_copy == (rows >= DEQUANTIZED_MATMUL_ROWS and _backend.cpu_extension.cpu_isa() == "avx512_bf16")
    exact = exact_weight(*weights, bits, group_size)
    copy = dequantize(*weights, bits, group_size).bfloat16().double()
    assert_matches_reference(out, x.double() @ (copy if through_copy else exact).T)
    grad_out = torch.randn(out.shape).bfloat16()
    out.backward(grad_out)
    assert_matches_reference(x.grad, grad_out.double() @ exact, "grad x")


@pytest.mark.parametrize("kind", ["int8", "int4-g128-asym", "int4-g6-asym"])
def test_cpu_results_do_not_depend_on_the_thread_count(kind):
    """Each output is summed by one thread in one order, whatever the split: the same bits on 1 thread or many."""
    weights = make_weights(kind, 45, in_features_of(kind, 4))
    x = torch.randn(11, in_features_of(kind, 4), requires_grad=True)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            x.grad = None
            out = call(x, weights, kind, backend="cpu")
            out.backward(torch.ones_like(out))
            results.append((out.detach(), x.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_rows(backend, device):
    weights = make_weights("int4-g32-sym", 6, 64, device)
    x = torch.randn(0, 64, device=device, requires_grad=True)
    out = call(x, weights, "int4-g32-sym", backend=backend)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert x.grad.shape == (0, 64)


def test_strided_input():
    weights = make_weights("int4-g32-sym", 6, 64)
    x = torch.randn(64, 10).t()  # last dimension strided
    assert_matches_reference(call(x, weights, "int4-g32-sym"), x.double() @ exact_weight(*weights, 4, 32).T)


def test_runs_in_autocasts_dtype():
    weights = make_weights("int8", 6, 40)
    x = torch.randn(3, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(x, weights, "int8")
    assert out.dtype == torch.bfloat16
    assert_matches_reference(out, x.bfloat16().double() @ exact_weight(*weights, 8, None).T)


def test_compiles_in_one_graph():
    torch._dynamo.reset()
    weights = make_weights("int4-g32-sym", 12, 64)

    def block(x, bias):
        return call(torch.tanh(x), weights, "int4-g32-sym", bias).square().sum()

    x, bias = torch.randn(2, 5, 64, requires_grad=True), torch.randn(12, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(x, bias), (x, bias))
    eager_grads = torch.autograd.grad(block(x, bias), (x, bias))
    for grad, eager_grad in zip(grads, eager_grads):
        torch.testing.assert_close(grad, eager_grad)


# --- int8_inputs: x rounded to int8 first ---------------------------------------------------------------------------
# The reference rounds x with round_inputs_to_int8 (blocks of 32 columns, from x's fp32 values), then multiplies in
# float64. On a CPU with VNNI, 16 rows or more whose blocks lie within the weights' groups (in_features a multiple of
# 32; int4: the group size too) run on a GEMM of integers, on AMX tiles where the CPU has AMX-INT8 (aquila._C.cpu_amx())
# and on vpdpbusd elsewhere (test_narrower_cpu_paths runs the latter on AMX CPUs too): 16 rows (one vector of lanes),
# 17, 33 and 40 (a part-filled vector), 130 (many vectors); 1 block a row (int8 at 1 unit), an odd number of blocks
# (int8 at 3 units); W's rows in one tile of 16 and in part-filled tiles (33, 18, 37). Fewer rows, and the other
# widths (int8 at 33 columns a unit, int4 g6), take the fp32 kernels on the rounded x.
INT8_INPUT_BACKENDS = [p for p in BACKENDS if p.values in (("cpu", "cpu"), ("torch", "cpu"))]
INT8_INPUT_SHAPES = [(1, 4, 37), (5, 3, 9), (16, 1, 5), (17, 2, 33), (33, 3, 18), (40, 4, 7), (130, 2, 1)]


def int8_input_width(kind, units, whole_blocks=True):
    """units groups (int4), or units blocks of 32 columns (int8; with whole_blocks False, 33 columns a unit)."""
    bits, group_size, _ = KINDS[kind]
    return units * (group_size if bits == 4 else INPUT_BLOCK if whole_blocks else 33)


def check_int8_inputs(kind, rows, in_features, out_features, dtype, backend, x=None):
    bits, group_size, asymmetric = KINDS[kind]
    weights = make_weights(kind, out_features, in_features)
    x = torch.randn(rows, in_features).to(dtype) if x is None else x
    bias = torch.randn(out_features)
    out = quantized_linear(x, *weights, bits=bits, group_size=group_size, bias=bias, symmetric=not asymmetric,
                           int8_inputs=True, backend=backend)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    expected = round_inputs_to_int8(x) @ exact_weight(*weights, bits, group_size).T + bias.double()
    assert_matches_reference(out, expected)
    return out


@pytest.mark.parametrize("backend, device, dtype", with_dtypes(INT8_INPUT_BACKENDS))
@pytest.mark.parametrize("kind, whole_blocks", [(kind, True) for kind in KINDS] + [("int8", False)],
                         ids=[*KINDS, "int8-33-column-units"])
@pytest.mark.parametrize("shape", INT8_INPUT_SHAPES, ids=str)
def test_int8_inputs_match_float64_reference(backend, device, dtype, kind, whole_blocks, shape):
    rows, units, out_features = shape
    check_int8_inputs(kind, rows, int8_input_width(kind, units, whole_blocks), out_features, dtype, backend)


# Aquila-7B's widths: many blocks a row, and a prompt longer than one panel of x (the lanes of 752 rows at 11008
# columns fill the GEMM's 8 MiB panel).
@pytest.mark.parametrize("kind", ["int8", "int4-g128-sym", "int4-g128-asym", "int4-g32-sym"])
@pytest.mark.parametrize("rows, in_features, out_features", [(64, 4096, 19), (70, 11008, 6), (770, 11008, 17)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_inputs_at_aquila_7b_widths(kind, rows, in_features, out_features, dtype):
    check_int8_inputs(kind, rows, in_features, out_features, dtype, "cpu")


@pytest.mark.parametrize("kind", ["int8", "int4-g64-asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_inputs_read_rows_a_stride_apart(kind, dtype):
    """x as the first columns of a wider tensor (rows further apart than in_features), as the GEMM reads them."""
    in_features = int8_input_width(kind, 3)
    x = torch.randn(40, in_features + 24).to(dtype)[:, :in_features]
    assert x.stride(0) == in_features + 24
    check_int8_inputs(kind, 40, in_features, 21, dtype, "cpu", x=x)


@pytest.mark.parametrize("kind", ["int8", "int4-g64-asym"])
def test_int8_inputs_carry_a_non_finite_input_to_its_row_only(kind):
    """A NaN or an infinity makes its block's scale NaN: its row's outputs are NaN, every other row's exact."""
    in_features = int8_input_width(kind, 2)
    x = torch.randn(20, in_features)
    x[3, 5], x[17, in_features - 1] = float("nan"), float("inf")
    bits, group_size, asymmetric = KINDS[kind]
    weights = make_weights(kind, 9, in_features)
    out = quantized_linear(x, *weights, bits=bits, group_size=group_size, symmetric=not asymmetric, int8_inputs=True)
    finite = torch.ones(20, dtype=torch.bool)
    finite[[3, 17]] = False
    assert out[~finite].isnan().all()
    expected = round_inputs_to_int8(x[finite]) @ exact_weight(*weights, bits, group_size).T
    assert_matches_reference(out[finite], expected)


@pytest.mark.parametrize("kind", ["int8", "int4-g128-asym"])
def test_int8_inputs_do_not_depend_on_the_thread_count(kind):
    weights = make_weights(kind, 45, int8_input_width(kind, 4))
    bits, group_size, asymmetric = KINDS[kind]
    x = torch.randn(37, int8_input_width(kind, 4))
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            results.append(quantized_linear(x, *weights, bits=bits, group_size=group_size, symmetric=not asymmetric,
                                            int8_inputs=True, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_int8_inputs_are_for_inference_on_the_cpu():
    weights = make_weights("int8", 4, 64)
    x = torch.randn(2, 64, requires_grad=True)
    with pytest.raises(ValueError, match="int8_inputs rounds x for inference and has no gradient"):
        quantized_linear(x, *weights, bits=8, int8_inputs=True)
    with pytest.raises(ValueError, match="int8_inputs must be a bool, got 1"):
        quantized_linear(x.detach(), *weights, bits=8, int8_inputs=1)
    with pytest.raises(UnsupportedBackend, match=r"triton does not round inputs to int8 \(int8_inputs"):
        quantized_linear(x.detach(), *weights, bits=8, int8_inputs=True, backend="triton")


def test_amx_follows_the_cpu_and_the_isa_cap():
    """The GEMM of int8 inputs runs on AMX tiles exactly where the CPU has AMX-INT8, Linux grants the process the
    tiles (asked here again through libc: the same request, which is idempotent) and the kernels take their widest
    path (any AQUILA_CPU_ISA cap turns the tiles off)."""
    extension = _backend.cpu_extension
    if extension is None or not os.path.exists("/proc/cpuinfo") or platform.machine() != "x86_64":
        pytest.skip("needs the CPU extension on Linux x86-64")
    with open("/proc/cpuinfo") as cpuinfo:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    has_amx = "amx_tile" in flags and "amx_int8" in flags
    arch_prctl, request_permission, tile_data = 158, 0x1023, 18  # SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA
    granted = has_amx and ctypes.CDLL(None, use_errno=True).syscall(arch_prctl, request_permission, tile_data) == 0
    assert extension.cpu_amx() == (extension.cpu_isa() == "avx512_bf16" and has_amx and granted)
    assert not extension.cpu_amx() or extension.cpu_vnni()


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_narrower_cpu_paths(isa):
    """The CPU kernels have AVX-512 bodies without AVX512-BF16 and AMX, AVX2 and baseline ones (8- and 4-lane
    vectors); this machine may run a wider path, so force each in a fresh process (the choice is made once per process)
    and compare with float64. With int8_inputs, avx512 multiplies integers on vpdpbusd where the CPU has VNNI (the
    AMX tiles off), and the narrower ISAs round x and run the fp32 kernels."""
    script = f"""
import torch
from aquila import _C
from tests.kernels.test_quantized_linear import (KINDS, check_forward_and_gradients, check_int8_inputs,
                                                in_features_of, int8_input_width)
levels = ["baseline", "avx2", "avx512", "avx512_bf16"]
assert levels.index(_C.cpu_isa()) <= levels.index("{isa}"), _C.cpu_isa()  # a CPU without {isa} takes its own widest
assert not _C.cpu_amx()
torch.manual_seed(0)
for kind in KINDS:
    for rows, units, out_features in ((1, 3, 37), (7, 2, 9), (70, 12, 5), (33, 3, 18)):
        for dtype in (torch.float32, torch.bfloat16):
            check_forward_and_gradients(kind, (rows,), in_features_of(kind, units), out_features, True, dtype, "cpu",
                                        "cpu")
            check_int8_inputs(kind, rows, int8_input_width(kind, units), out_features, dtype, "cpu")
print("ok")
"""
    env = {**os.environ, "AQUILA_CPU_ISA": isa, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stdout + result.stderr


def _int4(out_features=4, in_features=64, groups=2):
    return (torch.zeros(out_features, in_features // 2, dtype=torch.uint8), torch.ones(out_features, groups),
            torch.zeros(out_features, groups, dtype=torch.uint8))


X = torch.ones(2, 64)
Q, S, Z = _int4()
Q8, S8 = torch.zeros(4, 64, dtype=torch.int8), torch.ones(4)


@pytest.mark.parametrize("call_, error, words", [
    (lambda: quantized_linear(X.int(), Q, S, bits=4, group_size=32), TypeError, "x must have one of the dtypes"),
    (lambda: quantized_linear(X.double(), Q, S, bits=4, group_size=32), TypeError, "x must have one of the dtypes"),
    (lambda: quantized_linear(torch.ones(2, 0), Q, S, bits=4, group_size=32), ValueError,
     "x must have a non-empty last (in_features) dimension"),
    (lambda: quantized_linear(X, Q, S, bits=3, group_size=32), ValueError, "bits must be 4 or 8, got 3"),
    (lambda: quantized_linear(X, Q, S, bits=True, group_size=32), ValueError, "bits must be 4 or 8, got True"),
    (lambda: quantized_linear(X, Q.to(torch.int8), S, bits=4, group_size=32), TypeError,
     "qweight must be torch.uint8 for 4 bits, got torch.int8"),
    (lambda: quantized_linear(X, Q, S8, bits=8), TypeError, "qweight must be torch.int8 for 8 bits, got torch.uint8"),
    (lambda: quantized_linear(X, Q.tolist(), S, bits=4, group_size=32), TypeError, "qweight must be a torch.Tensor"),
    (lambda: quantized_linear(X, Q[0], S, bits=4, group_size=32), ValueError, "qweight must be 2-D"),
    (lambda: quantized_linear(X, Q[:, :16], S, bits=4, group_size=32), ValueError,
     "4-bit qweight packs two input features per byte: x's last dimension must be even and qweight must have shape "
     "(4, 32) for in_features 64, got (4, 16)"),
    (lambda: quantized_linear(torch.ones(2, 63), Q, S, bits=4, group_size=32), ValueError,
     "two input features per byte: x's last dimension must be even"),
    (lambda: quantized_linear(X, Q8[:, :60], S8, bits=8), ValueError,
     "qweight must have shape (4, 64) (in_features from x), got (4, 60)"),
    (lambda: quantized_linear(X, Q, S, bits=4), ValueError, "4 bits need group_size, an even int >= 2, got None"),
    (lambda: quantized_linear(X, Q, S, bits=4, group_size=31), ValueError, "an even int >= 2, got 31"),
    (lambda: quantized_linear(X, Q, S, bits=4, group_size=24), ValueError,
     "in_features (64) must be a multiple of group_size (24)"),
    (lambda: quantized_linear(X, Q8, S8, bits=8, group_size=128), ValueError,
     "8 bits have one scale per output feature; group_size is for 4 bits only"),
    (lambda: quantized_linear(X, Q8, S8, torch.zeros(4, dtype=torch.uint8), bits=8), ValueError,
     "8 bits are symmetric: zeros must be None"),
    (lambda: quantized_linear(X, Q, S.double(), bits=4, group_size=32), TypeError,
     "scales must have one of the dtypes torch.float32"),
    (lambda: quantized_linear(X, Q, S[:, :1], bits=4, group_size=32), ValueError, "scales must have shape (4, 2)"),
    (lambda: quantized_linear(X, Q8, S8[:3], bits=8), ValueError, "scales must have shape (4,)"),
    (lambda: quantized_linear(X, Q, S, Z, bits=4, group_size=32, symmetric=True), ValueError,
     "symmetric 4-bit weights take no zeros"),
    (lambda: quantized_linear(X, Q, S, bits=4, group_size=32, symmetric=False), ValueError,
     "asymmetric 4-bit weights need zeros (uint8 (4, 2)), got None"),
    (lambda: quantized_linear(X, Q, S, Z.int(), bits=4, group_size=32), TypeError,
     "zeros must have one of the dtypes torch.uint8"),
    (lambda: quantized_linear(X, Q, S, Z[:, :1], bits=4, group_size=32), ValueError, "zeros must have shape (4, 2)"),
    (lambda: quantized_linear(X, Q, S, bits=4, group_size=32, bias=torch.ones(5)), ValueError,
     "bias must have shape (4,)"),
    (lambda: quantized_linear(X, Q, S, bits=4, group_size=32, symmetric=1), ValueError,
     "symmetric must be a bool or None"),
    (lambda: quantized_linear(X, Q, S.to("meta"), bits=4, group_size=32), ValueError, "scales must be on cpu"),
    (lambda: quantized_linear(X, Q, S, bits=4, group_size=32, backend="cuda"), UnsupportedBackend,
     "quantized_linear: cuda has no quantized_linear kernel"),
    (lambda: quantized_linear(X, Q, S.clone().requires_grad_(), bits=4, group_size=32), ValueError,
     "scales requires grad, but the quantized weights are frozen: gradients flow to x and bias only"),
])
def test_bad_input_gets_a_clear_error(call_, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call_()


@pytest.mark.skipif(_backend.cpu_extension is None, reason="aquila._C is not built")
def test_the_cpu_kernel_checks_its_own_arguments():
    """A direct caller of aquila._C gets an error where Python would have refused the call, not a crash."""
    fields = dict(x=0, x_row_stride=64, qweight=0, scales=0, zeros=0, bias=0, out=0, rows=1, in_features=64,
                  out_features=4, bits=3, group_size=32, dtype=0, int8_inputs=False)
    with pytest.raises(ValueError, match="aquila quantized_linear: bits must be 4 or 8, got 3"):
        _backend.cpu_extension.quantized_linear(fields, 1)
    fields.update(bits=4, group_size=24)
    with pytest.raises(ValueError, match="group_size must be even, >= 2 and divide in_features, got 24"):
        _backend.cpu_extension.quantized_linear(fields, 1)
    dequantize_fields = dict(qweight=0, scales=0, zeros=0, out=0, in_features=64, out_features=4, bits=3,
                             group_size=32, dtype=0)
    with pytest.raises(ValueError, match="aquila quantized_dequantize: bits must be 4 or 8, got 3"):
        _backend.cpu_extension.quantized_dequantize(dequantize_fields, 1)
    dequantize_fields.update(bits=4, group_size=24)
    with pytest.raises(ValueError, match="group_size must be even, >= 2 and divide in_features, got 24"):
        _backend.cpu_extension.quantized_dequantize(dequantize_fields, 1)
