// RMSNorm on CPU: one pass per row for the statistics, one for the output, OpenMP over rows.
#include <algorithm>
#include <cmath>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

template <typename T>
AQUILA_SIMD_CLONES void forward_kernel(const RmsNormForward& a, int threads) {
  const int64_t hidden = a.hidden;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < a.rows; ++row) {
    const T* __restrict x = static_cast<const T*>(a.x) + row * a.x_row_stride;
    T* __restrict out = static_cast<T*>(a.out) + row * hidden;
    const float* __restrict w = a.weight;
    const T* input = x;
    if (a.residual) {
      // The sum is rounded to T before the statistics: the output is exactly rms_norm(x + residual) as stored.
      const T* __restrict r = static_cast<const T*>(a.residual) + row * a.residual_row_stride;
      T* __restrict h = static_cast<T*>(a.residual_out) + row * hidden;
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) h[j] = from_float<T>(to_float(x[j]) + to_float(r[j]));
      input = h;
    }
    const T* __restrict in = input;
    const double sum_sq = sum_over(hidden, [&](int64_t j) {
      const float v = to_float(in[j]);
      return v * v;
    });
    const float rstd = static_cast<float>(1.0 / std::sqrt(sum_sq / hidden + a.eps));
    a.rstd[row] = rstd;
    if (a.round_normalized) {
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) {
        const float normalised = to_float(from_float<T>(to_float(in[j]) * rstd));
        out[j] = from_float<T>(normalised * w[j]);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) out[j] = from_float<T>(to_float(in[j]) * rstd * w[j]);
    }
  }
}

// dx may be dy's buffer (inplace_backward), and grad_residual may be dy itself: each element is read before it is
// written and never again after, which holds without __restrict on those three.
template <typename T>
AQUILA_INLINE void store_grad_input(const T* dy, const T* __restrict x, const float* __restrict w,
                                    const T* grad_residual, T* dx, float rstd, float mean_dot, int64_t hidden) {
#pragma omp simd
  for (int64_t j = 0; j < hidden; ++j) {
    const float x_hat = to_float(x[j]) * rstd;
    float g = rstd * (to_float(dy[j]) * w[j] - x_hat * mean_dot);
    if (grad_residual) g += to_float(grad_residual[j]);
    dx[j] = from_float<T>(g);
  }
}

template <typename T>
AQUILA_SIMD_CLONES void backward_kernel(const RmsNormBackward& a, int threads) {
  const int64_t hidden = a.hidden;
  // Each thread sums its rows' weight gradient into its own row of the partials; Python adds the rows.
  std::fill(a.grad_weight_partials, a.grad_weight_partials + a.partial_rows * hidden, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* __restrict dw = a.grad_weight_partials + thread_id() * hidden;
    const float* __restrict w = a.weight;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.rows; ++row) {
      const T* dy = static_cast<const T*>(a.grad_out) + row * a.grad_out_row_stride;  // may be grad_input's row
      const T* __restrict x = static_cast<const T*>(a.input) + row * a.input_row_stride;
      const T* grad_residual =
          a.grad_residual ? static_cast<const T*>(a.grad_residual) + row * a.grad_residual_row_stride : nullptr;
      const float rstd = a.rstd[row];
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) dw[j] += to_float(dy[j]) * to_float(x[j]) * rstd;
      const double dot = sum_over(hidden, [&](int64_t j) { return to_float(x[j]) * rstd * (to_float(dy[j]) * w[j]); });
      const float mean_dot = static_cast<float>(dot / hidden);
      T* dx = static_cast<T*>(a.grad_input) + row * hidden;
      if (grad_residual) {
        store_grad_input(dy, x, w, grad_residual, dx, rstd, mean_dot, hidden);
      } else {
        store_grad_input<T>(dy, x, w, nullptr, dx, rstd, mean_dot, hidden);
      }
    }
  }
}

}  // namespace

void rms_norm_forward(const RmsNormForward& args, int threads) {
  dispatch_dtype(args.dtype, [&](auto* tag) { forward_kernel<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

void rms_norm_backward(const RmsNormBackward& args, int threads) {
  if (args.partial_rows < threads) throw std::invalid_argument("aquila: rms_norm_backward needs a partial row per thread");
  dispatch_dtype(args.dtype, [&](auto* tag) { backward_kernel<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

}  // namespace aquila::cpu
