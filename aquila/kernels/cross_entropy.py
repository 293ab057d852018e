"""Softmax cross-entropy over large vocabularies, and fused linear cross-entropy (the lm_head and the loss in one).

Per row of logits z with target t, class weights w (all 1 without them; W = sum_j w_j), label smoothing eps and
z-loss lambda, the loss of F.cross_entropy(weight=w, label_smoothing=eps) plus an unweighted z-loss:
    lse  = log sum_j exp(z_j),   p_j = exp(z_j - lse)
    ce   = (1 - eps) w_t (lse - z_t) + (eps / V) sum_j w_j (lse - z_j)
    loss = ce + lambda lse^2
    dz_j = s (a p_j - (eps / V) w_j - (1 - eps) w_t [j == t]) + s_z 2 lambda lse p_j,   a = (1 - eps) w_t + eps W / V
where s and s_z are what the reduction gives a row's ce and its z-loss: 1 for 'sum' (and per token for 'none'); for
'mean' s = 1 / (sum of w_t over the counted tokens), torch's divisor, and s_z = 1 / (number of counted tokens), so the
z-loss is the same whatever the class weights' scale (as Liger-Kernel's); num_tokens replaces both divisors.
With softcapping c (Gemma 2's final logits) z_j is c tanh(x_j / c) of the logits x, and dx_j = dz_j (1 - tanh^2).
Rows whose target is ``ignore_index`` count for nothing. The kernels make one pass over a row for the loss (online
softmax, fp32; the index of the row's first largest logit too, for the token accuracy) and, when a gradient is
needed, a second that writes it: in the same launch, during the forward, so the backward is free; with
``inplace_backward`` the gradient is written over the logits, saving a logits-sized buffer. The gradient is computed
in fp32 up to its single rounding (so p_t - 1 of a confident prediction keeps its digits).

``linear_cross_entropy(hidden, weight, targets)`` never holds all N x V logits: tokens go in chunks (see
``default_chunk_size``); each chunk's logits become its gradient in place, which is turned into the chunk's
hidden-state gradient and added into the weight gradient (in fp32) before the next chunk.
"""

import functools
import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from aquila import IGNORE_INDEX

from . import backend as _backend
from .backend import Implementation, Implementations
from .triton import cross_entropy as triton_cross_entropy

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyOutput(NamedTuple):
    """What cross_entropy and linear_cross_entropy return when return_z_loss or return_token_accuracy is set. loss:
    as without them. z_loss: the z-loss term included in loss (z_loss * lse^2, reduced as the loss is), or None.
    token_accuracy: the fraction of counted tokens whose largest logit is the target's (per token as bools for
    reduction='none'), or None. Neither carries a gradient."""

    loss: Tensor
    z_loss: Optional[Tensor]
    token_accuracy: Optional[Tensor]


# --- Implementations ------------------------------------------------------------------------------------------------
# row_losses(logits, targets, class_weights, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap, loss,
# lse, argmax) fills loss (the row's ce + z-loss), lse (fp32 [rows]) and, when argmax is a tensor, argmax (int64
# [rows], the first largest logit's index) for logits [rows >= 1, V] (unit last stride), targets int64 [rows],
# class_weights fp32 [V] or None, grad_scale fp32 [2] (s, s_z above) on logits' device; and, when grad is a [rows, V]
# tensor (it may be logits), the gradient of sum_i (s ce_i + s_z z-loss_i). The gradient is written in the forward's
# pass over the row, so one function serves both directions.


