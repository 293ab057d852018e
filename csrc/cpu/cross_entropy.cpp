// Softmax cross-entropy on CPU (the math is in csrc/kernels.h). One read of each row from memory for the loss:
// the row streams through L1 in chunks, each chunk's maximum rescales the running sum (online softmax) before its
// exponentials are added. The gradient is a second pass, written in place over the logits when the caller asks.
#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

constexpr int64_t kChunk = 2048;  // 8 KiB of fp32 logits: the chunk is re-read from L1

// A row's logit as the loss sees it: x itself, or softcapped to c tanh(x / c).
template <bool kCapped, typename T>
AQUILA_INLINE float logit(T x, float cap) {
  if constexpr (kCapped) {
    float t, slope;
    tanh_and_slope(to_float(x) / cap, t, slope);
    return cap * t;
  } else {
    return to_float(x);
  }
}

// d(capped logit) / d(logit): 1 - tanh^2(x / c), or 1 without softcapping.
template <bool kCapped, typename T>
AQUILA_INLINE float logit_slope(T x, float cap) {
  if constexpr (kCapped) {
    float t, slope;
    tanh_and_slope(to_float(x) / cap, t, slope);
    return slope;
  } else {
    return 1.0f;
  }
}

template <typename T, bool kCapped>
AQUILA_SIMD_CLONES void cross_entropy_kernel(const CrossEntropy& a, int threads) {
  const int64_t vocab = a.vocab;
  const float eps = static_cast<float>(a.label_smoothing);
  const float uniform = eps / static_cast<float>(vocab);
  const float scale = a.grad ? *a.grad_scale : 0.0f;
  const float cap = static_cast<float>(a.softcap);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t row = 0; row < a.rows; ++row) {
    // Not __restrict: grad may be the logits themselves.
    const T* z = static_cast<const T*>(a.logits) + row * a.logits_row_stride;
    const auto value = [&](int64_t j) { return logit<kCapped>(z[j], cap); };
    const int64_t target = a.targets[row];
    // The sum of exp(z - max) as the target's term plus all the others', kept apart: the gradient's p_t - 1 is
    // -others / sum, which keeps its digits when p_t is near 1 (p_t - 1 itself would cancel them away).
    float max = -std::numeric_limits<float>::infinity();
    double others = 0.0, target_exp = 0.0, sum_z = 0.0;
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const float chunk_max = max_over(n, [&](int64_t j) { return value(start + j); });
      if (chunk_max > max) {
        const double rescale = std::exp(static_cast<double>(max) - chunk_max);
        others *= rescale;
        target_exp *= rescale;
        max = chunk_max;
      }
      const float m = max;
      const int64_t t = target - start;
      if (t >= 0 && t < n) {
        others += sum_over(n, [&](int64_t j) { return j == t ? 0.0f : exp_nonpositive(value(start + j) - m); });
        target_exp += exp_nonpositive(value(target) - m);
      } else {
        others += sum_over(n, [&](int64_t j) { return exp_nonpositive(value(start + j) - m); });
      }
      if (eps != 0.0f) sum_z += sum_over(n, [&](int64_t j) { return value(start + j); });
    }
    const double sum_exp = others + target_exp;
    const double log_sum = std::log(sum_exp);
    const double lse = max + log_sum;
    a.lse[row] = static_cast<float>(lse);

    const bool ignored = target == a.ignore_index;
    const bool valid = target >= 0 && target < vocab;
    float loss = 0.0f;
    if (!ignored) {
      // lse - z_t as log_sum + (max - z_t): for a confident prediction both are small and exact, where lse - z_t
      // would cancel away the digits of a loss near 0.
      loss = valid ? static_cast<float>(log_sum + (1.0 - a.label_smoothing) * (max - value(target)) +
                                        a.label_smoothing * (max - sum_z / vocab) + a.z_loss * lse * lse)
                   : std::numeric_limits<float>::quiet_NaN();
    }
    a.loss[row] = loss;
    if (!a.grad) continue;

    T* grad = static_cast<T*>(a.grad) + row * a.grad_row_stride;
    const float row_scale = ignored ? 0.0f : valid ? scale : std::numeric_limits<float>::quiet_NaN();
    const float lse_f = static_cast<float>(lse);
    const float softmax_scale = row_scale * static_cast<float>(1.0 + 2.0 * a.z_loss * lse);
    // The target's gradient, read before the loop below may overwrite its logit (grad may be the logits).
    const float target_slope = valid ? logit_slope<kCapped>(z[target], cap) : 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) {
      const float g = exp_nonpositive(value(j) - lse_f) * softmax_scale - row_scale * uniform;
      grad[j] = from_float<T>(g * logit_slope<kCapped>(z[j], cap));
    }
    if (valid && !ignored) {
      // p_t c - (1 - eps) - eps / V with c = 1 + 2 lambda lse, as (p_t - 1) c + (c - 1) + eps - eps / V.
      const double c = 1.0 + 2.0 * a.z_loss * lse;
      grad[target] = from_float<T>(static_cast<float>(
          row_scale * (-(others / sum_exp) * c + (c - 1.0) + a.label_smoothing - a.label_smoothing / vocab)) *
          target_slope);
    }
  }
}

}  // namespace

void cross_entropy(const CrossEntropy& args, int threads) {
  if (args.vocab < 1) throw std::invalid_argument("aquila: cross_entropy needs vocab >= 1");
  if (!(args.softcap >= 0.0)) throw std::invalid_argument("aquila: cross_entropy needs softcap >= 0");
  dispatch_dtype(args.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (args.softcap > 0.0) {
      cross_entropy_kernel<T, true>(args, threads);
    } else {
      cross_entropy_kernel<T, false>(args, threads);
    }
  });
}

}  // namespace aquila::cpu
