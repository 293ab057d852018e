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
// int8_inputs: x rounded to int8 first; on AVX512-VNNI, from 16 rows, a GEMM of integers (the last sections: on
// vpdpbusd, or on AMX tiles where the CPU has AMX-INT8), else the rounded x in fp32 through the kernels above.
#include <algorithm>
#include <string>
#include <type_traits>
#include <utility>
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
  const void* x;  // the input: a.x, or (int8_inputs off the vpdpbusd path) x rounded, in fp32
  int64_t x_row_stride;
  DType x_dtype;
  int64_t rows, cols;  // of x a panel holds
  float* buffers;      // rows x cols floats per thread
  float* partial;      // rows x out_features fp32 partial sums (when cols < in_features)
};

template <int W, int P>
AQUILA_INLINE void fill_panel(const Panels& p, float* panel, int64_t m0, int64_t rows, int64_t k0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t offset = (m0 + r) * p.x_row_stride + k0;
    float* dst = panel + r * cols;
    switch (p.x_dtype) {
      case DType::f32: fill_row<float, W, P>(dst, static_cast<const float*>(p.x) + offset, cols); break;
      case DType::f16: fill_row<f16, W, P>(dst, static_cast<const f16*>(p.x) + offset, cols); break;
      case DType::bf16: fill_row<bf16, W, P>(dst, static_cast<const bf16*>(p.x) + offset, cols); break;
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
      fill_panel<W, P>(p, panel, m0, rows, k0, cols);
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

// x: the input in fp32, rows in_features apart.
void scalar_forward(const QuantizedLinear& a, const float* x, int threads) {
  const Weights wt = weights_of(a);
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

// ------------------------------------------------------------------------------------------------------------------
// Forward with int8 inputs on vpdpbusd (AVX512-VNNI): a GEMM with the rows of x in the vector lanes.
//
// x is rounded as the decoding step rounds its inputs (quantize_block: blocks of kInputBlock = 32 columns, one d
// each) and held in "lanes": per 16 rows of x (a vector, a lane per row) and per quad of 4 columns, 64 bytes, lane t
// holding row t's four q + 128 (vpdpbusd multiplies unsigned bytes by signed ones). Each quad of a row of W, 4 signed
// bytes, is broadcast to the 16 lanes by the instruction itself, so one vpdpbusd adds 4 columns' products for 16 rows
// of x and one of W, and the weights need no layout of their own. A block's int32 sums start from -128 times the
// block's sum of weights (what the + 128 adds; exact: every partial sum stays below 2^21 in magnitude) and are then
// scaled by each lane's d into fp32 accumulators.
//   Int8 weights are broadcast from the weights as they lie. Int4 ones are first unpacked, C rows at a time, into a
// scratch of bytes 0..15 (L1/L2-resident) that holds each block's low nibbles (columns 2j) then its high ones
// (2j + 1); x's quads take the same order. The nibbles enter unshifted, so each group's zero adds
// - zero scale sum_b d_b S_b (S_b: block b's sum of q; "terms"), once per group and row of x, as in the decoding step.
// Tiles: R = 2 vectors of x (32 rows) by C = 4 rows of W: 8 int32 chains of 8 vpdpbusd a block, beside 8 fp32
// accumulators a group and 8 in all. Each thread owns a range of W's rows and runs, per panel of x, every tile of its
// range against every pair of the panel's vectors: W streams from memory once per panel, and each tile reads the
// panel from the caches (L2, or L3 for long prompts).

constexpr int64_t kLaneRows = 16;
constexpr int64_t kQuadsPerBlock = kInputBlock / 4;
// x's lanes a panel holds: a prompt of up to 736 tokens at 11008 columns (2048 at 4096) is one panel. Panels the
// size of an L2 (512 KiB) streamed W from memory once per 32 rows there, and ran 256 rows of Aquila-7B's w2 at 0.93x
// torch's bf16 matmul of dense weights, against 1.6x-1.9x with one panel (benchmarks/quantized_prefill.py).
constexpr int64_t kLanePanelBytes = 8 << 20;
constexpr int kGemmRows = 2, kGemmWeightRows = 4;  // R vectors of x, C rows of W

// Whether the vpdpbusd GEMM takes this call: blocks of x that lie within one group of the weights, and a vector of
// rows of x at least (with fewer, most lanes would multiply zeros: the fp32 kernels, which read each row of W once for
// a few rows of x, are then the faster).
bool int8_gemm_takes(const QuantizedLinear& a) {
  return has_vnni() && a.rows >= kLaneRows && a.in_features % kInputBlock == 0 &&
         (a.bits == 8 || a.group_size % kInputBlock == 0);
}

// x rounded and laid out in lanes, for vectors of kLaneRows rows.
struct LaneInputs {
  uint8_t* q;      // [vector][quad][lane][4]: q + 128, each block's quads in the weights' order
  float* d;        // [vector][block][lane]
  float* terms;    // int4: [vector][group][lane], sum over the group's blocks of d S
  int64_t quads, blocks, groups;

  uint8_t* quad(int64_t v, int64_t quad) const { return q + (v * quads + quad) * 64; }
  float* scales(int64_t v, int64_t block) const { return d + (v * blocks + block) * kLaneRows; }
  float* group_terms(int64_t v, int64_t g) const { return terms + (v * groups + g) * kLaneRows; }
};

// A block of x's q in the order of the weights' bytes, each q + offset: int8 weights, the columns in order; int4, the
// block's even columns (low nibbles), then its odd ones. Byte 4 i + j is byte j of the block's quad i.
template <int Bits>
AQUILA_INLINE void block_bytes(const int8_t (&q)[kInputBlock], int offset, uint8_t (&out)[kInputBlock]) {
  using Bytes32 = uint8_t __attribute__((vector_size(kInputBlock)));
  Bytes32 bytes;
  std::memcpy(&bytes, q, kInputBlock);
  bytes += static_cast<uint8_t>(offset);
  if constexpr (Bits == 4) {
    bytes = __builtin_shuffle(bytes, Bytes32{0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                             1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31});
  }
  std::memcpy(out, &bytes, kInputBlock);
}

// Rows [16 v, 16 v + 16) of x, for the blocks of `unit` (an int4 group: a unit of terms; for int8, one block):
// rounded, laid out (each byte q + offset: 128 for vpdpbusd's unsigned bytes, 0 for AMX's signed ones), and their d
// and terms. Rows past x's are zeros (q = 0, d = 0).
template <int Bits>
AQUILA_INLINE void fill_lanes(const QuantizedLinear& a, const LaneInputs& x, int64_t v, int64_t first_block,
                              int64_t blocks, int offset) {
  float values[kInputBlock];
  int8_t q[kInputBlock];
  for (int64_t lane = 0; lane < kLaneRows; ++lane) {
    const int64_t row = v * kLaneRows + lane;
    double term = 0.0;
    for (int64_t b = first_block; b < first_block + blocks; ++b) {
      float d = 0.0f;
      int sum = 0;
      std::fill(q, q + kInputBlock, int8_t{0});
      if (row < a.rows) {
        dispatch_dtype(a.dtype, [&](auto* tag) {
          using T = std::remove_pointer_t<decltype(tag)>;
          const T* src = static_cast<const T*>(a.x) + row * a.x_row_stride + b * kInputBlock;
          for (int64_t i = 0; i < kInputBlock; ++i) values[i] = to_float(src[i]);
        });
        d = quantize_block(values, kInputBlock, q);
        for (int64_t i = 0; i < kInputBlock; ++i) sum += q[i];
      }
      uint8_t bytes[kInputBlock];
      block_bytes<Bits>(q, offset, bytes);
      for (int64_t i = 0; i < kQuadsPerBlock; ++i)
        std::memcpy(x.quad(v, b * kQuadsPerBlock + i) + lane * 4, bytes + 4 * i, 4);
      x.scales(v, b)[lane] = d;
      term += static_cast<double>(d) * sum;
    }
    if constexpr (Bits == 4) x.group_terms(v, first_block / blocks)[lane] = static_cast<float>(term);
  }
}

// Every lane of x's `vectors`, shared by a team (inside its parallel region): per (vector, unit of blocks), a group for
// int4 (its terms), a block for int8.
template <int Bits>
AQUILA_INLINE void fill_lanes_in_team(const QuantizedLinear& a, const LaneInputs& x, int64_t vectors, int offset) {
  const int64_t unit = Bits == 4 ? a.group_size / kInputBlock : 1;
  const int64_t units = x.blocks / unit;
#pragma omp for schedule(static)
  for (int64_t item = 0; item < vectors * units; ++item)
    fill_lanes<Bits>(a, x, item / units, item % units * unit, unit, offset);
}

// Per thread: C rows of W ready for the tiles. int8: their rows as they lie; int4: unpacked into the scratch. And each
// block's -128 sum of weights (int4: of nibbles), the start of its int32 sums.
struct WeightRows {
  const uint8_t* rows[kGemmWeightRows];
  int64_t padded_blocks;  // the blocks of a row, rounded up to whole vectors of weights (4 blocks)
  int32_t* starts;        // [C][padded_blocks]
  uint8_t* scratch;       // int4: [C][padded_blocks * 32]
};

using Bytes64 = uint8_t __attribute__((vector_size(64)));
using Quads64 = uint64_t __attribute__((vector_size(64)));

// The sum of each 32-byte half of v's unsigned bytes: vpsadbw against zeros sums each 8 bytes (inline assembly, as
// dot_bytes), then the half's four sums.
AQUILA_INLINE void half_sums(const Bytes64& v, int32_t (&sums)[2]) {
  Quads64 eights;
  asm("vpsadbw %[zeros], %[v], %[eights]" : [eights] "=v"(eights) : [v] "v"(v), [zeros] "v"(Bytes64{}));
  sums[0] = static_cast<int32_t>(eights[0] + eights[1] + eights[2] + eights[3]);
  sums[1] = static_cast<int32_t>(eights[4] + eights[5] + eights[6] + eights[7]);
}

// 64 bytes from p, of which only `count` are to be read (the rest zeros): a whole vector in a loop's body, fewer once
// at a row's end (a copy of variable size costs far more than the vector's work).
AQUILA_INLINE void load_bytes(Bytes64& v, const uint8_t* p, int64_t count) {
  if (count >= 64) {
    std::memcpy(&v, p, 64);
  } else {
    v = Bytes64{};
    std::memcpy(&v, p, count);
  }
}

// 64 packed bytes of an int4 row (4 blocks, 128-bit lane L holding block b + L) as bytes 0..15 in the order x's
// quads take: each block's low nibbles (columns 2j), then its high ones; blocks b, b + 1 in `first`, b + 2, b + 3 in
// `second`.
AQUILA_INLINE void unpack_four_blocks(const Bytes64& packed, Quads64& first, Quads64& second) {
  const Bytes64 low = Bytes64{} + 15;
  const Quads64 even = (Quads64)(packed & low), odd = (Quads64)((packed >> 4) & low);
  first = __builtin_shuffle(even, odd, Quads64{0, 1, 8, 9, 2, 3, 10, 11});
  second = __builtin_shuffle(even, odd, Quads64{4, 5, 12, 13, 6, 7, 14, 15});
}

template <int Bits>
AQUILA_INLINE void prepare_rows(const QuantizedLinear& a, const int64_t (&n)[kGemmWeightRows], WeightRows& w) {
  const int64_t blocks = a.in_features / kInputBlock;
  for (int c = 0; c < kGemmWeightRows; ++c) {
    int32_t* starts = w.starts + c * w.padded_blocks;
    if constexpr (Bits == 8) {
      const uint8_t* row = static_cast<const uint8_t*>(a.qweight) + n[c] * a.in_features;
      w.rows[c] = row;
      for (int64_t b = 0; b < blocks; b += 2) {  // 64 bytes: 2 blocks
        Bytes64 v;
        load_bytes(v, row + b * kInputBlock, a.in_features - b * kInputBlock);
        int32_t sums[2];
        half_sums(v ^ 0x80, sums);  // of w + 128
        starts[b] = -128 * (sums[0] - 128 * kInputBlock);
        starts[b + 1] = -128 * (sums[1] - 128 * kInputBlock);
      }
    } else {
      const uint8_t* row = static_cast<const uint8_t*>(a.qweight) + n[c] * a.in_features / 2;
      uint8_t* out = w.scratch + c * w.padded_blocks * kInputBlock;
      w.rows[c] = out;
      for (int64_t b = 0; b < blocks; b += 4) {
        Bytes64 v;
        load_bytes(v, row + b * kInputBlock / 2, (blocks - b) * kInputBlock / 2);
        Quads64 first, second;
        unpack_four_blocks(v, first, second);
        int32_t sums[2];
        half_sums((Bytes64)first, sums);
        starts[b] = -128 * sums[0], starts[b + 1] = -128 * sums[1];
        half_sums((Bytes64)second, sums);
        starts[b + 2] = -128 * sums[0], starts[b + 3] = -128 * sums[1];
        std::memcpy(out + b * kInputBlock, &first, 64);
        std::memcpy(out + (b + 2) * kInputBlock, &second, 64);
      }
    }
  }
}

// One quad (4 columns, from byte `offset` of each prepared row) of every row of a tile: sums[r][c] += the lanes of
// vector r times row c's quad. A recursion over the rows, as step_rows, so that the sums stay in registers.
template <int R, int C, int Row>
AQUILA_INLINE void quad_rows(Words16 (&sums)[R][C], const Words16 (&lanes)[R], const uint8_t* const (&rows)[C],
                             int64_t offset) {
  if constexpr (Row < C) {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) dot_bytes_broadcast(sums[r][Row], lanes[r], rows[Row] + offset);
    quad_rows<R, C, Row + 1>(sums, lanes, rows, offset);
  }
}

// A tile's sums, with the bias, into out in T: for each row of x (a lane), its outputs at the `valid` columns from n0,
// side by side (the type chosen once a tile, not per element).
template <typename T, int R>
AQUILA_INLINE void store_tile(const QuantizedLinear& a, const Lanes<16>::type (&acc)[R][kGemmWeightRows], int64_t v,
                              int64_t n0, int64_t valid) {
  float values[R][kGemmWeightRows][kLaneRows], bias[kGemmWeightRows] = {};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kGemmWeightRows; ++c) store(values[r][c], acc[r][c]);
  for (int64_t c = 0; c < valid && a.bias; ++c) bias[c] = a.bias[n0 + c];
  for (int r = 0; r < R; ++r) {
    for (int64_t lane = 0; lane < kLaneRows && (v + r) * kLaneRows + lane < a.rows; ++lane) {
      T* out = static_cast<T*>(a.out) + ((v + r) * kLaneRows + lane) * a.out_features + n0;
      for (int64_t c = 0; c < valid; ++c) out[c] = from_float<T>(values[r][c][lane] + bias[c]);
    }
  }
}

// R vectors of x from v against the C prepared rows n of W: out rows 16 v.., columns n, in x's dtype.
// Compiled on its own (not inlined into its caller, where GCC kept the int32 sums in memory).
template <int R, int Bits>
AQUILA_TARGET_AVX512 __attribute__((noinline)) void gemm_tile(const QuantizedLinear& a, const LaneInputs& x,
                                                              int64_t v, const int64_t (&n)[kGemmWeightRows],
                                                              int64_t valid, const WeightRows& w) {
  constexpr int C = kGemmWeightRows;
  using V = Lanes<16>::type;
  const Weights wt = weights_of(a);
  const int64_t blocks = a.in_features / kInputBlock;
  const int64_t blocks_per_group = Bits == 4 ? a.group_size / kInputBlock : blocks;
  V acc[R][C] = {};
  for (int64_t g = 0; g < blocks / blocks_per_group; ++g) {
    V group_acc[R][C] = {};
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      Words16 sums[R][C];
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) {
        const Words16 start = Words16{} + static_cast<uint32_t>(w.starts[c * w.padded_blocks + b]);
#pragma GCC unroll 2
        for (int r = 0; r < R; ++r) sums[r][c] = start;
      }
#pragma GCC unroll 8
      for (int64_t i = 0; i < kQuadsPerBlock; ++i) {
        Words16 lanes[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) std::memcpy(&lanes[r], x.quad(v + r, b * kQuadsPerBlock + i), 64);
        quad_rows<R, C, 0>(sums, lanes, w.rows, b * kInputBlock + 4 * i);
      }
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        V d;
        load(d, x.scales(v + r, b));
#pragma GCC unroll 4
        for (int c = 0; c < C; ++c) {
          V products;
          lanes_of(products, sums[r][c]);
          group_acc[r][c] += products * d;
        }
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) {
      const float scale = Bits == 8 ? a.scales[n[c]] : wt.scale(n[c], g);
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r) {
        acc[r][c] += group_acc[r][c] * scale;
        if constexpr (Bits == 4) {
          V terms;
          load(terms, x.group_terms(v + r, g));
          acc[r][c] -= (wt.zero(n[c], g) * scale) * terms;
        }
      }
    }
  }
  switch (a.dtype) {
    case DType::f32: store_tile<float, R>(a, acc, v, n[0], valid); break;
    case DType::f16: store_tile<f16, R>(a, acc, v, n[0], valid); break;
    case DType::bf16: store_tile<bf16, R>(a, acc, v, n[0], valid); break;
  }
}

