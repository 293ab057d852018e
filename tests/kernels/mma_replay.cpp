// A CPU replay of the tensor-core decode attention (mma_kernel in csrc/cuda/decode_attention.cu), built and run by
// tests/kernels/test_mma_replay.py: it checks the kernel's mma fragment maps without a GPU.
//
// The kernel takes every fragment index from csrc/cuda/mma_fragments.h. This program includes the same header and
// replays, for one block of 4 warps of 32 emulated lanes, what the kernel does with those indices: Q's pieces in
// shared memory, each thread's K and V pieces in its slots, S = Q K^T by mma.m16n8k16, scaling and masking, the
// online softmax with its quad shuffles, the rescale of O by the alpha of other lanes, P split into hi + lo, V's A
// fragments built by byte_perm, O^T += V^T P^T by mma.m16n8k16 or m16n8k8, the warps' outputs in shared memory and
// the block's merge (finish_block). The warp instructions are emulated here from their documented semantics,
// independently of the header: mma.sync from the fragment layouts of the PTX ISA (section "Matrix Fragments for
// mma.m16n8k16 / mma.m16n8k8", .f16/.bf16 A and B, .f32 C and D), __byte_perm and __shfl_sync from the CUDA
// documentation. A map that puts an element anywhere else than where the instruction reads it gives wrong numbers.
//
// Checks, against float64 references from the same inputs (rounded to the element type, as the kernel sees them):
//   S    each step's Q K^T as the kernel reads it from the accumulators (qk_c_*), and that the accumulators hold
//        every (row, key) of the step exactly once;
//   PV   each step's O^T += V^T P^T: the increase of the accumulators, read through pv_c_*, against the sum over the
//        step's keys of P V with P = exp2(scores - running max) from the float64 scores;
//   out  the block's output softmax(scale Q K^T) V under the mask, and its lse, after the merge of the warps.
// The bounds are worst cases of the rounding the kernel does on purpose (fp32 accumulators and scores, exp2f, P kept as
// hi + lo), from the error model in `replay`. Over 240 random cases the worst errors seen were 0.35 of the S bound,
// 0.85 of the PV bound (a last step of few keys, where the accumulator's own rounding is nearly all of the error)
// and 0.06 of the output's; a misplaced element costs hundreds to millions of times the bound.
//
// Usage:
//   mma_replay DTYPE DIM_TILES ROW_TILES MAPS HEAD_DIM Q_LEN GROUP K_LEN CAUSAL ROW0 SEED
//     DTYPE bf16 or f16; DIM_TILES 1, 2 or 4 and ROW_TILES 1 or 2, as the launcher picks them; MAPS "kernel" (the
//     header's maps) or one deliberately wrong map (see Fault); the block takes rows ROW0 .. ROW0 + 8 ROW_TILES - 1
//     of a sequence of Q_LEN queries times GROUP heads against K_LEN keys, causal (bottom-right) or not.
//   mma_replay round DTYPE X...
//     prints the 16-bit pattern of each X rounded to DTYPE, to check this program's rounding against torch's.
// Prints one line per check (worst error as a fraction of its bound); exit status 0 when every check passes, 1 on a
// mismatch, 2 on bad arguments.

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cuda/mma_fragments.h"

namespace {

namespace frag = aquila::cuda::frag;

constexpr int kWarps = 4;  // warps of a block (decode_attention.cu)

// ---------------------------------------------------------------------------------------------------------------
// 16-bit floating-point formats, rounded to nearest even.

template <int kMantissaBits, int kExponentBits>
struct Format {
  static constexpr int kMantissa = kMantissaBits;
  static constexpr int kBias = (1 << (kExponentBits - 1)) - 1;
  static constexpr int kMaxExponent = (1 << kExponentBits) - 1;
  // Rounding a value to the format: at most this fraction of it (normals), or half the smallest subnormal.
  static constexpr double kUnitRoundoff = 1.0 / (2 << kMantissa);
  static double half_subnormal() { return std::ldexp(1.0, -kBias - kMantissa); }

  static double decode(uint16_t bits) {
    static const std::vector<double> values = [] {  // every pattern, once: the replay decodes millions
      std::vector<double> t(1 << 16);
      for (size_t b = 0; b < t.size(); ++b) t[b] = value_of(static_cast<uint16_t>(b));
      return t;
    }();
    return values[bits];
  }

  static double value_of(uint16_t bits) {
    const int exponent = (bits >> kMantissa) & kMaxExponent;
    const int mantissa = bits & ((1 << kMantissa) - 1);
    double v;
    if (exponent == 0) {
      v = std::ldexp(mantissa, 1 - kBias - kMantissa);  // subnormal
    } else if (exponent == kMaxExponent) {
      v = mantissa ? NAN : INFINITY;
    } else {
      v = std::ldexp(mantissa + (1 << kMantissa), exponent - kBias - kMantissa);
    }
    return (bits >> 15) ? -v : v;
  }

