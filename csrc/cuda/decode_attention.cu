// Split-K ("flash-decoding") attention on CUDA: a few query tokens per sequence against a long KV cache, with the
// semantics of kernels.h (AttentionForward): varlen sequences, GQA, bottom-right causal alignment, sliding windows,
// softcapping, lse in fp32.
//
// Work. A sequence's queries and the query heads that share kv head kh form its rows, row r = i * group + g being
// query i (0-based in the sequence) of head kh * group + g (group = heads_q / heads_k). Kernel 1 runs one block of
// 4 warps per (split, sequence, kv head, row chunk): the block takes up to kRows of those rows and streams its split
// of the sequence's keys once, every row served from the same K/V loads, its warps taking turns over steps of a few
// keys. Each warp keeps an online softmax per row (running max m, in units of log2: scores are multiplied by
// scale * log2(e) and exponentiated with exp2f, and a running sum l); at the end the warps merge through shared
// memory. Kernel 2 (only when splits > 1) merges the splits of each (token, head).
//
// Kernel 1, tensor-core form (fp16/bf16, K and V 16-byte aligned): S = Q K^T with mma.m16n8k16 (rows x keys, the
// head dimension as k), then O^T += V^T P^T with mma.m16n8k16 (or m16n8k8 for head_dim > 128: head dimension x
// rows, keys as k), fp32 accumulators throughout. K and V move in 16-byte pieces, each used whole by the thread
// that loaded it: the head dimension is a sum, so it may be visited in any order as long as Q and K agree, and the
// order of V's head dimension only decides where each output lands (see the fragment maps at mma_kernel). The
// pieces travel by cp.async through per-thread shared-memory slots, one step of keys ahead of the tensor cores. P is
// rounded to the element type for the tensor cores as the sum of two terms, hi + lo (hi = round(p),
// lo = round(p - hi)), so it keeps about 16 bits; l sums the fp32 p.
// Other dtypes and alignments take a CUDA-core kernel (simt_kernel): fp32 arithmetic, one key per warp at a time.
// Offsets into q, k, v, out and the workspace are 64-bit; positions within a sequence (< 2^31) are 32-bit.
//
// Windows and softcapping. The splits cut the keys that the sequence's first query's window starts at, up to its
// last key (with window_left >= 0: the last window_left + q_len keys at most), and a block streams only the keys
// that some of its rows see; keys outside a row's window are masked as the causal mask is. Softcapped scores, in
// log2 units s' = s log2(e), are c' tanh(s' / c') with c' = c log2(e): the same c tanh(s / c), scaled.
//
// Partial results (splits > 1). partial_out holds each split's normalised output o_s = sum_j p_j v_j / sum_j p_j
// (0 when the split saw no key) and partial_lse its natural-log lse_s (-inf when it saw no key), so that
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s,
// rounded once to the element type. The workspace is indexed token-major, because AttentionForward carries no
// total_q: partial_lse[(t * splits + s) * heads_q + h] and partial_out[((t * splits + s) * heads_q + h) * head_dim
// + d] for query token t. That is a permutation of the [splits, total_q, heads_q, (head_dim)] buffers that kernels.h
// names, of the same size; only this file reads or writes them. partial_out must be 16-byte aligned.
//
// Choosing splits (the host's job). Kernel 1 has splits * batch * heads_k * row_chunks blocks, row_chunks =
// ceil(max_q_len * group / rows_per_block) with rows_per_block = 16 (8 when head_dim > 128, or on the CUDA-core
// path 4, or 1 when max_q_len * group == 1). The tensor-core kernel holds about 3 blocks per SM; to fill the GPU
// several times over (the last wave is then a small part of the time) while keeping each split at least a few
// hundred keys long, use
//   splits = clamp(ceil(16 * num_SMs / (batch * heads_k * row_chunks)), 1, max(1, ceil(max_k_len / 256)))
// e.g. 132 SMs, batch 16, heads_k 32, one row chunk, 4096 keys: ceil(2112 / 512) = 5 splits, 2560 blocks.
// splits may exceed a sequence's keys: the empty splits write lse -inf and contribute nothing. (With a window,
// max_k_len above is at most window_left + max_q_len.)
#include <atomic>
#include <cmath>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/mma_fragments.h"

namespace aquila::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxHeadDim = 256;

// Per-call values the host derives from the arguments.
struct Launch {
  int64_t group;           // heads_q / heads_k
  int64_t rows_per_block;  // rows (query, head pairs of one kv head) per block of kernel 1
  int64_t row_chunks;      // blocks along a sequence's rows
  float scale_log2;        // scale * log2(e)
  float softcap_log2;      // softcap * log2(e); 0: no softcapping
  bool q_packed;           // q can be read in 16-byte pieces
  bool out_packed;         // out can be written 4 elements at a time
};

// What one block of kernel 1 computes.
struct Work {
  int64_t q_start, k_start;
  int64_t rows;  // q_len * group: the sequence's rows
  int64_t row0;  // the block's first row
  int q_len, k_len;
  int split, kv_head;
  int kb, ke;            // the split's keys [kb, ke) of the sequence
  int key_begin, key_end;  // keys [key_begin, key_end) are seen by at least one of the block's rows
  int unmasked_begin, unmasked_end;  // keys [unmasked_begin, unmasked_end) are seen by all of them
};

// Query i of a sequence sees keys first(i) <= j <= limit(i) (either may lie outside [0, k_len)).
__device__ __forceinline__ int64_t key_limit(const AttentionForward& a, const Work& w, int64_t i) {
  const int64_t position = i + w.k_len - w.q_len;
  if (a.causal) return position;
  return a.window_right >= 0 ? position + a.window_right : static_cast<int64_t>(w.k_len) - 1;
}
__device__ __forceinline__ int64_t key_first(const AttentionForward& a, const Work& w, int64_t i) {
  return a.window_left >= 0 ? i + w.k_len - w.q_len - a.window_left : 0;
}