template <int Bits>
AQUILA_TARGET_AVX512 __attribute__((noinline)) void int8_gemm_in_team(const QuantizedLinear& a, const LaneInputs& x,
                                                                     int64_t vectors, WeightRows w, int thread,
                                                                     int team) {
  constexpr int C = kGemmWeightRows;
  fill_lanes_in_team<Bits>(a, x, vectors, 128);
  // Every thread's rows of W against every vector of x, a panel of vectors at a time.
  const int64_t tiles = (a.out_features + C - 1) / C;
  const int64_t first = tiles * thread / team, end = tiles * (thread + 1) / team;
  const int64_t panel = std::max<int64_t>(kGemmRows, kLanePanelBytes / (kLaneRows * a.in_features) / kGemmRows *
                                                         kGemmRows);
  for (int64_t v0 = 0; v0 < vectors; v0 += panel) {
    const int64_t v_end = std::min(vectors, v0 + panel);
    for (int64_t tile = first; tile < end; ++tile) {
      int64_t n[C];
      for (int c = 0; c < C; ++c) n[c] = std::min(tile * C + c, a.out_features - 1);  // past the end: not stored
      const int64_t valid = std::min<int64_t>(C, a.out_features - tile * C);
      prepare_rows<Bits>(a, n, w);
      int64_t v = v0;
      for (; v + kGemmRows <= v_end; v += kGemmRows) gemm_tile<kGemmRows, Bits>(a, x, v, n, valid, w);
      if (v < v_end) gemm_tile<1, Bits>(a, x, v, n, valid, w);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------------
// The same GEMM on AMX tiles (AMX-INT8), where has_amx_int8(). x is rounded and laid out as above but without the
// + 128: AMX multiplies signed bytes by signed ones (tdpbssd: int8 weights) or unsigned by signed (tdpbusd: int4
// nibbles), so the blocks need no starts. One instruction multiplies a tile of 16 rows of W over one block (A: 16 rows
// of 32 bytes, int8 rows where they lie, int4 ones unpacked into a scratch as above) by one vector of x's lanes over
// the block (B: the block's 8 quads of 64 bytes, the layout the lanes already have) into 16 x 16 int32 sums (C, row r:
// row r of W against the vector's 16 rows of x): 8192 products, where vpdpbusd makes 64. Each block has its own d per
// row of x (the decoding step's rounding), so each block's sums go through memory into fp32: 16 conversions and 16
// multiply-adds by the lanes' d, into a group's sums that stay in registers (16 vectors), which at the group's end
// (int8: the row's end) are scaled by their rows' scales, less the zeros' terms (int4), into the tile's totals in
// memory. The tile is half as deep as it could be (64 bytes), the price of the 32-column blocks; each block's product
// is issued before the previous block's sums are read back, so that the tile unit and the vector units overlap. Each
// thread owns a range of W's 16-row tiles and runs each against every vector of a panel of x.
//   On the AMX Xeon this was tuned on (a 2-core virtual machine), timing the tile instructions alone: a 16-row tile
// load costs about 3 tile products (42 cycles against 14), whatever the rows' width, and a store about one; so each
// block costs its loads first. Loading a tile of W once for two vectors of x would save a third of them, and leave
// the group's sums (32 vectors) no registers.
//   The tile instructions are inline assembly, as vpdpbusd is (no target attribute beyond AVX-512's). The tiles'
// loads read memory written before the function that issues them is called (the lanes, the scratch) and are no
// compiler barrier; a store tells the compiler which sums it writes.

constexpr int64_t kAmxRows = 16;  // rows of W in a tile
// x's lanes an AMX panel holds (W streams from memory once per panel): 1 MiB, half the L2 of each core of the AMX
// CPUs so far (2 MiB from Sapphire Rapids on), 256 rows at 4096 columns. Tile loads are the GEMM's bottleneck and pay
// for a miss: with the vpdpbusd GEMM's 8 MiB panels, 1024 rows x 4096 x 11008 took 5.2x what 256 rows took.
constexpr int64_t kAmxPanelBytes = 1 << 20;
enum : int { kSumsTile0 = 0, kSumsTile1 = 1, kWeightTile0 = 2, kWeightTile1 = 3, kLaneTile0 = 4, kLaneTile1 = 5 };
using TileSums = int32_t[kAmxRows * kLaneRows];

// ldtilecfg's operand (palette 1): C tiles 16 rows x 64 bytes, A tiles 16 x 32 (a block of 16 rows of W), B tiles
// 8 x 64 (a block's quads).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};

  TileConfig() {
    for (int t : {kSumsTile0, kSumsTile1}) bytes_per_row[t] = 64, rows[t] = kAmxRows;
    for (int t : {kWeightTile0, kWeightTile1}) bytes_per_row[t] = kInputBlock, rows[t] = kAmxRows;
    for (int t : {kLaneTile0, kLaneTile1}) bytes_per_row[t] = 64, rows[t] = kQuadsPerBlock;
  }
};

// Tile Sums = tile Weights (16 rows of W from `weights`, `stride` bytes apart) times tile Lanes (a block of a vector
// of x), over one block, from zero.
template <int Bits, int Sums, int Weights, int Lanes>
AQUILA_INLINE void tile_block_product(const uint8_t* weights, int64_t stride, const uint8_t* lanes) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(weights), "r"(stride), "i"(Weights));
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(lanes), "r"(int64_t{64}), "i"(Lanes));
  asm volatile("tilezero %%tmm%c0" ::"i"(Sums));
  if constexpr (Bits == 8) {  // AT&T order: B, A, C
    asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(Sums), "i"(Weights), "i"(Lanes));
  } else {
    asm volatile("tdpbusd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(Sums), "i"(Weights), "i"(Lanes));
  }
}

