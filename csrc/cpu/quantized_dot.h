// Dot products of fp32 inputs with rows of weight-only quantized weights (the format is in csrc/kernels.h's
// QuantizedLinear), the weights dequantized in registers: the primitives of the quantized linear layer
// (csrc/cpu/quantized.cpp) and of the decoding step's quantized projections (csrc/cpu/decode.cpp).
//
// Unpacking without shuffles. W weights are read as W 32-bit words, lane i holding 4 int8 weights (columns 4i..4i+3
// of the step) or 8 nibbles (columns 8i..8i+7, column 8i + j in nibble j: x86 is little-endian). Shifts and masks
// in the lanes then give the weights as P "planes" of W (P = 4 or 8), plane j holding columns Pi + j. Rather than
// interleaving the planes back, the inputs are kept in the same order: fill_row copies a row of x to fp32 with each
// step of P W columns stored plane by plane. With AVX-512 the 16 values (i - zero) * scale of an int4 group are one
// register, and vpermps (which reads the low 4 bits of each lane) dequantizes 16 nibbles in one instruction: a shift
// and a permute per 16 weights. Below AVX-512, a shift, a mask, a conversion and an FMA-able (q - zero) * scale.
//
// Int4 weights are dequantized exactly as the reference does, (nibble - zero) * scale rounded once to fp32, a group's
// zero and scale set up once per group; an int8 row's sum of x q is left unscaled for the caller to multiply by the
// row's scale. An int4 step is 8W columns, so the vector paths need a group size that is a multiple of 8W.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/common.h"

namespace aquila::cpu {

template <int W>
struct Words {
  typedef uint32_t type __attribute__((vector_size(4 * W)));
  typedef int32_t signed_type __attribute__((vector_size(4 * W)));
};

// The kernels' view of a quantized weight [out, in].
struct Weights {
  const void* qweight;
  const float* scales;
  const uint8_t* zeros;  // int4 asymmetric only
  int64_t in, groups, group_size;

  // bits 8: one group per row; bits 4: in / group_size.
  static Weights of(const void* qweight, const float* scales, const uint8_t* zeros, int64_t in, int64_t bits,
                    int64_t group_size) {
    const bool int4 = bits == 4;
    return {qweight, scales, zeros, in, int4 ? in / group_size : 1, int4 ? group_size : in};
  }

  // The bytes of row n from column k (8 bits: one byte a column; 4 bits: k even, two columns a byte).
  template <int Bits>
  AQUILA_INLINE const uint8_t* row(int64_t n, int64_t k) const {
    return static_cast<const uint8_t*>(qweight) + (Bits == 4 ? (n * in + k) / 2 : n * in + k);
  }
  AQUILA_INLINE float zero(int64_t n, int64_t g) const {
    return zeros ? static_cast<float>(zeros[n * groups + g]) : 8.0f;
  }
  AQUILA_INLINE float scale(int64_t n, int64_t g) const { return scales[n * groups + g]; }
  // One weight, dequantized: the scalar paths.
  AQUILA_INLINE float int8(int64_t n, int64_t k) const { return static_cast<const int8_t*>(qweight)[n * in + k]; }
  AQUILA_INLINE float int4(int64_t n, int64_t k) const {
    const uint8_t byte = *row<4>(n, k & ~int64_t{1});
    const int64_t g = k / group_size;
    return (static_cast<float>(k & 1 ? byte >> 4 : byte & 15) - zero(n, g)) * scale(n, g);
  }
};

// The dequantization of one int4 group of one row: plane j of a step's words is the group's weights at columns
// 8i + j.
template <int W>
struct Int4Group {
  using F = typename Lanes<W>::type;
  using U = typename Words<W>::type;
  using I = typename Words<W>::signed_type;
  F a, b;  // W == 16: the 16 dequantized values; else the zero and the scale, in every lane

  AQUILA_INLINE void set(float zero, float scale) {
    if constexpr (W == 16) {
      const F nibbles = {0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f};
      a = (nibbles - zero) * scale;
    } else {
      a = F{} + zero;
      b = F{} + scale;
    }
  }

