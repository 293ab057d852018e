"""Comparison of a kernel's output with a float64 reference, at a tolerance derived from the output's dtype.

The kernels compute in fp32 and round once to the output dtype, so an element may differ from the exact value by
  - the final rounding: half an ulp of the dtype on GPUs and in the C++ kernels, which round to nearest; a whole one
    under Triton's interpreter, whose fp32 -> bf16/fp16 conversion truncates (measured with triton 3.9). Two ulps
    (2 * eps relative) cover the truncation's worst case with a margin for the fp32 error before it;
  - fp32 arithmetic before it: reductions over rows of up to 64k elements and differences of terms that can cancel,
    bounded by 64 fp32 ulps of the largest magnitude involved (`scale`: by default the reference's largest value; for
    a difference that cancels, the largest term, which the caller passes).
For fp32 outputs that is 2.4e-7 relative plus 7.6e-6 of the largest value: far under 1e-4.
"""

import torch


def assert_matches_reference(actual, expected, name="output", scale=None):
    """actual: the kernel's output in its own dtype; expected: the float64 reference on the same inputs."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert expected.dtype == torch.float64
    rtol = 2 * torch.finfo(actual.dtype).eps
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an element left unwritten?)"
    if not expected.numel():
        return
    scale = expected.abs().max().item() if scale is None else scale
    atol = 64 * torch.finfo(torch.float32).eps * scale
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    worst = (error - allowed).argmax()
    assert (error <= allowed).all(), (
        f"{name}: error {error.flatten()[worst].item():.3g} at flat index {worst.item()} exceeds "
        f"{allowed.flatten()[worst].item():.3g} (rtol {rtol:.2g}, atol {atol:.2g})")