template <int Sums>
AQUILA_INLINE void tile_store(TileSums& sums) {
  asm volatile("tilestored %%tmm%c2, (%1,%3,1)" : "=m"(sums) : "r"(&sums[0]), "i"(Sums), "r"(int64_t{64}));
}

// A group's sums of a tile of W against a vector of x (row r of W, a lane per row of x): rows 0-7 and rows 8-15, two
// arrays indexed only by constants (GCC keeps an aggregate of 16 vectors, 1 KiB, in memory, one of 8 in registers).
using HalfTile = Lanes<16>::type[kAmxRows / 2];
using TileTotals = float[kAmxRows][kLaneRows];

// Row r of the group's sums += the block's sums of row r (from memory) times the lanes' d.
AQUILA_INLINE void add_block_sums(HalfTile& low_rows, HalfTile& high_rows, const TileSums& sums, const float* d) {
  using V = Lanes<16>::type;
  using Ints16 = int32_t __attribute__((vector_size(64)));
  V lanes_d;
  load(lanes_d, d);
#pragma GCC unroll 8
  for (int r = 0; r < kAmxRows / 2; ++r) {
    Ints16 low, high;
    std::memcpy(&low, sums + r * kLaneRows, 64);
    std::memcpy(&high, sums + (r + kAmxRows / 2) * kLaneRows, 64);
    low_rows[r] += __builtin_convertvector(low, V) * lanes_d;
    high_rows[r] += __builtin_convertvector(high, V) * lanes_d;
  }
}

