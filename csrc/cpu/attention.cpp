// Flash attention on CPU (the interface and the varlen layout are in csrc/kernels.h).
//
// Forward: a work item is a range of query blocks (BQ queries each) of the q heads of one kv head's group in one
// sequence. Keys stream through in blocks of BK, each packed to fp32 once for all of the item's query blocks; per
// (key block, query block) tile the scores, the online softmax (running max m and sum l per query) and the output
// accumulator O += P V are fp32 in per-thread scratch, so memory stays linear in the sequence length and no
// q_len x k_len matrix exists.
//
// Backward (recomputing P from q, k and lse, as flash-attention does): for a block of keys and a block of queries,
//   S^T = K Q^T,  P^T = exp(S^T - lse),  dV += P^T dO,  dP^T = V dO^T,  dS^T = P^T (dP^T - delta),
//   dK += dS^T Q,  dQ += dS K,
// with the scale folded into Q for S and applied to dK and dQ at the end. A work item owns whole outputs, so there
// are no atomics and the result does not depend on scheduling: one (sequence, kv head) item packs its keys and each
// q head's queries once, sweeps the tiles and keeps dK, dV and the q head's dQ in fp32 accumulators. When there are
// too few such items for the threads, the same tiles run as two passes instead: key-range items for dK and dV, then
// query-range items for dQ, which recompute S and dP (7 products instead of 5). Every order used adds each
// gradient's terms in the same sequence (dK and dV of a key block over (q head, query block), dQ of a query block
// over key blocks, increasing), so the gradients are the same bits whatever the split and the number of threads.
//
// Every product is one register-tiled kernel, C[m][n] (+)= sum_k A[m][k] B[k][n], with A read one broadcast scalar at
// a time through arbitrary strides (so a transposed A costs nothing) and B and C rows contiguous and vectorised. It is
// compiled per ISA with GCC vector types: a tile of R rows x N vectors of C stays in registers (6 x 4 zmm for
// AVX-512, 6 x 2 ymm for AVX2) while the k loop runs. Score tiles are kept transposed (keys x queries), so the
// softmax statistics of the queries are lanes of vectors and K and V are used in their natural row-major layout.
// AVX-512 matters: it doubles the peak of AVX2, and torch's SDPA (MKL) uses it where the CPU has it.
//
// Sliding windows and softcapping (kernels.h): every loop over key blocks runs over the keys that some query of its
// query block sees (KeyWindow), and every loop over query blocks over the queries that see some key of its key
// block, so a window of W keys costs about W / k_len of the full attention; only tiles that straddle the window's
// edges are masked. Softcapped scores are capped before the mask (tanh_and_slope); the backward keeps each tile's
// slopes 1 - tanh^2 to multiply dS by.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

AQUILA_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ------------------------------------------------------------------------------------------------------------------
// The tiled product.

// C (m rows, ldc apart; nv vectors of W floats each) = or += A B, A[r][k] at a[r * a_rs + k * a_ks] (m x depth),
// B[k] the nv vectors at b + k * ldb.
struct Product {
  int64_t m, nv, depth;
  const float* a;
  int64_t a_rs, a_ks;
  const float* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  bool accumulate;
};

// One R x N-vector tile of C.
template <int W, int R, int N>
AQUILA_INLINE void product_tile(int64_t depth, const float* __restrict a, int64_t a_rs, int64_t a_ks,
                                const float* __restrict b, int64_t ldb, float* __restrict c, int64_t ldc,
                                bool accumulate) {
  using V = typename Lanes<W>::type;
  V acc[R][N];
  if (accumulate) {
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int n = 0; n < N; ++n) load(acc[r][n], c + r * ldc + n * W);
  } else {
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int n = 0; n < N; ++n) acc[r][n] = V{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* __restrict bk = b + k * ldb;
    const float* __restrict ak = a + k * a_ks;
    V bv[N];
#pragma GCC unroll 32
    for (int n = 0; n < N; ++n) load(bv[n], bk + n * W);
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const float s = ak[r * a_rs];
#pragma GCC unroll 32
      for (int n = 0; n < N; ++n) acc[r][n] += s * bv[n];
    }
  }
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
    for (int n = 0; n < N; ++n) store(c + r * ldc + n * W, acc[r][n]);
}

// The fp32 product's tiles, for the walk over C below.
template <int W>
struct Fp32Tiles {
  using Args = Product;
  template <int R, int N>
  static AQUILA_INLINE void tile(const Product& p, int64_t row, int64_t n) {
    product_tile<W, R, N>(p.depth, p.a + row * p.a_rs, p.a_rs, p.a_ks, p.b + n * W, p.ldb, p.c + row * p.ldc + n * W,
                          p.ldc, p.accumulate);
  }
};

// ------------------------------------------------------------------------------------------------------------------
// The bf16 product (AVX512-BF16): C (m rows, ldc apart; nv vectors of 16 floats) = or += A B in fp32, from bf16 A and
// B. vdpbf16ps adds to each fp32 lane the two products of a pair of bf16 (adjacent k) from each operand, so the depth
// runs in pairs: A[r][k] at a[r * a_rs + k] with k contiguous (a pair is one 32-bit word, broadcast to every lane),
// and B stored as pairs, the word of k-pair kp and column x at b[kp * ldb + x] holding B[2kp][x] in its low half and
// B[2kp + 1][x] in its high half. Products of bf16 are exact in fp32; the instruction rounds each pair's sum to
// nearest even and treats subnormal inputs and results as zero (which softmax probabilities and gradients that
// small do not notice).
struct Bf16Product {
  int64_t m, nv, pairs;
  const uint16_t* a;
  int64_t a_rs;
  const uint32_t* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  bool accumulate;
};

struct Bf16Tiles {
  using Args = Bf16Product;
  template <int R, int N>
  static AQUILA_INLINE void tile(const Bf16Product& p, int64_t row, int64_t n) {
    using V = Lanes<16>::type;
    const uint16_t* __restrict a = p.a + row * p.a_rs;
    const uint32_t* __restrict b = p.b + n * 16;
    float* __restrict c = p.c + row * p.ldc + n * 16;
    V acc[R][N];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int v = 0; v < N; ++v) {
        if (p.accumulate) {
          load(acc[r][v], c + r * p.ldc + v * 16);
        } else {
          acc[r][v] = V{};
        }
      }
    for (int64_t kp = 0; kp < p.pairs; ++kp) {
      Words16 bv[N];
#pragma GCC unroll 32
      for (int v = 0; v < N; ++v) std::memcpy(&bv[v], b + kp * p.ldb + v * 16, sizeof bv[v]);
#pragma GCC unroll 32
      for (int r = 0; r < R; ++r) {
        uint32_t word;
        std::memcpy(&word, a + r * p.a_rs + 2 * kp, sizeof word);
        const Words16 av = Words16{} + word;
#pragma GCC unroll 32
        for (int v = 0; v < N; ++v) dot_pairs(acc[r][v], av, bv[v]);
      }
    }
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 32
      for (int v = 0; v < N; ++v) store(c + r * p.ldc + v * 16, acc[r][v]);
  }
};

// ------------------------------------------------------------------------------------------------------------------
// The walk over C: tiles of R rows x N vectors, then narrower and shorter tiles for the edges, each a compile-time
// shape.

// The last nv - n vectors (fewer than N) of R rows, as one tile of Tail vectors when that is how many are left.
template <typename Tiles, int R, int Tail>
AQUILA_INLINE void product_cols_tail(const typename Tiles::Args& p, int64_t row, int64_t n) {
  if constexpr (Tail > 0) {
    if (p.nv - n == Tail) {
      Tiles::template tile<R, Tail>(p, row, n);
    } else {
      product_cols_tail<Tiles, R, Tail - 1>(p, row, n);
    }
  }
}

// The vectors of R rows: tiles of N vectors, then one narrower tile for the rest.
template <typename Tiles, int R, int N>
AQUILA_INLINE void product_rows(const typename Tiles::Args& p, int64_t row) {
  int64_t n = 0;
  for (; n + N <= p.nv; n += N) Tiles::template tile<R, N>(p, row, n);
  product_cols_tail<Tiles, R, N - 1>(p, row, n);
}