  // Finite x within range. The quantum of x's binade (of the subnormals below the smallest normal) is
  // 2^(e - kMantissa); x in quanta, rounded to the nearest even integer q, gives the pattern
  // ((e + kBias - 1) << kMantissa) + q, which carries into the exponent when q rounds up to 2^(kMantissa + 1).
  static uint16_t encode(double x) {
    const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    const double a = std::fabs(x);
    if (a == 0) return sign;
    int e;
    std::frexp(a, &e);
    e = e - 1 < 1 - kBias ? 1 - kBias : e - 1;  // a in [2^e, 2^(e+1)), or subnormal
    const double q = std::nearbyint(std::ldexp(a, kMantissa - e));
    const long bits = (static_cast<long>(e + kBias - 1) << kMantissa) + static_cast<long>(q);
    if (bits >= (static_cast<long>(kMaxExponent) << kMantissa)) {
      std::fprintf(stderr, "value %g overflows the format\n", x);
      std::exit(2);
    }
    return static_cast<uint16_t>(sign | bits);
  }
};
using Bf16 = Format<7, 8>;
using F16 = Format<10, 5>;

// ---------------------------------------------------------------------------------------------------------------
// Warp instructions, emulated from their documentation (not from the header).

using Piece = uint32_t[4];  // 16 bytes as the kernel's uint4: word w holds elements 2w (low half) and 2w + 1

uint32_t half_of(uint32_t reg, int i) { return (reg >> (16 * i)) & 0xffffu; }

// __byte_perm(x, y, s): byte n of the result is byte (s >> 4n) & 7 of the 8 bytes y:x (x's bytes are 0-3).
uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  const uint64_t bytes = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((bytes >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return r;
}

// mma.sync.aligned.m16n8kK.row.col.f32.{bf16,f16}.{bf16,f16}.f32, K = 16 or 8: D = A B + C over the warp. Registers
// hold their elements low half first. With groupID = lane >> 2 and threadID_in_group = lane % 4, the PTX ISA places
//   A (m16k16) a0..a7: row groupID for a0, a1, a4, a5, else groupID + 8; column threadID_in_group * 2 + (i & 1),
//                      + 8 for a4..a7;
//   A (m16k8)  a0..a3: row groupID for a0, a1, else groupID + 8; column threadID_in_group * 2 + (i & 1);
//   B (k16n8)  b0..b3: row threadID_in_group * 2 + (i & 1), + 8 for b2, b3; column groupID;
//   B (k8n8)   b0, b1: row threadID_in_group * 2 + i; column groupID;
//   C, D       c0..c3: row groupID for c0, c1, else groupID + 8; column threadID_in_group * 2 + (i & 1).
// Products of 16-bit values are exact in double; the sum is rounded once to fp32 (the hardware's order and rounding
// of the sum differ, by far less than the bounds of the checks).
template <class F, int K>
void mma(const uint32_t (&a)[32][K / 4], const uint32_t (&b)[32][K / 8], float* const (&c)[32]) {
  double A[16][K], B[K][8];
  int seen_a[16][K] = {}, seen_b[K][8] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < K / 2; ++i) {
      const int row = (K == 16 ? (i < 2 || (i >= 4 && i < 6)) : i < 2) ? group : group + 8;
      const int col = tig * 2 + (i & 1) + (K == 16 && i >= 4 ? 8 : 0);
      A[row][col] = F::decode(half_of(a[lane][i / 2], i % 2));
      ++seen_a[row][col];
    }
    for (int i = 0; i < K / 4; ++i) {
      const int row = tig * 2 + (i & 1) + (K == 16 && i >= 2 ? 8 : 0);
      B[row][group] = F::decode(half_of(b[lane][i / 2], i % 2));
      ++seen_b[row][group];
    }
  }
  // The layouts above must give each element of A and B to exactly one lane: a check of this emulation itself.
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < K; ++k)
      if (seen_a[r][k] != 1) std::abort();
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < 8; ++n)
      if (seen_b[k][n] != 1) std::abort();
  for (int lane = 0; lane < 32; ++lane) {
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? group : group + 8;
      const int col = tig * 2 + (i & 1);
      double d = c[lane][i];
      for (int k = 0; k < K; ++k) d += A[row][k] * B[k][col];
      c[lane][i] = static_cast<float>(d);
    }
  }
}

// __shfl_xor_sync / __shfl_sync over the full warp: lane l gets v[l ^ mask] / v[source[l]].
void shfl_xor(float (&v)[32], int mask) {
  float r[32];
  for (int l = 0; l < 32; ++l) r[l] = v[l ^ mask];
  std::memcpy(v, r, sizeof r);
}

// ---------------------------------------------------------------------------------------------------------------
// The maps the replay uses: the header's, or one of them deliberately wrong (the test checks each is caught).

enum class Fault {
  none,
  selectors,  // the two byte_perm selectors swapped (V's elements 2w and 2w + 1 exchanged)
  q_rows,     // the A registers of S take Q row g + 8 for g and g for g + 8
  c_keys,     // S's accumulators read with keys 2t and 2t + 1 exchanged
  v_keys,     // V keys 2t and 2t + 1 (and 2t + 8, 2t + 9) exchanged in the loads
  p_tiles,    // P's two 8-key halves exchanged in the PV B registers (16-key PV steps only)
  o_rows,     // O's accumulator rows 2t and 2t + 1 exchanged (rescale and output)
};

struct Maps {
  Fault fault;