def _torch_row_losses(logits, targets, class_weights, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap,
                      loss, lse, argmax):
    vocab = logits.shape[1]
    z, slope = logits.float(), 1.0
    if softcap:
        tanh = torch.tanh(z / softcap)
        z, slope = softcap * tanh, 1 - tanh * tanh
    lse.copy_(torch.logsumexp(z, -1))
    counted = targets != ignore_index
    ce = torch.nn.functional.cross_entropy(z, targets, weight=class_weights, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, reduction="none")
    loss.copy_(ce + z_loss * lse.square() * counted)
    if argmax is not None:
        argmax.copy_(z.argmax(-1))
    if grad is None:
        return
    weights = torch.ones(vocab, device=z.device) if class_weights is None else class_weights
    clamped = targets.clamp(0, vocab - 1)[:, None]
    target_weight = (1 - label_smoothing) * weights[clamped]
    smoothing_mass = label_smoothing * weights.sum() / vocab
    scale, z_scale = grad_scale[0], grad_scale[1]
    coefficient = scale * (target_weight + smoothing_mass) + 2 * z_loss * lse[:, None] * z_scale
    is_target = torch.zeros_like(z, dtype=torch.bool).scatter_(1, clamped, True)
    uniform = scale * label_smoothing / vocab * weights
    dz = torch.exp(z - lse[:, None]) * coefficient - uniform
    # The target's p_t a - (1 - eps) w_t (scaled, z-loss aside) as (p_t - 1) a + eps W / V, with p_t - 1 = -others
    # / sum over exp(z - max): exact where p_t - 1 would cancel, and free of lse's rounding.
    terms = torch.exp(z - z.max(-1, keepdim=True).values)
    others = terms.masked_fill(is_target, 0.0).sum(-1, keepdim=True) / terms.sum(-1, keepdim=True)
    target_grad = (-others * coefficient + scale * smoothing_mass + 2 * z_loss * lse[:, None] * z_scale
                   - uniform[clamped])
    dz = torch.where(is_target, target_grad, dz)
    grad.copy_(torch.where(counted[:, None], dz * slope, 0.0))


def _native_row_losses(backend, logits, targets, class_weights, grad_scale, grad, ignore_index, label_smoothing,
                       z_loss, softcap, loss, lse, argmax):
    _backend.call_native(
        backend, "cross_entropy", logits, logits=logits, logits_row_stride=logits.stride(0), targets=targets,
        class_weights=class_weights, loss=loss, lse=lse, argmax=argmax, grad=grad,
        grad_row_stride=0 if grad is None else grad.stride(0), grad_scale=grad_scale, rows=logits.shape[0],
        vocab=logits.shape[1], ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, dtype=logits.dtype)


def _cuda_limits(softcap, class_weights, token_accuracy):
    """What the CUDA C++ kernel lacks (the Triton kernel has it all)."""
    lacking = [what for what, asked in (("softcapping", softcap), ("class weights", class_weights),
                                        ("token accuracy", token_accuracy)) if asked]
    return f"has no {' or '.join(lacking)} (the Triton kernel has)" if lacking else None


IMPLEMENTATIONS = Implementations(
    "cross_entropy",
    triton=Implementation.both_directions(triton_cross_entropy.row_losses),
    cuda=Implementation(*[functools.partial(_native_row_losses, "cuda")] * 2, limits=_cuda_limits),
    cpu=Implementation.both_directions(functools.partial(_native_row_losses, "cpu")),
    torch=Implementation.both_directions(_torch_row_losses),
)


@_backend.autocast_off
def _row_losses(logits, targets, class_weights, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap,
                compute_argmax, backend):
    """Returns the per-row loss and lse in fp32 and the argmax (int64; empty unless compute_argmax), and fills grad
    (None: loss only)."""
    rows = logits.shape[0]
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(rows if compute_argmax else 0, dtype=torch.int64, device=logits.device)
    if rows:
        implementation = IMPLEMENTATIONS[backend]
        with _backend.on_device(logits):
            (implementation.forward if grad is None else implementation.backward)(
                logits, targets, class_weights, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap,
                loss, lse, argmax if compute_argmax else None)
    return loss, lse, argmax


