// Linear layers with weight-only quantized weights on CPU (the format is in csrc/kernels.h):
//   forward   out = x W^T (+ bias), x [rows, in] in fp32, fp16 or bf16, out in x's dtype
//   backward  grad_x = grad_out W
// W is never materialised: the kernels turn the weights they are about to use into fp32 vector registers and
// accumulate in fp32. Int4 weights are dequantized exactly as the reference does, (nibble - zero) * scale rounded
// once to fp32; an int8 row's sum of x q is multiplied by the row's scale at the end (forward), or the scale is folded
// into grad_out's element first (backward).
//
// Unpacking without shuffles. W weights are read as W 32-bit words, lane i holding 4 int8 weights (columns 4i..4i+3
// of the step) or 8 nibbles (columns 8i..8i+7, column 8i + j in nibble j: x86 is little-endian). Shifts and masks
// in the lanes then give the weights as P "planes" of W (P = 4 or 8), plane j holding columns Pi + j. Rather than
// interleaving the planes back, the kernels keep x in the same order: the forward's fp32 copy of x ("panel") stores
// each step of P W columns plane by plane, and the backward writes its output planes back to their columns once. With
// AVX-512 the 16 values (i - zero) * scale of an int4 group are one register, and vpermps (which reads the low 4 bits
// of each lane) dequantizes 16 nibbles in one instruction: a shift and a permute per 16 weights.
//
// Forward. Each thread owns a contiguous range of output features (rows of W), in blocks of NB rows. x goes in
// panels of up to 64 rows and kPanelFloats floats (converted and reordered into the thread's own buffer, to stay in
// L2); a panel's rows run in tiles of R rows against C rows of the block at a time (R x C vector accumulators in
// registers, R C = NB), so each block of W is read from memory once per panel and from L1 by the panel's tiles. A
// decoding step (a few rows of x) is one panel: each thread streams its rows of W once, for all the rows. A panel
// narrower than in (many rows, long rows) leaves fp32 partial sums per output that the next panel adds to.
// Backward. grad_out is made fp32 once; each thread owns a range of (step of P W columns of grad_x, chunk of 64 rows)
// items and runs, for tiles of R rows, over every row n of W: R x P vector accumulators += grad_out[r][n] x the
// step's weights of row n, added into the tile's result every 256 rows (so no fp32 sum runs over more than 256
// terms).
// Group sizes that are not a multiple of 32 (int4 steps are 8W columns, W >= 4) take a scalar path.
// Weights stream from memory in order, C rows at a time: the hardware prefetchers follow such streams.
#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

constexpr int64_t kPanelFloats = 64 * 1024;  // 256 KiB of x per thread
constexpr int64_t kPanelRows = 64;
constexpr int64_t kBackwardRowBlock = 256;

template <int W>
struct Words {
  typedef uint32_t type __attribute__((vector_size(4 * W)));
  typedef int32_t signed_type __attribute__((vector_size(4 * W)));
};

