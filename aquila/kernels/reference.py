"""Pure-torch references: the ground truth of the tests and benchmarks, and the ``torch`` backend.

Each computes in fp32 for fp16/bf16/fp32 inputs and in float64 for float64 inputs, and rounds once to the input dtype,
exactly as the kernels are specified to. The tests feed them float64 copies of the kernels' inputs.
"""

import math

import torch

from aquila import IGNORE_INDEX


def compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


# The activations of the gated linear units, by the codes of csrc/kernels.h's GluActivation.
GLU_ACTIVATIONS = {0: torch.nn.functional.silu, 1: torch.nn.functional.gelu,
                   2: lambda g: torch.nn.functional.gelu(g, approximate="tanh")}


def glu_slope(gate, activation):
    """act'(gate) in closed form (the torch backend's backward, where no autograd graph can be recorded)."""
    g = gate.to(compute_dtype(gate.dtype))
    if activation == 0:
        sigmoid = torch.sigmoid(g)
        return sigmoid * (1 + g * (1 - sigmoid))
    if activation == 1:
        return 0.5 * (1 + torch.erf(g * 0.5 ** 0.5)) + g * torch.exp(-0.5 * g * g) * (2 * math.pi) ** -0.5
    k = (2 / math.pi) ** 0.5
    t = torch.tanh(k * (g + 0.044715 * g ** 3))
    return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k * (1 + 3 * 0.044715 * g * g)


def glu(gate, up, activation):
    """act(gate) * up, act by its GluActivation code (0 silu, 1 exact gelu, 2 tanh-approximated gelu)."""
    compute = compute_dtype(gate.dtype)
    return (GLU_ACTIVATIONS[activation](gate.to(compute)) * up.to(compute)).to(gate.dtype)


def rms_norm(x, weight, eps=1e-6, residual=None, round_normalized=False):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; with `residual`, normalises x + residual (rounded
    to x's dtype, as it is stored) and returns (out, x + residual). round_normalized: Llama's casting, the normalised
    x rounded to x's dtype before the weight multiplies it."""
    if residual is not None:
        x = x + residual
    h = x.to(compute_dtype(x.dtype))
    normalised = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if round_normalized:
        normalised = normalised.to(x.dtype).to(h.dtype)
    out = normalised * weight.to(h.dtype)
    out = out.to(x.dtype)
    return out if residual is None else (out, x)


def inverse_frequencies(head_dim, theta, device=None):
    """theta^(-2i/head_dim) for i < head_dim/2, in float64."""
    return theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)


def rotary(x, positions=None, offset=0, theta=10000.0, interleaved=False, inverse=False, cos=None, sin=None):
    """Rotary position embedding of x [..., seq, heads, head_dim]. `positions` ([seq] or [batch, seq]) defaults to
    offset + arange(seq). Angles and their cos/sin in float64, or the caller's cos and sin tables ([seq, head_dim/2]
    or [batch, seq, head_dim/2]) when given; `inverse` rotates back (the backward)."""
    seq, head_dim = x.shape[-3], x.shape[-1]
    compute = compute_dtype(x.dtype)
    if cos is None:
        if positions is None:
            positions = offset + torch.arange(seq, device=x.device)
        angles = positions.to(torch.float64)[..., None] * inverse_frequencies(head_dim, theta, x.device)
        cos, sin = angles.cos(), angles.sin()
    cos = cos.to(compute).unsqueeze(-2)  # broadcast over heads
    sin = sin.to(compute).unsqueeze(-2)
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


def cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                  num_tokens=None, softcap=0.0):
    """F.cross_entropy over the last dimension of logits (softcapped to softcap * tanh(logits / softcap) when
    softcap > 0), plus z_loss * logsumexp^2 per counted token; `mean` divides by num_tokens when given, else by the
    number of targets that are not ignore_index (nan when there are none)."""
    shape = targets.shape
    z = logits.to(compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    if softcap:
        z = softcap * torch.tanh(z / softcap)
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


def attention_visible(q_len, k_len, causal=False, window_size=(-1, -1), device=None):
    """[q_len, k_len] bool: which keys each query sees. Bottom-right aligned: query i sits at key position
    p = i + k_len - q_len and sees key j only if p - left <= j (left >= 0) and j <= p + right (right >= 0, or 0 when
    causal), window_size = (left, right) as in flash-attn."""
    left, right = window_size
    position = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    keys = torch.arange(k_len, device=device)[None, :]
    visible = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal or right >= 0:
        visible = visible & (keys <= position + (0 if causal else right))
    if left >= 0:
        visible = visible & (keys >= position - left)
    return visible


def attention_scores(qs, ks, scale, softcap):
    """scale * Q K^T, capped to softcap * tanh(s / softcap) when softcap > 0; and the cap's slope 1 - tanh^2 (1
    without a cap)."""
    scores = scale * qs @ ks.transpose(1, 2)
    if not softcap:
        return scores, 1.0
    tanh = torch.tanh(scores / softcap)
    return softcap * tanh, 1 - tanh * tanh


def attention(q, k, v, sequences, scale, causal=False, upcast=True, window_size=(-1, -1), softcap=0.0):
    """Explicit softmax(cap(scale * Q K^T) + mask) V for packed q [total_q, heads_q, d] and k, v [total_k, heads_k,
    d]: `sequences` is a list of (q_start, q_len, k_start, k_len). Query head h reads key/value head
    h // (heads_q // heads_k); the causal mask and the window are aligned bottom-right (attention_visible); softcap > 0
    caps the scores to softcap * tanh(s / softcap) before the mask.
    Returns (out, lse [total_q, heads_q]); a query that sees no key has out 0 and lse -inf. Quadratic memory: a
    reference, not a kernel. upcast=False computes in q's own dtype (the low-precision baseline of the tests)."""
    compute = compute_dtype(q.dtype) if upcast else q.dtype
    out = torch.zeros(q.shape, dtype=compute, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=compute, device=q.device)
    group = q.shape[1] // k.shape[1]
    for q_start, q_len, k_start, k_len in sequences:
        if q_len == 0:
            continue
        qs = q[q_start:q_start + q_len].to(compute).transpose(0, 1)  # [heads_q, q_len, d]
        ks = k[k_start:k_start + k_len].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        vs = v[k_start:k_start + k_len].to(compute).transpose(0, 1).repeat_interleave(group, 0)
        scores, _ = attention_scores(qs, ks, scale, softcap)
        visible = attention_visible(q_len, k_len, causal, window_size, q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(scores, -1)  # [heads_q, q_len]
        # A row that sees no key: all scores -inf, probabilities 0 (its gradient is not defined: test around it).
        safe_lse = torch.where(torch.isfinite(row_lse), row_lse, torch.zeros_like(row_lse))
        probs = torch.exp(scores - safe_lse[..., None])
        out[q_start:q_start + q_len] = (probs @ vs).transpose(0, 1)
        lse[q_start:q_start + q_len] = row_lse.transpose(0, 1)
    return out.to(q.dtype), lse


def attention_backward(grad_out, q, k, v, out, lse, sequences, scale, causal=False, window_size=(-1, -1),
                       softcap=0.0):
    """The closed-form gradients of `attention` (the flash-attention backward, with the probabilities recomputed
    from the forward's lse): dV = P^T dO, dS = P (dO V^T - rowsum(dO O)) cap', dQ = scale dS K, dK = scale dS^T Q,
    each key/value head summing over the query heads of its group (cap' = 1 - tanh^2 of the softcap, 1 without).
    Returns (grad_q, grad_k, grad_v) in q's dtype."""
    compute = compute_dtype(q.dtype)
    grads = [torch.zeros(t.shape, dtype=compute, device=q.device) for t in (q, k, v)]
    heads_k = k.shape[1]
    group = q.shape[1] // heads_k
    for q_start, q_len, k_start, k_len in sequences:
        if q_len == 0 or k_len == 0:
            continue
        queries, keys = slice(q_start, q_start + q_len), slice(k_start, k_start + k_len)
        qs, dos, os_ = (t[queries].to(compute).transpose(0, 1) for t in (q, grad_out, out))  # [heads_q, q_len, d]
        ks, vs = (t[keys].to(compute).transpose(0, 1).repeat_interleave(group, 0) for t in (k, v))
        row_lse = lse[queries].to(compute).transpose(0, 1)[..., None]  # [heads_q, q_len, 1]
        scores, slope = attention_scores(qs, ks, scale, softcap)
        visible = torch.isfinite(row_lse).expand_as(scores) & attention_visible(q_len, k_len, causal, window_size,
                                                                                q.device)
        probs = torch.where(visible, torch.exp(scores - torch.where(visible, row_lse, 0.0)), 0.0)
        delta = (dos * os_).sum(-1, keepdim=True)
        grad_scores = probs * (dos @ vs.transpose(1, 2) - delta) * slope
        per_head = {"q": scale * grad_scores @ ks, "k": scale * grad_scores.transpose(1, 2) @ qs,
                    "v": probs.transpose(1, 2) @ dos}
        grads[0][queries] = per_head["q"].transpose(0, 1)
        for grad, name in ((grads[1], "k"), (grads[2], "v")):
            grad[keys] = per_head[name].view(heads_k, group, k_len, -1).sum(1).transpose(0, 1)
    return tuple(g.to(q.dtype) for g in grads)
