// Shared pieces of the CPU kernels: element types, conversions to and from fp32, and runtime SIMD dispatch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace aquila::cpu {

// One binary runs everywhere: GCC compiles each hot function three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2,
// FMA, F16C) and the x86-64 baseline, and picks one at load time. -march=native would tie the build to the machine
// that built it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AQUILA_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AQUILA_SIMD_CLONES
#endif

#define AQUILA_INLINE inline __attribute__((always_inline))

// Kernels whose register tiling depends on the vector width (target_clones compiles one body, so one tiling, for
// every ISA) instead compile a function per ISA with these attributes and pick one with simd_level(). Everything the
// function calls must be AQUILA_INLINE: a function that is not inlined is compiled for the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define AQUILA_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
#define AQUILA_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define AQUILA_HAVE_SIMD_TARGETS 1
#else
#define AQUILA_TARGET_AVX2
#define AQUILA_TARGET_AVX512
#define AQUILA_HAVE_SIMD_TARGETS 0
#endif

struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;

AQUILA_INLINE float to_float(float v) { return v; }
AQUILA_INLINE float to_float(f16 v) { return static_cast<float>(v); }
AQUILA_INLINE float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
AQUILA_INLINE T from_float(float v);
template <>
AQUILA_INLINE float from_float<float>(float v) { return v; }
template <>
AQUILA_INLINE f16 from_float<f16>(float v) { return static_cast<f16>(v); }
template <>
AQUILA_INLINE bf16 from_float<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // round to nearest, ties to even
  return bf16{static_cast<uint16_t>(v != v ? 0x7FC0u : rounded)};
}

// Calls fn with a null pointer of the element type that `dtype` names, so one template serves every dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(static_cast<float*>(nullptr)); return;
    case DType::f16: fn(static_cast<f16*>(nullptr)); return;
    case DType::bf16: fn(static_cast<bf16*>(nullptr)); return;
  }
  throw std::invalid_argument("aquila: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

// Sum of term(j) for j < n. Accumulating in 32 independent fp32 lanes (four AVX2 registers) hides the latency of
// the adds, which a single accumulator would expose, and keeps each lane's error at that of a few hundred terms; the
// lanes and the tail are added in double.
template <typename Term>
AQUILA_INLINE double sum_over(int64_t n, Term term) {
  constexpr int kLanes = 32;
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) lanes[k] += term(j + k);
  }
  double total = 0.0;
  for (; j < n; ++j) total += term(j);
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// Largest of value(j) for j < n, over 32 independent lanes as in sum_over; -inf for n == 0.
template <typename Value>
AQUILA_INLINE float max_over(int64_t n, Value value) {
  constexpr int kLanes = 32;
  float lanes[kLanes];
  for (int k = 0; k < kLanes; ++k) lanes[k] = -__builtin_inff();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) {
      const float v = value(j + k);
      lanes[k] = lanes[k] > v ? lanes[k] : v;
    }
  }
  float best = -__builtin_inff();
  for (; j < n; ++j) best = best > value(j) ? best : value(j);
  for (int k = 0; k < kLanes; ++k) best = best > lanes[k] ? best : lanes[k];
  return best;
}

// exp(x) for x <= 0 (softmax arguments), in plain float arithmetic that the compiler vectorises (std::exp stays
// scalar without -ffast-math). exp(x) = 2^k exp(r), r = x - k ln2 in [-ln2/2, ln2/2], exp(r) by its Taylor series
// to r^7 (truncation error < 2e-8 relative); about 2 ulps in all. Results below 2^-126 (x < -87.3) are 0.
AQUILA_INLINE float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;
  // Round to nearest by adding and removing 1.5 * 2^23 (no libm call, so the loop vectorises).
  const float k = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - k * 0.693359375f) + k * 2.12194440e-4f;  // ln2 in two parts: k * hi is exact
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // 2^k from its exponent bits, and 0 below the range.
  const int32_t exponent_bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &exponent_bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

// tanh(y) and its derivative 1 - tanh(y)^2 in vectorisable fp32 arithmetic, each within a few ulps: from
// e = exp(-2|y|), tanh = sign(y) (1 - e) / (1 + e) and 1 - tanh^2 = 4e / (1 + e)^2 (no cancellation as |tanh| nears
// 1); below |y| = 0.25, where 1 - e would cancel digits, tanh from its Taylor series to y^9 (truncation < 1e-8
// relative).
AQUILA_INLINE void tanh_and_slope(float y, float& t, float& slope) {
  const float a = std::fabs(y);
  const float e = exp_nonpositive(-2.0f * a);
  const float y2 = y * y;
  const float series =
      y * (1.0f + y2 * (-1.0f / 3.0f + y2 * (2.0f / 15.0f + y2 * (-17.0f / 315.0f + y2 * (62.0f / 2835.0f)))));
  const bool small = a < 0.25f;
  t = small ? series : std::copysign((1.0f - e) / (1.0f + e), y);
  slope = small ? 1.0f - t * t : 4.0f * e / ((1.0f + e) * (1.0f + e));
}