def _reduce(row_losses, row_lse, counted, grad_scale, z_loss, weighted, reduction):
    """The reduced loss of the rows' losses (z-loss included): for a weighted mean, whose z-loss has its own divisor,
    the z-loss's share is moved from the ce's scale s to its own s_z."""
    if reduction == "none":
        return row_losses
    if reduction == "sum":
        return row_losses.sum()
    loss = row_losses.sum() * grad_scale[0]
    if weighted and z_loss:
        loss = loss + _row_z_losses(row_lse, counted, z_loss).sum() * (grad_scale[1] - grad_scale[0])
    return loss


def _row_z_losses(row_lse, counted, z_loss):
    return z_loss * row_lse.square() * counted


def _grad_scale(targets, class_weights, ignore_index, reduction, num_tokens, device):
    """[s, s_z]: d(reduced loss) / d(row's ce) and d(reduced loss) / d(row's z-loss) as fp32, computed without a
    host sync: for a mean, 1 / (the counted targets' weight sum) and 1 / (their number), both 1 / num_tokens when
    given (inf when a divisor is 0: no row uses it, and the mean 0 * inf is nan, as in F.cross_entropy)."""
    if reduction != "mean":
        return torch.ones(2, dtype=torch.float32, device=device)
    if num_tokens is not None:
        return torch.full((2,), 1.0 / num_tokens, dtype=torch.float32, device=device)
    counted = targets != ignore_index
    count = counted.sum().float()
    if class_weights is None:
        return (1.0 / count).expand(2).clone()
    weight_sum = torch.where(counted, class_weights[targets.clamp(0, class_weights.shape[0] - 1)], 0.0).sum()
    return 1.0 / torch.stack([weight_sum, count])


def _check_targets(op, targets, vocab, ignore_index):
    """On CPU a target out of range is an error; on GPU the check would cost a sync, so that row's loss and gradient
    are nan instead. Runs inside the custom ops, where the values are real even under torch.compile."""
    if targets.device.type != "cpu" or not targets.numel():
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if bad.any():
        index = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: targets must be in [0, {vocab}) or ignore_index ({ignore_index}); "
                         f"targets[{index}] is {int(targets[index])} (position in the flattened targets)")


# --- torch.library ops and autograd -----------------------------------------------------------------------------------