  int qk_row(int g, int rt) const { return frag::qk_row(g, rt); }
  int qk_row_lane(int r) const { return frag::qk_row_lane(r); }
  int qk_piece(int u, int t) const { return frag::qk_piece(u, t); }
  int qk_tile_key(int jt) const { return frag::qk_tile_key(jt); }
  int qk_key(int g) const { return frag::qk_key(g); }
  int qk_a_row_tile(int i) const { return frag::qk_a_row_tile(i) ^ (fault == Fault::q_rows ? 1 : 0); }
  int qk_a_word(int h, int i) const { return frag::qk_a_word(h, i); }
  int qk_b_word(int h, int i) const { return frag::qk_b_word(h, i); }
  int qk_c_row_tile(int c) const { return frag::qk_c_row_tile(c); }
  int qk_c_key(int first, int t, int c) const { return frag::qk_c_key(first, t, fault == Fault::c_keys ? c ^ 1 : c); }
  int qk_c_index(int rt, int e) const { return frag::qk_c_index(rt, e); }
  int pv_piece(int v, int g) const { return frag::pv_piece(v, g); }
  int pv_step_key(int ks) const { return frag::pv_step_key(ks); }
  int pv_key_base(int t) const { return frag::pv_key_base(t); }
  int pv_key_offset(int e) const { return frag::pv_key_offset(fault == Fault::v_keys ? e ^ 1 : e); }
  int pv_a_source(int i, int which) const { return frag::pv_a_source(i, which); }
  uint32_t pv_a_selector(int i) const { return frag::pv_a_selector(fault == Fault::selectors ? i ^ 1 : i); }
  int pv_b_tile(int ks, int i) const { return frag::pv_b_tile(ks, fault == Fault::p_tiles ? i ^ 1 : i); }
  int pv_c_row_slot(int c) const { return frag::pv_c_row_slot(c); }
  int pv_c_element_slot(int c) const { return frag::pv_c_element_slot(c); }
  int pv_c_row(int t, int slot) const { return frag::pv_c_row(t, fault == Fault::o_rows ? slot ^ 1 : slot); }
  int pv_c_element(int v, int g, int w, int slot) const { return frag::pv_c_element(v, g, w, slot); }
  int pv_c_index(int row_slot, int element_slot) const { return frag::pv_c_index(row_slot, element_slot); }
};

// ---------------------------------------------------------------------------------------------------------------
// The case and its float64 references.

struct Case {
  int head_dim, q_len, group, k_len, row0;
  bool causal;
  int rows() const { return q_len * group; }
  // Query i sees keys j <= limit(i) (bottom-right causal alignment), as key_limit in the kernel.
  int limit(int row) const { return causal ? row / group + k_len - q_len : k_len - 1; }
};

template <class F>
struct Data {
  const Case& cs;
  std::vector<uint16_t> q, k, v;  // rows x head_dim, k_len x head_dim, k_len x head_dim
  double scale;

  Data(const Case& c, uint64_t seed) : cs(c) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal;
    const auto fill = [&](std::vector<uint16_t>& m, size_t n) {
      m.resize(n);
      for (auto& e : m) e = F::encode(normal(rng));
    };
    fill(q, size_t(cs.rows()) * cs.head_dim);
    fill(k, size_t(cs.k_len) * cs.head_dim);
    fill(v, size_t(cs.k_len) * cs.head_dim);
    // Twice the usual 1/sqrt(d): sharper softmax, so that the running max moves between steps and the rescale of O
    // by other lanes' alpha matters.
    scale = 2.0 / std::sqrt(static_cast<double>(cs.head_dim));
  }
  double qe(int row, int d) const { return F::decode(q[size_t(row) * cs.head_dim + d]); }
  double ke(int key, int d) const { return F::decode(k[size_t(key) * cs.head_dim + d]); }
  double ve(int key, int d) const { return F::decode(v[size_t(key) * cs.head_dim + d]); }
  double dot(int row, int key, double* abs_sum) const {
    double s = 0, a = 0;
    for (int d = 0; d < cs.head_dim; ++d) {
      s += qe(row, d) * ke(key, d);
      a += std::fabs(qe(row, d) * ke(key, d));
    }
    if (abs_sum) *abs_sum = a;
    return s;
  }
  // Piece `piece` of a row of q, k or v as the kernel's 16-byte load sees it, zeros where !ok.
  void load(const std::vector<uint16_t>& m, int row, int piece, bool ok, Piece& out) const {
    for (int w = 0; w < 4; ++w) {
      out[w] = 0;
      if (!ok) continue;
      const size_t at = size_t(row) * cs.head_dim + piece * 8 + 2 * w;
      out[w] = m[at] | static_cast<uint32_t>(m[at + 1]) << 16;
    }
  }
};

// Worst error of a check, as a fraction of its bound, and where.
struct Check {
  explicit Check(const char* n) : name(n) {}
  const char* name;
  double worst = 0;
  std::string where;
  bool failed = false;
  void add(double error, double bound, const std::string& at) {
    const double ratio = error == 0 ? 0.0 : error / bound;
    if (!(ratio <= worst)) {  // NaN counts as the worst
      worst = std::isnan(ratio) ? INFINITY : ratio;
      where = at;
    }
    if (!(error <= bound)) failed = true;
  }
  void fail(const std::string& at) {
    if (!failed) where = at;
    failed = true;
    worst = INFINITY;
  }
};

