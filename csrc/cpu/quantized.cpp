// Linear layers with weight-only quantized weights on CPU (the format is in csrc/kernels.h):
//   forward   out = x W^T (+ bias), x [rows, in] in fp32, fp16 or bf16, out in x's dtype
//   backward  grad_x = grad_out W
// W is never materialised: the kernels turn the weights they are about to use into fp32 vector registers and
// accumulate in fp32. Int4 weights are dequantized exactly as the reference does, (nibble - zero) * scale rounded
// once to fp32; an int8 row's sum of x q is multiplied by the row's scale at the end (forward), or the scale is folded
// into grad_out's element first (backward).
//
// The weights are unpacked into planes with shifts and masks (int4 on AVX-512: a shift and a vpermps lookup per 16
// weights), and x is kept in the planes' order: the dot-product primitives and the format's view are in
// csrc/cpu/quantized_dot.h, shared with the decoding step. The forward's fp32 copy of x ("panel") is in that order,
// and the backward writes its output planes back to their columns once.
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
#include "cpu/quantized_dot.h"

namespace aquila::cpu {
namespace {

constexpr int64_t kPanelFloats = 64 * 1024;  // 256 KiB of x per thread
constexpr int64_t kPanelRows = 64;
constexpr int64_t kBackwardRowBlock = 256;

template <typename Args>
Weights weights_of(const Args& a) {
  return Weights::of(a.qweight, a.scales, a.zeros, a.in_features, a.bits, a.group_size);
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
        block_dots<W, NB, Bits>(wt, a.out_features, b * NB, panel, cols, rows, k0, cols, 0,
                                [&](int64_t m, int64_t n, float v) { emit(a, p, m0 + m, n, v, first, last); });
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

// One row of the dense weight: int8 q * scale; int4 (nibble - zero) * scale, per group. The products are those of the
// reference (fp32, one rounding), then rounded to T.
template <typename T>
AQUILA_INLINE void dequantize_row(const QuantizedDequantize& a, int64_t n, T* __restrict out) {
  const Weights wt = weights_of(a);
  if (a.bits == 8) {
    const int8_t* q = reinterpret_cast<const int8_t*>(wt.row<8>(n, 0));
    const float scale = a.scales[n];
    for (int64_t k = 0; k < a.in_features; ++k) out[k] = from_float<T>(static_cast<float>(q[k]) * scale);
    return;
  }
  for (int64_t g = 0; g < wt.groups; ++g) {
    const float zero = wt.zero(n, g), scale = wt.scale(n, g);
    const uint8_t* b = wt.row<4>(n, g * wt.group_size);
    T* o = out + g * wt.group_size;
    for (int64_t j = 0; j < wt.group_size / 2; ++j) {
      o[2 * j] = from_float<T>((static_cast<float>(b[j] & 15) - zero) * scale);
      o[2 * j + 1] = from_float<T>((static_cast<float>(b[j] >> 4) - zero) * scale);
    }
  }
}

// Rows [begin, end) of the dense weight in each dtype: straight loops the compiler vectorises, once per ISA (called
// from the parallel region, not holding it: GCC outlines a parallel region into a function without the clones).
#define AQUILA_DEQUANTIZE_ROWS(T)                                                                                 \
  AQUILA_SIMD_CLONES void dequantize_rows_##T(const QuantizedDequantize& a, int64_t begin, int64_t end) {         \
    for (int64_t n = begin; n < end; ++n) dequantize_row<T>(a, n, static_cast<T*>(a.out) + n * a.in_features);   \
  }
AQUILA_DEQUANTIZE_ROWS(float)
AQUILA_DEQUANTIZE_ROWS(f16)
AQUILA_DEQUANTIZE_ROWS(bf16)
#undef AQUILA_DEQUANTIZE_ROWS

}  // namespace

void quantized_dequantize(const QuantizedDequantize& args, int threads) {
  check(args, "quantized_dequantize");
  const auto rows = args.dtype == DType::f32 ? dequantize_rows_float
                    : args.dtype == DType::f16 ? dequantize_rows_f16
                                               : dequantize_rows_bf16;
  threads = std::max(threads, 1);
#pragma omp parallel num_threads(threads)
  {
    const int64_t team = team_size(), per_thread = (args.out_features + team - 1) / team;
    const int64_t begin = std::min(args.out_features, thread_id() * per_thread);
    rows(args, begin, std::min(args.out_features, begin + per_thread));
  }
}

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