// totals row r += the group's sums of row r times scales[r], less zeros[r] (zero times scale, int4) times the lanes'
// terms; the group's sums back to zero.
AQUILA_INLINE void add_group_sums(TileTotals& totals, HalfTile& low_rows, HalfTile& high_rows, const float* scales,
                                  const float* zeros, const Lanes<16>::type& terms) {
  using V = Lanes<16>::type;
#pragma GCC unroll 8
  for (int r = 0; r < kAmxRows / 2; ++r) {
    const int high = r + kAmxRows / 2;
    V low_total, high_total;
    load(low_total, totals[r]);
    load(high_total, totals[high]);
    store(totals[r], low_total + low_rows[r] * scales[r] - zeros[r] * terms);
    store(totals[high], high_total + high_rows[r] * scales[high] - zeros[high] * terms);
    low_rows[r] = V{}, high_rows[r] = V{};
  }
}

// One stage of a 16 x 16 transpose in registers: rows i and i + K (i without bit K) swap bit K of their row index with
// bit K of the lane's, each pair in two shuffles. After the stages for K = 1, 2, 4, 8, row i holds column i.
template <int K, bool High, size_t... P>
AQUILA_INLINE void transpose_mask(Words16& mask, std::index_sequence<P...>) {
  mask = Words16{static_cast<uint32_t>(High ? ((P & K) ? 16 + P : P + K) : ((P & K) ? 16 + P - K : P))...};
}