__device__ __forceinline__ int clamp_key(int64_t key, int lo, int hi) {
  return static_cast<int>(key < lo ? lo : key > hi ? hi : key);
}

// tanh(y) within a few ulps (tanhf itself compiles to tanh.approx.f32, relative error 2^-11, under --use_fast_math):
// as csrc/cpu/common.h's tanh_and_slope, sign(y) (1 - e) / (1 + e) from e = exp(-2|y|), and below |y| = 0.25, where
// 1 - e would cancel digits, tanh's Taylor series to y^9.
__device__ __forceinline__ float accurate_tanh(float y) {
  const float a = fabsf(y);
  const float y2 = y * y;
  const float series =
      y * (1.0f + y2 * (-1.0f / 3.0f + y2 * (2.0f / 15.0f + y2 * (-17.0f / 315.0f + y2 * (62.0f / 2835.0f)))));
  const float e = exp2f(-2.0f * kLog2e * a);
  return a < 0.25f ? series : copysignf(__fdividef(1.0f - e, 1.0f + e), y);
}

// A score in log2 units, softcapped when softcap_log2 > 0.
__device__ __forceinline__ float capped(float s, const Launch& x) {
  return x.softcap_log2 > 0.0f ? x.softcap_log2 * accurate_tanh(s / x.softcap_log2) : s;
}

// Block id -> work; false when the block has no rows (its row chunk lies past the sequence's rows). Row chunks vary
// fastest, so that blocks reading the same keys run side by side and share them through L2.
__device__ __forceinline__ bool block_work(int64_t id, const AttentionForward& a, const Launch& x, int rows_in_block,
                                           Work& w) {
  const int64_t chunk = id % x.row_chunks;
  id /= x.row_chunks;
  w.kv_head = static_cast<int>(id % a.heads_k);
  id /= a.heads_k;
  const int64_t b = id % a.seq.batch;
  w.split = static_cast<int>(id / a.seq.batch);
  w.q_len = a.seq.q_len[b];
  w.rows = static_cast<int64_t>(w.q_len) * x.group;
  w.row0 = chunk * x.rows_per_block;
  if (w.row0 >= w.rows) return false;
  w.q_start = a.seq.q_start[b];
  w.k_start = a.seq.k_start[b];
  w.k_len = a.seq.k_len[b];
  // The splits cut the keys from the first that the sequence's first query sees.
  const int reach = clamp_key(key_first(a, w, 0), 0, w.k_len);
  const int64_t span = w.k_len - reach;
  w.kb = reach + static_cast<int>(static_cast<int64_t>(w.split) * span / a.splits);
  w.ke = reach + static_cast<int>((static_cast<int64_t>(w.split) + 1) * span / a.splits);
  const int64_t last_row = (w.row0 + rows_in_block < w.rows ? w.row0 + rows_in_block : w.rows) - 1;
  // Later queries' windows lie later: the first row's window starts what the block needs and the last row's ends
  // it; keys past the last row's start and before the first row's end are seen by every row.
  const int64_t first_query = w.row0 / x.group, last_query = last_row / x.group;
  w.key_begin = clamp_key(key_first(a, w, first_query), w.kb, w.ke);
  w.key_end = clamp_key(key_limit(a, w, last_query) + 1, w.key_begin, w.ke);
  w.unmasked_begin = clamp_key(key_first(a, w, last_query), w.key_begin, w.key_end);
  w.unmasked_end = clamp_key(key_limit(a, w, first_query) + 1, w.unmasked_begin, w.key_end);
  return true;
}

// The last step of kernel 1. Each warp has left, for each of the block's kRows rows, its running max m (log2
// units), its sum l and its unnormalised output o (kDimP floats a row, head_dim of them used) in shared memory;
// merge the warps and write the split's normalised output and lse, or with a single split the final out and lse.
template <typename T, int kRows, int kDimP>
__device__ void finish_block(const AttentionForward& a, const Launch& x, const Work& w,
                             const float (&o_s)[kWarps][kRows][kDimP], const float (&m_s)[kWarps][kRows],
                             const float (&l_s)[kWarps][kRows]) {
  const int quads = static_cast<int>(a.head_dim / 4);
  for (int item = threadIdx.x; item < kRows * quads; item += kThreads) {
    const int r = item / quads;
    const int d = (item - r * quads) * 4;
    const int64_t row = w.row0 + r;
    if (row >= w.rows) continue;
    const int64_t token = w.q_start + row / x.group;
    const int64_t head = w.kv_head * x.group + row % x.group;

    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) m = fmaxf(m, m_s[k][r]);
    float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float lse = -INFINITY;
    if (m != -INFINITY) {
      float l = 0.0f;
#pragma unroll
      for (int k = 0; k < kWarps; ++k) {
        const float f = exp2f(m_s[k][r] - m);  // 0 for a warp that saw no key (m -inf)
        l += f * l_s[k][r];
#pragma unroll
        for (int e = 0; e < 4; ++e) o[e] += f * o_s[k][r][d + e];
      }
      // l >= 1: the warp that holds the maximum counts its largest p as exp2(0).
      const float inv = 1.0f / l;
#pragma unroll
      for (int e = 0; e < 4; ++e) o[e] *= inv;
      lse = (m + log2f(l)) * kLn2;
    }

    if (a.splits == 1) {
      T* out = static_cast<T*>(a.out.data) + token * a.out.token_stride + head * a.out.head_stride + d;
      if (x.out_packed) {
        store_from_float<4>(out, o);
      } else {
        store_from_float<4, 1>(out, o);
      }
      if (a.lse && d == 0) a.lse[token * a.heads_q + head] = lse;
    } else {
      const int64_t slot = (token * a.splits + w.split) * a.heads_q + head;
      store_from_float<4>(a.partial_out + slot * a.head_dim + d, o);
      if (d == 0) a.partial_lse[slot] = lse;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tensor-core kernel (fp16 / bf16).

template <typename T>
__device__ __forceinline__ void mma_k16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                        uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ void mma_k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
  } else {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
}

// Two floats rounded to a T pair, the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  uint32_t bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&bits, &v, sizeof bits);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&bits, &v, sizeof bits);
  }
  return bits;
}