@torch.library.custom_op("aquila::cross_entropy_forward", mutates_args=())
def _forward_op(logits: Tensor, targets: Tensor, class_weights: Optional[Tensor], grad_scale: Tensor,
                ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, compute_grad: bool,
                compute_argmax: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_targets("cross_entropy", targets, logits.shape[1], ignore_index)
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    loss, lse, argmax = _row_losses(logits, targets, class_weights, grad_scale, grad if compute_grad else None,
                                    ignore_index, label_smoothing, z_loss, softcap, compute_argmax, backend)
    return loss, lse, argmax, grad


def _fake_row_outputs(rows, compute_argmax, like):
    """Fake tensors for _row_losses' outputs: loss, lse and argmax."""
    return (like.new_empty(rows, dtype=torch.float32), like.new_empty(rows, dtype=torch.float32),
            like.new_empty(rows if compute_argmax else 0, dtype=torch.int64))


@_forward_op.register_fake
def _(logits, targets, class_weights, grad_scale, ignore_index, label_smoothing, z_loss, softcap, compute_grad,
      compute_argmax, backend):
    grad = torch.empty_like(logits) if compute_grad else logits.new_empty(0)
    return *_fake_row_outputs(logits.shape[0], compute_argmax, logits), grad


@torch.library.custom_op("aquila::cross_entropy_forward_inplace", mutates_args=("logits",))
def _forward_inplace_op(logits: Tensor, targets: Tensor, class_weights: Optional[Tensor], grad_scale: Tensor,
                        ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, compute_argmax: bool,
                        backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _check_targets("cross_entropy", targets, logits.shape[1], ignore_index)
    return _row_losses(logits, targets, class_weights, grad_scale, logits, ignore_index, label_smoothing, z_loss,
                       softcap, compute_argmax, backend)


@_forward_inplace_op.register_fake
def _(logits, targets, class_weights, grad_scale, ignore_index, label_smoothing, z_loss, softcap, compute_argmax,
      backend):
    return _fake_row_outputs(logits.shape[0], compute_argmax, logits)


@torch.library.custom_op("aquila::scale_gradient_", mutates_args=("grad",))
def _scale_gradient_op(grad: Tensor, grad_output: Tensor) -> None:
    """grad *= grad_output (per row for a [rows] grad_output), skipping the pass when grad_output is exactly 1, as
    it is for a loss that is the one being differentiated."""
    if grad_output.dim() == 0 or grad_output.numel() == 1:
        if grad_output.item() != 1.0:
            grad.mul_(grad_output.reshape(()).to(grad.dtype))
    else:
        grad.mul_(grad_output.reshape(-1, *([1] * (grad.dim() - 1))).to(grad.dtype))


@_scale_gradient_op.register_fake
def _(grad, grad_output):
    return None


class CrossEntropyFunction(torch.autograd.Function):
    """Returns the reduced loss, and the rows' lse and argmax (empty unless compute_argmax) without gradients."""

    @staticmethod
    def forward(ctx, logits, targets, class_weights, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                reduction, inplace, compute_argmax, backend):
        compute_grad = ctx.needs_input_grad[0]
        if compute_grad and inplace:
            row_losses, row_lse, argmax = _forward_inplace_op(logits, targets, class_weights, grad_scale,
                                                              ignore_index, label_smoothing, z_loss, softcap,
                                                              compute_argmax, backend)
            grad = logits
            # The logits now hold their gradient: any other user of them in the graph must fail loudly.
            torch.autograd.graph.increment_version(logits)
        else:
            row_losses, row_lse, argmax, grad = _forward_op(logits, targets, class_weights, grad_scale, ignore_index,
                                                            label_smoothing, z_loss, softcap, compute_grad,
                                                            compute_argmax, backend)
        if compute_grad:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(row_lse, argmax)
        loss = _reduce(row_losses, row_lse, targets != ignore_index, grad_scale, z_loss, class_weights is not None,
                       reduction)
        return loss, row_lse, argmax

    @staticmethod
    def backward(ctx, grad_output, _, __):
        (grad,) = ctx.saved_tensors
        _scale_gradient_op(grad, grad_output)
        return (grad,) + (None,) * 11


# --- Fused linear cross-entropy ---------------------------------------------------------------------------------------


def _accumulate_product(accumulator, a, b):
    """accumulator (fp32) += a @ b for a, b in any float dtype, accumulating in fp32 without an fp32 copy of a or b
    where the device allows it."""
    if a.dtype == accumulator.dtype:
        accumulator.addmm_(a, b)
    elif a.is_cuda and "dtype_out" in torch.ops.aten.addmm.overloads():  # cuBLAS: 16-bit inputs, fp32 C (torch >= 2.8)
        torch.ops.aten.addmm.dtype_out(accumulator, a, b, torch.float32, out=accumulator)
    else:
        accumulator.addmm_(a.float(), b.float())


# Each chunk adds its weight gradient into a V x H fp32 accumulator: 8 V H bytes of traffic against 6 C V H FLOPs of
# matmuls. A chunk of C tokens keeps that traffic under about a tenth of the matmul time when C is above ~13x the
# device's FLOP/byte balance: ~25 for a 2-core AVX2 CPU, ~180 for an H100/H200.
MIN_CHUNK_TOKENS = {"cpu": 256, "cuda": 2048}


def default_chunk_size(tokens, hidden, vocab, device_type="cpu"):
    """Tokens per chunk: enough that a chunk's logits are at least as large as the hidden states, and at least
    MIN_CHUNK_TOKENS, rounded up to a multiple of 64."""
    lean = 64 * math.ceil(tokens * hidden / vocab / 64)
    return max(1, min(tokens, max(lean, MIN_CHUNK_TOKENS.get(device_type, 256))))


@_backend.autocast_off
def _linear_pass(hidden, weight, bias, targets, class_weights, grad_scale, row_grad_scale, ignore_index,
                 label_smoothing, z_loss, softcap, compute_grad, compute_argmax, chunk_size, backend):
    """Loss rows, lse rows, argmax rows (empty unless compute_argmax) and, if compute_grad, the gradients of the
    rows' losses scaled by grad_scale (times row_grad_scale[i] when given) for hidden [N, H], weight [V, H], bias [V]
    or None."""
    tokens = hidden.shape[0]
    vocab = weight.shape[0]
    row_losses = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    row_lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
    argmax = torch.empty(tokens if compute_argmax else 0, dtype=torch.int64, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if compute_grad else hidden.new_empty(0)
    weight_accumulator = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if compute_grad else None
    bias_accumulator = (torch.zeros(vocab, dtype=torch.float32, device=weight.device)
                        if compute_grad and bias is not None else None)
    for start in range(0, tokens, chunk_size):
        chunk = slice(start, start + chunk_size)
        h = hidden[chunk]
        logits = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        grad = logits if compute_grad else None  # the chunk's logits become its gradient, in place
        row_losses[chunk], row_lse[chunk], chunk_argmax = _row_losses(
            logits, targets[chunk], class_weights, grad_scale, grad, ignore_index, label_smoothing, z_loss, softcap,
            compute_argmax, backend)
        if compute_argmax:
            argmax[chunk] = chunk_argmax
        if not compute_grad:
            continue
        if row_grad_scale is not None:
            grad.mul_(row_grad_scale[chunk, None].to(grad.dtype))
        torch.mm(grad, weight, out=grad_hidden[chunk])
        _accumulate_product(weight_accumulator, grad.T, h)
        if bias_accumulator is not None:
            bias_accumulator += grad.sum(0, dtype=torch.float32)
    grad_weight = weight_accumulator.to(weight.dtype) if compute_grad else weight.new_empty(0)
    grad_bias = bias_accumulator.to(bias.dtype) if bias_accumulator is not None else weight.new_empty(0)
    return row_losses, row_lse, argmax, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("aquila::linear_cross_entropy", mutates_args=())
def _linear_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
               class_weights: Optional[Tensor], grad_scale: Tensor, row_grad_scale: Optional[Tensor],
               ignore_index: int, label_smoothing: float, z_loss: float, softcap: float, compute_grad: bool,
               compute_argmax: bool, chunk_size: int,
               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_targets("linear_cross_entropy", targets, weight.shape[0], ignore_index)
    return _linear_pass(hidden, weight, bias, targets, class_weights, grad_scale, row_grad_scale, ignore_index,
                        label_smoothing, z_loss, softcap, compute_grad, compute_argmax, chunk_size, backend)


@_linear_op.register_fake
def _(hidden, weight, bias, targets, class_weights, grad_scale, row_grad_scale, ignore_index, label_smoothing, z_loss,
      softcap, compute_grad, compute_argmax, chunk_size, backend):
    empty = hidden.new_empty(0)
    return (*_fake_row_outputs(hidden.shape[0], compute_argmax, hidden),
            torch.empty_like(hidden) if compute_grad else empty,
            torch.empty_like(weight) if compute_grad else empty,
            torch.empty_like(bias) if compute_grad and bias is not None else empty)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """For mean and sum reductions the gradients are computed during the forward, where each chunk's logits exist
    anyway; for reduction='none' they depend on a per-token grad_output, so the backward runs the chunks again.
    Returns the reduced loss, and the rows' lse and argmax (empty unless compute_argmax) without gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, class_weights, grad_scale, ignore_index, label_smoothing, z_loss,
                softcap, reduction, compute_argmax, chunk_size, backend):
        compute_grad = any(ctx.needs_input_grad[:3])
        eager_grad = compute_grad and reduction != "none"
        row_losses, row_lse, argmax, grad_hidden, grad_weight, grad_bias = _linear_op(
            hidden, weight, bias, targets, class_weights, grad_scale, None, ignore_index, label_smoothing, z_loss,
            softcap, eager_grad, compute_argmax, chunk_size, backend)
        ctx.eager_grad = eager_grad
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, True, False, chunk_size, backend)
        ctx.has_bias = bias is not None
        if eager_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        elif compute_grad:
            ctx.save_for_backward(hidden, weight, bias, targets, class_weights, grad_scale)
        ctx.mark_non_differentiable(row_lse, argmax)
        loss = _reduce(row_losses, row_lse, targets != ignore_index, grad_scale, z_loss, class_weights is not None,
                       reduction)
        return loss, row_lse, argmax

    @staticmethod
    def backward(ctx, grad_output, _, __):
        if ctx.eager_grad:
            grads = ctx.saved_tensors
            for grad in grads:
                if grad.numel():
                    _scale_gradient_op(grad, grad_output)
        else:
            hidden, weight, bias, targets, class_weights, grad_scale = ctx.saved_tensors
            *_, grad_hidden, grad_weight, grad_bias = _linear_op(hidden, weight, bias, targets, class_weights,
                                                                 grad_scale, grad_output.float(), *ctx.options)
            grads = grad_hidden, grad_weight, grad_bias
        grad_hidden, grad_weight, grad_bias = grads
        return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 11


# --- Public API -----------------------------------------------------------------------------------------------------


def _check_options(op, targets, device, vocab, ignore_index, label_smoothing, z_loss, softcap, reduction, num_tokens,
                   class_weights):
    _backend.check_tensor(op, "targets", targets, dtypes=(torch.int64, torch.int32), device=device)
    if not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not z_loss >= 0.0:
        raise ValueError(f"{op}: z_loss must be a number >= 0, got {z_loss!r}")
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(softcap, (int, float))
                                or not 0 < softcap < math.inf):
        raise ValueError(f"{op}: softcap must be None or a finite number > 0, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if num_tokens is not None:
        if reduction != "mean":
            raise ValueError(f"{op}: num_tokens divides a mean: it needs reduction='mean', got {reduction!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, (int, float)) or not num_tokens > 0:
            raise ValueError(f"{op}: num_tokens must be a number > 0, got {num_tokens!r}")
    if class_weights is not None:
        _backend.check_tensor(op, "class_weights", class_weights, dtypes=_backend.FLOAT_DTYPES + (torch.float64,),
                              device=device, shape=(vocab,))
        if class_weights.requires_grad:
            raise ValueError(f"{op}: class_weights get no gradient, but these require grad: pass "
                             "class_weights.detach()")


def _check_overwritable(op, logits, rows):
    """Refuses logits whose overwriting by their gradient would silently change other values."""
    if logits.is_leaf:
        raise ValueError(f"{op}: inplace_backward would overwrite leaf logits (a parameter's or an input's own "
                         "values): pass logits computed from them, or inplace_backward=False")
    if rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]:
        raise ValueError(f"{op}: inplace_backward needs logits whose rows do not overlap in memory, got strides "
                         f"{tuple(logits.stride())} for shape {tuple(logits.shape)} (an expanded view?): pass "
                         "logits.contiguous(), or inplace_backward=False")
    producer = logits.grad_fn
    for name in dir(producer):
        saved = getattr(producer, name, None) if name.startswith("_saved_") else None
        if isinstance(saved, Tensor) and saved.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr():
            raise ValueError(f"{op}: inplace_backward would overwrite logits that {type(producer).__name__} saved "
                             "for its backward: use inplace_backward=False")


def _result(loss, row_lse, argmax, targets, ignore_index, grad_scale, z_loss, reduction, return_z_loss,
            return_token_accuracy):
    """The loss in the targets' shape for reduction='none', or with return_z_loss or return_token_accuracy a
    CrossEntropyOutput."""
    shape = targets.shape
    flat_targets = targets.reshape(-1)
    loss = loss.view(shape) if reduction == "none" else loss
    if not (return_z_loss or return_token_accuracy):
        return loss
    counted = flat_targets != ignore_index
    z = accuracy = None
    if return_z_loss:
        rows = _row_z_losses(row_lse, counted, z_loss)
        z = {"none": rows.view(shape), "sum": rows.sum(), "mean": rows.sum() * grad_scale[1]}[reduction]
    if return_token_accuracy:
        correct = (argmax == flat_targets) & counted
        accuracy = correct.view(shape) if reduction == "none" else correct.sum() / counted.sum()
    return CrossEntropyOutput(loss, z, accuracy)


def cross_entropy(logits: Tensor, targets: Tensor, *, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0,
                  z_loss: float = 0.0, softcap: Optional[float] = None, reduction: str = "mean",
                  num_tokens: Optional[float] = None, inplace_backward: bool = False,
                  class_weights: Optional[Tensor] = None, return_z_loss: bool = False,
                  return_token_accuracy: bool = False,
                  backend: Optional[str] = None) -> Union[Tensor, CrossEntropyOutput]:
    """Softmax cross-entropy of logits [..., V] (fp32, fp16 or bf16) against integer targets [...]; the loss is fp32.

    ignore_index: targets that count for nothing (the mean is over the others; nan if there are none, like
        F.cross_entropy). label_smoothing: as in F.cross_entropy.
    class_weights: [V] float tensor, or None: F.cross_entropy's weight, label smoothing included; 'mean' divides
        by the sum of the counted targets' weights. Any sign, as in torch; no gradient (one requiring grad is
        refused).
    z_loss: adds z_loss * logsumexp^2 per counted token, unweighted by class_weights; 'mean' divides it by the number
        of counted tokens (the same as without class weights).
    softcap: the loss of softcap * tanh(logits / softcap) (Gemma 2's final logit softcapping), differentiated through
        the tanh.
    reduction: 'mean', 'sum' or 'none' (per token, in the targets' shape).
    num_tokens: for 'mean', divide by this instead (the ce and the z-loss alike), e.g. the target tokens of all
        micro-batches of an optimizer step (with class_weights: their weight sum), so that gradient accumulation
        gives the gradient of one big batch.
    return_z_loss, return_token_accuracy: return a CrossEntropyOutput(loss, z_loss, token_accuracy) with the z-loss
        term (reduced as the loss; per token for 'none') and the fraction of counted tokens whose largest (softcapped)
        logit is their target (for 'none': per token, as bools, False where ignored; not divided by num_tokens),
        None for what was not asked; neither has a gradient. Without them, the loss tensor alone.
    inplace_backward: write the gradient over the logits during the forward, saving a logits-sized buffer. It
        happens only when a gradient is needed (autograd on and logits requiring grad), and only when the logits
        are laid out with a contiguous last dimension (else the kernels work on a copy); the logits then hold
        their gradient once the call returns, and autograd refuses any later backward that needs their values.
        Refused: leaf logits (a parameter's or an input's own values), logits whose rows overlap in memory (an
        expanded view), and logits the operation that made them saved for its own backward.
    """
    op = "cross_entropy"
    _backend.check_tensor(op, "logits", logits)
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have a non-empty last (vocabulary) dimension, got {tuple(logits.shape)}")
    if not isinstance(targets, Tensor) or targets.shape != logits.shape[:-1]:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"{op}: targets must have shape {tuple(logits.shape[:-1])} (logits without their last "
                         f"dimension), got {shape}")
    _check_options(op, targets, logits.device, logits.shape[-1], ignore_index, label_smoothing, z_loss, softcap,
                   reduction, num_tokens, class_weights)
    softcap = float(softcap or 0.0)
    backward = _backend.needs_backward(logits)
    backend = _backend.resolve(IMPLEMENTATIONS, logits, backend, op=op, backward=backward, softcap=softcap,
                               class_weights=class_weights is not None, token_accuracy=return_token_accuracy)
    rows = _backend.as_rows(logits)
    if inplace_backward and backward and not torch.compiler.is_compiling():  # autograd's graph is not traceable
        _check_overwritable(op, logits, rows)
    flat_targets = targets.reshape(-1).to(torch.int64)
    class_weights = None if class_weights is None else class_weights.float()
    grad_scale = _grad_scale(flat_targets, class_weights, ignore_index, reduction, num_tokens, logits.device)
    loss, row_lse, argmax = CrossEntropyFunction.apply(
        rows, flat_targets, class_weights, grad_scale, ignore_index, float(label_smoothing), float(z_loss), softcap,
        reduction, bool(inplace_backward), bool(return_token_accuracy), backend)
    return _result(loss, row_lse, argmax, targets, ignore_index, grad_scale, float(z_loss), reduction, return_z_loss,
                   return_token_accuracy)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: Optional[float] = None, reduction: str = "mean", num_tokens: Optional[float] = None,
                         class_weights: Optional[Tensor] = None, return_z_loss: bool = False,
                         return_token_accuracy: bool = False, chunk_size: Optional[int] = None,
                         backend: Optional[str] = None) -> Union[Tensor, CrossEntropyOutput]:
    """cross_entropy(hidden @ weight.T + bias, targets) without materialising the logits: hidden [..., H],
    weight [V, H] (the lm_head; class weights are class_weights), bias [V] or None, targets [...]. Same options as
    cross_entropy; the token accuracy comes from the kernel's pass over each chunk's logits. Gradients for hidden,
    weight and bias; the weight's is summed in fp32. chunk_size: tokens per chunk; smaller saves memory (chunk x V
    logits), larger saves time (each chunk reads and writes the fp32 V x H weight-gradient accumulator once); the
    default is default_chunk_size."""
    op = "linear_cross_entropy"
    _backend.check_tensor(op, "hidden", hidden)
    if hidden.dim() == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"{op}: hidden must have a non-empty last dimension, got {tuple(hidden.shape)}")
    _backend.check_tensor(op, "weight", weight, device=hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have shape (vocab, {hidden.shape[-1]}) with vocab >= 1, got "
                         f"{tuple(weight.shape)}")
    vocab = weight.shape[0]
    if bias is not None:
        _backend.check_tensor(op, "bias", bias, device=hidden.device, shape=(vocab,))
    if not isinstance(targets, Tensor) or targets.shape != hidden.shape[:-1]:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(f"{op}: targets must have shape {tuple(hidden.shape[:-1])} (hidden without its last "
                         f"dimension), got {shape}")
    _check_options(op, targets, hidden.device, vocab, ignore_index, label_smoothing, z_loss, softcap, reduction,
                   num_tokens, class_weights)
    softcap = float(softcap or 0.0)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    # A matmul at heart: in autocast's dtype under autocast, as torch's linear; else in the inputs' common dtype.
    cast = _backend.autocast_dtype(hidden)
    if cast is not None:
        hidden, weight, bias = (None if t is None else t.to(cast) for t in (hidden, weight, bias))
    else:
        hidden, weight, bias = _backend.promoted(hidden, weight, bias)
    backend = _backend.resolve(IMPLEMENTATIONS, hidden, backend, op=op,
                               backward=_backend.needs_backward(hidden, weight, bias), softcap=softcap,
                               class_weights=class_weights is not None, token_accuracy=return_token_accuracy)
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(torch.int64)
    chunk_size = chunk_size or default_chunk_size(rows.shape[0], rows.shape[1], vocab, hidden.device.type)
    class_weights = None if class_weights is None else class_weights.float()
    grad_scale = _grad_scale(flat_targets, class_weights, ignore_index, reduction, num_tokens, hidden.device)
    loss, row_lse, argmax = LinearCrossEntropyFunction.apply(
        rows, weight, bias, flat_targets, class_weights, grad_scale, ignore_index, float(label_smoothing),
        float(z_loss), softcap, reduction, bool(return_token_accuracy), chunk_size, backend)
    return _result(loss, row_lse, argmax, targets, ignore_index, grad_scale, float(z_loss), reduction, return_z_loss,
                   return_token_accuracy)