template <typename Tiles, int Rows, int N>
AQUILA_INLINE void product_tail_rows(const typename Tiles::Args& p, int64_t row) {
  if constexpr (Rows > 0) {
    if (p.m - row == Rows) {
      product_rows<Tiles, Rows, N>(p, row);
    } else {
      product_tail_rows<Tiles, Rows - 1, N>(p, row);
    }
  }
}

template <typename Tiles, int R, int N>
AQUILA_INLINE void product(const typename Tiles::Args& p) {
  int64_t row = 0;
  for (; row + R <= p.m; row += R) product_rows<Tiles, R, N>(p, row);
  product_tail_rows<Tiles, R - 1, N>(p, row);
}

// ------------------------------------------------------------------------------------------------------------------
// Per-ISA tiling. W floats a vector; R x N vectors of C in registers (of 16 xmm/ymm or 32 zmm); BQ queries and BK keys
// a block. product() is compiled for the ISA once, outside the dtype templates.

struct Baseline {
  static constexpr int W = 4, R = 4, N = 2;
  static constexpr int64_t BQ = 32, BK = 64;
  static constexpr bool kBf16Dot = false;
  static void product(const Product& p);
};
struct Avx2 {
  static constexpr int W = 8, R = 6, N = 2;
  static constexpr int64_t BQ = 64, BK = 64;
  static constexpr bool kBf16Dot = false;
  AQUILA_TARGET_AVX2 static void product(const Product& p);
};
struct Avx512 {
  static constexpr int W = 16, R = 6, N = 4;
  static constexpr int64_t BQ = 64, BK = 64;
  static constexpr bool kBf16Dot = false;
  AQUILA_TARGET_AVX512 static void product(const Product& p);
};
// bf16 inputs on a CPU with AVX512-BF16: the products take bf16 operands (the fp32 tiling of AVX-512 for the one
// product that stays fp32, dQ in the backward).
struct Avx512Bf16 : Avx512 {
  static constexpr bool kBf16Dot = true;
  AQUILA_TARGET_AVX512 static void product_bf16(const Bf16Product& p);
};

void Baseline::product(const Product& p) { cpu::product<Fp32Tiles<W>, R, N>(p); }
AQUILA_TARGET_AVX2 void Avx2::product(const Product& p) { cpu::product<Fp32Tiles<W>, R, N>(p); }
AQUILA_TARGET_AVX512 void Avx512::product(const Product& p) { cpu::product<Fp32Tiles<W>, R, N>(p); }
AQUILA_TARGET_AVX512 void Avx512Bf16::product_bf16(const Bf16Product& p) { cpu::product<Bf16Tiles, R, N>(p); }

// ------------------------------------------------------------------------------------------------------------------
// Tiles: packing to fp32, masking, softmax.

// Rows of q, k and v are a token stride (often many pages) apart, which the hardware prefetchers do not follow: the
// packing loops ask for the row kPrefetchRows ahead of the one they copy.
constexpr int64_t kPrefetchRows = 4;

template <typename T>
AQUILA_INLINE void prefetch_row(const T* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t x = 0; x < d * static_cast<int64_t>(sizeof(T)); x += 64) __builtin_prefetch(bytes + x, 0, 2);
}

// dst[r][x] = src row r (rows `stride` apart), x < d, in fp32; zeros from d to dp.
template <typename T>
AQUILA_INLINE void pack_rows(const T* __restrict src, int64_t stride, int64_t rows, int64_t d, int64_t dp,
                             float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict s = src + r * stride;
    if (r + kPrefetchRows < rows) prefetch_row(s + kPrefetchRows * stride, d);
    float* __restrict o = dst + r * dp;
#pragma omp simd
    for (int64_t x = 0; x < d; ++x) o[x] = to_float(s[x]);
    for (int64_t x = d; x < dp; ++x) o[x] = 0.0f;
  }
}

// dst[x][r] = scale * src row r element x (x < d, r < rows; rows ld apart in dst), zeros for r in [rows, width).
template <typename T>
AQUILA_INLINE void pack_transposed(const T* __restrict src, int64_t stride, int64_t rows, int64_t width, int64_t d,
                                   int64_t ld, float scale, float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict s = src + r * stride;
    if (r + kPrefetchRows < rows) prefetch_row(s + kPrefetchRows * stride, d);
    for (int64_t x = 0; x < d; ++x) dst[x * ld + r] = to_float(s[x]) * scale;
  }
  for (int64_t x = 0; x < d; ++x)
    for (int64_t r = rows; r < width; ++r) dst[x * ld + r] = 0.0f;
}

// The bf16 operands of Bf16Product, copied from bf16 rows (no rounding: the inputs are the operands).

// Two bf16 in one word, `low` first: the order in which vdpbf16ps pairs them.
AQUILA_INLINE uint32_t word_of(uint16_t low, uint16_t high) {
  return static_cast<uint32_t>(low) | static_cast<uint32_t>(high) << 16;
}

// An A operand: dst[r][x] = src row r element x, x < d, zeros from d to dp (dp even).
AQUILA_INLINE void pack_bf16_rows(const bf16* __restrict src, int64_t stride, int64_t rows, int64_t d, int64_t dp,
                                  uint16_t* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const bf16* __restrict s = src + r * stride;
    if (r + kPrefetchRows < rows) prefetch_row(s + kPrefetchRows * stride, d);
    std::memcpy(dst + r * dp, s, d * sizeof(uint16_t));
    std::fill(dst + r * dp + d, dst + (r + 1) * dp, uint16_t{0});
  }
}

// A B operand whose depth is the row's elements: word [x / 2][r] (ld words apart in x / 2) = elements x, x + 1 of row
// r, for x < dp (zeros from d) and r < width (zeros from rows).
AQUILA_INLINE void pack_bf16_element_pairs(const bf16* __restrict src, int64_t stride, int64_t rows, int64_t width,
                                           int64_t d, int64_t dp, int64_t ld, uint32_t* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* __restrict s = &src[r * stride].bits;
    if (r + kPrefetchRows < rows) prefetch_row(src + (r + kPrefetchRows) * stride, d);
    for (int64_t x = 0; x + 1 < d; x += 2) dst[x / 2 * ld + r] = word_of(s[x], s[x + 1]);
    if (d % 2) dst[d / 2 * ld + r] = word_of(s[d - 1], 0);
    for (int64_t x = (d + 1) / 2; x < dp / 2; ++x) dst[x * ld + r] = 0;
  }
  for (int64_t x = 0; x < dp / 2; ++x) std::fill(dst + x * ld + rows, dst + x * ld + width, 0u);
}

// A B operand whose depth is the rows: word [r / 2][x] (dp words apart in r / 2) = element x of rows r and r + 1, for
// x < dp (zeros from d), and a row of zeros after an odd number of rows.
AQUILA_INLINE void pack_bf16_row_pairs(const bf16* __restrict src, int64_t stride, int64_t rows, int64_t d, int64_t dp,
                                       uint32_t* __restrict dst) {
  for (int64_t r = 0; r < rows; r += 2) {
    const uint16_t* __restrict even = &src[r * stride].bits;
    const uint16_t* __restrict odd = r + 1 < rows ? &src[(r + 1) * stride].bits : nullptr;
    for (int64_t ahead = r + kPrefetchRows; ahead < std::min(rows, r + kPrefetchRows + 2); ++ahead)
      prefetch_row(src + ahead * stride, d);
    uint32_t* __restrict out = dst + r / 2 * dp;
    if (odd) {
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) out[x] = word_of(even[x], odd[x]);
    } else {
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) out[x] = word_of(even[x], 0);
    }
    std::fill(out + d, out + dp, 0u);
  }
}

// dst[r][i] = src[r][i] rounded to bf16 (to nearest even), r < rows, i < width: probabilities and their gradients as
// the A operand of a bf16 product.
AQUILA_INLINE void round_to_bf16(const float* __restrict src, int64_t ld, int64_t rows, int64_t width,
                                 uint16_t* __restrict dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict in = src + r * ld;
    uint16_t* __restrict out = dst + r * ldd;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) out[i] = from_float<bf16>(in[i]).bits;
  }
}

// Far beyond any position in a sequence (< 2^31): the bound of an unbounded side of the window.
constexpr int64_t kUnbounded = int64_t{1} << 40;