template <typename T>
__device__ __forceinline__ float2 unpack_pair(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
  } else {
    __half2 v;
    memcpy(&v, &bits, sizeof bits);
    return __half22float2(v);
  }
}

// p0, p1 as hi + lo, each a T pair: hi = round(p), lo = round(p - hi).
template <typename T>
__device__ __forceinline__ void split_pair(float p0, float p1, uint32_t& hi, uint32_t& lo) {
  hi = pack_pair<T>(p0, p1);
  const float2 h = unpack_pair<T>(hi);
  lo = pack_pair<T>(p0 - h.x, p1 - h.y);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// cp.async of one 16-byte piece into shared memory, zeros instead where `ok` is false (no global read then).
__device__ __forceinline__ void copy_piece(uint4* dst, const void* src, bool ok) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(ok ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void copy_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void copy_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// Fragment maps, for lane = 4 * g + t (g = lane / 4, t = lane % 4). The head dimension is cut into pieces of 8
// elements (16 bytes); words are the 4 element pairs of a piece. The kernel takes every index below from the
// functions of cuda/mma_fragments.h (frag::), which tests/kernels/test_mma_replay.py replays on the CPU against the
// PTX ISA's fragment layouts.
//
// S = Q K^T, one mma.m16n8k16 per (8 keys, 16 head elements): rows 0-15 of the block as m, keys as n. Thread (g, t)
// takes piece 4u + t of key g of each 8-key tile (u < 2 kDimTiles), and piece 4u + t of rows g and g + 8 of Q. The
// k index 2t + e (e = 0, 1) of the mma for half h of that piece stands for element 4h + e of the piece, and k index
// 2t + 8 + e for element 4h + 2 + e: so A = {Q_g word 2h, Q_g+8 word 2h, Q_g word 2h+1, Q_g+8 word 2h+1} and
// B = {K word 2h, K word 2h+1}, the same head elements on both sides. The accumulator gives thread (g, t) the
// scores of rows g (c0, c1) and g + 8 (c2, c3) with keys 2t and 2t + 1 of the tile.
//
// O^T += V^T P^T, one mma per (16 head elements, 8 rows, 16 keys): head elements as m, rows as n, keys as k, the
// keys of a k step being tiles 2ks and 2ks + 1 of S. P^T as B is then exactly S's accumulator, packed: b0 = row g's
// p for keys 2t, 2t + 1, b1 for keys 8 + 2t, 9 + 2t (rows g + 8 from c2, c3 for the second row tile). Thread (g, t)
// takes piece 8v + g (v < kDimTiles) of keys 2t, 2t + 1, 2t + 8, 2t + 9 of V; the mma for word w of those pieces
// takes m index g as element 2w of the piece and m index g + 8 as element 2w + 1, so A = {lo(x0) lo(x1),
// hi(x0) hi(x1), lo(x2) lo(x3), hi(x2) hi(x3)}, x_e word w of key e's piece. Its accumulator gives thread (g, t)
// rows 2t (c0, c2) and 2t + 1 (c1, c3) at head elements 8(8v + g) + 2w (c0, c1) and that + 1 (c2, c3). With
// 8-key steps (head_dim > 128) the mma is m16n8k8: keys 2t and 2t + 1 only, A = {lo(x0) lo(x1), hi(x0) hi(x1)}.
//
// Loads. A step is kKeys = 32 / kDimTiles keys, so that every thread needs 8 pieces of K and 8 of V whatever the
// head dimension. Each thread cp.asyncs exactly the pieces it will use into its own slots of shared memory (slot
// [stage][piece][thread]: a warp's accesses are 512 contiguous bytes, free of bank conflicts) and reads them back
// after cp.async.wait_group: no other thread touches them, so no barrier is needed. Two stages: the next step's
// pieces are in flight while the thread computes on this one (8 to 16 KiB a warp), and none of them holds a
// register meanwhile.
template <int kDimTiles, int kRowTiles>
struct MmaShape : frag::Tiling<kDimTiles, kRowTiles> {
  using Tiling = frag::Tiling<kDimTiles, kRowTiles>;
  static constexpr int kRows = Tiling::kRows;
  static constexpr int kDimP = 64 * kDimTiles;
  static constexpr int kPieces = Tiling::kPieces;  // K and V pieces a thread takes per step
  static constexpr int kStages = 2;
  static constexpr size_t kStageBytes = size_t{kStages} * kPieces * kThreads * sizeof(uint4);
  static constexpr size_t kOutBytes = size_t{kWarps} * kRows * kDimP * sizeof(float);
  // Dynamic shared memory: the stages, and afterwards (aliased) the warps' outputs.
  static constexpr size_t kDynamicBytes = kStageBytes > kOutBytes ? kStageBytes : kOutBytes;
};

template <typename T, int kDimTiles, int kRowTiles>
__global__ void __launch_bounds__(kThreads, 3) mma_kernel(const __grid_constant__ AttentionForward a, const Launch x) {
  using Shape = MmaShape<kDimTiles, kRowTiles>;
  constexpr int kRows = Shape::kRows;
  constexpr int kDimP = Shape::kDimP;
  constexpr int kKeys = Shape::kKeys;        // keys a warp takes per step
  constexpr int kTiles = Shape::kTiles;      // 8-key tiles of S per step
  constexpr int kPvSteps = Shape::kPvSteps;  // PV k steps per step
  constexpr int kVKeys = Shape::kVKeys;      // V keys a thread takes per PV step
  constexpr int kQPieces = Shape::kQPieces;  // pieces qk_piece(u, t) of a Q or K row a thread takes

  extern __shared__ uint4 dynamic_s[];
  // Q's rows as 16-byte pieces. The 4 pieces of padding put rows g and g + 1 64 bytes apart in the banks, so the
  // 8 threads of a quarter warp (pieces 4u + t of 2 rows) read 8 distinct 16-byte bank groups.
  __shared__ uint4 q_s[kRows][kDimP / 8 + 4];
  __shared__ float m_s[kWarps][kRows];
  __shared__ float l_s[kWarps][kRows];
  __shared__ Work work_s;
  auto& o_s = *reinterpret_cast<float(*)[kWarps][kRows][kDimP]>(dynamic_s);
  // This thread's slot for piece p of stage st.
  const auto slot = [&](int st, int p) { return dynamic_s + (st * Shape::kPieces + p) * kThreads + threadIdx.x; };

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = frag::lane_group(lane);
  const int t = frag::lane_in_group(lane);
  const int pieces = static_cast<int>(a.head_dim / 8);
  const int64_t blocks = a.splits * a.seq.batch * a.heads_k * x.row_chunks;

  bool k_piece_ok[kQPieces];
#pragma unroll
  for (int u = 0; u < kQPieces; ++u) k_piece_ok[u] = frag::qk_piece(u, t) < pieces;
  bool v_piece_ok[kDimTiles];
#pragma unroll
  for (int v = 0; v < kDimTiles; ++v) v_piece_ok[v] = frag::pv_piece(v, g) < pieces;

  for (int64_t id = blockIdx.x; id < blocks; id += gridDim.x) {
    Work w;
    if (!block_work(id, a, x, kRows, w)) continue;  // uniform over the block

    // Q into shared memory, zeros past the sequence's rows and head_dim; and the last key each of rows g and g + 8
    // sees (-1 for rows past the sequence's: all masked).
    for (int item = threadIdx.x; item < kRows * (kDimP / 8); item += kThreads) {
      const int r = item / (kDimP / 8);
      const int piece = item - r * (kDimP / 8);
      const int64_t row = w.row0 + r;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row < w.rows && piece < pieces) {
        const T* p = static_cast<const T*>(a.q.data) + (w.q_start + row / x.group) * a.q.token_stride +
                     (w.kv_head * x.group + row % x.group) * a.q.head_stride + piece * 8;
        if (x.q_packed) {
          v = *reinterpret_cast<const uint4*>(p);
        } else {
          T e[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) e[i] = p[i];
          memcpy(&v, e, sizeof e);
        }
      }
      q_s[r][piece] = v;
    }
    int first[kRowTiles], limit[kRowTiles];  // clamped to [0, k_len] and [-1, k_len - 1]
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      const int64_t row = frag::qk_row(w.row0 + g, rt);
      const bool live = row < w.rows;
      first[rt] = live ? clamp_key(key_first(a, w, row / x.group), 0, w.k_len) : w.k_len;
      limit[rt] = live ? clamp_key(key_limit(a, w, row / x.group), -1, w.k_len - 1) : -1;
    }
    // The finish needs the block's Work again: from shared memory, so that it holds no registers during the keys.
    if (threadIdx.x == 0) work_s = w;
    __syncthreads();

    // Thread bases: K key qk_key(g) of a tile at piece qk_piece(0, t); V key pv_key_base(t) of a PV step at piece
    // pv_piece(0, g).
    const T* k_lane = static_cast<const T*>(a.k.data) + (w.k_start + frag::qk_key(g)) * a.k.token_stride +
                      w.kv_head * a.k.head_stride + frag::qk_piece(0, t) * 8;
    const T* v_lane = static_cast<const T*>(a.v.data) + (w.k_start + frag::pv_key_base(t)) * a.v.token_stride +
                      w.kv_head * a.v.head_stride + frag::pv_piece(0, g) * 8;
    const int64_t kts = a.k.token_stride;
    const int64_t vts = a.v.token_stride;

    // Start the copies of the pieces of keys [j0, j0 + kKeys) into stage st; keys at or past key_end read as 0.
    const auto issue = [&](int j0, int st) {
#pragma unroll
      for (int jt = 0; jt < kTiles; ++jt) {
        const bool key_ok = j0 + frag::qk_tile_key(jt) + frag::qk_key(g) < w.key_end;
        const T* p = k_lane + static_cast<int64_t>(j0 + frag::qk_tile_key(jt)) * kts;
#pragma unroll
        for (int u = 0; u < kQPieces; ++u) {
          copy_piece(slot(st, Shape::k_slot(jt, u)), p + (frag::qk_piece(u, t) - frag::qk_piece(0, t)) * 8,
                     key_ok && k_piece_ok[u]);
        }
      }
#pragma unroll
      for (int ks = 0; ks < kPvSteps; ++ks) {
#pragma unroll
        for (int e = 0; e < kVKeys; ++e) {
          // keys 2t, 2t + 1 (, 2t + 8, 2t + 9) of the PV step
          const int offset = frag::pv_step_key(ks) + frag::pv_key_offset(e);
          const bool key_ok = j0 + offset + frag::pv_key_base(t) < w.key_end;
          const T* p = v_lane + static_cast<int64_t>(j0 + offset) * vts;
#pragma unroll
          for (int v = 0; v < kDimTiles; ++v) {
            copy_piece(slot(st, Shape::v_slot(ks, e, v)), p + (frag::pv_piece(v, g) - frag::pv_piece(0, g)) * 8,
                       key_ok && v_piece_ok[v]);
          }
        }
      }
    };

    float m[kRowTiles], l[kRowTiles];
    float acc[kDimTiles][4][kRowTiles][4];
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      m[rt] = -INFINITY;
      l[rt] = 0.0f;
    }
#pragma unroll
    for (int v = 0; v < kDimTiles; ++v)
#pragma unroll
      for (int wd = 0; wd < 4; ++wd)
#pragma unroll
        for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[v][wd][rt][c] = 0.0f;

    // One step on keys [j0, j0 + kKeys), whose pieces are in stage st. kMasked: some key is past key_end, or hidden
    // from some row.
    const auto step = [&](int j0, int st, auto masked_tag) {
      constexpr bool kMasked = decltype(masked_tag)::value;

      // S = Q K^T, scaled to log2 units and masked.
      float s[kTiles][4];
#pragma unroll
      for (int jt = 0; jt < kTiles; ++jt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[jt][c] = 0.0f;
#pragma unroll
      for (int u = 0; u < kQPieces; ++u) {
        const int piece = frag::qk_piece(u, t);
        // Q rows of row tiles 0 and 1 (zeros for a block of one row tile: its rows 8-15 are not rows).
        const uint4 q_lo = q_s[frag::qk_row(g, 0)][piece];
        const uint4 q_hi =
            kRowTiles > 1 ? q_s[frag::qk_row(g, kRowTiles > 1 ? 1 : 0)][piece] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int jt = 0; jt < kTiles; ++jt) {
          const uint4 kp = *slot(st, Shape::k_slot(jt, u));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t qa[4], kb[2];
#pragma unroll
            for (int i = 0; i < 4; ++i) qa[i] = word(frag::qk_a_row_tile(i) == 0 ? q_lo : q_hi, frag::qk_a_word(h, i));
#pragma unroll
            for (int i = 0; i < 2; ++i) kb[i] = word(kp, frag::qk_b_word(h, i));
            mma_k16<T>(s[jt], qa[0], qa[1], qa[2], qa[3], kb[0], kb[1]);
          }
        }
      }
#pragma unroll
      for (int jt = 0; jt < kTiles; ++jt) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[jt][c] = capped(s[jt][c] * x.scale_log2, x);
          if constexpr (kMasked) {
            const int key = frag::qk_c_key(j0 + frag::qk_tile_key(jt), t, c);
            // (a row tile past kRowTiles holds no row: its scores are never read)
            const int rt = frag::qk_c_row_tile(c) % kRowTiles;
            if (key >= w.key_end || key > limit[rt] || key < first[rt]) s[jt][c] = -INFINITY;
          }
        }
      }

      // Online softmax per row: rows g + 8 rt here, p overwrites s.
      float alpha[kRowTiles];
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        float mx = -INFINITY;
#pragma unroll
        for (int jt = 0; jt < kTiles; ++jt) {
          mx = fmaxf(mx, fmaxf(s[jt][frag::qk_c_index(rt, 0)], s[jt][frag::qk_c_index(rt, 1)]));
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[rt], mx);
        const float base = m_new == -INFINITY ? 0.0f : m_new;  // no key yet: every p and alpha is 0, not NaN
        alpha[rt] = exp2f(m[rt] - base);
        m[rt] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int jt = 0; jt < kTiles; ++jt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& p = s[jt][frag::qk_c_index(rt, e)];
            p = exp2f(p - base);
            sum += p;
          }
        }
        l[rt] = l[rt] * alpha[rt] + sum;  // this thread's keys only; the quad is summed at the end
      }

      // Rescale O: its rows pv_c_row(t, 0) and pv_c_row(t, 1) of each row tile (2t and 2t + 1) take the alpha of
      // the lanes that hold those rows of S (lanes 8t and 8t + 4).
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
        const float alpha0 = __shfl_sync(0xffffffffu, alpha[rt], frag::qk_row_lane(frag::pv_c_row(t, 0)));
        const float alpha1 = __shfl_sync(0xffffffffu, alpha[rt], frag::qk_row_lane(frag::pv_c_row(t, 1)));