// The kernels' view of the weights.
struct Weights {
  const void* qweight;
  const float* scales;
  const uint8_t* zeros;  // int4 asymmetric only
  int64_t in, groups, group_size;

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

template <typename Args>
Weights weights_of(const Args& a) {
  const bool int4 = a.bits == 4;
  return {a.qweight, a.scales, a.zeros, a.in_features, int4 ? a.in_features / a.group_size : 1,
          int4 ? a.group_size : a.in_features};
}

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

template <typename T>
AQUILA_INLINE void store_value(void* out, int64_t index, float v) {
  static_cast<T*>(out)[index] = from_float<T>(v);
}

AQUILA_INLINE void store_value(DType dtype, void* out, int64_t index, float v) {
  switch (dtype) {
    case DType::f32: store_value<float>(out, index, v); return;
    case DType::f16: store_value<f16>(out, index, v); return;
    case DType::bf16: store_value<bf16>(out, index, v); return;
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Forward.

struct Panels {
  int64_t rows, cols;  // of x a panel holds
  float* buffers;      // rows x cols floats per thread
  float* partial;      // rows x out_features fp32 partial sums (when cols < in_features)
};

// One row of x, columns [k0, k0 + count), into the panel: each whole step of P W columns plane by plane (panel
// column s + j W + i holds column k0 + s + P i + j), the rest (int8 only) in order.
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

template <int W, int P>
AQUILA_INLINE void fill_panel(const QuantizedLinear& a, float* panel, int64_t m0, int64_t rows, int64_t k0,
                              int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t offset = (m0 + r) * a.x_row_stride + k0;
    float* dst = panel + r * cols;
    switch (a.dtype) {
      case DType::f32: fill_row<float, W, P>(dst, static_cast<const float*>(a.x) + offset, cols); break;
      case DType::f16: fill_row<f16, W, P>(dst, static_cast<const f16*>(a.x) + offset, cols); break;
      case DType::bf16: fill_row<bf16, W, P>(dst, static_cast<const bf16*>(a.x) + offset, cols); break;
    }
  }
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

// One step (P W columns, from byte `offset` of each row) of every row of a tile.
template <int W, int R, int C, int P, int Row, typename Dequant>
AQUILA_INLINE void step_rows(typename Lanes<W>::type (&acc)[R][C], const Dequant (&dq)[C],
                             const uint8_t* const (&rows)[C], int64_t offset, const float* x, int64_t x_stride) {
  if constexpr (Row < C) {
    typename Words<W>::type words;
    std::memcpy(&words, rows[Row] + offset, sizeof words);
    step_planes<W, R, C, P, Row, 0>(acc, dq[Row], words, x, x_stride);
    step_rows<W, R, C, P, Row + 1>(acc, dq, rows, offset, x, x_stride);
  }
}

// sums[r][c] = x row r of the panel . W row n[c] over columns [k0, k0 + cols) (int8: not yet scaled).
template <int W, int R, int C, int Bits>
AQUILA_INLINE void forward_tile(const Weights& wt, const int64_t (&n)[C], const float* x, int64_t x_stride, int64_t k0,
                                int64_t cols, float (&sums)[R][C]) {
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
        step_rows<W, R, C, P, 0>(acc, groups, rows, s >> 1, x + s, x_stride);
    }
  } else {
    const Int8Planes<W> planes[C] = {};
    for (; k + kStep <= cols; k += kStep) step_rows<W, R, C, P, 0>(acc, planes, rows, k, x + k, x_stride);
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

// Adds a tile's sums to the outputs: into the partial sums, or (the last panel of columns) scaled, with the bias, in
// x's dtype.
AQUILA_INLINE void emit(const QuantizedLinear& a, const Panels& p, int64_t m, int64_t n, float v, bool first,
                        bool last) {
  float* partial = p.partial + m * a.out_features + n;
  if (!first) v += *partial;
  if (!last) {
    *partial = v;
    return;
  }
  if (a.bits == 8) v *= a.scales[n];
  if (a.bias) v += a.bias[n];
  store_value(a.dtype, a.out, m * a.out_features + n, v);
}

// R rows of the panel (from its row m) against the block of NB rows of W from row n_first, C rows at a time.
template <int W, int NB, int R, int Bits>
AQUILA_INLINE void forward_rows(const QuantizedLinear& a, const Weights& wt, const Panels& p, const float* x,
                                int64_t x_stride, int64_t m, int64_t n_first, int64_t k0, int64_t cols, bool first,
                                bool last) {
  constexpr int C = NB / R > 0 ? NB / R : 1;
  for (int c0 = 0; c0 < NB; c0 += C) {
    const int64_t n0 = n_first + c0;
    if (n0 >= a.out_features) break;
    int64_t n[C];
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) n[c] = std::min(n0 + c, a.out_features - 1);  // past the end: computed, not stored
    float sums[R][C];
    forward_tile<W, R, C, Bits>(wt, n, x, x_stride, k0, cols, sums);
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C && n0 + c < a.out_features; ++c) emit(a, p, m + r, n0 + c, sums[r][c], first, last);
    }
  }
}