// The keys each query of one sequence sees (kernels.h): query i sees keys [i + shift - before, i + shift + after]
// within [0, k_len), shift = k_len - q_len. Ranges below are half-open.
struct KeyWindow {
  int64_t before, after, shift, k_len;

  // The keys [first(i0), end(i1)) that some query of [i0, i1) sees (i0 < i1).
  int64_t first(int64_t i0) const { return std::clamp<int64_t>(i0 + shift - before, 0, k_len); }
  int64_t end(int64_t i1) const { return std::clamp<int64_t>(i1 + shift + after, 0, k_len); }
  // The queries [first_query(j0), end_query(j1)) of [0, q_len) that see some key of [j0, j1) (j0 < j1).
  int64_t first_query(int64_t j0) const { return std::max<int64_t>(0, j0 - shift - after); }
  int64_t end_query(int64_t j1, int64_t q_len) const { return std::clamp<int64_t>(j1 - shift + before, 0, q_len); }
  // Whether some query of [i0, i0 + rows) sees some key of [j0, j0 + cols).
  bool sees(int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
    return j0 <= i0 + rows - 1 + shift + after && j0 + cols - 1 >= i0 + shift - before;
  }
  // Whether every query of [i0, i0 + rows) sees every key of [j0, j0 + cols): the tile needs no mask.
  bool sees_all(int64_t i0, int64_t rows, int64_t j0, int64_t cols) const {
    return j0 + cols - 1 <= i0 + shift + after && j0 >= i0 + rows - 1 + shift - before;
  }
};

template <typename Args>
KeyWindow key_window(const Args& a, int64_t b) {
  const int64_t q_len = a.seq.q_len[b], k_len = a.seq.k_len[b];
  const int64_t after = a.causal ? 0 : a.window_right >= 0 ? a.window_right : kUnbounded;
  return {a.window_left >= 0 ? a.window_left : kUnbounded, after, k_len - q_len, k_len};
}

// Scores s[j][i] (keys j0 + j, j < cols; queries i0 + i, i < width; rows ld apart): -inf where the query does not see
// the key.
AQUILA_INLINE void window_mask(float* s, int64_t ld, int64_t cols, int64_t width, const KeyWindow& w, int64_t i0,
                               int64_t j0) {
  for (int64_t j = 0; j < cols; ++j) {
    // Key j0 + j is seen by the queries i0 + i with lo <= i <= hi.
    const int64_t lo = j0 + j - w.shift - w.after - i0, hi = j0 + j - w.shift + w.before - i0;
    float* row = s + j * ld;
    const int64_t hidden_below = std::clamp<int64_t>(lo, 0, width);
    for (int64_t i = 0; i < hidden_below; ++i) row[i] = -kInf;
    for (int64_t i = std::clamp<int64_t>(hi + 1, hidden_below, width); i < width; ++i) row[i] = -kInf;
  }
}

// The scores of a tile (rows x cols, rows ld apart) from the products q.k: times scale, then softcapped to
// c tanh(s / c) when softcap c > 0, with each score's slope 1 - tanh^2 (its derivative) into `slope` (same layout)
// when not null.
AQUILA_INLINE void form_scores(float* __restrict s, int64_t ld, int64_t rows, int64_t cols, float scale, float softcap,
                               float* __restrict slope) {
  if (softcap > 0.0f) {
    const float to_unit = scale / softcap;
    for (int64_t r = 0; r < rows; ++r) {
      float* __restrict row = s + r * ld;
      if (slope) {
        float* __restrict d = slope + r * ld;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          float t;
          tanh_and_slope(row[c] * to_unit, t, d[c]);
          row[c] = softcap * t;
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
          float t, unused;
          tanh_and_slope(row[c] * to_unit, t, unused);
          row[c] = softcap * t;
        }
      }
    }
  } else if (scale != 1.0f) {
    for (int64_t r = 0; r < rows; ++r) {
      float* __restrict row = s + r * ld;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) row[c] *= scale;
    }
  }
}

// Online softmax over a tile of scores s[j][i] (j < cols keys, i < width queries): updates each query's running max
// m and sum l, replaces the scores by exp(s - m), and leaves in alpha the factor exp(m_old - m_new) by which the
// query's output accumulator must be scaled. base and sum are scratch.
AQUILA_INLINE void online_softmax(float* __restrict s, int64_t ld, int64_t cols, int64_t width, float* __restrict m,
                                  float* __restrict l, float* __restrict alpha, float* __restrict base,
                                  float* __restrict sum) {
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) base[i] = m[i];
  for (int64_t j = 0; j < cols; ++j) {
    const float* __restrict row = s + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) base[i] = base[i] > row[i] ? base[i] : row[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) {
    const float new_max = base[i];
    const float b = new_max == -kInf ? 0.0f : new_max;  // a query that has seen no key yet: its exps are all 0
    alpha[i] = exp_nonpositive(m[i] - b);
    m[i] = new_max;
    base[i] = b;
    sum[i] = 0.0f;
  }
  for (int64_t j = 0; j < cols; ++j) {
    float* __restrict row = s + j * ld;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float p = exp_nonpositive(row[i] - base[i]);
      row[i] = p;
      sum[i] += p;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < width; ++i) l[i] = l[i] * alpha[i] + sum[i];
}

// Carves per-thread scratch into 64-byte aligned fp32 arrays; with no scratch (base null) it only counts the floats.
struct Carver {
  float* base;
  int64_t used = 0;
  AQUILA_INLINE float* take(int64_t n) {
    float* p = base ? base + used : nullptr;
    used += round_up(n, 16);
    return p;
  }
};

struct AlignedFree {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
using Scratch = std::unique_ptr<float[], AlignedFree>;

// One buffer of `floats` for each of `count` threads.
inline std::vector<Scratch> allocate_each(int count, int64_t floats) {
  std::vector<Scratch> buffers;
  for (int t = 0; t < count; ++t)
    buffers.emplace_back(
        static_cast<float*>(::operator new[](static_cast<size_t>(floats) * sizeof(float), std::align_val_t(64))));
  return buffers;
}

// ------------------------------------------------------------------------------------------------------------------
// Forward.
//
// A work item is a range of query blocks of every q head of one kv head's group: each key/value block is packed once
// for all of them, so K and V (rows a token stride apart, read at the speed of memory latency) are fetched once per
// item rather than once per query block.

template <typename I>
int64_t forward_scratch(int64_t d, int64_t tiles) {
  const int64_t dp = round_up(d, I::W);
  if constexpr (I::kBf16Dot) {  // see forward_bf16_item
    return tiles * (I::BQ * dp / 2 + I::BQ * dp + 2 * I::BQ) + 2 * round_up(I::BK * dp / 2, 16) + I::BQ * I::BK +
           I::BQ * I::BK / 2 + 16;
  }
  return tiles * (d * I::BQ + I::BQ * dp + 2 * I::BQ) + 2 * round_up(I::BK * dp, 16) + I::BK * I::BQ + 3 * I::BQ;
}

// The output O / l and the log-sum-exp m + log l of queries [q_lo, q_hi) of sequence b, every q head of kv head hk,
// from the per-tile accumulators (tile t: q head hk * group + t / blocks, query block t % blocks).
template <typename T>
AQUILA_INLINE void store_output(const AttentionForward& a, int64_t b, int64_t hk, int64_t q_lo, int64_t q_hi,
                                int64_t bq, int64_t dp, const float* o, const float* m, const float* l) {
  const int64_t d = a.head_dim, group = a.heads_q / a.heads_k, blocks = (q_hi - q_lo + bq - 1) / bq;
  const int64_t q_len = a.seq.q_len[b], q_start = a.seq.q_start[b];
  for (int64_t t = 0; t < group * blocks; ++t) {
    const int64_t h = hk * group + t / blocks, i0 = q_lo + t % blocks * bq;
    const int64_t rows = std::min(bq, q_len - i0);
    T* out = static_cast<T*>(a.out.data) + (q_start + i0) * a.out.token_stride + h * a.out.head_stride;
    for (int64_t i = 0; i < rows; ++i) {
      const float total = l[t * bq + i];
      const float inv = total > 0.0f ? 1.0f / total : 0.0f;
      const float* __restrict row = o + (t * bq + i) * dp;
      T* __restrict dst = out + i * a.out.token_stride;
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) dst[x] = from_float<T>(row[x] * inv);
      if (a.lse) a.lse[(q_start + i0 + i) * a.heads_q + h] = total > 0.0f ? m[t * bq + i] + std::log(total) : -kInf;
    }
  }
}