template <int K>
AQUILA_INLINE void transpose_stage(Lanes<16>::type (&rows)[16]) {
  Words16 low, high;
  transpose_mask<K, false>(low, std::make_index_sequence<16>());
  transpose_mask<K, true>(high, std::make_index_sequence<16>());
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    if (i & K) continue;
    const Lanes<16>::type a = rows[i], b = rows[i + K];
    rows[i] = __builtin_shuffle(a, b, low);
    rows[i + K] = __builtin_shuffle(a, b, high);
  }
}

// The tile's totals [row of W][lane] as [lane][row of W], the output's order.
AQUILA_INLINE void transpose_totals(const TileTotals& totals, TileTotals& by_lane) {
  Lanes<16>::type rows[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) load(rows[i], totals[i]);
  transpose_stage<1>(rows);
  transpose_stage<2>(rows);
  transpose_stage<4>(rows);
  transpose_stage<8>(rows);
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) store(by_lane[i], rows[i]);
}

// A tile of W ready for the tile products: its 16 rows from n0 (`valid` of them real), and per group of the weights
// (int8: one) the rows' scales and zeros (zero times scale; int8: 0).
struct AmxWeightTile {
  const uint8_t* rows;  // block b's rows from rows + b * 32, stride bytes apart
  int64_t stride, n0, valid;
  const float* scales;  // [group][16]
  const float* zeros;   // [group][16]
};