template <int W, int NB, int Bits>
AQUILA_INLINE void forward_in_team(const QuantizedLinear& a, const Panels& p, int thread, int team) {
  const Weights wt = weights_of(a);
  const int64_t blocks = (a.out_features + NB - 1) / NB;
  const int64_t first_block = blocks * thread / team, end_block = blocks * (thread + 1) / team;
  if (first_block == end_block) return;
  float* panel = p.buffers + thread * p.rows * p.cols;
  constexpr int P = Bits == 4 ? 8 : 4;
  for (int64_t k0 = 0; k0 < a.in_features; k0 += p.cols) {
    const int64_t cols = std::min(p.cols, a.in_features - k0);
    const bool first = k0 == 0, last = k0 + cols == a.in_features;
    for (int64_t m0 = 0; m0 < a.rows; m0 += p.rows) {
      const int64_t rows = std::min(p.rows, a.rows - m0);
      fill_panel<W, P>(a, panel, m0, rows, k0, cols);
      for (int64_t b = first_block; b < end_block; ++b) {
        int64_t m = 0;
        for (; m + 4 <= rows; m += 4)
          forward_rows<W, NB, 4, Bits>(a, wt, p, panel + m * cols, cols, m0 + m, b * NB, k0, cols, first, last);
        if (rows - m >= 2) {
          forward_rows<W, NB, 2, Bits>(a, wt, p, panel + m * cols, cols, m0 + m, b * NB, k0, cols, first, last);
          m += 2;
        }
        if (rows - m == 1)
          forward_rows<W, NB, 1, Bits>(a, wt, p, panel + m * cols, cols, m0 + m, b * NB, k0, cols, first, last);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// Backward.

// acc[r][j] += g[r] * the weights' plane j, one plane at a time.
template <int W, int R, int P, int J, typename Dequant>
AQUILA_INLINE void backward_planes(typename Lanes<W>::type (&acc)[R][P], const Dequant& dq,
                                   const typename Words<W>::type& words, const float (&g)[R]) {
  if constexpr (J < P) {
    typename Lanes<W>::type w;
    dq.template plane<J>(w, words);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][J] += g[r] * w;
    backward_planes<W, R, P, J + 1>(acc, dq, words, g);
  }
}

// grad_x rows [m, m + R), the step of columns [k, k + P W): sum over the rows n of W of dy[r][n] W[n][columns].
template <int W, int R, int Bits>
AQUILA_INLINE void backward_tile(const QuantizedLinearBackward& a, const Weights& wt, const float* dy, int64_t m,
                                 int64_t k) {
  using F = typename Lanes<W>::type;
  using U = typename Words<W>::type;
  constexpr int P = Bits == 4 ? 8 : 4;
  const int64_t N = a.out_features;
  float result[R][P * W] = {};
  const int64_t g = Bits == 4 ? k / wt.group_size : 0;
  for (int64_t n0 = 0; n0 < N; n0 += kBackwardRowBlock) {
    F acc[R][P];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) acc[r][j] = F{};
    const int64_t n1 = std::min(N, n0 + kBackwardRowBlock);
    for (int64_t n = n0; n < n1; ++n) {
      U words;
      std::memcpy(&words, wt.row<Bits>(n, k), sizeof words);
      float gr[R];
      if constexpr (Bits == 4) {
        Int4Group<W> group;
        group.set(wt.zero(n, g), wt.scale(n, g));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) gr[r] = dy[(m + r) * N + n];
        backward_planes<W, R, P, 0>(acc, group, words, gr);
      } else {
        const float s = wt.scales[n];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) gr[r] = dy[(m + r) * N + n] * s;
        backward_planes<W, R, P, 0>(acc, Int8Planes<W>{}, words, gr);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
      for (int j = 0; j < P; ++j) {
        F sum;
        load(sum, &result[r][j * W]);
        store(&result[r][j * W], sum + acc[r][j]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < P; ++j) {
      for (int i = 0; i < W; ++i)
        store_value(a.dtype, a.grad_x, (m + r) * a.in_features + k + P * i + j, result[r][j * W + i]);
    }
  }
}

// Work items: a step of columns and a chunk of up to kPanelRows rows, consecutive items on the same step (so its
// weights stay in cache), split evenly over the team.
template <int W, int RMax, int Bits>
AQUILA_INLINE void backward_in_team(const QuantizedLinearBackward& a, const float* dy, int thread, int team) {
  const Weights wt = weights_of(a);
  constexpr int P = Bits == 4 ? 8 : 4;
  const int64_t steps = a.in_features / (P * W), chunks = (a.rows + kPanelRows - 1) / kPanelRows;
  const int64_t items = steps * chunks;
  const int64_t first = items * thread / team, end = items * (thread + 1) / team;
  for (int64_t item = first; item < end; ++item) {
    const int64_t k = item / chunks * P * W;
    int64_t m = item % chunks * kPanelRows;
    const int64_t m_end = std::min(a.rows, m + kPanelRows);
    for (; m + RMax <= m_end; m += RMax) backward_tile<W, RMax, Bits>(a, wt, dy, m, k);
    if constexpr (RMax >= 4) {
      if (m_end - m >= 2) {
        backward_tile<W, 2, Bits>(a, wt, dy, m, k);
        m += 2;
      }
    }
    for (; m < m_end; ++m) backward_tile<W, 1, Bits>(a, wt, dy, m, k);
  }
}

// ------------------------------------------------------------------------------------------------------------------
// One entry per ISA and vector width. Forward tiles: R x C = NB accumulators, 8 with AVX-512's 32 registers, 4 with
// the 16 of AVX2 and the baseline. Each takes a chain of P FMAs a step, and the R x C chains hide the FMA latency:
// the dequantization, not the chains, bounds a step. Backward tiles: up to RMAX rows of P accumulators each (16
// registers of them with 32, 8 with 16). An int4 step is 8W columns, so a group size that is a multiple of 64 but not
// of 128 takes W 8 (ymm) on AVX-512, and one of 32 W 4.

using ForwardBody = void (*)(const QuantizedLinear&, const Panels&, int, int);
using BackwardBody = void (*)(const QuantizedLinearBackward&, const float*, int, int);

#define AQUILA_QUANTIZED_ENTRIES(NAME, TARGET, W, NB, RMAX8, RMAX4)                                               \
  template <int Bits>                                                                                             \
  TARGET void forward_##NAME(const QuantizedLinear& a, const Panels& p, int thread, int team) {                  \
    forward_in_team<W, NB, Bits>(a, p, thread, team);                                                            \
  }                                                                                                               \
  template <int Bits>                                                                                             \
  TARGET void backward_##NAME(const QuantizedLinearBackward& a, const float* dy, int thread, int team) {         \
    backward_in_team<W, Bits == 4 ? RMAX4 : RMAX8, Bits>(a, dy, thread, team);                                   \
  }

AQUILA_QUANTIZED_ENTRIES(baseline4, , 4, 4, 2, 1)
AQUILA_QUANTIZED_ENTRIES(avx2_8, AQUILA_TARGET_AVX2, 8, 4, 2, 1)
AQUILA_QUANTIZED_ENTRIES(avx2_4, AQUILA_TARGET_AVX2, 4, 4, 2, 1)
AQUILA_QUANTIZED_ENTRIES(avx512_16, AQUILA_TARGET_AVX512, 16, 8, 4, 2)
AQUILA_QUANTIZED_ENTRIES(avx512_8, AQUILA_TARGET_AVX512, 8, 8, 4, 2)
AQUILA_QUANTIZED_ENTRIES(avx512_4, AQUILA_TARGET_AVX512, 4, 8, 4, 2)
#undef AQUILA_QUANTIZED_ENTRIES

// The vector width the kernels use for this call (0: the scalar path): the ISA's, narrowed until an int4 step (8W
// columns) divides the group size.
int vector_width(int64_t bits, int64_t group_size) {
  const SimdLevel level = simd_level();
  int w = level >= SimdLevel::avx512 ? 16 : level >= SimdLevel::avx2 ? 8 : 4;
  if (bits == 8) return w;
  while (w >= 4 && group_size % (8 * w) != 0) w /= 2;
  return w >= 4 ? w : 0;
}

template <typename Body>
Body pick(int w, Body baseline4, Body avx2_8, Body avx2_4, Body avx512_16, Body avx512_8, Body avx512_4) {
  const SimdLevel level = simd_level();  // levels above AVX-512 (e.g. with AVX512-BF16) take its bodies
  if (level >= SimdLevel::avx512) return w == 16 ? avx512_16 : w == 8 ? avx512_8 : avx512_4;
  if (level >= SimdLevel::avx2) return w == 8 ? avx2_8 : avx2_4;
  return baseline4;
}

template <int Bits>
ForwardBody forward_body(int w) {
  return pick<ForwardBody>(w, forward_baseline4<Bits>, forward_avx2_8<Bits>, forward_avx2_4<Bits>,
                           forward_avx512_16<Bits>, forward_avx512_8<Bits>, forward_avx512_4<Bits>);
}

template <int Bits>
BackwardBody backward_body(int w) {
  return pick<BackwardBody>(w, backward_baseline4<Bits>, backward_avx2_8<Bits>, backward_avx2_4<Bits>,
                            backward_avx512_16<Bits>, backward_avx512_8<Bits>, backward_avx512_4<Bits>);
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

template <typename T>
void to_fp32(const void* src, int64_t row_stride, int64_t rows, int64_t cols, float* dst, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = static_cast<const T*>(src) + r * row_stride;
    for (int64_t j = 0; j < cols; ++j) dst[r * cols + j] = to_float(s[j]);
  }
}

// src [rows, cols] (row_stride apart, in dtype) as fp32 [rows, cols]: itself when it already is.
const float* as_fp32(const void* src, int64_t row_stride, int64_t rows, int64_t cols, DType dtype,
                     std::vector<float>& buffer, int threads) {
  if (dtype == DType::f32 && (row_stride == cols || rows == 1)) return static_cast<const float*>(src);
  buffer.resize(rows * cols);
  dispatch_dtype(dtype, [&](auto* tag) {
    to_fp32<std::remove_pointer_t<decltype(tag)>>(src, row_stride, rows, cols, buffer.data(), threads);
  });
  return buffer.data();
}

// ------------------------------------------------------------------------------------------------------------------
// The scalar path (int4 with a group size that is not a multiple of 32), and the int8 backward's last columns.

void scalar_forward(const QuantizedLinear& a, int threads) {
  const Weights wt = weights_of(a);
  std::vector<float> buffer;
  const float* x = as_fp32(a.x, a.x_row_stride, a.rows, a.in_features, a.dtype, buffer, threads);
  const int64_t K = a.in_features, N = a.out_features;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t m = 0; m < a.rows; ++m) {
      const float* row = x + m * K;
      float v = static_cast<float>(sum_over(K, [&](int64_t k) { return row[k] * wt.int4(n, k); }));
      if (a.bias) v += a.bias[n];
      store_value(a.dtype, a.out, m * N + n, v);
    }
  }
}

