// RMSNorm on CUDA, forward and backward: the same arithmetic as csrc/cpu/rms_norm.cpp.
//
// A row is covered by a row group of threads (see RowTiling): thread t owns the packs t, t + blockDim.x, ... of
// kVec elements each. kVec is 16 bytes' worth of elements when pointers, strides and hidden allow 16-byte accesses,
// else 1. Rows of up to 1024 * 8 elements are kept in registers (kItems packs per thread) and read from memory once;
// longer rows are streamed twice (kItems == 0), the second read mostly from L1/L2. A thread reads back only what it
// wrote itself, so out, residual_out and grad_input may alias their inputs.
#include "cuda/common.cuh"

namespace aquila::cuda {
namespace {

// Elements of a row that each thread keeps in registers. 8 keeps every kernel within the 64 registers that a
// 1024-thread block allows (the forward holds the residual too while it loads, the backward x_hat, dy * w and dw).
constexpr int kForwardCached = 8;
constexpr int kBackwardCached = 8;
// Short rows share a block up to this size, so that an SM is not limited by its block count.
constexpr int kMinBlockThreads = 256;

// ---------------------------------------------------------------------------------------------------------------
// Forward.

// x + residual, rounded to T before the statistics so that the output is exactly rms_norm of the stored sum.
template <typename T, int kVec>
__device__ __forceinline__ void add_residual(float (&h)[kVec], const float (&r)[kVec], T* residual_out) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) h[e] = to_float(from_float<T>(h[e] + r[e]));
  store_from_float(residual_out, h);
}

// round_normalized: Llama's casting, h * rstd rounded to T before the weight multiplies it.
template <typename T, int kVec>
__device__ __forceinline__ void normalise(const float (&h)[kVec], float rstd, const float (&w)[kVec], T* out,
                                          bool round_normalized) {
  float y[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float n = h[e] * rstd;
    y[e] = (round_normalized ? to_float(from_float<T>(n)) : n) * w[e];
  }
  store_from_float(out, y);
}

template <int kVec>
__device__ __forceinline__ float sum_of_squares(const float (&h)[kVec]) {
  float s = 0.0f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) s += h[e] * h[e];
  return s;
}

template <typename T, int kVec, int kItems>
__global__ void __launch_bounds__(1024) rms_norm_forward_kernel(const __grid_constant__ RmsNormForward a) {
  __shared__ float scratch[2][32];
  const int packs = static_cast<int>(a.hidden / kVec);
  int parity = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * blockDim.y, parity ^= 1) {
    // Threads past the last row still take part in the reduction (it synchronises the block).
    const int64_t row = first + threadIdx.y;
    const bool live = row < a.rows;
    const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
    const T* residual = a.residual ? static_cast<const T*>(a.residual) + row * a.residual_row_stride : nullptr;
    T* residual_out = a.residual ? static_cast<T*>(a.residual_out) + row * a.hidden : nullptr;
    T* out = static_cast<T*>(a.out) + row * a.hidden;

    float sum_sq = 0.0f;
    float h[kItems > 0 ? kItems : 1][kVec];
    if constexpr (kItems > 0) {
      // All loads before any store: the stores may alias the inputs, so loads after one could not be issued early.
      float r[kItems][kVec];
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (live && p < packs) {
          load_as_float(x + p * kVec, h[k]);
          if (residual) load_as_float(residual + p * kVec, r[k]);
        }
      }
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (live && p < packs) {
          if (residual) add_residual(h[k], r[k], residual_out + p * kVec);
          sum_sq += sum_of_squares(h[k]);
        }
      }
    } else {
      for (int p = threadIdx.x; live && p < packs; p += blockDim.x) {
        load_as_float(x + p * kVec, h[0]);
        if (residual) {
          float r[kVec];
          load_as_float(residual + p * kVec, r);
          add_residual(h[0], r, residual_out + p * kVec);
        }
        sum_sq += sum_of_squares(h[0]);
      }
    }

    sum_sq = row_group_sum(sum_sq, scratch[parity]);
    if (!live) continue;
    // Correctly rounded steps: --use_fast_math would otherwise approximate the division and the square root.
    const float mean_sq = __fdiv_rn(sum_sq, static_cast<float>(a.hidden));
    const float rstd = __frsqrt_rn(__fadd_rn(mean_sq, static_cast<float>(a.eps)));
    if (threadIdx.x == 0) a.rstd[row] = rstd;

    if constexpr (kItems > 0) {
      float w[kItems][kVec];
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (p < packs) load_as_float(a.weight + p * kVec, w[k]);
      }
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (p < packs) normalise(h[k], rstd, w[k], out + p * kVec, a.round_normalized);
      }
    } else {
      // The normalised values again: residual_out as this thread stored it, else x.
      const T* in = residual ? residual_out : x;
      for (int p = threadIdx.x; p < packs; p += blockDim.x) {
        float w[kVec];
        load_as_float(in + p * kVec, h[0]);
        load_as_float(a.weight + p * kVec, w);
        normalise(h[0], rstd, w, out + p * kVec, a.round_normalized);
      }
    }
  }
}