// The widest of the kernels' ISA levels that this CPU runs: x86-64 baseline, AVX2 (AQUILA_TARGET_AVX2, x86-64-v3),
// AVX-512 (AQUILA_TARGET_AVX512, x86-64-v4), and AVX-512 with AVX512-BF16, where the attention takes bf16 operands in
// its products (vdpbf16ps: see csrc/cpu/attention.cpp); AMX hosts have AVX512-BF16 and take that path (one kernel
// adds AMX tiles on top: has_amx_int8). The environment variable AQUILA_CPU_ISA=avx512, =avx2 or =baseline caps the
// level, to test the narrower paths on a wider CPU; another value is an error at the first kernel call.
enum class SimdLevel : int { baseline = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3 };

constexpr const char* simd_level_name(SimdLevel level) {
  return level == SimdLevel::avx512_bf16 ? "avx512_bf16"
         : level == SimdLevel::avx512    ? "avx512"
         : level == SimdLevel::avx2      ? "avx2"
                                         : "baseline";
}

inline SimdLevel simd_level() {
  static const SimdLevel level = [] {
    SimdLevel best = SimdLevel::baseline;
#if AQUILA_HAVE_SIMD_TARGETS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) {
      best = __builtin_cpu_supports("avx512bf16") ? SimdLevel::avx512_bf16 : SimdLevel::avx512;
    } else if (__builtin_cpu_supports("x86-64-v3")) {
      best = SimdLevel::avx2;
    }
#endif
    if (const char* cap = std::getenv("AQUILA_CPU_ISA")) {
      bool known = false;
      for (SimdLevel level : {SimdLevel::baseline, SimdLevel::avx2, SimdLevel::avx512, SimdLevel::avx512_bf16}) {
        if (std::strcmp(cap, simd_level_name(level)) != 0) continue;
        known = true;
        best = std::min(best, level);
      }
      if (!known)
        throw std::invalid_argument(std::string("aquila: AQUILA_CPU_ISA=") + cap +
                                    " is not one of avx512_bf16, avx512, avx2, baseline");
    }
    return best;
  }();
  return level;
}

// W fp32 lanes in one vector register, for the kernels compiled once per ISA (see AQUILA_TARGET_AVX512).
template <int W>
struct Lanes {
  typedef float type __attribute__((vector_size(4 * W)));
};

// Through references, not by value: a vector argument or result would differ between the ISAs' calling conventions.
template <typename V>
AQUILA_INLINE void load(V& v, const float* p) {
  std::memcpy(&v, p, sizeof v);
}

template <typename V>
AQUILA_INLINE void store(float* p, const V& v) {
  std::memcpy(p, &v, sizeof v);
}

// acc += the pairwise bf16 dot products of a and b (vdpbf16ps: each 32-bit word holds two bf16, low half first), lane
// by lane. Inline assembly rather than the intrinsic, whose target attribute would forbid inlining it into the
// generic kernels; the caller is compiled for AVX-512 and runs only where the CPU has AVX512-BF16
// (SimdLevel::avx512_bf16).
using Words16 = uint32_t __attribute__((vector_size(64)));
AQUILA_INLINE void dot_pairs(Lanes<16>::type& acc, const Words16& a, const Words16& b) {
  asm("vdpbf16ps %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
}

// Whether this process's AVX-512 path may use AVX512-VNNI's vpdpbusd (the decoding step's products of int8 inputs and
// quantized weights): the CPU has it and AQUILA_CPU_ISA leaves the AVX-512 path on.
inline bool has_vnni() {
  static const bool vnni = [] {
#if AQUILA_HAVE_SIMD_TARGETS
    __builtin_cpu_init();
    return simd_level() >= SimdLevel::avx512 && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
  }();
  return vnni;
}

// acc += the dot products of 4 unsigned bytes of a with the 4 signed bytes of b in the same 32-bit lane, in int32
// (vpdpbusd, without saturation: at most 4 x 255 x 128 a product set). Inline assembly as dot_pairs is; the caller is
// compiled for AVX-512 and runs only where has_vnni().
AQUILA_INLINE void dot_bytes(Words16& acc, const Words16& a, const Words16& b) {
  asm("vpdpbusd %[b], %[a], %[acc]" : [acc] "+v"(acc) : [a] "v"(a), [b] "v"(b));
}

// dot_bytes with the 4 signed bytes at b broadcast to every lane, read by the instruction itself (an embedded
// broadcast, no register or instruction of its own).
AQUILA_INLINE void dot_bytes_broadcast(Words16& acc, const Words16& a, const void* b) {
  asm("vpdpbusd %[b]%{1to16%}, %[a], %[acc]"
      : [acc] "+v"(acc)
      : [a] "v"(a), [b] "m"(*static_cast<const uint32_t*>(b)));
}

// Whether this process multiplies int8 on AMX tiles (AMX-INT8: the prefill's GEMM of int8 inputs and quantized
// weights, csrc/cpu/quantized.cpp): the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25), Linux grants
// the process the tiles' state (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA, asked once here), and AQUILA_CPU_ISA
// leaves the widest path on (any cap, avx512 included, turns AMX off, which is how the vpdpbusd GEMM is tested on an
// AMX CPU). The tile instructions are inline assembly, as vpdpbusd is: no compiler flag or intrinsic is needed.
inline bool has_amx_int8() {
  static const bool amx = [] {
#if AQUILA_HAVE_SIMD_TARGETS
    if (simd_level() != SimdLevel::avx512_bf16) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!(edx & (1u << 24)) || !(edx & (1u << 25))) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
    return false;
#endif
  }();
  return amx;
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

}  // namespace aquila::cpu
