"""Deliberately bad Triton kernels and launchers, for the test that the compile check catches what it must
(tests/kernels/test_build.py): one that spills, one that needs more shared memory than any card gives a block."""

import torch

from aquila.kernels.triton_compat import tl, triton


@triton.jit
def _spilling_kernel(X, OUT, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    x = tl.load(X + cols).to(tl.float32)
    # x stays live across the reduction: BLOCK / 32 values per thread at one warp, far more than 255 registers.
    tl.store(OUT + cols, (x * tl.sum(x * x, axis=0)).to(OUT.dtype.element_ty))


@triton.jit
def _shared_memory_kernel(A, B, OUT, K: tl.constexpr):
    rows, ks = tl.arange(0, 16), tl.arange(0, K)
    a = tl.load(A + rows[:, None] * K + ks[None, :])
    b = tl.load(B + ks[:, None] * 16 + rows[None, :])
    # Both bf16 operands, 16 x K and K x 16, staged in shared memory: 256 KiB at K = 4096.
    tl.store(OUT + rows[:, None] * 16 + rows[None, :], tl.dot(a, b).to(OUT.dtype.element_ty))


def launch_cases():
    def spill():
        x = torch.zeros(16384, dtype=torch.bfloat16)
        _spilling_kernel[(1,)](x, torch.empty_like(x), BLOCK=16384, num_warps=1)

    def shared_memory():
        a = torch.zeros(16, 4096, dtype=torch.bfloat16)
        _shared_memory_kernel[(1,)](a, a, torch.empty(16, 16, dtype=torch.bfloat16), K=4096, num_warps=4,
                                    num_stages=1)

    return [("bad spill", spill), ("bad shared memory", shared_memory)]
