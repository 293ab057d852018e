// Gated linear units on CPU (the maths is in csrc/kernels.h): elementwise, OpenMP over rows, the activation and its
// derivative in vectorisable fp32 arithmetic (exp through exp_nonpositive; the exact GELU's erf is scalar).
#include <cmath>
#include <type_traits>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;  // the tanh approximation's sqrt(2 / pi)
constexpr float kCubic = 0.044715f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// act(g) and act'(g). sigmoid and tanh from exp of a non-positive argument only, so nothing overflows.
template <GluActivation Act>
AQUILA_INLINE void activation(float g, float& act, float& slope) {
  if constexpr (Act == GluActivation::silu) {
    const float e = exp_nonpositive(-std::fabs(g));
    const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    act = g * sigmoid;
    slope = sigmoid * (1.0f + g * (1.0f - sigmoid));
  } else if constexpr (Act == GluActivation::gelu_tanh) {
    const float z = kSqrt2OverPi * (g + kCubic * g * g * g);
    const float e = exp_nonpositive(-2.0f * std::fabs(z));
    const float t = std::copysign((1.0f - e) / (1.0f + e), z);
    act = 0.5f * g * (1.0f + t);
    slope = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kCubic * g * g);
  } else {
    const float cdf = 0.5f * (1.0f + std::erf(g * kInvSqrt2));
    act = g * cdf;
    slope = cdf + g * kInvSqrt2Pi * exp_nonpositive(-0.5f * g * g);
  }
}

template <typename T, GluActivation Act>
AQUILA_SIMD_CLONES void forward_kernel(const GluForward& a, int threads) {
  const int64_t cols = a.cols;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < a.rows; ++row) {
    const T* __restrict gate = static_cast<const T*>(a.gate) + row * a.gate_row_stride;
    const T* __restrict up = static_cast<const T*>(a.up) + row * a.up_row_stride;
    T* __restrict out = static_cast<T*>(a.out) + row * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      float act, slope;
      activation<Act>(to_float(gate[j]), act, slope);
      out[j] = from_float<T>(act * to_float(up[j]));
    }
  }
}

template <typename T, GluActivation Act>
AQUILA_SIMD_CLONES void backward_kernel(const GluBackward& a, int threads) {
  const int64_t cols = a.cols;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t row = 0; row < a.rows; ++row) {
    const T* __restrict dy = static_cast<const T*>(a.grad_out) + row * a.grad_out_row_stride;
    const T* __restrict gate = static_cast<const T*>(a.gate) + row * a.gate_row_stride;
    const T* __restrict up = static_cast<const T*>(a.up) + row * a.up_row_stride;
    T* __restrict grad_gate = static_cast<T*>(a.grad_gate) + row * cols;
    T* __restrict grad_up = static_cast<T*>(a.grad_up) + row * cols;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      float act, slope;
      activation<Act>(to_float(gate[j]), act, slope);
      const float g = to_float(dy[j]);
      grad_gate[j] = from_float<T>(g * to_float(up[j]) * slope);
      grad_up[j] = from_float<T>(g * act);
    }
  }
}

// Calls fn with a null pointer of the element type and the activation as a compile-time constant.
template <typename Fn>
void dispatch(DType dtype, GluActivation act, Fn&& fn) {
  dispatch_dtype(dtype, [&](auto* tag) {
    switch (act) {
      case GluActivation::silu: return fn(tag, std::integral_constant<GluActivation, GluActivation::silu>{});
      case GluActivation::gelu: return fn(tag, std::integral_constant<GluActivation, GluActivation::gelu>{});
      case GluActivation::gelu_tanh:
        return fn(tag, std::integral_constant<GluActivation, GluActivation::gelu_tanh>{});
    }
  });
}

}  // namespace

void glu_forward(const GluForward& args, int threads) {
  dispatch(args.dtype, args.activation, [&](auto* tag, auto act) {
    forward_kernel<std::remove_pointer_t<decltype(tag)>, decltype(act)::value>(args, threads);
  });
}

void glu_backward(const GluBackward& args, int threads) {
  dispatch(args.dtype, args.activation, [&](auto* tag, auto act) {
    backward_kernel<std::remove_pointer_t<decltype(tag)>, decltype(act)::value>(args, threads);
  });
}

}  // namespace aquila::cpu