// grad_x[m][k] = sum_n dy[m][n] W[n][k] for the columns [k0, in), in double.
void scalar_backward(const QuantizedLinearBackward& a, const float* dy, int64_t k0, int threads) {
  const Weights wt = weights_of(a);
  const int64_t K = a.in_features, N = a.out_features, width = K - k0;
  if (width <= 0) return;
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> sums(width);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < a.rows; ++m) {
      std::fill(sums.begin(), sums.end(), 0.0);
      for (int64_t n = 0; n < N; ++n) {
        const double g = dy[m * N + n];
        if (a.bits == 8) {
          const double s = g * a.scales[n];
          for (int64_t k = k0; k < K; ++k) sums[k - k0] += s * wt.int8(n, k);
        } else {
          for (int64_t k = k0; k < K; ++k) sums[k - k0] += g * wt.int4(n, k);
        }
      }
      for (int64_t k = k0; k < K; ++k) store_value(a.dtype, a.grad_x, m * K + k, static_cast<float>(sums[k - k0]));
    }
  }
}

template <typename Args>
void check(const Args& a, const char* kernel) {
  const std::string name = std::string("aquila ") + kernel + ": ";
  if (a.bits != 4 && a.bits != 8)
    throw std::invalid_argument(name + "bits must be 4 or 8, got " + std::to_string(a.bits));
  if (a.bits == 4 && (a.group_size < 2 || a.group_size % 2 != 0 || a.in_features % a.group_size != 0)) {
    throw std::invalid_argument(name + "group_size must be even, >= 2 and divide in_features, got " +
                                std::to_string(a.group_size) + " for in_features " + std::to_string(a.in_features));
  }
  if (a.bits == 8 && a.zeros) throw std::invalid_argument(name + "8 bits take no zeros");
}

}  // namespace