#pragma unroll
        for (int v = 0; v < kDimTiles; ++v) {
#pragma unroll
          for (int wd = 0; wd < 4; ++wd) {
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[v][wd][rt][c] *= frag::pv_c_row_slot(c) == 0 ? alpha0 : alpha1;
          }
        }
      }

      // P^T fragments, hi and lo parts: [row tile][PV step][b register].
      uint32_t p_hi[kRowTiles][kPvSteps][2], p_lo[kRowTiles][kPvSteps][2];
#pragma unroll
      for (int rt = 0; rt < kRowTiles; ++rt) {
#pragma unroll
        for (int ks = 0; ks < kPvSteps; ++ks) {
#pragma unroll
          for (int half = 0; half < (Shape::kK16 ? 2 : 1); ++half) {
            const int jt = frag::pv_b_tile(ks, half);
            split_pair<T>(s[jt][frag::qk_c_index(rt, 0)], s[jt][frag::qk_c_index(rt, 1)], p_hi[rt][ks][half],
                          p_lo[rt][ks][half]);
          }
        }
      }

      // O^T += V^T P^T.
#pragma unroll
      for (int ks = 0; ks < kPvSteps; ++ks) {
#pragma unroll
        for (int v = 0; v < kDimTiles; ++v) {
          uint4 vp[kVKeys];
#pragma unroll
          for (int e = 0; e < kVKeys; ++e) vp[e] = *slot(st, Shape::v_slot(ks, e, v));
#pragma unroll
          for (int wd = 0; wd < 4; ++wd) {
            // Elements 2wd (selector 0x5410) and 2wd + 1 (0x7632) of keys 2t, 2t + 1 (, and 2t + 8, 2t + 9).
            uint32_t va[Shape::kPvAWords];
#pragma unroll
            for (int i = 0; i < Shape::kPvAWords; ++i) {
              va[i] = __byte_perm(word(vp[frag::pv_a_source(i, 0)], wd), word(vp[frag::pv_a_source(i, 1)], wd),
                                  frag::pv_a_selector(i));
            }
            if constexpr (Shape::kK16) {
#pragma unroll
              for (int rt = 0; rt < kRowTiles; ++rt) {
                mma_k16<T>(acc[v][wd][rt], va[0], va[1], va[2], va[3], p_hi[rt][ks][0], p_hi[rt][ks][1]);
                mma_k16<T>(acc[v][wd][rt], va[0], va[1], va[2], va[3], p_lo[rt][ks][0], p_lo[rt][ks][1]);
              }
            } else {
#pragma unroll
              for (int rt = 0; rt < kRowTiles; ++rt) {
                mma_k8<T>(acc[v][wd][rt], va[0], va[1], p_hi[rt][ks][0]);
                mma_k8<T>(acc[v][wd][rt], va[0], va[1], p_lo[rt][ks][0]);
              }
            }
          }
        }
      }
    };

    // Warp `warp` takes steps warp, warp + kWarps, ... of the block's keys, its copies one step ahead. A commit with
    // nothing issued makes an empty group, so "all but the newest group complete" always means this step's pieces.
    const int stride = kWarps * kKeys;
    int j0 = w.key_begin + warp * kKeys;
    if (j0 < w.key_end) issue(j0, 0);
    copy_commit();