__attribute__((format(printf, 1, 2))) std::string at(const char* fmt, ...) {
  char buf[160];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// The replay of one block.

template <class F, int kDimTiles, int kRowTiles>
int replay(const Case& cs, const Maps& M, uint64_t seed) {
  using Tiling = frag::Tiling<kDimTiles, kRowTiles>;
  constexpr int kRows = Tiling::kRows;
  constexpr int kKeys = Tiling::kKeys;
  constexpr int kTiles = Tiling::kTiles;
  constexpr int kPvSteps = Tiling::kPvSteps;
  constexpr int kVKeys = Tiling::kVKeys;
  constexpr int kQPieces = Tiling::kQPieces;
  constexpr int kDimP = 64 * kDimTiles;
  constexpr bool kK16 = Tiling::kK16;

  const Data<F> data(cs, seed);
  const int pieces = cs.head_dim / 8;
  const int rows = cs.rows();
  const float scale_log2 = static_cast<float>(data.scale * 1.4426950408889634);
  Check s_check("S"), pv_check("PV"), out_check("out"), lse_check("lse");

  // The block's Work as block_work derives it, for one split of the whole sequence (kb = 0, ke = k_len).
  const int kb = 0, ke = cs.k_len;
  const int last_row = (cs.row0 + kRows < rows ? cs.row0 + kRows : rows) - 1;
  const auto clamp = [&](int j) { return j < kb ? kb : j > ke ? ke : j; };
  const int key_end = clamp(cs.limit(last_row) + 1);
  const int unmasked_end = clamp(cs.limit(cs.row0) + 1);

  // Q's rows in shared memory as 16-byte pieces, zeros past the sequence's rows and head_dim.
  static Piece q_s[16][kDimP / 8];
  for (int r = 0; r < kRows; ++r)
    for (int p = 0; p < kDimP / 8; ++p) data.load(data.q, cs.row0 + r, p, cs.row0 + r < rows && p < pieces, q_s[r][p]);

  // float64 references of every score the block may use, and the sums of |products| that bound their fp32 error.
  std::vector<double> s_ref(size_t(kRows) * cs.k_len), s_abs(s_ref.size());
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < cs.k_len; ++j)
      if (cs.row0 + r < rows) {
        s_ref[size_t(r) * cs.k_len + j] = data.dot(cs.row0 + r, j, &s_abs[size_t(r) * cs.k_len + j]);
      }
  const auto score = [&](int r, int j) { return s_ref[size_t(r) * cs.k_len + j]; };
  // Whether row r of the block sees key j (the mask the output must follow).
  const auto sees = [&](int r, int j) { return cs.row0 + r < rows && j < cs.k_len && j <= cs.limit(cs.row0 + r); };

  // Error model of what the kernel rounds on purpose, for the bounds of the checks (kU: fp32's unit roundoff).
  // A scaled score s = scale_log2 (Q K^T) in log2 units is off by the 2 kQPieces roundings of its accumulator (each
  // at most kU of the sum of |products|) and by kU of itself twice (scale_log2's rounding to fp32, the multiply).
  constexpr double kU = 0x1p-24, kLn2 = 0.6931471805599453;
  const auto score_error = [&](int r, int j) {
    return scale_log2 * (2 * kQPieces * kU * s_abs[size_t(r) * cs.k_len + j] + 2 * kU * std::fabs(score(r, j)));
  };
  // The running max m is one of the row's scores: off by at most the worst of their errors.
  double max_score_error[16] = {};
  for (int r = 0; r < kRows; ++r)
    for (int j = 0; j < cs.k_len; ++j)
      if (sees(r, j)) max_score_error[r] = std::fmax(max_score_error[r], score_error(r, j));
  // p = exp2(s - m), relative to exp2 of the exact scores less m_exact: the errors of s and m and of the subtraction
  // (kU of |s - m|) in log2 units, times ln 2; exp2f (2^-22, the device's ex2.approx is within 2 ulp); and P kept as
  // hi + lo in the element type, within u^2 of p (u the type's unit roundoff: 2^-16 of p in bf16, 2^-22 in fp16),
  // or half the smallest subnormal (the fp16 subnormals of P's smallest values: p_floor, absolute).
  const auto p_error = [&](int r, int j, double m_exact) {
    return kLn2 * (score_error(r, j) + max_score_error[r] + kU * std::fabs(scale_log2 * score(r, j) - m_exact)) +
           0x1p-22 + F::kUnitRoundoff * F::kUnitRoundoff;
  };
  const double p_floor = F::half_subnormal();
  // Steps a warp takes (each rescales O once and rounds each accumulator 2 kPvSteps times).
  const int warp_steps = (key_end - kb + kWarps * kKeys - 1) / (kWarps * kKeys);

  // What the warps leave in shared memory for the merge.
  static float o_s[kWarps][16][256];
  static int o_writes[kWarps][16][256];
  float m_s[kWarps][16], l_s[kWarps][16];

  for (int warp = 0; warp < kWarps; ++warp) {
    // Per-lane state, as the kernel's registers and slots.
    static Piece slots[32][2][16];
    float m[32][kRowTiles], l[32][kRowTiles], acc[32][kDimTiles][4][kRowTiles][4];
    int limit[32][kRowTiles];
    for (int lane = 0; lane < 32; ++lane) {
      const int g = frag::lane_group(lane);
      for (int rt = 0; rt < kRowTiles; ++rt) {
        m[lane][rt] = -INFINITY;
        l[lane][rt] = 0.0f;
        const int row = M.qk_row(cs.row0 + g, rt);
        const int last = row < rows ? cs.limit(row) : -1;
        limit[lane][rt] = last < -1 ? -1 : last;
      }
      std::memset(acc[lane], 0, sizeof acc[lane]);
    }
    // The float64 running max of each row's scores over this warp's keys so far (log2 units), for the PV check.
    double m_ref[16];
    for (double& e : m_ref) e = -INFINITY;

    const auto issue = [&](int j0, int st) {
      for (int lane = 0; lane < 32; ++lane) {
        const int g = frag::lane_group(lane), t = frag::lane_in_group(lane);
        for (int jt = 0; jt < kTiles; ++jt) {
          const int key = j0 + M.qk_tile_key(jt) + M.qk_key(g);
          for (int u = 0; u < kQPieces; ++u) {
            const int piece = M.qk_piece(u, t);
            data.load(data.k, key, piece, key < key_end && piece < pieces, slots[lane][st][Tiling::k_slot(jt, u)]);
          }
        }
        for (int ks = 0; ks < kPvSteps; ++ks)
          for (int e = 0; e < kVKeys; ++e) {
            const int key = j0 + M.pv_step_key(ks) + M.pv_key_offset(e) + M.pv_key_base(t);
            for (int v = 0; v < kDimTiles; ++v) {
              const int piece = M.pv_piece(v, g);
              data.load(data.v, key, piece, key < key_end && piece < pieces, slots[lane][st][Tiling::v_slot(ks, e, v)]);
            }
          }
      }
    };

    const auto step = [&](int j0, int st, bool masked) {
      // S = Q K^T.
      float s[32][kTiles][4] = {};
      for (int u = 0; u < kQPieces; ++u)
        for (int jt = 0; jt < kTiles; ++jt)
          for (int h = 0; h < 2; ++h) {
            uint32_t a[32][4], b[32][2];
            float* c[32];
            for (int lane = 0; lane < 32; ++lane) {
              const int g = frag::lane_group(lane), t = frag::lane_in_group(lane);
              const int piece = M.qk_piece(u, t);
              for (int i = 0; i < 4; ++i) {
                const int rt = M.qk_a_row_tile(i);
                // The kernel's zeros for row tile 1 of a one-tile block.
                a[lane][i] = rt < kRowTiles ? q_s[M.qk_row(g, rt)][piece][M.qk_a_word(h, i)] : 0u;
              }
              const Piece& kp = slots[lane][st][Tiling::k_slot(jt, u)];
              for (int i = 0; i < 2; ++i) b[lane][i] = kp[M.qk_b_word(h, i)];
              c[lane] = s[lane][jt];
            }
            mma<F, 16>(a, b, c);
          }

      // Check S as the kernel reads it. Bound: each of the 2 kQPieces mmas into an accumulator rounds it to fp32
      // once, an error of at most 2^-24 of the sum of |products| so far.
      int held[16][32] = {};
      for (int lane = 0; lane < 32; ++lane) {
        const int g = frag::lane_group(lane), t = frag::lane_in_group(lane);
        for (int jt = 0; jt < kTiles; ++jt)
          for (int c = 0; c < 4; ++c) {
            const int rt = M.qk_c_row_tile(c);
            if (rt >= kRowTiles) continue;  // rows 8-15 of a one-tile block: not rows
            const int r = M.qk_row(g, rt), key = M.qk_c_key(M.qk_tile_key(jt), t, c);
            if (r < 0 || r >= kRows || key < 0 || key >= kKeys) {
              s_check.fail(at("step %d: lane %d accumulator %d outside the step", j0, lane, c));
              continue;
            }
            ++held[r][key];
            if (cs.row0 + r >= rows || j0 + key >= key_end) continue;
            const double bound = 2 * kQPieces * kU * s_abs[size_t(r) * cs.k_len + j0 + key];
            s_check.add(std::fabs(s[lane][jt][c] - score(r, j0 + key)), bound,
                        at("row %d key %d (step %d)", r, j0 + key, j0));
          }
      }
      for (int r = 0; r < kRows; ++r)
        for (int key = 0; key < kKeys; ++key)
          if (held[r][key] != 1) s_check.fail(at("row %d key %d held %d times", r, j0 + key, held[r][key]));

      // Scale and mask.
      for (int lane = 0; lane < 32; ++lane) {
        const int t = frag::lane_in_group(lane);
        for (int jt = 0; jt < kTiles; ++jt)
          for (int c = 0; c < 4; ++c) {
            s[lane][jt][c] *= scale_log2;
            if (masked) {
              const int key = M.qk_c_key(j0 + M.qk_tile_key(jt), t, c);
              if (key >= key_end || key > limit[lane][M.qk_c_row_tile(c) % kRowTiles]) s[lane][jt][c] = -INFINITY;
            }
          }
      }

      // Online softmax per row, p overwriting s; the quad's max through two xor shuffles.
      float alpha[kRowTiles][32];
      for (int rt = 0; rt < kRowTiles; ++rt) {
        float mx[32];
        for (int lane = 0; lane < 32; ++lane) {
          mx[lane] = -INFINITY;
          for (int jt = 0; jt < kTiles; ++jt)
            mx[lane] =
                std::fmax(mx[lane], std::fmax(s[lane][jt][M.qk_c_index(rt, 0)], s[lane][jt][M.qk_c_index(rt, 1)]));
        }
        for (int mask = 1; mask <= 2; mask *= 2) {
          float other[32];
          std::memcpy(other, mx, sizeof mx);
          shfl_xor(other, mask);
          for (int lane = 0; lane < 32; ++lane) mx[lane] = std::fmax(mx[lane], other[lane]);
        }
        for (int lane = 0; lane < 32; ++lane) {
          const float m_new = std::fmax(m[lane][rt], mx[lane]);
          const float base = m_new == -INFINITY ? 0.0f : m_new;
          alpha[rt][lane] = std::exp2(m[lane][rt] - base);
          m[lane][rt] = m_new;
          float sum = 0.0f;
          for (int jt = 0; jt < kTiles; ++jt)
            for (int e = 0; e < 2; ++e) {
              float& p = s[lane][jt][M.qk_c_index(rt, e)];
              p = std::exp2(p - base);
              sum += p;
            }
          l[lane][rt] = l[lane][rt] * alpha[rt][lane] + sum;
        }
      }

      // Rescale O by the alpha of the lanes holding its rows.
      for (int rt = 0; rt < kRowTiles; ++rt)
        for (int lane = 0; lane < 32; ++lane) {
          const int t = frag::lane_in_group(lane);
          const float alpha0 = alpha[rt][M.qk_row_lane(M.pv_c_row(t, 0))];
          const float alpha1 = alpha[rt][M.qk_row_lane(M.pv_c_row(t, 1))];
          for (int v = 0; v < kDimTiles; ++v)
            for (int wd = 0; wd < 4; ++wd)
              for (int c = 0; c < 4; ++c) acc[lane][v][wd][rt][c] *= M.pv_c_row_slot(c) == 0 ? alpha0 : alpha1;
        }

      // P^T fragments, hi and lo parts (split_pair).
      uint32_t p_hi[32][kRowTiles][kPvSteps][2], p_lo[32][kRowTiles][kPvSteps][2];
      const auto pack = [](float lo, float hi) { return F::encode(lo) | static_cast<uint32_t>(F::encode(hi)) << 16; };
      for (int lane = 0; lane < 32; ++lane)
        for (int rt = 0; rt < kRowTiles; ++rt)
          for (int ks = 0; ks < kPvSteps; ++ks)
            for (int half = 0; half < (kK16 ? 2 : 1); ++half) {
              const int jt = M.pv_b_tile(ks, half);
              const float p0 = s[lane][jt][M.qk_c_index(rt, 0)], p1 = s[lane][jt][M.qk_c_index(rt, 1)];
              const uint32_t hi = pack(p0, p1);
              p_hi[lane][rt][ks][half] = hi;
              p_lo[lane][rt][ks][half] = pack(p0 - static_cast<float>(F::decode(half_of(hi, 0))),
                                              p1 - static_cast<float>(F::decode(half_of(hi, 1))));
            }

      float before[32][kDimTiles][4][kRowTiles][4];
      std::memcpy(before, acc, sizeof acc);

      // O^T += V^T P^T.
      for (int ks = 0; ks < kPvSteps; ++ks)
        for (int v = 0; v < kDimTiles; ++v)
          for (int wd = 0; wd < 4; ++wd) {
            constexpr int kA = Tiling::kPvAWords;
            uint32_t va[32][kA];
            for (int lane = 0; lane < 32; ++lane)
              for (int i = 0; i < kA; ++i) {
                const Piece& x = slots[lane][st][Tiling::v_slot(ks, M.pv_a_source(i, 0), v)];
                const Piece& y = slots[lane][st][Tiling::v_slot(ks, M.pv_a_source(i, 1), v)];
                va[lane][i] = byte_perm(x[wd], y[wd], M.pv_a_selector(i));
              }
            for (int rt = 0; rt < kRowTiles; ++rt)
              for (int part = 0; part < 2; ++part) {
                uint32_t b[32][kA / 2];
                float* c[32];
                for (int lane = 0; lane < 32; ++lane) {
                  for (int i = 0; i < kA / 2; ++i) b[lane][i] = (part == 0 ? p_hi : p_lo)[lane][rt][ks][i];
                  c[lane] = acc[lane][v][wd][rt];
                }
                mma<F, kK16 ? 16 : 8>(va, b, c);
              }
          }

      // Check the step's O^T += V^T P^T against the sum over the step's keys of P V, P from the float64 scores:
      // exp2(s - m), m the running max over this warp's keys (the kernel's own p are relative to its fp32 max, a
      // difference p_error covers). Bound: each p's error, and the 2 kPvSteps roundings of the accumulator (kU of
      // its value, at most |before| + sum P |V|).
      double m_new_ref[16];
      for (int r = 0; r < kRows; ++r) {
        m_new_ref[r] = m_ref[r];
        for (int key = 0; key < kKeys; ++key)
          if (j0 + key < key_end && sees(r, j0 + key)) {
            m_new_ref[r] = std::fmax(m_new_ref[r], scale_log2 * score(r, j0 + key));
          }
      }
      // P and its error bound for the keys of the step each row sees (0 for the others).
      double p_ref[16][32] = {}, p_bound[16][32] = {};
      for (int r = 0; r < kRows; ++r)
        for (int key = 0; key < kKeys; ++key) {
          const int j = j0 + key;
          if (j >= key_end || !sees(r, j)) continue;
          p_ref[r][key] = std::exp2(scale_log2 * score(r, j) - m_new_ref[r]);
          p_bound[r][key] = p_ref[r][key] * p_error(r, j, m_new_ref[r]) + p_floor;
        }
      int held_o[16][256] = {};
      for (int lane = 0; lane < 32; ++lane) {
        const int g = frag::lane_group(lane), t = frag::lane_in_group(lane);
        for (int v = 0; v < kDimTiles; ++v)
          for (int wd = 0; wd < 4; ++wd)
            for (int rt = 0; rt < kRowTiles; ++rt)
              for (int c = 0; c < 4; ++c) {
                const int r = M.qk_row(M.pv_c_row(t, M.pv_c_row_slot(c)), rt);
                const int d = M.pv_c_element(v, g, wd, M.pv_c_element_slot(c));
                if (r < 0 || r >= kRows || d < 0 || d >= kDimP) {
                  pv_check.fail(at("step %d: lane %d accumulator %d outside the block", j0, lane, c));
                  continue;
                }
                ++held_o[r][d];
                if (cs.row0 + r >= rows || d >= cs.head_dim) continue;
                double expected = 0, magnitude = 0, bound = 0;
                for (int key = 0; key < kKeys && j0 + key < cs.k_len; ++key) {
                  const double vj = data.ve(j0 + key, d);
                  expected += p_ref[r][key] * vj;
                  magnitude += p_ref[r][key] * std::fabs(vj);
                  bound += p_bound[r][key] * std::fabs(vj);
                }
                const double got = double(acc[lane][v][wd][rt][c]) - before[lane][v][wd][rt][c];
                bound += 2 * kPvSteps * kU * (std::fabs(before[lane][v][wd][rt][c]) + magnitude);
                pv_check.add(std::fabs(got - expected), bound, at("row %d element %d (step %d)", r, d, j0));
              }
      }
      for (int r = 0; r < kRows; ++r)
        for (int d = 0; d < kDimP; ++d)
          if (held_o[r][d] != 1) pv_check.fail(at("row %d element %d held %d times", r, d, held_o[r][d]));
      for (int r = 0; r < kRows; ++r) m_ref[r] = m_new_ref[r];
    };

    // Warp `warp` takes steps warp, warp + kWarps, ... of the block's keys, alternating its two stages.
    const int stride = kWarps * kKeys;
    int st = 0;
    for (int j0 = kb + warp * kKeys; j0 < key_end; j0 += stride, st ^= 1) {
      issue(j0, st);
      step(j0, st, !(j0 + kKeys <= unmasked_end));
    }

    // Hand the warp's state to the block: the quad's l summed by two xor shuffles, m and l by lane t == 0 of each
    // row, O as float2 pairs (element slots 0 and 1 of a row slot).
    for (int rt = 0; rt < kRowTiles; ++rt) {
      float lv[32];
      for (int lane = 0; lane < 32; ++lane) lv[lane] = l[lane][rt];
      for (int mask = 1; mask <= 2; mask *= 2) {
        float other[32];
        std::memcpy(other, lv, sizeof lv);
        shfl_xor(other, mask);
        for (int lane = 0; lane < 32; ++lane) lv[lane] += other[lane];
      }
      for (int lane = 0; lane < 32; ++lane) l[lane][rt] = lv[lane];
    }
    for (int r = 0; r < 16; ++r)
      for (int d = 0; d < 256; ++d) {
        o_s[warp][r][d] = NAN;
        o_writes[warp][r][d] = 0;
      }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = frag::lane_group(lane), t = frag::lane_in_group(lane);
      for (int rt = 0; rt < kRowTiles; ++rt) {
        if (t == 0) {
          m_s[warp][M.qk_row(g, rt)] = m[lane][rt];
          l_s[warp][M.qk_row(g, rt)] = l[lane][rt];
        }
        for (int v = 0; v < kDimTiles; ++v)
          for (int wd = 0; wd < 4; ++wd) {
            const int d = M.pv_c_element(v, g, wd, 0);
            const float(&c)[4] = acc[lane][v][wd][rt];
            for (int r = 0; r < 2; ++r) {
              const int row = M.qk_row(M.pv_c_row(t, r), rt);
              if (row < 0 || row >= kRows || d < 0 || d + 1 >= kDimP) {
                out_check.fail(at("lane %d writes row %d element %d outside o_s", lane, row, d));
                continue;
              }
              o_s[warp][row][d] = c[M.pv_c_index(r, 0)];
              o_s[warp][row][d + 1] = c[M.pv_c_index(r, 1)];
              ++o_writes[warp][row][d];
              ++o_writes[warp][row][d + 1];
            }
          }
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int d = 0; d < kDimP; ++d)
        if (o_writes[warp][r][d] != 1) {
          out_check.fail(at("warp %d row %d element %d written %d times", warp, r, d, o_writes[warp][r][d]));
        }
  }

  // finish_block: merge the warps; compare with softmax(scale Q K^T) V and its lse (natural log).
  // Bound for out: o = sum_j p'_j V_j / sum_j p'_j with p'_j = p_j (1 + e_j) is off by sum_j w_j e_j (V_j - o), at
  // most sum_j w_j e_j |V_j| + max_j e_j sum_j w_j |V_j| (w the softmax weights), plus p_floor |V_j| a key (l >= 1),
  // plus kU of sum_j w_j |V_j| for each rounding on the way: the accumulator's (2 kPvSteps and a rescale a step)
  // and the merge's (8). Bound for lse = ln 2 (m + log2 l): ln 2 times m's error, l's relative error (the worst e_j
  // and kU a rounding: 2 kTiles + 2 a step, 8 in the quad sum and the merge), and 2^-21 (1 + |lse|) for log2f and
  // the last operations.
  for (int r = 0; r < kRows; ++r) {
    const int row = cs.row0 + r;
    if (row >= rows) continue;
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = std::fmax(m, m_s[w][r]);
    double lse_ref = -INFINITY, mx = -INFINITY, worst_e = 0;
    for (int j = 0; j < cs.k_len; ++j)
      if (sees(r, j)) mx = std::fmax(mx, data.scale * score(r, j));
    double l_ref = 0;
    for (int j = 0; j < cs.k_len; ++j)
      if (sees(r, j)) {
        l_ref += std::exp(data.scale * score(r, j) - mx);
        worst_e = std::fmax(worst_e, p_error(r, j, mx / kLn2));
      }
    if (l_ref > 0) lse_ref = mx + std::log(l_ref);
    // The softmax weights and their error bounds, 0 for keys the row does not see.
    std::vector<double> w_ref(cs.k_len), w_bound(cs.k_len);
    for (int j = 0; j < cs.k_len; ++j) {
      if (!sees(r, j)) continue;
      w_ref[j] = std::exp(data.scale * score(r, j) - lse_ref);
      w_bound[j] = w_ref[j] * p_error(r, j, mx / kLn2) + p_floor;
    }
    for (int d = 0; d < cs.head_dim; d += 4) {
      float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float lse = -INFINITY;
      if (m != -INFINITY) {
        float l = 0.0f;
        for (int w = 0; w < kWarps; ++w) {
          const float f = std::exp2(m_s[w][r] - m);  // 0 for a warp that saw no key
          l += f * l_s[w][r];
          for (int e = 0; e < 4; ++e) o[e] += f * o_s[w][r][d + e];
        }
        const float inv = 1.0f / l;
        for (int e = 0; e < 4; ++e) o[e] *= inv;
        lse = (m + std::log2(l)) * 0.6931471805599453f;
      }
      for (int e = 0; e < 4; ++e) {
        double expected = 0, magnitude = 0, bound = 0;
        for (int j = 0; j < cs.k_len; ++j) {
          const double vj = data.ve(j, d + e);
          expected += w_ref[j] * vj;
          magnitude += w_ref[j] * std::fabs(vj);
          bound += w_bound[j] * std::fabs(vj);
        }
        // A row that sees no key must be exactly 0 (lse -inf), as the kernel writes it: bound 0.
        bound += (worst_e + (warp_steps * (2 * kPvSteps + 1) + 8) * kU) * magnitude;
        out_check.add(std::fabs(o[e] - expected), bound, at("row %d element %d", r, d + e));
      }
      if (d > 0) continue;
      if (l_ref > 0) {
        const double bound = kLn2 * max_score_error[r] + worst_e + (warp_steps * (2 * kTiles + 2) + 8) * kU +
                             0x1p-21 * (1 + std::fabs(lse_ref));
        lse_check.add(std::fabs(lse - lse_ref), bound, at("row %d", r));
      } else if (lse != -INFINITY) {
        lse_check.fail(at("row %d sees no key but has lse %g", r, lse));
      }
    }
  }

  bool ok = true;
  for (Check* c : {&s_check, &pv_check, &out_check, &lse_check}) {
    std::printf("%-4s worst error %.3g of its bound%s%s\n", c->name, c->worst, c->where.empty() ? "" : " at ",
                c->where.c_str());
    if (c->failed) {
      std::printf("MISMATCH %s at %s\n", c->name, c->where.c_str());
      ok = false;
    }
  }
  std::printf("%s (key_end %d, unmasked_end %d)\n", ok ? "OK" : "FAILED", key_end, unmasked_end);
  return ok ? 0 : 1;
}

