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

// The index of the first largest of value(j) for j < n (0 when none is above -inf). Scalar: only a chunk that raises
// the row's maximum is scanned.
template <typename Value>
AQUILA_INLINE int64_t first_max_index(int64_t n, Value value) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t index = 0;
  for (int64_t j = 0; j < n; ++j) {
    const float v = value(j);
    if (v > best) {
      best = v;
      index = j;
    }
  }
  return index;
}

// A class's weight: w_j, or 1 without class weights.
template <bool kWeighted>
AQUILA_INLINE float class_weight(const float* weights, int64_t j) {
  if constexpr (kWeighted) {
    return weights[j];
  } else {
    return 1.0f;
  }
}

template <typename T, bool kCapped, bool kWeighted>
AQUILA_SIMD_CLONES void cross_entropy_kernel(const CrossEntropy& a, int threads) {
  const int64_t vocab = a.vocab;
  const float eps = static_cast<float>(a.label_smoothing);
  const float scale = a.grad ? a.grad_scale[0] : 0.0f;
  const float z_scale = a.grad ? a.grad_scale[1] : 0.0f;
  const float cap = static_cast<float>(a.softcap);
  const float* weights = a.class_weights;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t row = 0; row < a.rows; ++row) {
    // Not __restrict: grad may be the logits themselves.
    const T* z = static_cast<const T*>(a.logits) + row * a.logits_row_stride;
    const auto value = [&](int64_t j) { return logit<kCapped>(z[j], cap); };
    const int64_t target = a.targets[row];
    // The sum of exp(z - max) as the target's term plus all the others', kept apart: the gradient's p_t - 1 is
    // -others / sum, which keeps its digits when p_t is near 1 (p_t - 1 itself would cancel them away).
    float max = -std::numeric_limits<float>::infinity();
    int64_t argmax = 0;
    double others = 0.0, target_exp = 0.0, sum_wz = 0.0, sum_w = 0.0;
    for (int64_t start = 0; start < vocab; start += kChunk) {
      const int64_t n = std::min(kChunk, vocab - start);
      const float chunk_max = max_over(n, [&](int64_t j) { return value(start + j); });
      if (chunk_max > max) {
        const double rescale = std::exp(static_cast<double>(max) - chunk_max);
        others *= rescale;
        target_exp *= rescale;
        max = chunk_max;
        if (a.argmax) argmax = start + first_max_index(n, [&](int64_t j) { return value(start + j); });
      }
      const float m = max;
      const int64_t t = target - start;
      if (t >= 0 && t < n) {
        others += sum_over(n, [&](int64_t j) { return j == t ? 0.0f : exp_nonpositive(value(start + j) - m); });
        target_exp += exp_nonpositive(value(target) - m);
      } else {
        others += sum_over(n, [&](int64_t j) { return exp_nonpositive(value(start + j) - m); });
      }
      if (eps != 0.0f) {
        sum_wz += sum_over(n, [&](int64_t j) {
          return class_weight<kWeighted>(weights, start + j) * value(start + j);
        });
        sum_w += kWeighted ? sum_over(n, [&](int64_t j) { return weights[start + j]; }) : static_cast<double>(n);
      }
    }
    if (a.argmax) a.argmax[row] = argmax;
    const double sum_exp = others + target_exp;
    const double log_sum = std::log(sum_exp);
    const double lse = max + log_sum;
    a.lse[row] = static_cast<float>(lse);

    const bool ignored = target == a.ignore_index;
    const bool valid = target >= 0 && target < vocab;
    const bool counted = valid && !ignored;
    const double target_class_weight = counted ? class_weight<kWeighted>(weights, target) : 0.0;
    const double target_weight = (1.0 - a.label_smoothing) * target_class_weight;  // (1 - eps) w_t
    const double smoothing_mass = a.label_smoothing * sum_w / vocab;                // eps W / V
    float loss = 0.0f;
    if (!ignored) {
      // lse - z_t as log_sum + (max - z_t): for a confident prediction both are small and exact, where lse - z_t
      // would cancel away the digits of a loss near 0. Likewise sum_j w_j (lse - z_j).
      loss = valid ? static_cast<float>((target_weight + smoothing_mass) * log_sum +
                                        target_weight * (max - value(target)) + smoothing_mass * max -
                                        a.label_smoothing * sum_wz / vocab + a.z_loss * lse * lse)
                   : std::numeric_limits<float>::quiet_NaN();
    }
    a.loss[row] = loss;
    if (!a.grad) continue;

    T* grad = static_cast<T*>(a.grad) + row * a.grad_row_stride;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float row_scale = ignored ? 0.0f : valid ? scale : nan;
    const double z_loss_slope = ignored ? 0.0 : 2.0 * a.z_loss * lse * (valid ? z_scale : nan);  // of s_z lambda lse^2
    const double coefficient = row_scale * (target_weight + smoothing_mass) + z_loss_slope;
    const float coefficient_f = static_cast<float>(coefficient);
    const float uniform = row_scale * eps / static_cast<float>(vocab);  // times w_j
    const float lse_f = static_cast<float>(lse);
    // The target's gradient, read before the loop below may overwrite its logit (grad may be the logits).
    const float target_slope = valid ? logit_slope<kCapped>(z[target], cap) : 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < vocab; ++j) {
      const float g =
          exp_nonpositive(value(j) - lse_f) * coefficient_f - uniform * class_weight<kWeighted>(weights, j);
      grad[j] = from_float<T>(g * logit_slope<kCapped>(z[j], cap));
    }
    if (counted) {
      // p_t a' - s (1 - eps) w_t - s eps w_t / V (a' = the coefficient) as (p_t - 1) a' + s eps W / V
      // + s_z 2 lambda lse - s eps w_t / V, with p_t - 1 = -others / sum.
      grad[target] = from_float<T>(static_cast<float>(
          -(others / sum_exp) * coefficient + row_scale * smoothing_mass + z_loss_slope -
          static_cast<double>(uniform) * target_class_weight) * target_slope);
    }
  }
}

}  // namespace

void cross_entropy(const CrossEntropy& args, int threads) {
  if (args.vocab < 1) throw std::invalid_argument("aquila: cross_entropy needs vocab >= 1");
  if (!(args.softcap >= 0.0)) throw std::invalid_argument("aquila: cross_entropy needs softcap >= 0");
  dispatch_dtype(args.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const bool weighted = args.class_weights != nullptr;
    if (args.softcap > 0.0) {
      weighted ? cross_entropy_kernel<T, true, true>(args, threads)
               : cross_entropy_kernel<T, true, false>(args, threads);
    } else {
      weighted ? cross_entropy_kernel<T, false, true>(args, threads)
               : cross_entropy_kernel<T, false, false>(args, threads);
    }
  });
}

}  // namespace aquila::cpu
