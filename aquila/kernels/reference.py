"""Pure-torch references: the ground truth of the tests and benchmarks, and the ``torch`` backend.

Each computes in fp32 for fp16/bf16/fp32 inputs and in float64 for float64 inputs, and rounds once to the input dtype,
exactly as the kernels are specified to. The tests feed them float64 copies of the kernels' inputs.
"""

import torch


def compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def rms_norm(x, weight, eps=1e-6, residual=None):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; with `residual`, normalises x + residual (rounded
    to x's dtype, as it is stored) and returns (out, x + residual)."""
    if residual is not None:
        x = x + residual
    h = x.to(compute_dtype(x.dtype))
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.to(h.dtype)
    out = out.to(x.dtype)
    return out if residual is None else (out, x)


def inverse_frequencies(head_dim, theta, device=None):
    """theta^(-2i/head_dim) for i < head_dim/2, in float64."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def rotary(x, positions=None, offset=0, theta=10000.0, interleaved=False, inverse=False):
    """Rotary position embedding of x [..., seq, heads, head_dim]. `positions` ([seq] or [batch, seq]) defaults to
    offset + arange(seq). Angles and their cos/sin in float64; `inverse` rotates back (the backward)."""
    seq, head_dim = x.shape[-3], x.shape[-1]
    if positions is None:
        positions = offset + torch.arange(seq, device=x.device)
    angles = positions.to(torch.float64)[..., None] * inverse_frequencies(head_dim, theta, x.device)
    compute = compute_dtype(x.dtype)
    cos = angles.cos().to(compute).unsqueeze(-2)  # broadcast over heads
    sin = angles.sin().to(compute).unsqueeze(-2)
    if inverse:
        sin = -sin
    xc = x.to(compute)
    if interleaved:
        first, second = xc[..., 0::2], xc[..., 1::2]
    else:
        first, second = xc[..., : head_dim // 2], xc[..., head_dim // 2 :]
    rotated = (first * cos - second * sin, second * cos + first * sin)
    out = torch.stack(rotated, dim=-1).flatten(-2) if interleaved else torch.cat(rotated, dim=-1)
    return out.to(x.dtype)


def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  num_tokens=None):
    """F.cross_entropy over the last dimension of logits, plus z_loss * logsumexp^2 per counted token; `mean` divides
    by num_tokens when given, else by the number of targets that are not ignore_index (nan when there are none)."""
    shape = targets.shape
    z = logits.to(compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    targets = targets.flatten()
    counted = targets != ignore_index
    rows = torch.nn.functional.cross_entropy(z, targets, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                             reduction="none")
    if z_loss:
        rows = rows + z_loss * torch.logsumexp(z, -1).pow(2) * counted
    if reduction == "none":
        return rows.view(shape)
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / (counted.sum() if num_tokens is None else num_tokens)