// Queries [q_lo, q_hi) of sequence b (q_lo a multiple of BQ), for every q head of kv head hk.
// The forward with bf16 products (bf16 inputs, AVX512-BF16): the work items, blocks and online softmax of
// forward_item, but the scores are kept by rows (queries x keys), so that the probabilities, rounded to bf16, are the
// A operand of O += P V as they lie; each query's softmax statistics are then a reduction along its row. The scale is
// applied to the fp32 scores rather than folded into Q, which would round Q a second time. As in flash-attention on
// tensor cores, the sum l adds the probabilities before their rounding to bf16.
template <typename I>
AQUILA_INLINE void forward_bf16_item(const AttentionForward& a, int64_t b, int64_t hk, int64_t q_lo, int64_t q_hi,
                                     float* ws) {
  constexpr int64_t BQ = I::BQ, BK = I::BK;
  const int64_t d = a.head_dim, dp = round_up(d, I::W), nd = dp / I::W;
  const int64_t group = a.heads_q / a.heads_k;
  const int64_t blocks = (q_hi - q_lo + BQ - 1) / BQ, tiles = group * blocks;
  const int64_t q_len = a.seq.q_len[b];
  const KeyWindow window = key_window(a, b);
  const int64_t q_start = a.seq.q_start[b], k_token = a.seq.k_start[b];
  const float scale = static_cast<float>(a.scale);
  const bf16* k = static_cast<const bf16*>(a.k.data) + k_token * a.k.token_stride + hk * a.k.head_stride;
  const bf16* v = static_cast<const bf16*>(a.v.data) + k_token * a.v.token_stride + hk * a.v.head_stride;

  Carver carve{ws};
  uint16_t* qr = reinterpret_cast<uint16_t*>(carve.take(tiles * BQ * dp / 2));  // per tile, Q by rows: [BQ][dp]
  float* o = carve.take(tiles * BQ * dp);  // per tile, the output accumulator: [BQ][dp]
  float* m = carve.take(tiles * BQ);       // per tile, running max and sum of each query
  float* l = carve.take(tiles * BQ);
  uint32_t* kp = reinterpret_cast<uint32_t*>(carve.take(BK * dp / 2));  // the key block's element pairs: [dp/2][BK]
  uint32_t* vp = reinterpret_cast<uint32_t*>(carve.take(BK * dp / 2));  // the value block's row pairs: [BK/2][dp]
  float* s = carve.take(BQ * BK);                                        // a tile's scores: [BQ][BK]
  uint16_t* p = reinterpret_cast<uint16_t*>(carve.take(BQ * BK / 2));    // its probabilities in bf16: [BQ][BK]

  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t h = hk * group + t / blocks, i0 = q_lo + t % blocks * BQ;
    const int64_t rows = std::min(BQ, q_len - i0);
    const bf16* q = static_cast<const bf16*>(a.q.data) + (q_start + i0) * a.q.token_stride + h * a.q.head_stride;
    pack_bf16_rows(q, a.q.token_stride, rows, d, dp, qr + t * BQ * dp);
    std::fill(o + t * BQ * dp, o + t * BQ * dp + rows * dp, 0.0f);
    std::fill(m + t * BQ, m + (t + 1) * BQ, -kInf);
    std::fill(l + t * BQ, l + (t + 1) * BQ, 0.0f);
  }

  const int64_t k_end = window.end(q_hi);
  for (int64_t j0 = window.first(q_lo); j0 < k_end; j0 += BK) {
    const int64_t cols = std::min(BK, k_end - j0);
    pack_bf16_element_pairs(k + j0 * a.k.token_stride, a.k.token_stride, cols, round_up(cols, I::W), d, dp, BK, kp);
    pack_bf16_row_pairs(v + j0 * a.v.token_stride, a.v.token_stride, cols, d, dp, vp);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i0 = q_lo + t % blocks * BQ;
      const int64_t rows = std::min(BQ, q_len - i0);
      const int64_t tile_end = window.end(i0 + rows);
      if (j0 >= tile_end || j0 + cols <= window.first(i0)) continue;
      const int64_t tile_cols = std::min(cols, tile_end - j0), depth = round_up(tile_cols, 2);
      float* to = o + t * BQ * dp;
      I::product_bf16({rows, (tile_cols + I::W - 1) / I::W, dp / 2, qr + t * BQ * dp, dp, kp, BK, s, BK, false});
      form_scores(s, BK, rows, tile_cols, scale, a.softcap, nullptr);
      for (int64_t i = 0; i < rows; ++i) {
        const float* __restrict row = s + i * BK;
        // The keys [lo, hi) of the tile that this query sees.
        const int64_t lo = std::clamp<int64_t>(window.first(i0 + i) - j0, 0, tile_cols);
        const int64_t hi = std::clamp<int64_t>(window.end(i0 + i + 1) - j0, lo, tile_cols);
        float& running_max = m[t * BQ + i];
        const float new_max = std::max(running_max, max_over(hi - lo, [&](int64_t j) { return row[lo + j]; }));
        const float base = new_max == -kInf ? 0.0f : new_max;  // a query that has seen no key yet: its exps are 0
        const float alpha = exp_nonpositive(running_max - base);
        running_max = new_max;
        uint16_t* __restrict prow = p + i * BK;
        float sum = 0.0f;
        std::fill(prow, prow + lo, uint16_t{0});
#pragma omp simd reduction(+ : sum)
        for (int64_t j = lo; j < hi; ++j) {
          const float e = exp_nonpositive(row[j] - base);
          prow[j] = from_float<bf16>(e).bits;
          sum += e;
        }
        std::fill(prow + hi, prow + depth, uint16_t{0});
        l[t * BQ + i] = l[t * BQ + i] * alpha + sum;
        if (alpha != 1.0f) {
          float* __restrict out = to + i * dp;
#pragma omp simd
          for (int64_t x = 0; x < dp; ++x) out[x] *= alpha;
        }
      }
      I::product_bf16({rows, nd, depth / 2, p, BK, vp, dp, to, dp, true});  // O += P V
    }
  }
  store_output<bf16>(a, b, hk, q_lo, q_hi, BQ, dp, o, m, l);
}