#pragma unroll 1
    for (int st = 0; j0 < w.key_end; j0 += stride, st ^= 1) {
      if (j0 + stride < w.key_end) issue(j0 + stride, st ^ 1);
      copy_commit();
      copy_wait<1>();
      if (j0 >= w.unmasked_begin && j0 + kKeys <= w.unmasked_end) {
        step(j0, st, std::false_type{});
      } else {
        step(j0, st, std::true_type{});
      }
    }

    // Hand the warp's state to the block: m and the quad's l by lane t == 0 of each row, O in natural order, into
    // the slots once every warp is done with them.
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      l[rt] += __shfl_xor_sync(0xffffffffu, l[rt], 1);
      l[rt] += __shfl_xor_sync(0xffffffffu, l[rt], 2);
    }
    copy_wait<0>();  // only empty groups can be left, but no copy may land after the barrier
    __syncthreads();
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      if (t == 0) {
        m_s[warp][frag::qk_row(g, rt)] = m[rt];
        l_s[warp][frag::qk_row(g, rt)] = l[rt];
      }
#pragma unroll
      for (int v = 0; v < kDimTiles; ++v) {
#pragma unroll
        for (int wd = 0; wd < 4; ++wd) {
          const int d = frag::pv_c_element(v, g, wd, 0);  // element slot 1 is d + 1: one float2 per row
          const float(&c)[4] = acc[v][wd][rt];
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            *reinterpret_cast<float2*>(&o_s[warp][frag::qk_row(frag::pv_c_row(t, r), rt)][d]) =
                make_float2(c[frag::pv_c_index(r, 0)], c[frag::pv_c_index(r, 1)]);
          }
        }
      }
    }
    __syncthreads();
    finish_block<T>(a, x, work_s, o_s, m_s, l_s);
    __syncthreads();  // the next block's Q, copies and state go into the same shared memory
  }
}

