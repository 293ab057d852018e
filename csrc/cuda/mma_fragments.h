// Fragment maps of the tensor-core decode attention (mma_kernel in decode_attention.cu): which block row, key and
// head element each lane's registers hold, for the two mma products of a step (S = Q K^T, then O^T += V^T P^T), in
// both forms (m16n8k16, and m16n8k8 for 8-key steps), and where the byte_perm that builds V's A fragments takes its
// halves from. The kernel computes every such index through these functions, and tests/kernels/test_mma_replay.py
// compiles this header with a plain C++ compiler to replay a block's mma sequence on the CPU against the PTX ISA's
// fragment layouts, so the test checks what the kernel does rather than a copy of it.
//
// Index arithmetic only, constexpr and inline: after the kernel's loops unroll, each call folds to the constants and
// lane terms it would otherwise spell out, so the kernel compiles to the same code. Plain C++ too (no CUDA header):
// the CUDA qualifiers apply only under nvcc.
//
// Terms, as at mma_kernel: lane = 4 g + t (g = lane / 4 its group, t = lane % 4 its place in the group); a piece is
// 8 consecutive head elements (16 bytes); word w of a piece holds elements 2w (low half) and 2w + 1 (high half); the
// block's rows come in row tiles of 8.
#pragma once

#if defined(__CUDACC__)
#define AQUILA_FRAGMENT_MAP __host__ __device__ __forceinline__ constexpr
#else
#define AQUILA_FRAGMENT_MAP inline constexpr
#endif

namespace aquila::cuda::frag {

// The shape of a step, by head-dimension tiles (64 elements each: 1 up to head_dim 64, 2 up to 128, 4 up to 256)
// and row tiles. A step is kKeys = 32 / kDimTiles keys, so that every thread takes 8 K and 8 V pieces whatever the
// head dimension; each thread keeps the pieces it loads in its own kPieces slots.
template <int kDimTiles, int kRowTiles>
struct Tiling {
  static constexpr int kRows = 8 * kRowTiles;
  static constexpr int kKeys = 32 / kDimTiles;                   // keys a warp takes per step
  static constexpr int kTiles = kKeys / 8;                       // 8-key tiles of S per step
  static constexpr bool kK16 = kKeys >= 16;                      // PV by m16n8k16; else m16n8k8 (8-key steps)
  static constexpr int kPvSteps = kK16 ? kKeys / 16 : 1;         // PV mma k steps per step
  static constexpr int kVKeys = kK16 ? 4 : 2;                    // V keys a thread takes per PV step
  static constexpr int kPvAWords = kK16 ? 4 : 2;                 // A registers of a PV mma
  static constexpr int kQPieces = 2 * kDimTiles;                 // pieces of a Q row or K key a thread takes
  static constexpr int kPieces = 16;                             // K and V pieces a thread takes per step
  static_assert(kDimTiles == 1 || kDimTiles == 2 || kDimTiles == 4, "64, 128 or 256 head elements");
  static_assert(kRowTiles == 1 || kRowTiles == 2, "one or two row tiles (the S mma has 16 rows)");
  static_assert(kKeys == 8 || kKeys % 16 == 0, "a step is 8 keys or whole 16-key PV steps");
  static_assert(kTiles * kQPieces == kPieces / 2 && kPvSteps * kVKeys * kDimTiles == kPieces / 2,
                "8 K and 8 V pieces a thread per step");