  template <int J>
  AQUILA_INLINE void plane(F& w, const U& words) const {
    if constexpr (W == 16) {
      w = __builtin_shuffle(a, words >> (4 * J));  // the lane's low 4 bits pick the value
    } else {
      const I nibbles = (I)((words >> (4 * J)) & 15u);
      w = (__builtin_convertvector(nibbles, F) - a) * b;
    }
  }
};

// Plane j of int8 words: the signed byte j of each lane.
template <int W, int J>
AQUILA_INLINE void int8_plane(typename Lanes<W>::type& w, const typename Words<W>::type& words) {
  using I = typename Words<W>::signed_type;
  const I bytes = J == 3 ? (I)words >> 24 : (I)(words << (24 - 8 * J)) >> 24;
  w = __builtin_convertvector(bytes, typename Lanes<W>::type);
}

// The int8 counterpart of Int4Group: plane j of a step's words is the signed byte j of each lane (columns 4i + j),
// not yet scaled.
template <int W>
struct Int8Planes {
  template <int J>
  AQUILA_INLINE void plane(typename Lanes<W>::type& w, const typename Words<W>::type& words) const {
    int8_plane<W, J>(w, words);
  }
};

// The int32 lanes of a vpdpbusd sum as fp32 (exact: a lane's sum is below 2^24 in magnitude).
AQUILA_INLINE void lanes_of(Lanes<16>::type& out, const Words16& sums) {
  out = __builtin_convertvector((Words<16>::signed_type)sums, Lanes<16>::type);
}

// The lanes of v summed pairwise, as a tree: W dependent scalar adds would cost as much as a row's FMAs.
template <int W>
AQUILA_INLINE float lane_sum(const typename Lanes<W>::type& v) {
  float lanes[W];
  store(lanes, v);
#pragma GCC unroll 16
  for (int width = W / 2; width >= 1; width /= 2) {
#pragma GCC unroll 16
    for (int lane = 0; lane < width; ++lane) lanes[lane] += lanes[lane + width];
  }
  return lanes[0];
}

// `count` columns of a row of x, as fp32 in the planes' order: each whole step of P W columns plane by plane (column
// s + j W + i of dst holds column s + P i + j of src), the rest (int8 only) in order.
template <typename T, int W, int P>
AQUILA_INLINE void fill_row(float* __restrict dst, const T* __restrict src, int64_t count) {
  int64_t s = 0;
  for (; s + P * W <= count; s += P * W) {
#pragma GCC unroll 8
    for (int j = 0; j < P; ++j) {
      for (int i = 0; i < W; ++i) dst[s + j * W + i] = to_float(src[s + P * i + j]);
    }
  }
  for (; s < count; ++s) dst[s] = to_float(src[s]);
}

// One step of row c of a tile: acc[r][c] += x plane j of row r * the weights' plane j, one plane at a time (so that
// one word and one plane of weights are live, not all of a step's).
template <int W, int R, int C, int P, int Row, int J, typename Dequant>
AQUILA_INLINE void step_planes(typename Lanes<W>::type (&acc)[R][C], const Dequant& dq,
                               const typename Words<W>::type& words, const float* x, int64_t x_stride) {
  using F = typename Lanes<W>::type;
  if constexpr (J < P) {
    F w;
    dq.template plane<J>(w, words);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      F xv;
      load(xv, x + r * x_stride + J * W);
      acc[r][Row] += xv * w;
    }
    step_planes<W, R, C, P, Row, J + 1>(acc, dq, words, x, x_stride);
  }
}

// One step (P W columns, the 4W bytes from byte `offset` of each row) of every row of a tile, asking for each row's
// bytes `prefetch` ahead (0: none; a prefetch never faults, so past the end of the weights is harmless).
template <int W, int R, int C, int P, int Row, typename Dequant>
AQUILA_INLINE void step_rows(typename Lanes<W>::type (&acc)[R][C], const Dequant (&dq)[C],
                             const uint8_t* const (&rows)[C], int64_t offset, const float* x, int64_t x_stride,
                             int64_t prefetch) {
  if constexpr (Row < C) {
    if (prefetch > 0) __builtin_prefetch(rows[Row] + offset + prefetch, 0, 3);
    typename Words<W>::type words;
    std::memcpy(&words, rows[Row] + offset, sizeof words);
    step_planes<W, R, C, P, Row, 0>(acc, dq[Row], words, x, x_stride);
    step_rows<W, R, C, P, Row + 1>(acc, dq, rows, offset, x, x_stride, prefetch);
  }
}

// sums[r][c] = x row r (in the planes' order) . W row n[c] over columns [k0, k0 + cols) (int8: not yet scaled). R
// rows of x share each load and dequantization of the weights, C rows of W each load of x; the R C accumulator
// chains hide the FMA latency.
template <int W, int R, int C, int Bits>
AQUILA_INLINE void forward_tile(const Weights& wt, const int64_t (&n)[C], const float* x, int64_t x_stride, int64_t k0,
                                int64_t cols, float (&sums)[R][C], int64_t prefetch) {
  using F = typename Lanes<W>::type;
  constexpr int P = Bits == 4 ? 8 : 4;
  constexpr int64_t kStep = P * W;
  F acc[R][C];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) acc[r][c] = F{};
  const uint8_t* rows[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) rows[c] = wt.row<Bits>(n[c], k0);
  int64_t k = 0;  // from k0
  if constexpr (Bits == 4) {
    for (int64_t g = k0 / wt.group_size; k < cols; k += wt.group_size, ++g) {
      Int4Group<W> groups[C];
#pragma GCC unroll 8
      for (int c = 0; c < C; ++c) groups[c].set(wt.zero(n[c], g), wt.scale(n[c], g));
      for (int64_t s = k; s < k + wt.group_size; s += kStep)
        step_rows<W, R, C, P, 0>(acc, groups, rows, s >> 1, x + s, x_stride, prefetch);
    }
  } else {
    const Int8Planes<W> planes[C] = {};
    for (; k + kStep <= cols; k += kStep) step_rows<W, R, C, P, 0>(acc, planes, rows, k, x + k, x_stride, prefetch);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      sums[r][c] = lane_sum<W>(acc[r][c]);
      if constexpr (Bits == 8) {  // the last columns, fewer than a step
        const int8_t* q = reinterpret_cast<const int8_t*>(rows[c]);
        for (int64_t j = k; j < cols; ++j) sums[r][c] += x[r * x_stride + j] * static_cast<float>(q[j]);
      }
    }
  }
}

