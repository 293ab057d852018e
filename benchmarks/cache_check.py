"""Compute- or memory-bound? The bf16 CPU kernels' time per element on data that fits in cache against data that
streams from memory (as the benchmarks do, freed memory is reused, so large outputs cost no page faults per call). A
kernel bound by memory runs several times faster per element in cache; one bound by its arithmetic runs about as fast
either way (the in-cache sizes also carry the per-call overhead).

    python benchmarks/cache_check.py
"""

import ctypes
import time

import torch

from aquila.kernels import cross_entropy, rms_norm, rotary_embedding

LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocations up to 1 GiB from the heap
LIBC.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: freed heap memory kept


def nanoseconds_per_element(fn, elements, repeats):
    """The median of five timings of `repeats` calls, per call and element."""
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats)
    return sorted(times)[2] / elements * 1e9


def cross_entropy_call(rows):
    logits, targets = torch.randn(rows, 100008).bfloat16(), torch.randint(0, 100008, (rows,))
    return lambda: cross_entropy(logits, targets), logits.numel()


def rms_norm_call(rows):
    x, weight = torch.randn(rows, 4096).bfloat16(), torch.ones(4096)
    return lambda: rms_norm(x, weight), x.numel()


def rotary_call(tokens):
    x = torch.randn(1, tokens, 32, 128).bfloat16()
    return lambda: rotary_embedding(x), x.numel()


def main():
    torch.manual_seed(0)
    for name, make, small, large in [("cross_entropy fwd", cross_entropy_call, 8, 1024),
                                     ("rms_norm fwd", rms_norm_call, 64, 8192),
                                     ("rotary fwd", rotary_call, 64, 8192)]:
        (small_fn, small_n), (large_fn, large_n) = make(small), make(large)
        in_cache = nanoseconds_per_element(small_fn, small_n, 50)
        from_memory = nanoseconds_per_element(large_fn, large_n, 3)
        print(f"{name:18} in cache {in_cache:.3f} ns/element ({small_n * 2 / 1e6:.1f} MB), from memory "
              f"{from_memory:.3f} ns/element ({large_n * 2 / 1e6:.0f} MB): {from_memory / in_cache:.2f}x")


if __name__ == "__main__":
    main()
