// LayerNorm on CPU (the maths in csrc/kernels.h): per row a pass for the mean, one for the variance and one for the
// output, the row staying in cache between them; OpenMP over rows.
#include <algorithm>
#include <cmath>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

template <typename T>
AQUILA_SIMD_CLONES void forward_kernel(const LayerNormForward& a, int threads) {
  const int64_t hidden = a.hidden;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < a.rows; ++row) {
    const T* __restrict x = static_cast<const T*>(a.x) + row * a.x_row_stride;
    T* __restrict out = static_cast<T*>(a.out) + row * hidden;
    const float* __restrict w = a.weight;
    const float* __restrict b = a.bias;
    const float mean = static_cast<float>(sum_over(hidden, [&](int64_t j) { return to_float(x[j]); }) / hidden);
    const double sum_sq = sum_over(hidden, [&](int64_t j) {
      const float deviation = to_float(x[j]) - mean;
      return deviation * deviation;
    });
    const float rstd = static_cast<float>(1.0 / std::sqrt(sum_sq / hidden + a.eps));
    a.mean[row] = mean;
    a.rstd[row] = rstd;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) out[j] = from_float<T>((to_float(x[j]) - mean) * rstd * w[j] + b[j]);
  }
}

template <typename T>
AQUILA_SIMD_CLONES void backward_kernel(const LayerNormBackward& a, int threads) {
  const int64_t hidden = a.hidden;
  // Each thread sums its rows' weight and bias gradients into its own rows of the partials; Python adds the rows.
  std::fill(a.grad_weight_partials, a.grad_weight_partials + a.partial_rows * hidden, 0.0f);
  std::fill(a.grad_bias_partials, a.grad_bias_partials + a.partial_rows * hidden, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* __restrict dw = a.grad_weight_partials + thread_id() * hidden;
    float* __restrict db = a.grad_bias_partials + thread_id() * hidden;
    const float* __restrict w = a.weight;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < a.rows; ++row) {
      const T* __restrict dy = static_cast<const T*>(a.grad_out) + row * a.grad_out_row_stride;
      const T* __restrict x = static_cast<const T*>(a.input) + row * a.input_row_stride;
      T* __restrict dx = static_cast<T*>(a.grad_input) + row * hidden;
      const float mean = a.mean[row], rstd = a.rstd[row];
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) {
        const float g = to_float(dy[j]);
        dw[j] += g * (to_float(x[j]) - mean) * rstd;
        db[j] += g;
      }
      const float mean_g = static_cast<float>(sum_over(hidden, [&](int64_t j) { return to_float(dy[j]) * w[j]; }) /
                                              hidden);
      const float mean_g_x_hat = static_cast<float>(
          sum_over(hidden, [&](int64_t j) { return to_float(dy[j]) * w[j] * (to_float(x[j]) - mean) * rstd; }) /
          hidden);
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) {
        const float x_hat = (to_float(x[j]) - mean) * rstd;
        dx[j] = from_float<T>(rstd * (to_float(dy[j]) * w[j] - mean_g - x_hat * mean_g_x_hat));
      }
    }
  }
}

}  // namespace

void layer_norm_forward(const LayerNormForward& args, int threads) {
  dispatch_dtype(args.dtype, [&](auto* tag) { forward_kernel<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

void layer_norm_backward(const LayerNormBackward& args, int threads) {
  if (args.partial_rows < threads)
    throw std::invalid_argument("aquila: layer_norm_backward needs a partial row per thread");
  dispatch_dtype(args.dtype, [&](auto* tag) { backward_kernel<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

}  // namespace aquila::cpu