// R rows of x (from its row m) against the rows [n_first, n_first + NB) of W that are below `rows`, C = NB / R of
// them at a time: emit(row of x, row of W, sum) for each.
template <int W, int NB, int R, int Bits, typename Emit>
AQUILA_INLINE void tile_rows(const Weights& wt, int64_t rows, int64_t n_first, const float* x, int64_t x_stride,
                             int64_t m, int64_t k0, int64_t cols, int64_t prefetch, Emit& emit) {
  constexpr int C = NB / R > 0 ? NB / R : 1;
  for (int c0 = 0; c0 < NB; c0 += C) {
    const int64_t n0 = n_first + c0;
    if (n0 >= rows) break;
    int64_t n[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) n[c] = std::min(n0 + c, rows - 1);  // past the end: computed, not emitted
    float sums[R][C];
    forward_tile<W, R, C, Bits>(wt, n, x + m * x_stride, x_stride, k0, cols, sums, prefetch);
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C && n0 + c < rows; ++c) emit(m + r, n0 + c, sums[r][c]);
    }
  }
}

// The `inputs` rows of x (x_stride apart, in the planes' order) against the block of NB rows of W from n_first:
// 4 rows of x at a time, then 2, then 1, so that each weight is read from memory once for all of them (and again
// only from L1, by a narrower tile of the same block).
template <int W, int NB, int Bits, typename Emit>
AQUILA_INLINE void block_dots(const Weights& wt, int64_t rows, int64_t n_first, const float* x, int64_t x_stride,
                              int64_t inputs, int64_t k0, int64_t cols, int64_t prefetch, Emit&& emit) {
  int64_t m = 0;
  for (; m + 4 <= inputs; m += 4) tile_rows<W, NB, 4, Bits>(wt, rows, n_first, x, x_stride, m, k0, cols, prefetch, emit);
  if (inputs - m >= 2) {
    tile_rows<W, NB, 2, Bits>(wt, rows, n_first, x, x_stride, m, k0, cols, prefetch, emit);
    m += 2;
  }
  if (inputs - m == 1) tile_rows<W, NB, 1, Bits>(wt, rows, n_first, x, x_stride, m, k0, cols, prefetch, emit);
}

// --- Inputs rounded to int8 ---------------------------------------------------------------------------------------
// A quantized projection's input rounded to int8 (int8_inputs of DecodeStep and QuantizedLinear): in blocks of
// kInputBlock columns from the first (the last may be shorter), d = max |x| / 127 and q = x / d rounded to nearest,
// ties to even (within +-127), both in fp32; x is then taken as d q. A block of zeros (or so small that d is 0) has
// q = 0; one holding a NaN or an infinity has d = NaN, which the products carry to the output as the fp32 inputs
// would.
constexpr int64_t kInputBlock = 32;

AQUILA_INLINE float quantize_block(const float* __restrict x, int64_t count, int8_t* __restrict q) {
  // max |x| on the bits: without the sign bit, a float's bits order as its magnitude does, an infinity's above every
  // finite value and a NaN's above an infinity's. An integer maximum, unlike a float one that must carry a NaN,
  // vectorises.
  constexpr uint32_t kMagnitude = 0x7fffffffu, kInfinity = 0x7f800000u;
  uint32_t largest_bits = 0;
  for (int64_t i = 0; i < count; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    largest_bits = std::max(largest_bits, bits & kMagnitude);
  }
  float largest;
  std::memcpy(&largest, &largest_bits, sizeof(largest));
  const float d = largest_bits < kInfinity ? largest / 127.0f : __builtin_nanf("");
  // Clamped: where d is subnormal it may round far below max |x| / 127, and x / d past 127.
  for (int64_t i = 0; i < count; ++i)
    q[i] = d > 0.0f ? static_cast<int8_t>(std::clamp(std::nearbyint(x[i] / d), -127.0f, 127.0f)) : 0;
  return d;
}

// A row rounded to int8 and back, d q in fp32: the inputs of the fp32 kernels under int8_inputs (where the vpdpbusd
// loops do not apply).
AQUILA_INLINE void dequantize_int8_row(const float* __restrict x, int64_t cols, float* __restrict out) {
  int8_t q[kInputBlock];
  for (int64_t c0 = 0; c0 < cols; c0 += kInputBlock) {
    const int64_t count = std::min(kInputBlock, cols - c0);
    const float d = quantize_block(x + c0, count, q);
    for (int64_t i = 0; i < count; ++i) out[c0 + i] = d * static_cast<float>(q[i]);
  }
}

}  // namespace aquila::cpu