// The tile of W against vector v of x: out rows 16 v.., columns n0.., in x's dtype.
template <int Bits>
AQUILA_TARGET_AVX512 __attribute__((noinline)) void amx_tile_vector(const QuantizedLinear& a, const LaneInputs& x,
                                                                    int64_t v, const AmxWeightTile& w) {
  using V = Lanes<16>::type;
  const int64_t blocks = x.blocks, blocks_per_group = Bits == 4 ? a.group_size / kInputBlock : blocks;
  TileSums sums;
  alignas(64) TileTotals totals = {};
  HalfTile low_rows = {}, high_rows = {};
  tile_block_product<Bits, kSumsTile0, kWeightTile0, kLaneTile0>(w.rows, w.stride, x.quad(v, 0));
  for (int64_t b = 0, g = 0, group_end = blocks_per_group; b < blocks; ++b) {
    // The block's sums out of their tile, the next block's product into the other.
    const uint8_t* next_weights = w.rows + (b + 1) * kInputBlock;
    const uint8_t* next_lanes = x.quad(v, (b + 1) * kQuadsPerBlock);
    if (b % 2 == 0) {
      tile_store<kSumsTile0>(sums);
      if (b + 1 < blocks)
        tile_block_product<Bits, kSumsTile1, kWeightTile1, kLaneTile1>(next_weights, w.stride, next_lanes);
    } else {
      tile_store<kSumsTile1>(sums);
      if (b + 1 < blocks)
        tile_block_product<Bits, kSumsTile0, kWeightTile0, kLaneTile0>(next_weights, w.stride, next_lanes);
    }
    add_block_sums(low_rows, high_rows, sums, x.scales(v, b));
    if (b + 1 == group_end) {
      V terms = {};
      if constexpr (Bits == 4) load(terms, x.group_terms(v, g));
      add_group_sums(totals, low_rows, high_rows, w.scales + g * kAmxRows, w.zeros + g * kAmxRows, terms);
      ++g, group_end += blocks_per_group;
    }
  }
  // Out row by row, a whole tile's outputs in a loop of constant length, which vectorises (an element at a time, the
  // totals read down their columns, cost about 5% of a 64 x 384 x 384 int4 call).
  alignas(64) TileTotals by_lane;
  transpose_totals(totals, by_lane);
  float bias[kAmxRows] = {};
  for (int64_t r = 0; r < w.valid && a.bias; ++r) bias[r] = a.bias[w.n0 + r];
  dispatch_dtype(a.dtype, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t lane = 0; lane < kLaneRows && v * kLaneRows + lane < a.rows; ++lane) {
      T* out = static_cast<T*>(a.out) + (v * kLaneRows + lane) * a.out_features + w.n0;
      if (w.valid == kAmxRows) {
        for (int64_t r = 0; r < kAmxRows; ++r) out[r] = from_float<T>(by_lane[lane][r] + bias[r]);
      } else {
        for (int64_t r = 0; r < w.valid; ++r) out[r] = from_float<T>(by_lane[lane][r] + bias[r]);
      }
    }
  });
}