template <typename T, typename I>
AQUILA_INLINE void forward_item(const AttentionForward& a, int64_t b, int64_t hk, int64_t q_lo, int64_t q_hi,
                                float* ws) {
  if constexpr (I::kBf16Dot) {
    static_assert(std::is_same_v<T, bf16>, "the bf16 products take bf16 inputs");
    return forward_bf16_item<I>(a, b, hk, q_lo, q_hi, ws);
  }
  constexpr int W = I::W;
  constexpr int64_t BQ = I::BQ, BK = I::BK;
  const int64_t d = a.head_dim, dp = round_up(d, W), nd = dp / W;
  const int64_t group = a.heads_q / a.heads_k;
  const int64_t blocks = (q_hi - q_lo + BQ - 1) / BQ, tiles = group * blocks;
  const int64_t q_len = a.seq.q_len[b];
  const KeyWindow window = key_window(a, b);
  const int64_t q_start = a.seq.q_start[b], k_token = a.seq.k_start[b];
  const T* k = static_cast<const T*>(a.k.data) + k_token * a.k.token_stride + hk * a.k.head_stride;
  const T* v = static_cast<const T*>(a.v.data) + k_token * a.v.token_stride + hk * a.v.head_stride;

  Carver carve{ws};
  float* qt = carve.take(tiles * d * BQ);  // per tile, scale * Q^T: [d][BQ]
  float* o = carve.take(tiles * BQ * dp);  // per tile, the output accumulator: [BQ][dp]
  float* m = carve.take(tiles * BQ);       // per tile, running max and sum of each query
  float* l = carve.take(tiles * BQ);
  float* kt = carve.take(BK * dp);  // the key block: [BK][dp]
  float* vt = carve.take(BK * dp);
  float* s = carve.take(BK * BQ);  // scores, then probabilities, transposed: [BK][BQ]
  float* alpha = carve.take(BQ);
  float* base = carve.take(BQ);
  float* sum = carve.take(BQ);

  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t h = hk * group + t / blocks, i0 = q_lo + t % blocks * BQ;
    const int64_t rows = std::min(BQ, q_len - i0), width = round_up(rows, W);
    const T* q = static_cast<const T*>(a.q.data) + (q_start + i0) * a.q.token_stride + h * a.q.head_stride;
    pack_transposed(q, a.q.token_stride, rows, width, d, BQ, static_cast<float>(a.scale), qt + t * d * BQ);
    std::fill(o + t * BQ * dp, o + t * BQ * dp + rows * dp, 0.0f);
    std::fill(m + t * BQ, m + t * BQ + width, -kInf);
    std::fill(l + t * BQ, l + t * BQ + width, 0.0f);
  }

  const int64_t k_end = window.end(q_hi);
  for (int64_t j0 = window.first(q_lo); j0 < k_end; j0 += BK) {
    const int64_t cols = std::min(BK, k_end - j0);
    pack_rows(k + j0 * a.k.token_stride, a.k.token_stride, cols, d, dp, kt);
    pack_rows(v + j0 * a.v.token_stride, a.v.token_stride, cols, d, dp, vt);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t i0 = q_lo + t % blocks * BQ;
      const int64_t rows = std::min(BQ, q_len - i0), nq = (rows + W - 1) / W, width = nq * W;
      const int64_t tile_end = window.end(i0 + rows);
      if (j0 >= tile_end || j0 + cols <= window.first(i0)) continue;
      const int64_t tile_cols = std::min(cols, tile_end - j0);
      float* tm = m + t * BQ;
      float* to = o + t * BQ * dp;
      I::product({tile_cols, nq, d, kt, dp, 1, qt + t * d * BQ, BQ, s, BQ, false});  // S^T = K (scale Q)^T
      form_scores(s, BQ, tile_cols, width, 1.0f, a.softcap, nullptr);
      if (!window.sees_all(i0, rows, j0, tile_cols)) window_mask(s, BQ, tile_cols, width, window, i0, j0);
      online_softmax(s, BQ, tile_cols, width, tm, l + t * BQ, alpha, base, sum);
      for (int64_t i = 0; i < rows; ++i) {
        if (alpha[i] == 1.0f) continue;
        float* __restrict row = to + i * dp;
        const float f = alpha[i];
#pragma omp simd
        for (int64_t x = 0; x < dp; ++x) row[x] *= f;
      }
      I::product({rows, nd, tile_cols, s, 1, BQ, vt, dp, to, dp, true});  // O += P V
    }
  }

  store_output<T>(a, b, hk, q_lo, q_hi, BQ, dp, o, m, l);
}

// ------------------------------------------------------------------------------------------------------------------
// Backward.
//
// The unit of work is a tile: one key block (BK keys) against one query block (BQ queries) of one q head. Query data
// are packed per block ([d][BQ] transposed for Q^T and dO^T, [BQ][dp] by rows for Q and dO), key data by rows
// ([BK][dp]). dK and dV of a key block add their tiles over up to kSpan consecutive queries of one q head, then these
// partial sums are added in order (over spans, then over the heads of the group): one running sum over every query
// of every head would lose up to 4x more to rounding than torch's blocked matmul and sum over the group (MQA, long
// sequences). dQ of a query block adds its tiles over key blocks in increasing order, whichever loops run them.
constexpr int64_t kSpan = 256;

// A capacity of q_rows packed queries (a multiple of BQ) and k_rows packed keys.
//
// With bf16 products (Avx512Bf16) the operands are packed in bf16 instead (see Bf16Product): Q and dO as element pairs
// (qe, doe: [q_rows / BQ][dp / 2][BQ] words) for S^T and dP^T, as row pairs (qrp, dorp: [q_rows / BQ][BQ / 2][dp]
// words) for dK and dV; K and V by rows (k16, v16: [k_rows][dp]); P^T and dS^T rounded to bf16 (p16, ds16:
// [BK][BQ]). dQ += dS K stays an fp32 product on fp32 K (kt): its A operand would be dS transposed.
struct BackwardScratch {
  float *qt, *dot, *qr, *dor, *dq, *lse, *delta;  // qt, dot: [q_rows / BQ][d][BQ]; qr, dor, dq: [q_rows][dp]
  float *kt, *vt, *dk, *dv;                       // [k_rows][dp]
  float *dk_head, *dv_head;                       // [k_rows][dp]: the partial sums of one span of queries
  float *p, *ds;                                  // [BK][BQ]: P^T, then dP^T and dS^T
  float* slope;                                   // [BK][BQ]: the softcap's slopes 1 - tanh^2 of the scores
  uint32_t *qe, *doe, *qrp, *dorp;                // bf16 products only
  uint16_t *k16, *v16, *p16, *ds16;
};

// Carves the scratch of carve_backward from ws, or with ws null counts the floats it takes.
template <typename I>
AQUILA_INLINE BackwardScratch carve_backward(float* ws, int64_t d, int64_t q_rows, int64_t k_rows,
                                             int64_t* floats = nullptr) {
  const int64_t dp = round_up(d, I::W);
  const int64_t fp32_q = I::kBf16Dot ? 0 : q_rows, bf16_q = I::kBf16Dot ? q_rows : 0;
  const int64_t bf16_k = I::kBf16Dot ? k_rows : 0, bf16_tile = I::kBf16Dot ? I::BK * I::BQ : 0;
  Carver c{ws};
  const auto words = [&](int64_t n) { return reinterpret_cast<uint32_t*>(c.take(n)); };
  const auto halves = [&](int64_t n) { return reinterpret_cast<uint16_t*>(c.take((n + 1) / 2)); };
  BackwardScratch s;
  s.qt = c.take(fp32_q * d);
  s.dot = c.take(fp32_q * d);
  s.qr = c.take(fp32_q * dp);
  s.dor = c.take(fp32_q * dp);
  s.dq = c.take(q_rows * dp);
  s.lse = c.take(q_rows);
  s.delta = c.take(q_rows);
  s.kt = c.take(k_rows * dp);
  s.vt = c.take((k_rows - bf16_k) * dp);
  s.dk = c.take(k_rows * dp);
  s.dv = c.take(k_rows * dp);
  s.dk_head = c.take(k_rows * dp);
  s.dv_head = c.take(k_rows * dp);
  s.p = c.take(I::BK * I::BQ);
  s.ds = c.take(I::BK * I::BQ);
  s.slope = c.take(I::BK * I::BQ);
  s.qe = words(bf16_q * dp / 2);
  s.doe = words(bf16_q * dp / 2);
  s.qrp = words(bf16_q * dp / 2);
  s.dorp = words(bf16_q * dp / 2);
  s.k16 = halves(bf16_k * dp);
  s.v16 = halves(bf16_k * dp);
  s.p16 = halves(bf16_tile);
  s.ds16 = halves(bf16_tile);
  if (floats) *floats = c.used;
  return s;
}

template <typename I>
int64_t backward_scratch(int64_t d, int64_t q_rows, int64_t k_rows) {
  int64_t floats = 0;
  carve_backward<I>(nullptr, d, q_rows, k_rows, &floats);
  return floats;
}