template <typename T, int kVec>
void launch_forward(const RmsNormForward& a, cudaStream_t stream) {
  constexpr int kItems = kForwardCached / kVec;
  const RowTiling tiling = row_tiling(a.hidden / kVec, kItems, kMinBlockThreads);
  const dim3 block(tiling.threads_per_row, tiling.rows_per_block);
  const unsigned grid = grid_size(ceil_div(a.rows, tiling.rows_per_block));
  if (tiling.cached) {
    rms_norm_forward_kernel<T, kVec, kItems><<<grid, block, 0, stream>>>(a);
  } else {
    rms_norm_forward_kernel<T, kVec, 0><<<grid, block, 0, stream>>>(a);
  }
}

template <typename T>
void forward(const RmsNormForward& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = a.hidden % kVec == 0 && a.x_row_stride % kVec == 0 && is_aligned(a.x, 16) &&
                      is_aligned(a.out, 16) && is_aligned(a.weight, 16) &&
                      (!a.residual || (a.residual_row_stride % kVec == 0 && is_aligned(a.residual, 16) &&
                                       is_aligned(a.residual_out, 16)));
  if (packed) {
    launch_forward<T, kVec>(a, stream);
  } else {
    launch_forward<T, 1>(a, stream);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward. The grid is exactly partial_rows blocks; block b sums the weight gradient of its rows (b, b + grid, ...
// in units of blockDim.y rows) into row b of grad_weight_partials, in a fixed order: no atomics, deterministic.

// One pack of a row: loads dy, x and w, returns x_hat = x * rstd and gw = dy * w, and adds x_hat . gw to dot and
// dy * x_hat to dw.
template <typename T, int kVec>
__device__ __forceinline__ void pack_terms(const T* dy, const T* x, const float* w, float rstd, float (&x_hat)[kVec],
                                           float (&gw)[kVec], float& dot, float (&dw)[kVec]) {
  float g[kVec], wv[kVec];
  load_as_float(dy, g);
  load_as_float(x, x_hat);
  load_as_float(w, wv);
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    x_hat[e] *= rstd;
    gw[e] = g[e] * wv[e];
    dot += x_hat[e] * gw[e];
    dw[e] += g[e] * x_hat[e];
  }
}

// dx = rstd * (dy * w - x_hat * mean(x_hat . dy * w)) + grad_residual, where gr holds grad_residual or zeros.
template <typename T, int kVec>
__device__ __forceinline__ void store_input_grad(const float (&x_hat)[kVec], const float (&gw)[kVec], float rstd,
                                                 float mean_dot, const float (&gr)[kVec], T* dx) {
  float g[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) g[e] = rstd * (gw[e] - x_hat[e] * mean_dot) + gr[e];
  store_from_float(dx, g);
}

template <typename T, int kVec, int kItems>
__global__ void __launch_bounds__(1024) rms_norm_backward_kernel(const __grid_constant__ RmsNormBackward a) {
  extern __shared__ float group_dw[];  // rows_per_block x hidden, only when blockDim.y > 1: combines the row groups
  __shared__ float scratch[2][32];
  const int hidden = static_cast<int>(a.hidden);
  float* partial = a.grad_weight_partials + static_cast<int64_t>(blockIdx.x) * a.hidden;

  // The cached kernel sums the weight gradient of its columns in registers; the streaming one (long rows, always
  // one row group per block) in its own row of the partials, which no other block touches.
  float dw[kItems > 0 ? kItems : 1][kVec] = {};
  if constexpr (kItems == 0) {
    for (int c = threadIdx.x * kVec; c < hidden; c += blockDim.x * kVec) store_from_float(partial + c, dw[0]);
  }

  int parity = 0;
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * blockDim.y, parity ^= 1) {
    const int64_t row = first + threadIdx.y;
    const bool live = row < a.rows;
    const T* dy = static_cast<const T*>(a.grad_out) + row * a.grad_out_row_stride;
    const T* x = static_cast<const T*>(a.input) + row * a.input_row_stride;
    const T* grad_residual =
        a.grad_residual ? static_cast<const T*>(a.grad_residual) + row * a.grad_residual_row_stride : nullptr;
    T* dx = static_cast<T*>(a.grad_input) + row * a.hidden;
    const float rstd = live ? a.rstd[row] : 0.0f;

    float dot = 0.0f;
    float x_hat[kItems > 0 ? kItems : 1][kVec], gw[kItems > 0 ? kItems : 1][kVec];
    if constexpr (kItems > 0) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * kVec;
        if (live && c < hidden) pack_terms(dy + c, x + c, a.weight + c, rstd, x_hat[k], gw[k], dot, dw[k]);
      }
    } else {
      for (int c = threadIdx.x * kVec; live && c < hidden; c += blockDim.x * kVec) {
        load_as_float(partial + c, dw[0]);
        pack_terms(dy + c, x + c, a.weight + c, rstd, x_hat[0], gw[0], dot, dw[0]);
        store_from_float(partial + c, dw[0]);
      }
    }

    dot = row_group_sum(dot, scratch[parity]);
    if (!live) continue;
    const float mean_dot = __fdiv_rn(dot, static_cast<float>(hidden));  // correctly rounded despite fast-math

    if constexpr (kItems > 0) {
      // grad_residual loaded ahead of the stores, which may alias it.
      float gr[kItems][kVec] = {};
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * kVec;
        if (grad_residual && c < hidden) load_as_float(grad_residual + c, gr[k]);
      }
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * kVec;
        if (c < hidden) store_input_grad(x_hat[k], gw[k], rstd, mean_dot, gr[k], dx + c);
      }
    } else {
      // The row is too long to keep: read it again (mostly from L1/L2) and recompute its terms.
      for (int c = threadIdx.x * kVec; c < hidden; c += blockDim.x * kVec) {
        float unused_dot = 0.0f, unused_dw[kVec] = {}, gr[kVec] = {};
        pack_terms(dy + c, x + c, a.weight + c, rstd, x_hat[0], gw[0], unused_dot, unused_dw);
        if (grad_residual) load_as_float(grad_residual + c, gr);
        store_input_grad(x_hat[0], gw[0], rstd, mean_dot, gr, dx + c);
      }
    }
  }

  if constexpr (kItems > 0) {
    // Every element of the partial row is written, zeros included, so Python can sum the rows as they are.
    if (blockDim.y > 1) {
      // Several row groups: combine them through shared memory, row group 0 adding them in a fixed order.
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * kVec;
        if (c < hidden) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) group_dw[threadIdx.y * hidden + c + e] = dw[k][e];
        }
      }
      __syncthreads();
      if (threadIdx.y != 0) return;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int c = (threadIdx.x + k * blockDim.x) * kVec;
        if (c >= hidden) continue;
        for (int y = 1; y < static_cast<int>(blockDim.y); ++y) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) dw[k][e] += group_dw[y * hidden + c + e];
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int c = (threadIdx.x + k * blockDim.x) * kVec;
      if (c < hidden) store_from_float(partial + c, dw[k]);
    }
  }
}