// ---------------------------------------------------------------------------------------------------------------
// CUDA-core kernel: any dtype and alignment. Lane `lane` holds elements (c * 32 + lane) * kVec + e of the head
// dimension, c < kChunks; a warp takes one key at a time (two loaded ahead), the dot products reduced over the warp.

template <typename T, int kVec, int kRows>
__global__ void __launch_bounds__(kThreads) simt_kernel(const __grid_constant__ AttentionForward a, const Launch x) {
  constexpr int kChunks = kMaxHeadDim / (32 * kVec);
  constexpr int kUnroll = 2;
  __shared__ float o_s[kWarps][kRows][kMaxHeadDim];
  __shared__ float m_s[kWarps][kRows];
  __shared__ float l_s[kWarps][kRows];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int dim = static_cast<int>(a.head_dim);
  const int64_t blocks = a.splits * a.seq.batch * a.heads_k * x.row_chunks;
  bool chunk_ok[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) chunk_ok[c] = (c * 32 + lane) * kVec < dim;

  for (int64_t id = blockIdx.x; id < blocks; id += gridDim.x) {
    Work w;
    if (!block_work(id, a, x, kRows, w)) continue;

    float q[kRows][kChunks][kVec];
    int64_t first[kRows], limit[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t row = w.row0 + r;
      const bool live = row < w.rows;
      first[r] = live ? key_first(a, w, row / x.group) : 0;
      limit[r] = live ? key_limit(a, w, row / x.group) : -1;
      const T* qrow = static_cast<const T*>(a.q.data) + (w.q_start + row / x.group) * a.q.token_stride +
                      (w.kv_head * x.group + row % x.group) * a.q.head_stride;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) q[r][c][e] = 0.0f;
        if (live && chunk_ok[c]) {
          load_as_float(qrow + (c * 32 + lane) * kVec, q[r][c]);
#pragma unroll
          for (int e = 0; e < kVec; ++e) q[r][c][e] *= x.scale_log2;
        }
      }
    }

    const T* k_seq = static_cast<const T*>(a.k.data) + w.k_start * a.k.token_stride + w.kv_head * a.k.head_stride;
    const T* v_seq = static_cast<const T*>(a.v.data) + w.k_start * a.v.token_stride + w.kv_head * a.v.head_stride;
    float m[kRows], l[kRows], acc[kRows][kChunks][kVec];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[r][c][e] = 0.0f;
    }

    for (int j0 = w.key_begin + warp; j0 < w.key_end; j0 += kWarps * kUnroll) {
      float kv[kUnroll][2][kChunks][kVec];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kWarps;
        const T* kp = k_seq + static_cast<int64_t>(j) * a.k.token_stride;
        const T* vp = v_seq + static_cast<int64_t>(j) * a.v.token_stride;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
#pragma unroll
          for (int e = 0; e < kVec; ++e) kv[u][0][c][e] = kv[u][1][c][e] = 0.0f;
          if (j < w.key_end && chunk_ok[c]) {
            load_as_float(kp + (c * 32 + lane) * kVec, kv[u][0][c]);
            load_as_float(vp + (c * 32 + lane) * kVec, kv[u][1][c]);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int j = j0 + u * kWarps;
        if (j >= w.key_end) break;  // uniform over the warp
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          float dot = 0.0f;
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
#pragma unroll
            for (int e = 0; e < kVec; ++e) dot += q[r][c][e] * kv[u][0][c][e];
          const float s = capped(warp_sum(dot), x);  // the same bits in every lane: the branch below is uniform
          if (j > limit[r] || j < first[r]) continue;
          const float m_new = fmaxf(m[r], s);
          const float alpha = exp2f(m[r] - m_new);  // 0 for the first key (m -inf)
          const float p = exp2f(s - m_new);
          m[r] = m_new;
          l[r] = l[r] * alpha + p;
#pragma unroll
          for (int c = 0; c < kChunks; ++c)
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[r][c][e] = acc[r][c][e] * alpha + p * kv[u][1][c][e];
        }
      }
    }