  // The thread's slot for K piece u of tile jt, and for V piece v of its key e of PV step ks.
  static AQUILA_FRAGMENT_MAP int k_slot(int jt, int u) { return jt * kQPieces + u; }
  static AQUILA_FRAGMENT_MAP int v_slot(int ks, int e, int v) {
    return kPieces / 2 + (ks * kVKeys + e) * kDimTiles + v;
  }
};

AQUILA_FRAGMENT_MAP int lane_group(int lane) { return lane / 4; }     // g
AQUILA_FRAGMENT_MAP int lane_in_group(int lane) { return lane % 4; }  // t

// ---------------------------------------------------------------------------------------------------------------
// S = Q K^T: one mma.m16n8k16 per (8-key tile, half of a piece): the block's rows as m, the tile's keys as n, 16 head
// elements as k. Thread (g, t) takes piece qk_piece(u, t) of Q rows qk_row(g, 0), qk_row(g, 1) and of key qk_key(g)
// of each tile; for half h of those pieces, k index 2t + e stands for element 4h + e of the piece and 2t + 8 + e for
// element 4h + 2 + e, on both sides.

// Row tile rt's row held by group g: A's and C's rows, and the rows whose softmax state lanes of group g keep. Any
// integer type, so that a caller may pass first_row + g (first_row + g + 8 rt, added in that order).
template <typename Int>
AQUILA_FRAGMENT_MAP Int qk_row(Int g, int rt) {
  return g + 8 * rt;
}
// The lane read for row r's softmax state (every lane of group r holds it).
AQUILA_FRAGMENT_MAP int qk_row_lane(int r) { return 4 * r; }
// The piece of Q rows and K keys that lane t takes at u (u < kQPieces).
AQUILA_FRAGMENT_MAP int qk_piece(int u, int t) { return 4 * u + t; }
// First key of S tile jt in a step, and the key of a tile whose pieces group g loads (B's column g).
AQUILA_FRAGMENT_MAP int qk_tile_key(int jt) { return 8 * jt; }
AQUILA_FRAGMENT_MAP int qk_key(int g) { return g; }
// A register i (0-3) for half h: the row tile of its Q row, and the word of that row's piece.
AQUILA_FRAGMENT_MAP int qk_a_row_tile(int i) { return i & 1; }
AQUILA_FRAGMENT_MAP int qk_a_word(int h, int i) { return 2 * h + (i >> 1); }
// B register i (0, 1) for half h: the word of the K piece.
AQUILA_FRAGMENT_MAP int qk_b_word(int h, int i) { return 2 * h + i; }
// Accumulator c (0-3): the row tile of its row, and its key, first being the tile's first key; qk_c_index is the
// inverse (row tile rt, key first + 2t + e).
AQUILA_FRAGMENT_MAP int qk_c_row_tile(int c) { return c >> 1; }
AQUILA_FRAGMENT_MAP int qk_c_key(int first, int t, int c) { return first + 2 * t + (c & 1); }
AQUILA_FRAGMENT_MAP int qk_c_index(int rt, int e) { return 2 * rt + e; }

// ---------------------------------------------------------------------------------------------------------------
// O^T += V^T P^T: one mma per (16 head elements, 8 rows, 16 keys, or 8 in the m16n8k8 form): head elements as m,
// rows as n, keys as k, the keys of PV step ks being S tiles pv_b_tile(ks, 0) and pv_b_tile(ks, 1). Thread (g, t) takes
// piece pv_piece(v, g) of its V keys pv_key_base(t) + pv_key_offset(e) of the PV step (e < kVKeys). The mma for word w
// of those pieces takes m index g as element 2w of the piece and m index g + 8 as element 2w + 1.

// The V piece that group g takes for head-dimension tile v.
AQUILA_FRAGMENT_MAP int pv_piece(int v, int g) { return 8 * v + g; }
// The thread's V keys within PV step ks of a step: pv_step_key(ks) + pv_key_base(t) + pv_key_offset(e).
AQUILA_FRAGMENT_MAP int pv_step_key(int ks) { return 16 * ks; }
AQUILA_FRAGMENT_MAP int pv_key_base(int t) { return 2 * t; }
AQUILA_FRAGMENT_MAP int pv_key_offset(int e) { return (e & 1) + 8 * (e >> 1); }
// A register i (0-3; 0-1 in the m16n8k8 form) for word w: __byte_perm(word w of V piece pv_a_source(i, 0),
// word w of V piece pv_a_source(i, 1), pv_a_selector(i)). 0x5410 puts the low halves of the two words side by side
// (element 2w of both keys: m index g), 0x7632 the high halves (element 2w + 1: m index g + 8).
AQUILA_FRAGMENT_MAP int pv_a_source(int i, int which) { return 2 * (i >> 1) + which; }
AQUILA_FRAGMENT_MAP unsigned pv_a_selector(int i) { return (i & 1) ? 0x7632u : 0x5410u; }
// B register i of PV step ks: the S tile whose accumulators qk_c_index(rt, 0), qk_c_index(rt, 1) it packs (P of
// row qk_row(g, rt), keys 2t and 2t + 1 of the tile).
AQUILA_FRAGMENT_MAP int pv_b_tile(int ks, int i) { return 2 * ks + i; }
// Accumulator c: row pv_c_row(t, pv_c_row_slot(c)) of the row tile, head element
// pv_c_element(v, g, w, pv_c_element_slot(c)); pv_c_index is the inverse.
AQUILA_FRAGMENT_MAP int pv_c_row_slot(int c) { return c & 1; }
AQUILA_FRAGMENT_MAP int pv_c_element_slot(int c) { return c >> 1; }
AQUILA_FRAGMENT_MAP int pv_c_row(int t, int row_slot) { return 2 * t + row_slot; }
AQUILA_FRAGMENT_MAP int pv_c_element(int v, int g, int w, int element_slot) {
  return 8 * pv_piece(v, g) + 2 * w + element_slot;
}
AQUILA_FRAGMENT_MAP int pv_c_index(int row_slot, int element_slot) { return row_slot + 2 * element_slot; }

}  // namespace aquila::cuda::frag
