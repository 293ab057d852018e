"""Cross-entropy's Triton kernel and its launcher (the maths is in aquila/kernels/cross_entropy.py).

One program per row: an online-softmax pass for the loss, then, when asked, a second pass writing the gradient.
"""

import torch

from aquila.kernels.triton_compat import tl, triton


@triton.jit
def _tanh_and_slope(y):
    """tanh(y) and 1 - tanh(y)^2, as csrc/cpu/common.h's tanh_and_slope: from e = exp(-2|y|), or below |y| = 0.25
    from tanh's Taylor series (where 1 - e would cancel digits)."""
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    y2 = y * y
    series = y * (1.0 + y2 * (-1.0 / 3.0 + y2 * (2.0 / 15.0 + y2 * (-17.0 / 315.0 + y2 * (62.0 / 2835.0)))))
    far = (1.0 - e) / (1.0 + e)
    small = a < 0.25
    t = tl.where(small, series, tl.where(y >= 0, far, -far))
    slope = tl.where(small, 1.0 - t * t, 4.0 * e / ((1.0 + e) * (1.0 + e)))
    return t, slope


@triton.jit
def _logits(LOGITS, cols, mask, other, softcap, CAPPED: tl.constexpr):
    """A block of the row's logits in fp32 as the loss sees them (softcapped when CAPPED), and their slopes."""
    x = tl.load(LOGITS + cols, mask=mask, other=other).to(tl.float32)
    if CAPPED:
        t, slope = _tanh_and_slope(x / softcap)
        return tl.where(mask, softcap * t, other), slope
    return x, tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _cross_entropy_kernel(LOGITS, logits_row_stride, TARGETS, CLASS_WEIGHTS, LOSS, LSE, ARGMAX, GRAD, grad_row_stride,
                          GRAD_SCALE, vocab, ignore_index, label_smoothing, z_loss, softcap,
                          COMPUTE_GRAD: tl.constexpr, SMOOTHING: tl.constexpr, CAPPED: tl.constexpr,
                          WEIGHTED: tl.constexpr, TRACK_ARGMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * logits_row_stride
    target = tl.load(TARGETS + row)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < vocab)
    # Online softmax: the running maximum rescales the running sums, one read of the row. The target's term and the
    # others' are summed apart: the gradient's p_t - 1 is -others / sum, which keeps its digits when p_t is near 1.
    # Each lane keeps the column of its first largest logit; the row's argmax is the first of the lanes' at the max.
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_argmax = tl.zeros([BLOCK], tl.int32)
    running_others = tl.zeros([BLOCK], tl.float32)
    running_target = tl.zeros([BLOCK], tl.float32)
    logit_sum = tl.zeros([BLOCK], tl.float32)  # of w_j z_j (w_j = 1 unless WEIGHTED)
    weight_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < vocab
        z, _ = _logits(logits, cols, mask, float("-inf"), softcap, CAPPED)
        running_max_before = running_max
        if TRACK_ARGMAX:
            running_argmax = tl.where(z > running_max_before, cols, running_argmax)
        running_max = tl.maximum(running_max, z)
        # Lanes that have seen only -inf (padding past the vocabulary) subtract 0 instead: exp(-inf - -inf) is nan.
        shift = tl.where(running_max == float("-inf"), 0.0, running_max)
        rescale = tl.exp(running_max_before - shift)
        term = tl.exp(z - shift)
        running_others = running_others * rescale + tl.where(cols == target, 0.0, term)
        running_target = running_target * rescale + tl.where(cols == target, term, 0.0)
        if SMOOTHING:
            in_row = tl.where(mask, z, 0.0)
            if WEIGHTED:
                w = tl.load(CLASS_WEIGHTS + cols, mask=mask, other=0.0)
                logit_sum += w * in_row
                weight_sum += w
            else:
                logit_sum += in_row
    row_max = tl.max(running_max, axis=0)
    if TRACK_ARGMAX:
        tl.store(ARGMAX + row, tl.min(tl.where(running_max == row_max, running_argmax, vocab), axis=0).to(tl.int64))
    to_row_max = tl.exp(running_max - row_max)
    others = tl.sum(running_others * to_row_max, axis=0)
    sum_exp = others + tl.sum(running_target * to_row_max, axis=0)
    log_sum = tl.log(sum_exp)
    lse = row_max + log_sum

    counted = valid & (target != ignore_index)
    target_logit = tl.load(logits + target, mask=counted, other=0.0).to(tl.float32)
    target_slope = 1.0
    if CAPPED:
        target_tanh, target_slope = _tanh_and_slope(target_logit / softcap)
        target_logit = softcap * target_tanh
    target_weight = 1.0 - label_smoothing  # (1 - eps) w_t
    if WEIGHTED:
        target_weight *= tl.load(CLASS_WEIGHTS + target, mask=counted, other=0.0)
    # eps W / V: the softmax's share of the smoothing term (eps without weights).
    smoothing_mass = label_smoothing
    if SMOOTHING and WEIGHTED:
        smoothing_mass = label_smoothing * tl.sum(weight_sum, axis=0) / vocab
    # lse - z_t as log_sum + (max - z_t): for a confident prediction both are small and exact, where lse - z_t
    # would cancel away the digits of a loss near 0. Likewise for sum_j w_j (lse - z_j).
    loss = (target_weight + smoothing_mass) * log_sum + target_weight * (row_max - target_logit) + z_loss * lse * lse
    if SMOOTHING:
        loss += smoothing_mass * row_max - label_smoothing * tl.sum(logit_sum, axis=0) / vocab
    loss = tl.where(ignored, 0.0, tl.where(valid, loss, float("nan")))
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)

    if COMPUTE_GRAD:
        grad = GRAD + row * grad_row_stride
        row_scale = tl.where(ignored, 0.0, tl.where(valid, tl.load(GRAD_SCALE), float("nan")))
        z_loss_slope = 2.0 * z_loss * lse * tl.where(ignored, 0.0, tl.load(GRAD_SCALE + 1))  # d(s_z lambda lse^2)
        coefficient = row_scale * (target_weight + smoothing_mass) + z_loss_slope
        uniform = row_scale * label_smoothing / vocab  # times w_j
        target_uniform = uniform
        if WEIGHTED:
            target_uniform *= tl.load(CLASS_WEIGHTS + target, mask=counted, other=0.0)
        # p_t a' - s (1 - eps) w_t - s eps w_t / V as (p_t - 1) a' + s eps W / V + s_z 2 lambda lse - s eps w_t / V,
        # with p_t - 1 = -others / sum.
        target_grad = -(others / sum_exp) * coefficient + row_scale * smoothing_mass + z_loss_slope - target_uniform
        target_grad *= target_slope
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < vocab
            z, slope = _logits(logits, cols, mask, 0.0, softcap, CAPPED)
            smoothing = uniform
            if WEIGHTED:
                smoothing *= tl.load(CLASS_WEIGHTS + cols, mask=mask, other=0.0)
            dz = tl.where(cols == target, target_grad, (tl.exp(z - lse) * coefficient - smoothing) * slope)
            tl.store(grad + cols, dz.to(GRAD.dtype.element_ty), mask=mask)