#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (lane == 0) {
        m_s[warp][r] = m[r];
        l_s[warp][r] = l[r];
      }
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (!chunk_ok[c]) continue;
#pragma unroll
        for (int e = 0; e < kVec; ++e) o_s[warp][r][(c * 32 + lane) * kVec + e] = acc[r][c][e];
      }
    }
    __syncthreads();
    finish_block<T>(a, x, w, o_s, m_s, l_s);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel 2: merge the splits. One warp per (sequence, query, head); lane i holds head elements 4i .. 4i + 3 of each
// 128-element chunk.

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const __grid_constant__ AttentionForward a, const Launch x) {
  constexpr int kChunks = kMaxHeadDim / 128;
  const int lane = threadIdx.x % 32;
  const int dim = static_cast<int>(a.head_dim);
  const int64_t items = a.seq.batch * a.seq.max_q_len * a.heads_q;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; item < items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t head = item % a.heads_q;
    const int64_t rest = item / a.heads_q;
    const int64_t i = rest % a.seq.max_q_len;
    const int64_t b = rest / a.seq.max_q_len;
    if (i >= a.seq.q_len[b]) continue;  // uniform over the warp
    const int64_t token = a.seq.q_start[b] + i;
    const int64_t first = token * a.splits * a.heads_q + head;  // slot of split 0; split s is s * heads_q further
    const float* lse_s = a.partial_lse + first;

    float m = -INFINITY;
    for (int64_t s = lane; s < a.splits; s += 32) m = fmaxf(m, lse_s[s * a.heads_q]);
    m = warp_max(m);

    float o[kChunks][4] = {};
    float lse = -INFINITY;
    if (m != -INFINITY) {
      const float m2 = m * kLog2e;
      float l = 0.0f;
#pragma unroll 4
      for (int64_t s = 0; s < a.splits; ++s) {
        const float f = exp2f(fmaf(lse_s[s * a.heads_q], kLog2e, -m2));  // 0 for an empty split
        l += f;
        const float* po = a.partial_out + (first + s * a.heads_q) * a.head_dim;
#pragma unroll
        for (int c = 0; c < kChunks; ++c) {
          const int d = c * 128 + lane * 4;
          if (d < dim) {
            float v[4];
            load_as_float(po + d, v);
#pragma unroll
            for (int e = 0; e < 4; ++e) o[c][e] += f * v[e];
          }
        }
      }
      const float inv = 1.0f / l;  // l >= 1
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[c][e] *= inv;
      lse = m + log2f(l) * kLn2;
    }

    T* out = static_cast<T*>(a.out.data) + token * a.out.token_stride + head * a.out.head_stride;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = c * 128 + lane * 4;
      if (d >= dim) continue;
      if (x.out_packed) {
        store_from_float<4>(out + d, o[c]);
      } else {
        store_from_float<4, 1>(out + d, o[c]);
      }
    }
    if (a.lse && lane == 0) a.lse[token * a.heads_q + head] = lse;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

bool tensor_aligned(const StridedTensor& x, int elements, size_t element_bytes) {
  return is_aligned(x.data, elements * element_bytes) && x.token_stride % elements == 0 &&
         x.head_stride % elements == 0;
}

// The tensor-core kernel's shared memory is over the 48 KiB default: opt in, once per device and kernel (so that
// calls after the first, e.g. under CUDA graph capture, make no attribute call).
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes, std::atomic<uint64_t>& devices_done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  const uint64_t bit = err == cudaSuccess && device < 64 ? uint64_t{1} << device : 0;
  if (bit && (devices_done.load(std::memory_order_relaxed) & bit)) return;
  if (err == cudaSuccess) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("aquila CUDA kernel decode_attention failed: ") + cudaGetErrorString(err));
  }
  devices_done.fetch_or(bit, std::memory_order_relaxed);
}

