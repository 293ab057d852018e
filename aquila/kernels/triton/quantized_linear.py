"""The quantized linear layer's Triton kernels and their launchers (the format and the maths are in
aquila/kernels/quantized_linear.py).

forward: out = x W^T (+ bias). One program per BLOCK_M x BLOCK_N tile of the output, looping over the input features
BLOCK_K at a time: x's tile as it is, the weights' tile as stored (int8, or a byte per two columns, unpacked with a
mask and a shift and put back in column order with tl.join), the zero subtracted in integers. Those integers (|q -
zero| <= 15, or 127 for int8) are exact in fp16 and bf16, so 16-bit inputs multiply them on tensor cores (exact
products, fp32 accumulation) and the scale multiplies each step's partial sum: a step lies in one group when BLOCK_K
divides group_size; int8's one scale per row multiplies the row's sum at the end. A group size that no power of two
>= 16 divides dequantizes each weight, (q - zero) * scale, in fp32 and takes fp32 products.
backward: grad_x = grad_out W, one program per BLOCK_M x BLOCK_K tile of grad_x, looping over the output features.
The scale changes along that sum (one per output feature), so it multiplies grad_out's tile in fp32 and the products
are fp32 (IEEE) whatever the dtype: slower than tensor cores, and as accurate as the forward.
"""

import torch

from aquila.kernels.triton_compat import tl, triton