// A tile of W's rows for the tile loads, in_features bytes apart: int8 rows where they lie, but for a last tile of
// fewer than 16 rows, copied into `scratch`; int4 ones unpacked into it as for vpdpbusd. Rows past the end repeat
// the last (not stored). Returns where block 0's rows start.
template <int Bits>
AQUILA_INLINE const uint8_t* prepare_amx_tile(const QuantizedLinear& a, int64_t n0, uint8_t* scratch) {
  const uint8_t* weights = static_cast<const uint8_t*>(a.qweight);
  if (Bits == 8 && n0 + kAmxRows <= a.out_features) return weights + n0 * a.in_features;
  const int64_t blocks = a.in_features / kInputBlock;
  for (int64_t r = 0; r < kAmxRows; ++r) {
    const int64_t n = std::min(n0 + r, a.out_features - 1);
    uint8_t* out = scratch + r * a.in_features;
    if constexpr (Bits == 8) {
      std::memcpy(out, weights + n * a.in_features, a.in_features);
    } else {
      const uint8_t* row = weights + n * a.in_features / 2;
      for (int64_t b = 0; b < blocks; b += 4) {
        Bytes64 packed;
        load_bytes(packed, row + b * kInputBlock / 2, (blocks - b) * kInputBlock / 2);
        Quads64 unpacked[2];
        unpack_four_blocks(packed, unpacked[0], unpacked[1]);
        if (b + 4 <= blocks) {  // a copy of constant size in the loop's body, as load_bytes
          std::memcpy(out + b * kInputBlock, unpacked, 4 * kInputBlock);
        } else {
          std::memcpy(out + b * kInputBlock, unpacked, (blocks - b) * kInputBlock);
        }
      }
    }
  }
  return scratch;
}