// Packs queries [q_lo, q_hi) of sequence b, head h (q_lo a multiple of BQ) into block 0 onwards of s; Q and dO by rows
// only when by_rows (dK and dV need them).
template <typename T, typename I>
AQUILA_INLINE void pack_queries(const AttentionBackward& a, int64_t b, int64_t h, int64_t q_lo, int64_t q_hi,
                                const BackwardScratch& s, bool by_rows) {
  constexpr int64_t BQ = I::BQ;
  const int64_t d = a.head_dim, dp = round_up(d, I::W);
  const float scale = static_cast<float>(a.scale);
  for (int64_t i0 = q_lo; i0 < q_hi; i0 += BQ) {
    const int64_t blk = (i0 - q_lo) / BQ;
    const int64_t rows = std::min(BQ, q_hi - i0), width = round_up(rows, I::W);
    const int64_t q_token = static_cast<int64_t>(a.seq.q_start[b]) + i0;
    const T* q = static_cast<const T*>(a.q.data) + q_token * a.q.token_stride + h * a.q.head_stride;
    const T* dout =
        static_cast<const T*>(a.grad_out.data) + q_token * a.grad_out.token_stride + h * a.grad_out.head_stride;
    if constexpr (I::kBf16Dot) {
      pack_bf16_element_pairs(q, a.q.token_stride, rows, width, d, dp, BQ, s.qe + blk * dp / 2 * BQ);
      pack_bf16_element_pairs(dout, a.grad_out.token_stride, rows, width, d, dp, BQ, s.doe + blk * dp / 2 * BQ);
      if (by_rows) {
        pack_bf16_row_pairs(q, a.q.token_stride, rows, d, dp, s.qrp + blk * BQ / 2 * dp);
        pack_bf16_row_pairs(dout, a.grad_out.token_stride, rows, d, dp, s.dorp + blk * BQ / 2 * dp);
      }
    } else {
      pack_transposed(q, a.q.token_stride, rows, width, d, BQ, scale, s.qt + blk * d * BQ);
      pack_transposed(dout, a.grad_out.token_stride, rows, width, d, BQ, 1.0f, s.dot + blk * d * BQ);
      if (by_rows) {
        pack_rows(q, a.q.token_stride, rows, d, dp, s.qr + blk * BQ * dp);
        pack_rows(dout, a.grad_out.token_stride, rows, d, dp, s.dor + blk * BQ * dp);
      }
    }
    for (int64_t i = 0; i < width; ++i) {
      const bool real = i < rows;
      const float lse = real ? a.lse[(q_token + i) * a.heads_q + h] : kInf;
      // A query that saw no key (lse -inf) has P = 0: +inf makes exp(s - lse) 0 where s - lse would be NaN.
      s.lse[blk * BQ + i] = lse == -kInf ? kInf : lse;
      s.delta[blk * BQ + i] = real ? a.delta[(q_token + i) * a.heads_q + h] : 0.0f;
    }
  }
}

// One tile: query block `blk` of the packed queries (first query i0, rows of them) against key row `key` of the
// packed keys (first key j0, cols of them). Adds into the partial sums dk_head and dv_head (key rows) when kv is set,
// into dq (query rows) when it is not null.
template <typename I>
AQUILA_INLINE void backward_tile(const AttentionBackward& a, const BackwardScratch& s, const KeyWindow& window,
                                 int64_t blk,
                                 int64_t i0, int64_t rows, int64_t key, int64_t j0, int64_t cols, bool kv, float* dq) {
  constexpr int64_t BQ = I::BQ;
  const int64_t d = a.head_dim, dp = round_up(d, I::W), nd = dp / I::W;
  const int64_t nq = (rows + I::W - 1) / I::W, width = nq * I::W;
  const float* kt = s.kt + key * dp;
  const float* lse = s.lse + blk * BQ;
  const float* delta = s.delta + blk * BQ;
  // The scale is in the packed Q of the fp32 products, applied to the scores with bf16 ones.
  float scale = 1.0f;
  if constexpr (I::kBf16Dot) {
    scale = static_cast<float>(a.scale);
    I::product_bf16({cols, nq, dp / 2, s.k16 + key * dp, dp, s.qe + blk * dp / 2 * BQ, BQ, s.p, BQ, false});
  } else {
    I::product({cols, nq, d, kt, dp, 1, s.qt + blk * d * BQ, BQ, s.p, BQ, false});  // S^T = K (scale Q)^T
  }
  form_scores(s.p, BQ, cols, width, scale, a.softcap, s.slope);
  if (!window.sees_all(i0, rows, j0, cols)) window_mask(s.p, BQ, cols, width, window, i0, j0);
  for (int64_t j = 0; j < cols; ++j) {
    float* __restrict row = s.p + j * BQ;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) row[i] = exp_nonpositive(row[i] - lse[i]);
  }
  const int64_t query_pairs = (rows + 1) / 2;
  if constexpr (I::kBf16Dot) {
    if (kv) {  // dV += P^T dO
      round_to_bf16(s.p, BQ, cols, width, s.p16, BQ);
      I::product_bf16({cols, nd, query_pairs, s.p16, BQ, s.dorp + blk * BQ / 2 * dp, dp, s.dv_head + key * dp, dp,
                       true});
    }
    I::product_bf16({cols, nq, dp / 2, s.v16 + key * dp, dp, s.doe + blk * dp / 2 * BQ, BQ, s.ds, BQ, false});
  } else {
    if (kv) I::product({cols, nd, rows, s.p, BQ, 1, s.dor + blk * BQ * dp, dp, s.dv_head + key * dp, dp, true});
    I::product({cols, nq, d, s.vt + key * dp, dp, 1, s.dot + blk * d * BQ, BQ, s.ds, BQ, false});  // dP^T = V dO^T
  }
  for (int64_t j = 0; j < cols; ++j) {
    const float* __restrict prow = s.p + j * BQ;
    float* __restrict row = s.ds + j * BQ;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) row[i] = prow[i] * (row[i] - delta[i]);
    if (a.softcap > 0.0f) {
      const float* __restrict slope = s.slope + j * BQ;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) row[i] *= slope[i];
    }
  }
  if (kv) {  // dK += dS^T Q
    if constexpr (I::kBf16Dot) {
      round_to_bf16(s.ds, BQ, cols, width, s.ds16, BQ);
      I::product_bf16({cols, nd, query_pairs, s.ds16, BQ, s.qrp + blk * BQ / 2 * dp, dp, s.dk_head + key * dp, dp,
                       true});
    } else {
      I::product({cols, nd, rows, s.ds, BQ, 1, s.qr + blk * BQ * dp, dp, s.dk_head + key * dp, dp, true});
    }
  }
  if (dq) I::product({rows, nd, cols, s.ds, 1, BQ, kt, dp, dq, dp, true});  // dQ += dS K
}

// Keys and values [0, rows) from k and v into the scratch, as the products take them; fp32 keys with bf16 products
// only when dQ is computed (with_dq).
template <typename T, typename I>
AQUILA_INLINE void pack_keys(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int64_t rows, int64_t d,
                             const BackwardScratch& s, bool with_dq) {
  const int64_t dp = round_up(d, I::W);
  if constexpr (I::kBf16Dot) {
    pack_bf16_rows(k, k_stride, rows, d, dp, s.k16);
    pack_bf16_rows(v, v_stride, rows, d, dp, s.v16);
    if (with_dq) pack_rows(k, k_stride, rows, d, dp, s.kt);
  } else {
    pack_rows(k, k_stride, rows, d, dp, s.kt);
    pack_rows(v, v_stride, rows, d, dp, s.vt);
  }
}

template <typename T>
AQUILA_INLINE void store_rows(const float* src, int64_t dp, int64_t rows, int64_t d, float scale, T* dst,
                              int64_t stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict in = src + r * dp;
    T* __restrict out = dst + r * stride;
#pragma omp simd
    for (int64_t x = 0; x < d; ++x) out[x] = from_float<T>(in[x] * scale);
  }
}