def _config(vocab):
    """(BLOCK, num_warps): 4k-element steps along the row."""
    return min(triton.next_power_of_2(vocab), 4096), 8


# What the launch-time compile check drives the launcher over: vocabularies below, at and above the 4096 block
# (blocks 64 to 4096), loss only, with the gradient (in place or not), with label smoothing, softcapped (loss only and
# with the gradient), with class weights (loss only, and with smoothing, the gradient and the argmax), in each dtype.
LAUNCH_VOCABS = (50, 1000, 4096, 32000, 100008)


def launch_cases(vocabs=LAUNCH_VOCABS, dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """[(name, thunk)]: each thunk runs row_losses below on small CPU tensors of one vocabulary and dtype, as
    aquila.kernels.cross_entropy calls it: the loss alone, the gradient into its own tensor or into the logits, label
    smoothing, softcapping, class weights, the argmax."""
    def case(dtype, vocab):
        def run():
            logits = torch.zeros(2, vocab, dtype=dtype)
            targets = torch.zeros(2, dtype=torch.int64)
            weights = torch.ones(vocab, dtype=torch.float32)
            grad_scale = torch.ones(2, dtype=torch.float32)
            loss, lse = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float32)
            argmax = torch.zeros(2, dtype=torch.int64)
            for grad, smoothing, softcap, class_weights, track in (
                    (None, 0.0, 0.0, None, None), (torch.zeros_like(logits), 0.0, 0.0, None, None),
                    (logits, 0.1, 0.0, None, argmax), (None, 0.0, 30.0, None, None),
                    (torch.zeros_like(logits), 0.0, 30.0, None, argmax), (None, 0.0, 0.0, weights, None),
                    (torch.zeros_like(logits), 0.1, 0.0, weights, argmax)):
                row_losses(logits, targets, class_weights, grad_scale, grad, -100, smoothing, 1e-4, softcap, loss,
                           lse, track)
        return f"cross_entropy {str(dtype)[6:]} vocab={vocab}", run

    return [case(dtype, vocab) for dtype in dtypes for vocab in vocabs]


def row_losses(logits, targets, class_weights, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, loss,
               lse, argmax):
    rows, vocab = logits.shape
    block, num_warps = _config(vocab)
    _cross_entropy_kernel[(rows,)](
        logits, logits.stride(0), targets, class_weights if class_weights is not None else loss, loss, lse,
        argmax if argmax is not None else targets, grad if grad is not None else logits,
        grad.stride(0) if grad is not None else 0, grad_scale, vocab, ignore_index, label_smoothing, z_loss,
        softcap or 1.0, COMPUTE_GRAD=grad is not None, SMOOTHING=label_smoothing != 0.0, CAPPED=softcap > 0,
        WEIGHTED=class_weights is not None, TRACK_ARGMAX=argmax is not None, BLOCK=block, num_warps=num_warps)