// A thread's part of the AMX GEMM: the lanes (shared, in x's blocks), then its range of W's tiles against every
// vector of each panel of x. tile_rows: the thread's 16 rows of in_features bytes; group_values: its 2 [group][16]
// floats.
template <int Bits>
AQUILA_TARGET_AVX512 __attribute__((noinline)) void amx_gemm_in_team(const QuantizedLinear& a, const LaneInputs& x,
                                                                     int64_t vectors, uint8_t* tile_rows,
                                                                     float* group_values, int thread, int team) {
  fill_lanes_in_team<Bits>(a, x, vectors, 0);
  const TileConfig config;
  asm volatile("ldtilecfg %0" ::"m"(config));
  const Weights wt = weights_of(a);
  float *scales = group_values, *zeros = group_values + x.groups * kAmxRows;
  const int64_t tiles = (a.out_features + kAmxRows - 1) / kAmxRows;
  const int64_t panel = std::max<int64_t>(1, kAmxPanelBytes / (kLaneRows * a.in_features));
  for (int64_t v0 = 0; v0 < vectors; v0 += panel) {
    for (int64_t tile = tiles * thread / team; tile < tiles * (thread + 1) / team; ++tile) {
      const int64_t n0 = tile * kAmxRows;
      const uint8_t* rows = prepare_amx_tile<Bits>(a, n0, tile_rows);
      for (int64_t g = 0; g < x.groups; ++g) {
        for (int64_t r = 0; r < kAmxRows; ++r) {
          const int64_t n = std::min(n0 + r, a.out_features - 1);
          scales[g * kAmxRows + r] = Bits == 8 ? a.scales[n] : wt.scale(n, g);
          zeros[g * kAmxRows + r] = Bits == 8 ? 0.0f : wt.zero(n, g) * scales[g * kAmxRows + r];
        }
      }
      const AmxWeightTile w{rows, a.in_features, n0, std::min(kAmxRows, a.out_features - n0), scales, zeros};
      for (int64_t v = v0; v < std::min(vectors, v0 + panel); ++v) amx_tile_vector<Bits>(a, x, v, w);
    }
  }
  asm volatile("tilerelease" ::);
}

void int8_inputs_forward(const QuantizedLinear& a, int threads) {
  const int64_t vectors = (a.rows + kLaneRows - 1) / kLaneRows;
  const int64_t blocks = a.in_features / kInputBlock;
  LaneInputs x{};
  x.quads = a.in_features / 4, x.blocks = blocks, x.groups = a.bits == 4 ? a.in_features / a.group_size : 1;
  // Allocated here, where running out of memory throws, rather than inside the parallel region, where it would abort.
  std::vector<uint8_t> q(vectors * kLaneRows * a.in_features);
  std::vector<float> d(vectors * blocks * kLaneRows), terms(vectors * x.groups * kLaneRows);
  x.q = q.data(), x.d = d.data(), x.terms = terms.data();
  // Per thread, the vpdpbusd GEMM's prepared rows of W (their starts; int4, the unpacked rows), or the AMX GEMM's tile
  // of W and its rows' scales and zeros.
  const bool amx = has_amx_int8();
  const int64_t padded_blocks = (blocks + 3) / 4 * 4, rows = kGemmWeightRows * padded_blocks;
  std::vector<int32_t> starts(amx ? 0 : threads * rows);
  std::vector<uint8_t> scratch(amx ? threads * kAmxRows * a.in_features
                                   : a.bits == 4 ? threads * rows * kInputBlock : 0);
  std::vector<float> group_values(amx ? threads * 2 * x.groups * kAmxRows : 0);
#pragma omp parallel num_threads(threads)
  {
    const int thread = thread_id();
    if (amx) {
      uint8_t* tile_rows = scratch.data() + thread * kAmxRows * a.in_features;
      float* values = group_values.data() + thread * 2 * x.groups * kAmxRows;
      if (a.bits == 4) {
        amx_gemm_in_team<4>(a, x, vectors, tile_rows, values, thread, team_size());
      } else {
        amx_gemm_in_team<8>(a, x, vectors, tile_rows, values, thread, team_size());
      }
    } else {
      WeightRows w{};
      w.padded_blocks = padded_blocks;
      w.starts = starts.data() + thread * rows;
      w.scratch = a.bits == 4 ? scratch.data() + thread * rows * kInputBlock : nullptr;
      if (a.bits == 4) {
        int8_gemm_in_team<4>(a, x, vectors, w, thread, team_size());
      } else {
        int8_gemm_in_team<8>(a, x, vectors, w, thread, team_size());
      }
    }
  }
}

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
  if (args.int8_inputs && int8_gemm_takes(args)) {
    int8_inputs_forward(args, threads);
    return;
  }
  Panels p{args.x, args.x_row_stride, args.dtype};
  std::vector<float> rounded;
  if (args.int8_inputs) {  // x rounded to int8 and back, in fp32, for the fp32 kernels
    std::vector<float> buffer;
    const float* x = as_fp32(args.x, args.x_row_stride, args.rows, args.in_features, args.dtype, buffer, threads);
    rounded.resize(args.rows * args.in_features);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < args.rows; ++r)
      dequantize_int8_row(x + r * args.in_features, args.in_features, rounded.data() + r * args.in_features);
    p.x = rounded.data(), p.x_row_stride = args.in_features, p.x_dtype = DType::f32;
  }
  const int w = vector_width(args.bits, args.group_size);
  if (w == 0) {
    std::vector<float> buffer;
    scalar_forward(args, as_fp32(p.x, p.x_row_stride, args.rows, args.in_features, p.x_dtype, buffer, threads),
                   threads);
    return;
  }
  // Panels: up to kPanelRows rows of x and as many columns as kPanelFloats allow, in whole groups (int4) or steps.
  const int64_t unit = args.bits == 4 ? args.group_size : 4 * w;
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