void quantized_linear(const QuantizedLinear& args, int threads) {
  check(args, "quantized_linear");
  if (args.rows <= 0 || args.out_features <= 0) return;
  threads = std::max(threads, 1);
  const int w = vector_width(args.bits, args.group_size);
  if (w == 0) {
    scalar_forward(args, threads);
    return;
  }
  // Panels: up to kPanelRows rows of x and as many columns as kPanelFloats allow, in whole groups (int4) or steps.
  const int64_t unit = args.bits == 4 ? args.group_size : 4 * w;
  Panels p{};
  p.rows = std::min(args.rows, kPanelRows);
  p.cols = p.rows * args.in_features <= kPanelFloats
               ? args.in_features
               : std::min(args.in_features, std::max(unit, kPanelFloats / p.rows / unit * unit));
  // Allocated here, where running out of memory throws, rather than inside the parallel region, where it would abort.
  std::vector<float> buffers(threads * p.rows * p.cols);
  std::vector<float> partial(p.cols < args.in_features ? args.rows * args.out_features : 0);
  p.buffers = buffers.data();
  p.partial = partial.data();
  const ForwardBody body = args.bits == 4 ? forward_body<4>(w) : forward_body<8>(w);
#pragma omp parallel num_threads(threads)
  body(args, p, thread_id(), team_size());
}

void quantized_linear_backward(const QuantizedLinearBackward& args, int threads) {
  check(args, "quantized_linear_backward");
  if (args.rows <= 0 || args.in_features <= 0) return;
  threads = std::max(threads, 1);
  std::vector<float> buffer;
  const float* dy = as_fp32(args.grad_out, args.grad_out_row_stride, args.rows, args.out_features, args.dtype, buffer,
                            threads);
  const int w = vector_width(args.bits, args.group_size);
  if (w == 0) {
    scalar_backward(args, dy, 0, threads);
    return;
  }
  const BackwardBody body = args.bits == 4 ? backward_body<4>(w) : backward_body<8>(w);
#pragma omp parallel num_threads(threads)
  body(args, dy, thread_id(), team_size());
  // int8: the columns after the last whole step (int4 steps divide the group size, so in_features).
  scalar_backward(args, dy, args.in_features / (4 * w) * (4 * w), threads);
}

}  // namespace aquila::cpu