// Keys [k_lo, k_hi) of sequence b and kv head hk (k_lo a multiple of BK): their dK and dV, complete. With
// with_dq (the item then covers all of the sequence's keys), also dQ of the group's q heads.
template <typename T, typename I>
AQUILA_INLINE void key_item(const AttentionBackward& a, int64_t b, int64_t hk, int64_t k_lo, int64_t k_hi,
                            bool with_dq, float* ws, int64_t q_rows, int64_t k_rows) {
  constexpr int64_t BQ = I::BQ, BK = I::BK;
  // Key blocks are swept in chunks of this many, each against all query blocks: a packed query block is reused
  // by the chunk's key blocks while it is in L2.
  constexpr int64_t kChunk = 4;
  const int64_t d = a.head_dim, dp = round_up(d, I::W);
  const int64_t group = a.heads_q / a.heads_k;
  const int64_t q_len = a.seq.q_len[b], k_len = a.seq.k_len[b];
  const KeyWindow window = key_window(a, b);
  const int64_t q_start = a.seq.q_start[b], k_token = static_cast<int64_t>(a.seq.k_start[b]) + k_lo;
  const BackwardScratch s = carve_backward<I>(ws, d, q_rows, k_rows);
  const T* k = static_cast<const T*>(a.k.data) + k_token * a.k.token_stride + hk * a.k.head_stride;
  const T* v = static_cast<const T*>(a.v.data) + k_token * a.v.token_stride + hk * a.v.head_stride;
  const int64_t keys = k_hi - k_lo;
  pack_keys<T, I>(k, a.k.token_stride, v, a.v.token_stride, keys, d, s, with_dq);
  std::fill(s.dk, s.dk + keys * dp, 0.0f);
  std::fill(s.dv, s.dv + keys * dp, 0.0f);

  std::fill(s.dk_head, s.dk_head + keys * dp, 0.0f);
  std::fill(s.dv_head, s.dv_head + keys * dp, 0.0f);
  // Adds the partial sums of keys [c0, c1) into dK and dV, and zeroes them for the next span.
  const auto add_span = [&](int64_t c0, int64_t c1) {
    float* __restrict dk_part = s.dk_head + (c0 - k_lo) * dp;
    float* __restrict dv_part = s.dv_head + (c0 - k_lo) * dp;
    float* __restrict dk = s.dk + (c0 - k_lo) * dp;
    float* __restrict dv = s.dv + (c0 - k_lo) * dp;
#pragma omp simd
    for (int64_t x = 0; x < (c1 - c0) * dp; ++x) {
      dk[x] += dk_part[x];
      dv[x] += dv_part[x];
      dk_part[x] = 0.0f;
      dv_part[x] = 0.0f;
    }
  };

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    if (with_dq) {
      pack_queries<T, I>(a, b, h, 0, q_len, s, true);
      std::fill(s.dq, s.dq + q_len * dp, 0.0f);
    }
    for (int64_t c0 = k_lo; c0 < k_hi; c0 += kChunk * BK) {
      const int64_t c1 = std::min(k_hi, c0 + kChunk * BK);
      const int64_t first_query = window.first_query(c0), end_query = window.end_query(c1, q_len);
      for (int64_t i0 = first_query / BQ * BQ; i0 < end_query; i0 += BQ) {
        if (i0 > first_query / BQ * BQ && i0 % kSpan == 0) add_span(c0, c1);
        const int64_t rows = std::min(BQ, q_len - i0);
        int64_t blk = i0 / BQ;
        if (!with_dq) {
          pack_queries<T, I>(a, b, h, i0, i0 + rows, s, true);
          blk = 0;
        }
        for (int64_t j0 = c0; j0 < c1; j0 += BK) {
          const int64_t cols = std::min(BK, k_len - j0);
          if (!window.sees(i0, rows, j0, cols)) continue;
          backward_tile<I>(a, s, window, blk, i0, rows, j0 - k_lo, j0, cols, true,
                           with_dq ? s.dq + i0 * dp : nullptr);
        }
      }
      add_span(c0, c1);
    }
    if (with_dq) {
      T* gq = static_cast<T*>(a.grad_q.data) + q_start * a.grad_q.token_stride + h * a.grad_q.head_stride;
      store_rows(s.dq, dp, q_len, d, static_cast<float>(a.scale), gq, a.grad_q.token_stride);
    }
  }
  T* gk = static_cast<T*>(a.grad_k.data) + k_token * a.grad_k.token_stride + hk * a.grad_k.head_stride;
  T* gv = static_cast<T*>(a.grad_v.data) + k_token * a.grad_v.token_stride + hk * a.grad_v.head_stride;
  store_rows(s.dk, dp, keys, d, static_cast<float>(a.scale), gk, a.grad_k.token_stride);
  store_rows(s.dv, dp, keys, d, 1.0f, gv, a.grad_v.token_stride);
}

// dQ of queries [q_lo, q_hi) of sequence b, q head h (q_lo a multiple of BQ).
template <typename T, typename I>
AQUILA_INLINE void query_item(const AttentionBackward& a, int64_t b, int64_t h, int64_t q_lo, int64_t q_hi, float* ws,
                              int64_t q_rows, int64_t k_rows) {
  constexpr int64_t BQ = I::BQ, BK = I::BK;
  const int64_t d = a.head_dim, dp = round_up(d, I::W);
  const int64_t hk = h / (a.heads_q / a.heads_k);
  const int64_t k_len = a.seq.k_len[b];
  const KeyWindow window = key_window(a, b);
  const int64_t q_token = static_cast<int64_t>(a.seq.q_start[b]) + q_lo, k_start = a.seq.k_start[b];
  const BackwardScratch s = carve_backward<I>(ws, d, q_rows, k_rows);
  const T* k = static_cast<const T*>(a.k.data) + k_start * a.k.token_stride + hk * a.k.head_stride;
  const T* v = static_cast<const T*>(a.v.data) + k_start * a.v.token_stride + hk * a.v.head_stride;
  pack_queries<T, I>(a, b, h, q_lo, q_hi, s, false);
  std::fill(s.dq, s.dq + (q_hi - q_lo) * dp, 0.0f);
  // Key blocks cut as key_item cuts them (from key 0), so that dQ adds the same tiles in the same order.
  const int64_t k_end = window.end(q_hi);
  for (int64_t j0 = window.first(q_lo) / BK * BK; j0 < k_end; j0 += BK) {
    const int64_t cols = std::min(BK, k_len - j0);
    pack_keys<T, I>(k + j0 * a.k.token_stride, a.k.token_stride, v + j0 * a.v.token_stride, a.v.token_stride, cols,
                    d, s, true);
    for (int64_t i0 = q_lo; i0 < q_hi; i0 += BQ) {
      const int64_t rows = std::min(BQ, q_hi - i0);
      if (window.sees(i0, rows, j0, cols))
        backward_tile<I>(a, s, window, (i0 - q_lo) / BQ, i0, rows, 0, j0, cols, false, s.dq + (i0 - q_lo) * dp);
    }
  }
  T* gq = static_cast<T*>(a.grad_q.data) + q_token * a.grad_q.token_stride + h * a.grad_q.head_stride;
  store_rows(s.dq, dp, q_hi - q_lo, d, static_cast<float>(a.scale), gq, a.grad_q.token_stride);
}

// ------------------------------------------------------------------------------------------------------------------
// The per-ISA entry points, and the drivers that parallelise over them.

template <typename T>
struct Kernels {
  void (*forward_item)(const AttentionForward&, int64_t, int64_t, int64_t, int64_t, float*);
  void (*key_item)(const AttentionBackward&, int64_t, int64_t, int64_t, int64_t, bool, float*, int64_t, int64_t);
  void (*query_item)(const AttentionBackward&, int64_t, int64_t, int64_t, int64_t, float*, int64_t, int64_t);
  int64_t w, bq, bk;
  int64_t (*forward_scratch)(int64_t, int64_t);
  int64_t (*backward_scratch)(int64_t, int64_t, int64_t);
};

#define AQUILA_ATTENTION_ENTRIES(ISA, TARGET)                                                                       \
  template <typename T>                                                                                            \
  TARGET void forward_item_##ISA(const AttentionForward& a, int64_t b, int64_t hk, int64_t q_lo, int64_t q_hi,     \
                                 float* ws) {                                                                      \
    forward_item<T, ISA>(a, b, hk, q_lo, q_hi, ws);                                                                \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void key_item_##ISA(const AttentionBackward& a, int64_t b, int64_t hk, int64_t k_lo, int64_t k_hi,        \
                             bool with_dq, float* ws, int64_t q_rows, int64_t k_rows) {                            \
    key_item<T, ISA>(a, b, hk, k_lo, k_hi, with_dq, ws, q_rows, k_rows);                                           \
  }                                                                                                                \
  template <typename T>                                                                                            \
  TARGET void query_item_##ISA(const AttentionBackward& a, int64_t b, int64_t h, int64_t q_lo, int64_t q_hi,       \
                               float* ws, int64_t q_rows, int64_t k_rows) {                                        \
    query_item<T, ISA>(a, b, h, q_lo, q_hi, ws, q_rows, k_rows);                                                   \
  }                                                                                                                \
  template <typename T>                                                                                            \
  Kernels<T> kernels_##ISA() {                                                                                     \
    return {forward_item_##ISA<T>, key_item_##ISA<T>, query_item_##ISA<T>, ISA::W, ISA::BQ, ISA::BK,               \
            forward_scratch<ISA>, backward_scratch<ISA>};                                                          \
  }