template <class F>
int dispatch(int dim_tiles, int row_tiles, const Case& cs, const Maps& maps, uint64_t seed) {
  if (dim_tiles == 1 && row_tiles == 1) return replay<F, 1, 1>(cs, maps, seed);
  if (dim_tiles == 1 && row_tiles == 2) return replay<F, 1, 2>(cs, maps, seed);
  if (dim_tiles == 2 && row_tiles == 1) return replay<F, 2, 1>(cs, maps, seed);
  if (dim_tiles == 2 && row_tiles == 2) return replay<F, 2, 2>(cs, maps, seed);
  if (dim_tiles == 4 && row_tiles == 1) return replay<F, 4, 1>(cs, maps, seed);
  std::fprintf(stderr, "no launch has %d head-dimension tiles and %d row tiles\n", dim_tiles, row_tiles);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const auto usage = [] {
    std::fprintf(stderr,
                 "usage: mma_replay DTYPE DIM_TILES ROW_TILES MAPS HEAD_DIM Q_LEN GROUP K_LEN CAUSAL ROW0 SEED\n"
                 "       mma_replay round DTYPE X...\n");
    return 2;
  };
  if (argc >= 3 && std::strcmp(argv[1], "round") == 0) {
    const bool bf16 = std::strcmp(argv[2], "bf16") == 0;
    if (!bf16 && std::strcmp(argv[2], "f16") != 0) return usage();
    for (int i = 3; i < argc; ++i) {
      const double x = std::strtod(argv[i], nullptr);  // hexadecimal floats too: exactly the test's values
      std::printf("%u\n", bf16 ? Bf16::encode(x) : F16::encode(x));
    }
    return 0;
  }
  if (argc != 12) return usage();
  const std::string dtype = argv[1], maps_name = argv[4];
  const int dim_tiles = std::atoi(argv[2]), row_tiles = std::atoi(argv[3]);
  Case cs{};
  cs.head_dim = std::atoi(argv[5]);
  cs.q_len = std::atoi(argv[6]);
  cs.group = std::atoi(argv[7]);
  cs.k_len = std::atoi(argv[8]);
  cs.causal = std::atoi(argv[9]) != 0;
  cs.row0 = std::atoi(argv[10]);
  const uint64_t seed = std::strtoull(argv[11], nullptr, 10);

  const char* names[] = {"kernel", "selectors", "q_rows", "c_keys", "v_keys", "p_tiles", "o_rows"};
  Maps maps{Fault::none};
  bool known = false;
  for (int i = 0; i < 7; ++i)
    if (maps_name == names[i]) {
      maps.fault = static_cast<Fault>(i);
      known = true;
    }
  // The launcher's head-dimension classes: up to 64, 128 and 256 elements, a multiple of 8.
  const int max_dim = 64 * dim_tiles, min_dim = dim_tiles == 1 ? 8 : 32 * dim_tiles + 8;
  if (!known || cs.head_dim % 8 != 0 || cs.head_dim < min_dim || cs.head_dim > max_dim || cs.q_len < 1 ||
      cs.group < 1 || cs.k_len < 1 || cs.row0 < 0 || cs.row0 % (8 * row_tiles) != 0 || cs.row0 >= cs.rows() ||
      (maps.fault == Fault::p_tiles && dim_tiles == 4)) {
    return usage();
  }
  if (dtype == "bf16") return dispatch<Bf16>(dim_tiles, row_tiles, cs, maps, seed);
  if (dtype == "f16") return dispatch<F16>(dim_tiles, row_tiles, cs, maps, seed);
  return usage();
}