template <typename T, int kDimTiles, int kRowTiles>
void launch_mma(const AttentionForward& a, const Launch& x, int64_t blocks, cudaStream_t stream) {
  static std::atomic<uint64_t> devices_done{0};
  const auto kernel = mma_kernel<T, kDimTiles, kRowTiles>;
  constexpr size_t kBytes = MmaShape<kDimTiles, kRowTiles>::kDynamicBytes;
  allow_shared_memory(kernel, kBytes, devices_done);
  kernel<<<grid_size(blocks), kThreads, kBytes, stream>>>(a, x);
}

template <typename T, int kVec, int kRows>
void launch_simt(const AttentionForward& a, const Launch& x, int64_t blocks, cudaStream_t stream) {
  simt_kernel<T, kVec, kRows><<<grid_size(blocks), kThreads, 0, stream>>>(a, x);
}

template <typename T>
void run(const AttentionForward& a, Launch x, cudaStream_t stream) {
  const int64_t rows = a.seq.max_q_len * x.group;  // rows of the longest sequence
  const size_t bytes = sizeof(T);
  x.out_packed = tensor_aligned(a.out, 4, bytes);
  const auto blocks = [&](int64_t rows_per_block) {
    x.rows_per_block = rows_per_block;
    x.row_chunks = ceil_div(rows, rows_per_block);
    return a.splits * a.seq.batch * a.heads_k * x.row_chunks;
  };

  const bool tensor_cores = !std::is_same_v<T, float> && tensor_aligned(a.k, 8, bytes) && tensor_aligned(a.v, 8, bytes);
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      x.q_packed = tensor_aligned(a.q, 8, bytes);
      if (a.head_dim <= 64) {
        if (rows > 8) {
          launch_mma<T, 1, 2>(a, x, blocks(16), stream);
        } else {
          launch_mma<T, 1, 1>(a, x, blocks(8), stream);
        }
      } else if (a.head_dim <= 128) {
        if (rows > 8) {
          launch_mma<T, 2, 2>(a, x, blocks(16), stream);
        } else {
          launch_mma<T, 2, 1>(a, x, blocks(8), stream);
        }
      } else {
        launch_mma<T, 4, 1>(a, x, blocks(8), stream);
      }
    }
  }
  if (!tensor_cores) {
    bool packed = false;
    if constexpr (std::is_same_v<T, float>) {
      packed = tensor_aligned(a.q, 4, bytes) && tensor_aligned(a.k, 4, bytes) && tensor_aligned(a.v, 4, bytes);
    }
    x.q_packed = packed;
    if (packed) {
      if (rows > 1) {
        launch_simt<float, 4, 4>(a, x, blocks(4), stream);
      } else {
        launch_simt<float, 4, 1>(a, x, blocks(1), stream);
      }
    } else if (rows > 1) {
      launch_simt<T, 1, 4>(a, x, blocks(4), stream);
    } else {
      launch_simt<T, 1, 1>(a, x, blocks(1), stream);
    }
  }
  if (a.splits > 1) {
    const int64_t items = a.seq.batch * a.seq.max_q_len * a.heads_q;
    combine_kernel<T><<<grid_size(ceil_div(items, kWarps)), kThreads, 0, stream>>>(a, x);
  }
}

void invalid(const std::string& what) { throw std::invalid_argument("aquila: decode_attention " + what); }

}  // namespace

void decode_attention(const AttentionForward& args, uintptr_t stream) {
  const AttentionForward& a = args;
  if (a.splits < 1) invalid("needs splits >= 1");
  if (a.splits > INT_MAX) invalid("supports splits <= 2^31 - 1");
  if (a.heads_q < 1 || a.heads_k < 1 || a.heads_q % a.heads_k != 0) {
    invalid("needs heads_q a positive multiple of heads_k");
  }
  if (a.heads_k > INT_MAX) invalid("supports heads_k <= 2^31 - 1");
  if (a.head_dim < 8 || a.head_dim > kMaxHeadDim || a.head_dim % 8 != 0) {
    invalid("supports head_dim a multiple of 8 up to 256, got " + std::to_string(a.head_dim));
  }
  if (a.seq.batch < 0 || a.seq.max_q_len < 0 || a.seq.max_k_len < 0) invalid("needs batch, max_q_len, max_k_len >= 0");
  if (!std::isfinite(a.scale)) invalid("needs a finite scale");
  if (a.window_left < -1 || a.window_right < -1) invalid("needs window_left and window_right >= -1");
  if (!std::isfinite(a.softcap) || a.softcap < 0.0f) invalid("needs a finite softcap >= 0");
  if (a.seq.batch == 0 || a.seq.max_q_len == 0) return;
  if (!a.q.data || !a.k.data || !a.v.data || !a.out.data || !a.seq.q_start || !a.seq.q_len || !a.seq.k_start ||
      !a.seq.k_len) {
    invalid("needs q, k, v, out and the sequence arrays");
  }
  if (a.splits > 1) {
    if (!a.partial_out || !a.partial_lse) invalid("needs partial_out and partial_lse when splits > 1");
    if (!is_aligned(a.partial_out, 16)) invalid("needs partial_out 16-byte aligned");
  }

  Launch x{};
  x.group = a.heads_q / a.heads_k;
  x.scale_log2 = static_cast<float>(a.scale * 1.4426950408889634);
  x.softcap_log2 = a.softcap * kLog2e;
  dispatch_dtype(a.dtype, [&](auto* tag) { run<std::remove_pointer_t<decltype(tag)>>(a, x, as_stream(stream)); });
  check_launch("decode_attention");
}

}  // namespace aquila::cuda