AQUILA_ATTENTION_ENTRIES(Baseline, )
AQUILA_ATTENTION_ENTRIES(Avx2, AQUILA_TARGET_AVX2)
AQUILA_ATTENTION_ENTRIES(Avx512, AQUILA_TARGET_AVX512)
AQUILA_ATTENTION_ENTRIES(Avx512Bf16, AQUILA_TARGET_AVX512)
#undef AQUILA_ATTENTION_ENTRIES

template <typename T>
Kernels<T> kernels() {
  switch (simd_level()) {
    case SimdLevel::avx512_bf16:
      if constexpr (std::is_same_v<T, bf16>) return kernels_Avx512Bf16<T>();
      return kernels_Avx512<T>();
    case SimdLevel::avx512: return kernels_Avx512<T>();
    case SimdLevel::avx2: return kernels_Avx2<T>();
    default: return kernels_Baseline<T>();
  }
}

struct Item {
  int64_t b, head, lo, hi;
};

// Cuts [0, len) into ranges of `chunk` (a multiple of `block`), last range first: under a causal mask the later
// queries see more keys, and dynamic scheduling balances best when long items go first.
inline void add_ranges(std::vector<Item>& items, int64_t b, int64_t heads, int64_t len, int64_t chunk, bool reverse) {
  const int64_t n = (len + chunk - 1) / chunk;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t lo = (reverse ? n - 1 - c : c) * chunk;
    for (int64_t h = 0; h < heads; ++h) items.push_back({b, h, lo, std::min(len, lo + chunk)});
  }
}

// The largest multiple of block, at most `most` (and at least block), that still cuts the work into some items per
// thread.
inline int64_t pick_chunk(const int32_t* lengths, int64_t batch, int64_t heads, int64_t block, int64_t most,
                          int threads) {
  int64_t chunk = std::max(block, most / block * block);
  while (chunk > block) {
    int64_t items = 0;
    for (int64_t b = 0; b < batch; ++b) items += heads * ((lengths[b] + chunk - 1) / chunk);
    if (items >= 8 * static_cast<int64_t>(threads)) break;
    chunk = std::max(block, chunk / 2 / block * block);
  }
  return chunk;
}

template <typename T>
void forward_driver(const AttentionForward& a, int threads) {
  const Kernels<T> kern = kernels<T>();
  const int64_t group = a.heads_q / a.heads_k;
  // Up to 1 MiB of query state an item (Q^T and the output accumulator, fp32: 1024 query rows of all the group's heads
  // for head_dim 128), so that it stays in L2.
  const int64_t row_bytes = 8 * round_up(a.head_dim, kern.w);
  const int64_t chunk = pick_chunk(a.seq.q_len, a.seq.batch, a.heads_k, kern.bq, (1 << 20) / row_bytes / group, threads);
  std::vector<Item> items;
  for (int64_t b = 0; b < a.seq.batch; ++b) add_ranges(items, b, a.heads_k, a.seq.q_len[b], chunk, a.causal);
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  const int team = static_cast<int>(std::min<int64_t>(threads, n));
  // Allocated here, where running out of memory throws, rather than inside the parallel region, where it would abort.
  const std::vector<Scratch> scratch = allocate_each(team, kern.forward_scratch(a.head_dim, group * (chunk / kern.bq)));
#pragma omp parallel num_threads(team)
  {
    float* ws = scratch[thread_id()].get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n; ++it) kern.forward_item(a, items[it].b, items[it].head, items[it].lo, items[it].hi, ws);
  }
}

template <typename T>
void backward_driver(const AttentionBackward& a, int threads) {
  const Kernels<T> kern = kernels<T>();
  const int64_t group = a.heads_q / a.heads_k;
  const int64_t d = a.head_dim;
  int64_t max_q = 0, max_k = 0;
  for (int64_t b = 0; b < a.seq.batch; ++b) {
    max_q = std::max<int64_t>(max_q, a.seq.q_len[b]);
    max_k = std::max<int64_t>(max_k, a.seq.k_len[b]);
  }
  // (sequence, kv head) items own all their outputs. With fewer of them than a few per thread, the work is cut into
  // key ranges (dK, dV) and query ranges (dQ) instead, which recompute S and dP; the gradients are the same bits.
  const int64_t n_heads = a.seq.batch * a.heads_k;
  const bool split = threads > 1 && n_heads < 4 * threads && !(a.seq.batch == 1 && n_heads % threads == 0);
  std::vector<Item> key_items, query_items;
  int64_t q_rows, k_rows;
  if (split) {
    const int64_t key_chunk = pick_chunk(a.seq.k_len, a.seq.batch, a.heads_k, kern.bk, 4 * kern.bk, threads);
    const int64_t query_chunk = pick_chunk(a.seq.q_len, a.seq.batch, a.heads_q, kern.bq, 4 * kern.bq, threads);
    for (int64_t b = 0; b < a.seq.batch; ++b) {
      add_ranges(key_items, b, a.heads_k, a.seq.k_len[b], key_chunk, false);
      add_ranges(query_items, b, a.heads_q, a.seq.q_len[b], query_chunk, a.causal);
    }
    q_rows = query_chunk;
    k_rows = key_chunk;
  } else {
    q_rows = round_up(std::max<int64_t>(max_q, 1), kern.bq);
    k_rows = std::max<int64_t>(max_k, 1);
  }
  const std::vector<Scratch> scratch = allocate_each(threads, kern.backward_scratch(d, q_rows, k_rows));
  const int64_t n_keys = split ? static_cast<int64_t>(key_items.size()) : n_heads;
  const int64_t n_queries = static_cast<int64_t>(query_items.size());

#pragma omp parallel num_threads(threads)
  {
    // delta = rowsum(dO * O), fp32, for every query of every head.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_heads; ++it) {
      const int64_t b = it / a.heads_k, hk = it % a.heads_k;
      const int64_t q_start = a.seq.q_start[b], q_len = a.seq.q_len[b];
      for (int64_t i = 0; i < q_len; ++i) {
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const T* o = static_cast<const T*>(a.out.data) + (q_start + i) * a.out.token_stride + h * a.out.head_stride;
          const T* g = static_cast<const T*>(a.grad_out.data) + (q_start + i) * a.grad_out.token_stride +
                       h * a.grad_out.head_stride;
          float total = 0.0f;
#pragma omp simd reduction(+ : total)
          for (int64_t x = 0; x < d; ++x) total += to_float(o[x]) * to_float(g[x]);
          a.delta[(q_start + i) * a.heads_q + h] = total;
        }
      }
    }
    float* ws = scratch[thread_id()].get();
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_keys; ++it) {
      if (split) {
        const Item& item = key_items[it];
        kern.key_item(a, item.b, item.head, item.lo, item.hi, false, ws, q_rows, k_rows);
      } else {
        const int64_t b = it / a.heads_k;
        kern.key_item(a, b, it % a.heads_k, 0, a.seq.k_len[b], true, ws, q_rows, k_rows);
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_queries; ++it) {
      const Item& item = query_items[it];
      kern.query_item(a, item.b, item.head, item.lo, item.hi, ws, q_rows, k_rows);
    }
  }
}


template <typename Args>
void check(const Args& a) {
  if (a.heads_k < 1 || a.heads_q % a.heads_k != 0)
    throw std::invalid_argument("aquila: attention needs heads_q to be a multiple of heads_k");
  if (a.head_dim < 1) throw std::invalid_argument("aquila: attention needs head_dim >= 1");
  if (a.window_left < -1 || a.window_right < -1)
    throw std::invalid_argument("aquila: attention needs window_left and window_right >= -1");
  if (!std::isfinite(a.softcap) || a.softcap < 0.0f)
    throw std::invalid_argument("aquila: attention needs a finite softcap >= 0");
}

}  // namespace

void attention_forward(const AttentionForward& args, int threads) {
  check(args);
  threads = std::max(threads, 1);
  dispatch_dtype(args.dtype, [&](auto* tag) { forward_driver<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

void attention_backward(const AttentionBackward& args, int threads) {
  check(args);
  threads = std::max(threads, 1);
  dispatch_dtype(args.dtype, [&](auto* tag) { backward_driver<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

}  // namespace aquila::cpu