template <typename T, int kVec>
void launch_backward(const RmsNormBackward& a, cudaStream_t stream) {
  constexpr int kItems = kBackwardCached / kVec;
  const RowTiling tiling = row_tiling(a.hidden / kVec, kItems, kMinBlockThreads);
  const dim3 block(tiling.threads_per_row, tiling.rows_per_block);
  // Row groups meet in shared memory only when they share a block; rows are then short (hidden <= 8 * 128).
  const size_t shared = tiling.rows_per_block > 1 ? tiling.rows_per_block * a.hidden * sizeof(float) : 0;
  const unsigned grid = static_cast<unsigned>(a.partial_rows);
  if (tiling.cached) {
    rms_norm_backward_kernel<T, kVec, kItems><<<grid, block, shared, stream>>>(a);
  } else {
    rms_norm_backward_kernel<T, kVec, 0><<<grid, block, shared, stream>>>(a);
  }
}

template <typename T>
void backward(const RmsNormBackward& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = a.hidden % kVec == 0 && a.grad_out_row_stride % kVec == 0 && a.input_row_stride % kVec == 0 &&
                      is_aligned(a.grad_out, 16) && is_aligned(a.input, 16) && is_aligned(a.weight, 16) &&
                      is_aligned(a.grad_input, 16) && is_aligned(a.grad_weight_partials, 16) &&
                      (!a.grad_residual ||
                       (a.grad_residual_row_stride % kVec == 0 && is_aligned(a.grad_residual, 16)));
  if (packed) {
    launch_backward<T, kVec>(a, stream);
  } else {
    launch_backward<T, 1>(a, stream);
  }
}

// Columns are indexed in 32 bits inside a row (rows and strides in 64): it saves registers in every kernel.
void check_hidden(int64_t hidden, const char* kernel) {
  if (hidden > INT_MAX) throw std::invalid_argument(std::string("aquila: ") + kernel + " supports hidden <= 2^31 - 1");
}

}  // namespace

void rms_norm_forward(const RmsNormForward& args, uintptr_t stream) {
  if (args.rows <= 0 || args.hidden <= 0) return;
  check_hidden(args.hidden, "rms_norm_forward");
  dispatch_dtype(args.dtype, [&](auto* tag) { forward<std::remove_pointer_t<decltype(tag)>>(args, as_stream(stream)); });
  check_launch("rms_norm_forward");
}

void rms_norm_backward(const RmsNormBackward& args, uintptr_t stream) {
  if (args.partial_rows < 1) throw std::invalid_argument("aquila: rms_norm_backward needs partial_rows >= 1");
  if (args.partial_rows > INT_MAX) throw std::invalid_argument("aquila: rms_norm_backward partial_rows is too large");
  // With no rows the kernel still runs: it writes the zero partials that Python will sum.
  if (args.rows < 0 || args.hidden <= 0) return;
  check_hidden(args.hidden, "rms_norm_backward");
  dispatch_dtype(args.dtype,
                 [&](auto* tag) { backward<std::remove_pointer_t<decltype(tag)>>(args, as_stream(stream)); });
  check_launch("rms_norm_backward");
}

}  // namespace aquila::cuda