@triton.jit
def _weights(QWEIGHT, cols, col_mask, k0, in_features, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The integer weights (int32) of the rows `cols`, columns k0 .. k0 + BLOCK_K: [len(cols), BLOCK_K]."""
    rows = cols.to(tl.int64)[:, None]
    if BITS == 8:
        ks = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(QWEIGHT + rows * in_features + ks[None, :], mask=col_mask[:, None] & (ks < in_features)[None, :],
                    other=0).to(tl.int32)
    else:
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(QWEIGHT + rows * (in_features // 2) + half[None, :],
                         mask=col_mask[:, None] & (half < in_features // 2)[None, :], other=0).to(tl.int32)
        # Byte j holds column 2j in its low nibble and 2j + 1 in its high one: joined as [n, j, 2], then flattened.
        q = tl.join(packed & 15, packed >> 4).reshape(cols.shape[0], BLOCK_K)
    return q


@triton.jit
def _group_zero_scale(SCALES, ZEROS, cols, col_mask, group, groups, HAS_ZEROS: tl.constexpr):
    """The zero (int32) and scale (fp32) of group `group` of each row in `cols`."""
    offsets = cols.to(tl.int64) * groups + group
    scale = tl.load(SCALES + offsets, mask=col_mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(ZEROS + offsets, mask=col_mask, other=0).to(tl.int32)
    else:
        zero = tl.full(cols.shape, 8, tl.int32)
    return zero, scale


@triton.jit
def _dequantized(q, SCALES, ZEROS, cols, col_mask, k0, in_features, group_size, HAS_ZEROS: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """(q - zero) * scale in fp32, each column with its own group's: [len(cols), BLOCK_K]."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = col_mask[:, None] & (ks < in_features)[None, :]
    offsets = cols.to(tl.int64)[:, None] * (in_features // group_size) + (ks // group_size)[None, :]
    scale = tl.load(SCALES + offsets, mask=mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(ZEROS + offsets, mask=mask, other=0).to(tl.int32)
    else:
        zero = 8
    return (q - zero).to(tl.float32) * scale


@triton.jit
def _forward_kernel(X, x_row_stride, QWEIGHT, SCALES, ZEROS, BIAS, OUT, rows, in_features, out_features, group_size,
                    BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_ELEMENT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    n_blocks = tl.cdiv(out_features, BLOCK_N)
    block_m, block_n = tl.program_id(0) // n_blocks, tl.program_id(0) % n_blocks
    row_ids = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, col_mask = row_ids < rows, cols < out_features
    x_rows = X + row_ids.to(tl.int64)[:, None] * x_row_stride
    groups = in_features // group_size
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & (ks < in_features)[None, :], other=0.0)
        q = _weights(QWEIGHT, cols, col_mask, k0, in_features, BITS, BLOCK_K)
        if PER_ELEMENT:
            w = _dequantized(q, SCALES, ZEROS, cols, col_mask, k0, in_features, group_size, HAS_ZEROS, BLOCK_K)
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        elif BITS == 4:
            zero, scale = _group_zero_scale(SCALES, ZEROS, cols, col_mask, k0 // group_size, groups, HAS_ZEROS)
            w = (q - zero[:, None]).to(x.dtype)
            acc += tl.dot(x, tl.trans(w), input_precision=PRECISION) * scale[None, :]
        else:
            acc += tl.dot(x, tl.trans(q.to(x.dtype)), input_precision=PRECISION)
    if BITS == 8:
        acc *= tl.load(SCALES + cols, mask=col_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_mask, other=0.0)[None, :]
    out = OUT + row_ids.to(tl.int64)[:, None] * out_features + cols[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _backward_kernel(GRAD_OUT, grad_out_row_stride, QWEIGHT, SCALES, ZEROS, GRAD_X, rows, in_features, out_features,
                     group_size, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, PER_ELEMENT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k_blocks = tl.cdiv(in_features, BLOCK_K)
    block_m, block_k = tl.program_id(0) // k_blocks, tl.program_id(0) % k_blocks
    k0 = block_k * BLOCK_K
    row_ids = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = k0 + tl.arange(0, BLOCK_K)
    row_mask = row_ids < rows
    dy_rows = GRAD_OUT + row_ids.to(tl.int64)[:, None] * grad_out_row_stride
    groups = in_features // group_size
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for n0 in range(0, out_features, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < out_features
        dy = tl.load(dy_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        q = _weights(QWEIGHT, cols, col_mask, k0, in_features, BITS, BLOCK_K)
        if PER_ELEMENT:
            w = _dequantized(q, SCALES, ZEROS, cols, col_mask, k0, in_features, group_size, HAS_ZEROS, BLOCK_K)
            acc += tl.dot(dy, w, input_precision="ieee")
        elif BITS == 4:
            zero, scale = _group_zero_scale(SCALES, ZEROS, cols, col_mask, k0 // group_size, groups, HAS_ZEROS)
            acc += tl.dot(dy * scale[None, :], (q - zero[:, None]).to(tl.float32), input_precision="ieee")
        else:
            scale = tl.load(SCALES + cols, mask=col_mask, other=0.0)
            acc += tl.dot(dy * scale[None, :], q.to(tl.float32), input_precision="ieee")
    grad_x = GRAD_X + row_ids.to(tl.int64)[:, None] * in_features + ks[None, :]
    tl.store(grad_x, acc.to(GRAD_X.dtype.element_ty), mask=row_mask[:, None] & (ks < in_features)[None, :])


def _block_k(bits, group_size, widest):
    """(BLOCK_K, PER_ELEMENT): int8 takes the widest step; int4 the widest power of two (>= 16, tl.dot's least)
    that divides group_size, else the widest step with a scale per element."""
    if bits == 8:
        return widest, False
    divisor = group_size & -group_size  # the largest power of two dividing it
    return (min(divisor, widest), False) if divisor >= 16 else (widest, True)


def _precision(dtype):
    """fp32 inputs get true fp32 products (torch's default for fp32 matmuls), not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


# (BLOCK_M, BLOCK_N, widest BLOCK_K, num_warps, num_stages). Forward: a decoding step's few rows take a 16-row tile
# (tl.dot's least) and narrow column blocks, so that a matrix's rows spread over many programs. fp32 products (fp32
# inputs, the scale-per-element path, every backward) are FMAs that keep each thread's share of both operands in
# registers: small tiles over 8 warps (over 4 warps they took 200 to 255 registers a thread at sm_80/sm_90).
# tests/kernels/triton_compile_check.py holds each within the cards' shared memory as launched, without spills.
def _forward_config(rows, dtype, per_element):
    if dtype == torch.float32 or per_element:
        return (16, 32, 32, 8, 2) if rows <= 16 else (32, 32, 32, 8, 2)
    if rows <= 16:
        return 16, 32, 128, 4, 3
    return (64, 64, 64, 4, 3) if rows <= 64 else (128, 64, 64, 8, 3)


def _backward_config(rows):
    return (16, 32, 64, 8, 2) if rows <= 16 else (32, 32, 64, 8, 2)


def forward(x, qweight, scales, zeros, bias, bits, group_size, out):
    rows, in_features = x.shape
    out_features = out.shape[1]
    group_size = group_size or in_features
    _, _, widest, _, _ = _forward_config(rows, x.dtype, False)
    block_k, per_element = _block_k(bits, group_size, widest)
    block_m, block_n, widest, num_warps, num_stages = _forward_config(rows, x.dtype, per_element)
    block_k = min(block_k, widest)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(out_features, block_n),)
    _forward_kernel[grid](
        x, x.stride(0), qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales,
        out, rows, in_features, out_features, group_size, BITS=bits, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, PER_ELEMENT=per_element, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        PRECISION=_precision(x.dtype), num_warps=num_warps, num_stages=num_stages)


def backward(grad_out, qweight, scales, zeros, bits, group_size, grad_x):
    rows, in_features = grad_x.shape
    group_size = group_size or in_features
    block_m, block_n, widest, num_warps, num_stages = _backward_config(rows)
    block_k, per_element = _block_k(bits, group_size, widest)
    if per_element:  # the scales and zeros of a [BLOCK_N, BLOCK_K] tile gathered too: 245 registers at 64
        block_k = 32
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(in_features, block_k),)
    _backward_kernel[grid](
        grad_out, grad_out.stride(0), qweight, scales, zeros if zeros is not None else scales, grad_x, rows,
        in_features, grad_out.shape[1], group_size, BITS=bits, HAS_ZEROS=zeros is not None,
        PER_ELEMENT=per_element, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages)


# What the launch-time compile check (tests/kernels/triton_compile_check.py) drives the launchers over: each kind of
# weights (int8; int4 symmetric and asymmetric with a group of 128, a group of 32 and one of 6, which takes the scale
# per element), a decoding step's rows and a prefill's (each forward tile class), in every dtype, with a bias, at
# aligned sizes and at odd ones (Triton specialises on divisibility by 16).
LAUNCH_WEIGHTS = ((8, None, False), (4, 128, False), (4, 128, True), (4, 32, True), (4, 6, False))
LAUNCH_ROWS = (1, 40, 100)
LAUNCH_SHAPES = ((384, 96), (768, 37))  # (in_features, out_features): multiples of 128 and 6


def launch_cases(weights=LAUNCH_WEIGHTS, rows=LAUNCH_ROWS, shapes=LAUNCH_SHAPES,
                 dtypes=(torch.bfloat16, torch.float16, torch.float32)):
    """[(name, thunk)]: each thunk runs forward and backward below on small CPU tensors of one kind of weights, row
    count, shape and dtype, as aquila.kernels.quantized_linear calls them (x [rows, in] with unit last stride, bias
    fp32)."""
    def case(dtype, bits, group_size, asymmetric, count, in_features, out_features):
        def run():
            x, grad_out = torch.zeros(count, in_features, dtype=dtype), torch.zeros(count, out_features, dtype=dtype)
            out, grad_x = torch.zeros(count, out_features, dtype=dtype), torch.zeros(count, in_features, dtype=dtype)
            if bits == 8:
                qweight, scales = torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features)
            else:
                qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
                scales = torch.ones(out_features, in_features // group_size)
            zeros = torch.zeros(scales.shape, dtype=torch.uint8) if asymmetric else None
            forward(x, qweight, scales, zeros, torch.zeros(out_features), bits, group_size, out)
            backward(grad_out, qweight, scales, zeros, bits, group_size, grad_x)
        kind = "int8" if bits == 8 else f"int4 g{group_size} {'asym' if asymmetric else 'sym'}"
        return f"quantized_linear {str(dtype)[6:]} {kind} rows={count} {in_features}->{out_features}", run

    return [case(dtype, bits, group_size, asymmetric, count, in_features, out_features)
            for dtype in dtypes for bits, group_size, asymmetric in weights for count in rows
            for in_features, out_features in shapes]
