"""The tensor-core decode attention's mma fragment maps, checked on the CPU.

mma_kernel (csrc/cuda/decode_attention.cu) takes every fragment index from csrc/cuda/mma_fragments.h. The replay,
tests/kernels/mma_replay.cpp, includes the same header, emulates mma.sync (from the PTX ISA's fragment layouts),
__byte_perm and __shfl_sync, and runs one block of the kernel over 4 warps of 32 emulated lanes: it compares each
step's S = Q K^T and O^T += V^T P^T, and the block's output and lse, with float64 references. Built here with the
host C++ compiler (6 s of CPU at -O1); skipped only where there is none. What it cannot check, a GPU must
(scripts/gpu_check.sh): the kernel's mma asm strings (operand order, types), the hardware's rounding of the sums,
cp.async and the shared-memory slots, races and speed.

A change to how mma_kernel uses the maps (not only to the maps) must be made in the replay too."""

import os
import re
import shutil
import subprocess
import zlib

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "tests", "kernels", "mma_replay.cpp")
KERNEL = os.path.join(REPO, "csrc", "cuda", "decode_attention.cu")

# (head-dimension tiles, row tiles): every mma_kernel the launcher (run<T> in decode_attention.cu) instantiates;
# 4 tiles is the m16n8k8 form (8-key steps).
TILINGS = [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1)]
# Each head-dimension class at its full width and at a width it pads (pieces past head_dim load as zeros).
HEAD_DIMS = {1: [64, 40], 2: [128, 72], 4: [256, 136]}
# What one block sees: (q_len, group, k_len, causal, which row chunk). Odd key counts, so that the last step is cut
# by key_end and masked.
SCENARIOS = {
    # One query, the group's heads as the block's rows (group = 8 row tiles, set below): the decode step.
    "decode": (1, None, 517, True, "first"),
    # Five queries of three heads: each row its own causal limit; the last chunk, whose row 15 is past the rows.
    "causal-rows": (5, 3, 77, True, "last"),
    # Fewer keys than a step, and more queries than keys: query 0 sees no key (out 0, lse -inf); 3 warps idle.
    "few-keys": (4, 2, 3, True, "first"),
    # Several steps a warp, unmasked but for the cut at 333 keys: the running max moves, O is rescaled.
    "long": (4, 4, 333, False, "first"),
}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def replay(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler ($CXX, g++, c++ or clang++) to build tests/kernels/mma_replay.cpp")
    exe = str(tmp_path_factory.mktemp("mma_replay") / "mma_replay")
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-I", os.path.join(REPO, "csrc"), SOURCE, "-o", exe],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return lambda *args: subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120)


def _args(dtype, dim_tiles, row_tiles, maps, head_dim, scenario, seed):
    q_len, group, k_len, causal, chunk = SCENARIOS[scenario]
    rows_per_block = 8 * row_tiles
    group = group or rows_per_block
    row0 = 0 if chunk == "first" else (q_len * group - 1) // rows_per_block * rows_per_block
    return dtype, dim_tiles, row_tiles, maps, head_dim, q_len, group, k_len, int(causal), row0, seed


def _mismatches(output):
    return {line.split()[1] for line in output.splitlines() if line.startswith("MISMATCH")}


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("dim_tiles, row_tiles", TILINGS, ids=lambda v: str(v))
@pytest.mark.parametrize("full_width", [True, False], ids=["full", "padded"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_replay_matches_float64_reference(replay, dtype, full_width, dim_tiles, row_tiles, scenario):
    """The header's maps: S, every step's PV product, the output and lse within their bounds (worst cases of the
    rounding the kernel does on purpose, derived in mma_replay.cpp), every element held exactly once."""
    head_dim = HEAD_DIMS[dim_tiles][0 if full_width else 1]
    seed = zlib.crc32(f"{dtype}-{head_dim}-{row_tiles}-{scenario}".encode())  # fixed, and different per case
    result = replay(*_args(dtype, dim_tiles, row_tiles, "kernel", head_dim, scenario, seed))
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line.split()[0] for line in result.stdout.splitlines() if "worst error" in line]
    assert checks == ["S", "PV", "out", "lse"] and result.stdout.splitlines()[-1].startswith("OK"), result.stdout


# Each wrong map, and the check that must catch it (others may too).
FAULTS = {
    "selectors": "PV",  # 0x5410 and 0x7632 swapped: V's elements 2w and 2w + 1 exchanged
    "q_rows": "S",  # Q row g + 8 in the A registers of row g, and the reverse
    "c_keys": "S",  # the scores of keys 2t and 2t + 1 read from each other's accumulators
    "v_keys": "PV",  # V keys 2t and 2t + 1 (2t + 8, 2t + 9) exchanged in the loads
    "p_tiles": "PV",  # P's two 8-key halves exchanged in the B registers of a 16-key PV step
    "o_rows": "PV",  # O's rows 2t and 2t + 1 exchanged in the rescale and the output
}


# A 16-key PV form with two row tiles, and the 8-key m16n8k8 form (one S tile a PV step: no halves to exchange).
FAULT_CASES = [(fault, tiling) for fault in FAULTS for tiling in [(1, 2), (4, 1)]
               if not (fault == "p_tiles" and tiling == (4, 1))]


@pytest.mark.parametrize("fault, dim_tiles, row_tiles", [(f, *tiling) for f, tiling in FAULT_CASES],
                         ids=[f"{f}-{tiling[0]}-{tiling[1]}" for f, tiling in FAULT_CASES])
def test_replay_catches_a_wrong_map(replay, fault, dim_tiles, row_tiles):
    """The replay is not blind: one deliberately wrong map at a time fails it, in the check that should see it."""
    head_dim = HEAD_DIMS[dim_tiles][0]
    result = replay(*_args("bf16", dim_tiles, row_tiles, fault, head_dim, "long", 1))
    assert result.returncode == 1, result.stdout + result.stderr
    assert FAULTS[fault] in _mismatches(result.stdout), result.stdout
    # And the same case passes with the kernel's own maps.
    assert replay(*_args("bf16", dim_tiles, row_tiles, "kernel", head_dim, "long", 1)).returncode == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_replay_rounds_like_torch(replay, dtype):
    """The replay's own rounding to bf16/fp16 (inputs, P's hi and lo) is torch's: round to nearest even, ties,
    subnormals and the largest finite values included."""
    torch_dtype = DTYPES[dtype]
    info = torch.finfo(torch_dtype)
    ulp_at_1 = info.eps
    values = torch.cat([torch.randn(200) * 4.0 ** torch.randint(-10, 6, (200,)),
                        torch.tensor([0.0, -0.0, 1.0, 1 + ulp_at_1 / 2, 1 + 3 * ulp_at_1 / 2, -(1 + ulp_at_1 / 2),
                                      info.tiny, info.tiny / 2, info.tiny * 0.75, info.smallest_normal / 3,
                                      info.max, -info.max])]).float()
    values = values[values.abs() <= info.max]
    result = replay("round", dtype, *(float(v).hex() for v in values.tolist()))
    assert result.returncode == 0, result.stderr
    got = [int(line) for line in result.stdout.split()]
    expected = (values.to(torch_dtype).view(torch.int16).to(torch.int32) & 0xFFFF).tolist()
    assert got == expected


def test_kernel_takes_its_fragment_indices_from_the_header():
    """What the replay checks is what the kernel does only while the kernel computes its fragment indices through
    mma_fragments.h: no byte_perm selector, and no lane index arithmetic of the maps, written out in its code."""
    with open(KERNEL) as f:
        code = "\n".join(line.split("//")[0] for line in f)  # comments may name the maps' arithmetic
    assert '#include "cuda/mma_fragments.h"' in code
    assert "frag::pv_a_selector" in code and not re.search(r"0x5410|0x7632", code)
    assert not re.search(r"\b8 \* t\b|\b4 \* u \+ t\b|\bg \+ 8\b|\b2 \* t\b", code), "index arithmetic in the kernel"
