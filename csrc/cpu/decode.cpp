// A whole decoding step of the model in one call (CPU, fp32 or bf16 embeddings, norms and cache, fp32 activations;
// each linear dense in that dtype or weight-only quantized to int8 or int4): embeddings, every block (RMSNorm with the
// residual add, q/k/v projections, rotary, the cache write, attention over the cache, output projection, SwiGLU) and
// the output projection, inside one OpenMP team. A decoding step at batch 1 reads every weight once and does little
// else, so what it costs beyond the weight reads is overhead: here that is a barrier per stage instead of a Python
// call, a tensor allocation and a dispatch per op.
//
// Quantized projections take the dot-product primitives of the quantized linear layer (csrc/cpu/quantized_dot.h):
// the weights dequantized in registers, their input first copied into the order of the dequantized planes (a stage of
// its own, skipped when the previous projection of the same input already made that copy: wq, wk and wv share one,
// as do w1 and w3). Int4 takes the ISA's vector width W when its step (8W columns) divides the group size, a
// narrower width whose step does, and otherwise a loop over each group's bytes.
//
// Quantized projections with int8_inputs take their input quantized to int8 in blocks of 32 columns, as llama.cpp's
// Q8_0 activations are, and where the CPU has AVX512-VNNI multiply it by the weights as integers: one vpdpbusd sums
// 64 products of unsigned by signed bytes into 16 int32 lanes, where dequantizing to fp32 takes a shift, a conversion
// (int8) or a permute (int4) and an FMA per 16 weights, the instructions that bound those steps. Int8 weights become
// unsigned by flipping their sign bit (w + 128) and int4 nibbles already are (w = nibble - zero); what the offset
// adds is the block sums of the inputs times a constant, subtracted once per row (int8) or group (int4). Elsewhere,
// and for the shapes those loops do not take, the inputs are rounded the same way and the fp32 kernels run on them.
//
// Dense bf16 projections with bf16_inputs take their input rounded to bf16 (a copy shared in the same way), as a bf16
// model's matmuls do. Where the CPU has AVX512-BF16, one vdpbf16ps then multiplies 32 weights, as they lie in memory,
// by 32 inputs; fp32 inputs need each vector of 16 weights widened first (two more instructions), and on a core
// that executes a 512-bit instruction as two halves those instructions, not the memory, bound the step (docs/model.md
// has the measurement).
#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/quantized_dot.h"

namespace aquila::cpu {
namespace {

// W weights from memory as W fp32 lanes: fp32 as they are, bf16 widened (its bits are fp32's upper half).
template <typename V>
AQUILA_INLINE void load_weights(V& v, const float* p) {
  load(v, p);
}

template <int W>
struct Bf16Lanes {
  typedef uint16_t halves __attribute__((vector_size(2 * W)));
  typedef uint32_t words __attribute__((vector_size(4 * W)));
};

template <typename V>
AQUILA_INLINE void load_weights(V& v, const bf16* p) {
  using Lanes16 = Bf16Lanes<sizeof(V) / sizeof(float)>;
  typename Lanes16::halves halves;
  std::memcpy(&halves, p, sizeof halves);
  const typename Lanes16::words words = __builtin_convertvector(halves, typename Lanes16::words) << 16;
  std::memcpy(&v, &words, sizeof v);
}

// How a dense projection multiplies a vector of weights by a vector of inputs into W fp32 lanes (kStep columns a
// vector): fp32 inputs by the weights as fp32 (bf16 widened first), an FMA per W columns;
template <int W, typename T>
struct Fp32Products {
  using Input = float;
  using Weights = typename Lanes<W>::type;
  static constexpr int64_t kStep = W;
  static AQUILA_INLINE void load(Weights& w, const T* p) { load_weights(w, p); }
  static AQUILA_INLINE void add(typename Lanes<W>::type& acc, const Weights& w, const float* x) {
    Weights xv;
    aquila::cpu::load(xv, x);
    acc += w * xv;
  }
};

// bf16 inputs by bf16 weights on vdpbf16ps (W = 16), two exact products per lane per instruction, the weights as
// they lie in memory.
struct Bf16Products {
  using Input = bf16;
  using Weights = Words16;
  static constexpr int64_t kStep = 32;
  static AQUILA_INLINE void load(Weights& w, const bf16* p) { std::memcpy(&w, p, sizeof w); }
  static AQUILA_INLINE void add(Lanes<16>::type& acc, const Weights& w, const bf16* x) {
    Words16 xv;
    std::memcpy(&xv, x, sizeof xv);
    dot_pairs(acc, w, xv);
  }
};

// out[n * out_stride] = x_n . row over `cols` columns, for the NB inputs x_n = x + n * x_stride, in A vector
// accumulators per input (A independent chains: one would expose the FMA latency, 24 dependent FMAs for a 384-long
// row) while the row streams through in order; the columns past the last whole vector in scalar fp32 (the same
// products). Each vector of weights is loaded (and widened) once for all NB inputs: at batch 8, a dot per input
// would load every weight eight times, and the step would be bound by those instructions instead of by the weight
// reads. It also asks for the row's lines `prefetch` bytes ahead of those it reads (0: no prefetch): the hardware
// prefetchers alone can fall behind a loop that consumes a cache line every cycle or two, and the distance that pays
// differs from CPU to CPU, so the caller chooses it (aquila/model/native_decode.py tunes it once per host and kind of
// loop). Reading past the end of w is harmless: a prefetch never faults.
template <typename Products, int W, int A, int NB, typename T>
AQUILA_INLINE void dots(const T* __restrict row, int64_t cols, const typename Products::Input* __restrict x,
                        int64_t x_stride, float* __restrict out, int64_t out_stride, int64_t prefetch) {
  using V = typename Lanes<W>::type;
  constexpr int64_t kStep = Products::kStep;
  V acc[NB][A];
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) acc[n][a] = V{};
  int64_t j = 0;
  for (; j + A * kStep <= cols; j += A * kStep) {
    if (prefetch > 0) {
      const char* ahead = reinterpret_cast<const char*>(row + j) + prefetch;
      for (int line = 0; line < A * kStep * static_cast<int>(sizeof(T)); line += 64) {
        __builtin_prefetch(ahead + line, 0, 3);
      }
    }
#pragma GCC unroll 16
    for (int a = 0; a < A; ++a) {
      typename Products::Weights w;
      Products::load(w, row + j + a * kStep);
#pragma GCC unroll 16
      for (int n = 0; n < NB; ++n) Products::add(acc[n][a], w, x + n * x_stride + j + a * kStep);
    }
  }
  for (; j + kStep <= cols; j += kStep) {
    typename Products::Weights w;
    Products::load(w, row + j);
#pragma GCC unroll 16
    for (int n = 0; n < NB; ++n) Products::add(acc[n][0], w, x + n * x_stride + j);
  }
#pragma GCC unroll 16
  for (int n = 0; n < NB; ++n) {
#pragma GCC unroll 16
    for (int a = 1; a < A; ++a) acc[n][0] += acc[n][a];
    float total = lane_sum<W>(acc[n][0]);
    for (int64_t t = j; t < cols; ++t) total += to_float(row[t]) * to_float(x[n * x_stride + t]);
    out[n * out_stride] = total;
  }
}

// The inputs [b, batch) of one row: NB at a time, then the rest by a narrower instance.
template <typename Products, int W, int A, int NB, typename T>
AQUILA_INLINE void dots_over_batch(const T* __restrict row, int64_t cols,
                                   const typename Products::Input* __restrict in, int64_t in_stride,
                                   float* __restrict out, int64_t out_stride, int64_t b, int64_t batch,
                                   int64_t prefetch) {
  for (; b + NB <= batch; b += NB)
    dots<Products, W, A, NB, T>(row, cols, in + b * in_stride, in_stride, out + b * out_stride, out_stride, prefetch);
  if constexpr (NB > 1) {
    if (b < batch)
      dots_over_batch<Products, W, A, NB / 2, T>(row, cols, in, in_stride, out, out_stride, b, batch, prefetch);
  }
}

// out[b * out_stride + r] = in[b] . w[r] for the rows r, split over the team (each thread streams its own rows of w,
// once for the whole batch: a row stays in L1 while every input uses it). NB inputs share each load of the weights:
// as many as the registers hold with A accumulators each (32 vector registers with AVX-512, 16 below).
template <typename Products, int W, int A, typename T>
AQUILA_INLINE void project_dense(const T* __restrict w, int64_t rows, int64_t cols,
                                 const typename Products::Input* __restrict in, int64_t in_stride,
                                 float* __restrict out, int64_t out_stride, int64_t batch, int64_t prefetch) {
  constexpr int NB = W == 16 ? 4 : 2;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    dots_over_batch<Products, W, A, NB, T>(w + r * cols, cols, in, in_stride, out + r, out_stride, 0, batch,
                                           prefetch);
}

// --- int8 inputs -----------------------------------------------------------------------------------------------
// The columns of an int4 chunk (kInt4Chunk columns, 64 bytes of weights) in the order of its low nibbles, then its
// high ones: the even columns, then the odd.
constexpr int64_t kInt4Chunk = 128;

// One input row in the vpdpbusd loops' form, in `cols` floats of space (cols a multiple of 64 for int8 weights; of
// kInt4Chunk, the group size dividing cols, for int4): q, the int8 columns (int8 weights: in order; int4: each chunk
// in its nibbles' order); lanes, the block scale d of each int32 lane of those loops' products (a lane sums 4 columns
// of an int8 row, 8 of an int4 chunk: the same block); terms, what the weights' offsets add: int8, one float,
// 128 sum_b d_b S_b (w + 128 times the inputs); int4, one per group, sum_{b in g} d_b S_b (its zero times that), S_b
// being block b's sum of q.
struct Int8Input {
  const int8_t* q;
  const float* lanes;
  const float* terms;

  template <int Bits>
  static constexpr int64_t lanes_per_block() {
    return Bits == 8 ? kInputBlock / 4 : kInputBlock / 8;
  }

  template <int Bits>
  AQUILA_INLINE static Int8Input at(const float* row, int64_t cols) {
    const int8_t* q = reinterpret_cast<const int8_t*>(row);
    const float* lanes = reinterpret_cast<const float*>(q + cols);
    return {q, lanes, lanes + cols / kInputBlock * lanes_per_block<Bits>()};
  }
};

template <int Bits>
AQUILA_INLINE void quantize_int8_row(const float* __restrict x, int64_t cols, int64_t group_size, float* row) {
  const Int8Input form = Int8Input::at<Bits>(row, cols);
  int8_t* q = const_cast<int8_t*>(form.q);
  float* lanes = const_cast<float*>(form.lanes);
  float* terms = const_cast<float*>(form.terms);
  constexpr int64_t kLanes = Int8Input::lanes_per_block<Bits>();
  int8_t block[kInputBlock];
  double term = 0.0;
  for (int64_t c0 = 0; c0 < cols; c0 += kInputBlock) {
    const float d = quantize_block(x + c0, kInputBlock, block);
    int sum = 0;
    for (int64_t i = 0; i < kInputBlock; ++i) sum += block[i];
    for (int64_t l = 0; l < kLanes; ++l) lanes[c0 / kInputBlock * kLanes + l] = d;
    term += static_cast<double>(d) * sum;
    if constexpr (Bits == 8) {
      std::memcpy(q + c0, block, kInputBlock);
    } else {
      const int64_t chunk = c0 - c0 % kInt4Chunk;
      for (int64_t i = 0; i < kInputBlock; ++i) {
        const int64_t column = c0 % kInt4Chunk + i;
        q[chunk + (column % 2) * (kInt4Chunk / 2) + column / 2] = block[i];
      }
      if ((c0 + kInputBlock) % group_size == 0) {
        terms[c0 / group_size] = static_cast<float>(term);
        term = 0.0;
      }
    }
  }
  if constexpr (Bits == 8) terms[0] = static_cast<float>(128.0 * term);
}

// A projection's input copied into the form its weights' kernel reads, shared by the projections of one input (wq, wk
// and wv read one, as do w1 and w3): a quantized kernel's, in the order of its dequantized planes (fill_row); a bf16
// kernel's, rounded to bf16 (as bf16 words for vdpbf16ps, or as the floats they widen to, for the ISAs without it).
// Every thread of the team keeps the same record of what the buffer holds, so all take the same branch around the
// stage that fills it.
struct ProjectionInput {
  float* buffer;  // batch x cols floats
  const float* source = nullptr;  // what it holds: the rows of source, in `form`
  int form = 0;

  // The planar forms: 16 W + P > 0 (plus kDequantized with int8 inputs); the int8 forms of the vpdpbusd loops:
  // kInt8Bytes for int8 weights, int8_chunks(group size) for int4.
  static constexpr int kBf16Words = -1, kBf16Floats = -2, kInt8Bytes = -3, kInt8Floats = -4, kDequantized = 1024;
  static int int8_chunks(int64_t group_size) { return static_cast<int>(-8 - group_size); }

  // The step rewrites its inputs in place (normed, attended, gate): called once they are new, before their readers.
  AQUILA_INLINE void forget() { source = nullptr; }

  template <typename CopyRow>
  AQUILA_INLINE void hold(const float* in, int wanted, int64_t batch, CopyRow copy_row) {
    if (source != in || form != wanted) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < batch; ++b) copy_row(b);
      source = in, form = wanted;
    }
  }

  // int8_inputs: the rows rounded to int8 (dequantize_int8_row) first.
  template <int W, int P>
  AQUILA_INLINE const float* planar(const float* in, int64_t in_stride, int64_t cols, int64_t batch,
                                    bool int8_inputs) {
    hold(in, 16 * W + P + (int8_inputs ? kDequantized : 0), batch, [&](int64_t b) {
      if (int8_inputs) {
        thread_local std::vector<float> rounded;
        rounded.resize(cols);
        dequantize_int8_row(in + b * in_stride, cols, rounded.data());
        fill_row<float, W, P>(buffer + b * cols, rounded.data(), cols);
      } else {
        fill_row<float, W, P>(buffer + b * cols, in + b * in_stride, cols);
      }
    });
    return buffer;
  }

  // The rows rounded to int8 (dequantize_int8_row), in order.
  AQUILA_INLINE const float* int8_floats(const float* in, int64_t in_stride, int64_t cols, int64_t batch) {
    hold(in, kInt8Floats, batch, [&](int64_t b) { dequantize_int8_row(in + b * in_stride, cols, buffer + b * cols); });
    return buffer;
  }

  // The rows in the vpdpbusd loops' form (Int8Input), cols floats apart.
  template <int Bits>
  AQUILA_INLINE const float* int8_bytes(const float* in, int64_t in_stride, int64_t cols, int64_t batch,
                                        int64_t group_size) {
    hold(in, Bits == 8 ? kInt8Bytes : int8_chunks(group_size), batch,
         [&](int64_t b) { quantize_int8_row<Bits>(in + b * in_stride, cols, group_size, buffer + b * cols); });
    return buffer;
  }

  AQUILA_INLINE const bf16* bf16_words(const float* in, int64_t in_stride, int64_t cols, int64_t batch) {
    bf16* words = reinterpret_cast<bf16*>(buffer);
    hold(in, kBf16Words, batch, [&](int64_t b) {
      for (int64_t j = 0; j < cols; ++j) words[b * cols + j] = from_float<bf16>(in[b * in_stride + j]);
    });
    return words;
  }

  AQUILA_INLINE const float* bf16_floats(const float* in, int64_t in_stride, int64_t cols, int64_t batch) {
    hold(in, kBf16Floats, batch, [&](int64_t b) {
      for (int64_t j = 0; j < cols; ++j) buffer[b * cols + j] = to_float(from_float<bf16>(in[b * in_stride + j]));
    });
    return buffer;
  }
};

// out[b * out_stride + r] = in[b] . w[r] for a quantized w: blocks of NB rows split over the team, each block read
// once for up to 4 inputs (block_dots). NB: as many row accumulators as the ISA's registers hold (8 with AVX-512's 32,
// 4 with 16).
template <int W, int NB, int Bits>
AQUILA_INLINE void project_quantized(const Weights& wt, int64_t rows, int64_t cols, const float* in, int64_t in_stride,
                                     float* out, int64_t out_stride, int64_t batch, int64_t prefetch,
                                     ProjectionInput& input, bool int8_inputs) {
  const float* x = input.planar<W, Bits == 4 ? 8 : 4>(in, in_stride, cols, batch, int8_inputs);
  const int64_t blocks = (rows + NB - 1) / NB;
#pragma omp for schedule(static)
  for (int64_t block = 0; block < blocks; ++block) {
    block_dots<W, NB, Bits>(wt, rows, block * NB, x, cols, batch, 0, cols, prefetch,
                            [&](int64_t b, int64_t r, float sum) {
                              out[b * out_stride + r] = Bits == 8 ? sum * wt.scales[r] : sum;
                            });
  }
}

// The int4 projection whose group size no vector width's step (8W columns, W >= 4) divides: per row, each group's
// zero and scale once, then its bytes two columns at a time; the inputs one after the other (the row stays in L1).
AQUILA_INLINE void project_int4_by_groups(const Weights& wt, int64_t rows, int64_t cols, const float* in,
                                          int64_t in_stride, float* out, int64_t out_stride, int64_t batch) {
  const int64_t half_group = wt.group_size / 2;
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* bytes = wt.row<4>(r, 0);
    for (int64_t b = 0; b < batch; ++b) {
      const float* x = in + b * in_stride;
      float total = 0.0f;
      for (int64_t g = 0; g < wt.groups; ++g) {
        const float zero = wt.zero(r, g), scale = wt.scale(r, g);
        for (int64_t j = g * half_group; j < (g + 1) * half_group; ++j) {
          total += x[2 * j] * ((static_cast<float>(bytes[j] & 15) - zero) * scale) +
                   x[2 * j + 1] * ((static_cast<float>(bytes[j] >> 4) - zero) * scale);
        }
      }
      out[b * out_stride + r] = total;
    }
  }
}

// An int4 projection at the widest vector width W whose step (8W columns) divides the group size.
template <int W, int NB>
AQUILA_INLINE void project_int4(const Weights& wt, int64_t rows, int64_t cols, const float* in, int64_t in_stride,
                                float* out, int64_t out_stride, int64_t batch, int64_t prefetch, ProjectionInput& input,
                                bool int8_inputs) {
  if (wt.group_size % (8 * W) == 0) {
    project_quantized<W, NB, 4>(wt, rows, cols, in, in_stride, out, out_stride, batch, prefetch, input, int8_inputs);
  } else if constexpr (W > 4) {
    project_int4<W / 2, NB>(wt, rows, cols, in, in_stride, out, out_stride, batch, prefetch, input, int8_inputs);
  } else {
    if (int8_inputs) in = input.int8_floats(in, in_stride, cols, batch), in_stride = cols;
    project_int4_by_groups(wt, rows, cols, in, in_stride, out, out_stride, batch);
  }
}

// The quantized projections of an ISA of vector width W: out[b * out_stride + r] = in[b] . w[r]. They read no weight
// of the step's dtype, so each ISA compiles them once for both dtypes, out of line (noinline: a call from the step's
// body of the same ISA would otherwise be inlined into each).
template <int W>
AQUILA_INLINE void project_quantized_linear(const DecodeLinear& w, int64_t rows, int64_t cols, const float* in,
                                            int64_t in_stride, float* out, int64_t out_stride, int64_t batch,
                                            int64_t prefetch, ProjectionInput& input, bool int8_inputs) {
  constexpr int NB = W == 16 ? 8 : 4;
  const int64_t bits = w.format == WeightFormat::int4 ? 4 : 8;
  const Weights wt = Weights::of(w.weight, w.scales, w.zeros, cols, bits, w.group_size);
  if (bits == 8) {
    project_quantized<W, NB, 8>(wt, rows, cols, in, in_stride, out, out_stride, batch, prefetch, input, int8_inputs);
  } else {
    project_int4<W, NB>(wt, rows, cols, in, in_stride, out, out_stride, batch, prefetch, input, int8_inputs);
  }
}

#define AQUILA_DECODE_QUANTIZED(NAME, TARGET, W)                                                                   \
  TARGET __attribute__((noinline)) void project_quantized_##NAME(                                                  \
      const DecodeLinear& w, int64_t rows, int64_t cols, const float* in, int64_t in_stride, float* out,           \
      int64_t out_stride, int64_t batch, int64_t prefetch, ProjectionInput& input, bool int8_inputs) {             \
    project_quantized_linear<W>(w, rows, cols, in, in_stride, out, out_stride, batch, prefetch, input,           \
                                int8_inputs);                                                                      \
  }
AQUILA_DECODE_QUANTIZED(baseline, , 4)
AQUILA_DECODE_QUANTIZED(avx2, AQUILA_TARGET_AVX2, 8)
AQUILA_DECODE_QUANTIZED(avx512, AQUILA_TARGET_AVX512, 16)
#undef AQUILA_DECODE_QUANTIZED

// --- int8 inputs on vpdpbusd (AVX-512 with VNNI) ------------------------------------------------------------------

// Whether the vpdpbusd loops take this linear: int8 rows of whole 64-byte vectors, int4 groups of whole chunks.
AQUILA_INLINE bool int8_loops_take(const DecodeLinear& w, int64_t cols) {
  return w.format == WeightFormat::int8 ? cols % 64 == 0 : w.group_size % kInt4Chunk == 0;
}

// out[n * out_stride] = the NB inputs (Int8Input) . an int8 row of `cols` weights with the row's scale: per 64
// weights, their sign bits flipped (w + 128 as unsigned bytes), one vpdpbusd per input into lanes of 4 columns, each
// lane scaled by its block's d; the offset's 128 d_b S_b taken off at the end. Two accumulators per input, as dots
// keeps several.
template <int NB>
AQUILA_INLINE void int8_row_dots(const int8_t* row, int64_t cols, float scale, const Int8Input (&x)[NB],
                                 float* out, int64_t out_stride, int64_t prefetch) {
  using V = Lanes<16>::type;
  const Words16 flip = Words16{} + 0x80808080u;
  V acc[NB][2];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n) acc[n][0] = acc[n][1] = V{};
  const auto add = [&](int64_t j, int a) __attribute__((always_inline)) {
    Words16 w;
    std::memcpy(&w, row + j, sizeof w);
    w ^= flip;
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      Words16 q, sums = {};
      std::memcpy(&q, x[n].q + j, sizeof q);
      dot_bytes(sums, w, q);
      V d;
      load(d, x[n].lanes + j / 4);
      V products;
      lanes_of(products, sums);
      acc[n][a] += products * d;
    }
  };
  int64_t j = 0;
  for (; j + 128 <= cols; j += 128) {
    if (prefetch > 0) {
      __builtin_prefetch(row + j + prefetch, 0, 3);
      __builtin_prefetch(row + j + 64 + prefetch, 0, 3);
    }
    add(j, 0);
    add(j + 64, 1);
  }
  if (j < cols) add(j, 0);
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n) out[n * out_stride] = scale * (lane_sum<16>(acc[n][0] + acc[n][1]) - x[n].terms[0]);
}

// The int4 counterpart: per chunk of 128 weights (64 bytes), the low and the high nibbles against the chunk's even and
// odd inputs, two vpdpbusd per input into lanes of 8 columns, each lane scaled by its block's d and the group's scale;
// per group, its zero times the group's term taken off.
template <int NB>
AQUILA_INLINE void int4_row_dots(const Weights& wt, int64_t n_row, const Int8Input (&x)[NB], float* out,
                                 int64_t out_stride, int64_t prefetch) {
  using V = Lanes<16>::type;
  const Words16 low = Words16{} + 0x0F0F0F0Fu;
  const uint8_t* row = wt.row<4>(n_row, 0);
  V acc[NB];
  float offsets[NB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n) acc[n] = V{}, offsets[n] = 0.0f;
  for (int64_t g = 0; g < wt.groups; ++g) {
    const float scale = wt.scale(n_row, g);
    for (int64_t c = g * wt.group_size; c < (g + 1) * wt.group_size; c += kInt4Chunk) {
      const uint8_t* bytes = row + c / 2;
      if (prefetch > 0) __builtin_prefetch(bytes + prefetch, 0, 3);
      Words16 nibbles;
      std::memcpy(&nibbles, bytes, sizeof nibbles);
      const Words16 even = nibbles & low, odd = (nibbles >> 4) & low;
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) {
        Words16 q_even, q_odd, sums = {};
        std::memcpy(&q_even, x[n].q + c, sizeof q_even);
        std::memcpy(&q_odd, x[n].q + c + kInt4Chunk / 2, sizeof q_odd);
        dot_bytes(sums, even, q_even);
        dot_bytes(sums, odd, q_odd);
        V d;
        load(d, x[n].lanes + c / 8);
        V products;
        lanes_of(products, sums);
        acc[n] += products * d * scale;
      }
    }
    const float zero_times_scale = wt.zero(n_row, g) * scale;
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) offsets[n] += zero_times_scale * x[n].terms[g];
  }
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n) out[n * out_stride] = lane_sum<16>(acc[n]) - offsets[n];
}

// Row n_row of W against the inputs [b, batch): NB at a time (each weight loaded once for them), then fewer.
template <int Bits, int NB>
AQUILA_INLINE void int8_dots_over_batch(const Weights& wt, int64_t n_row, const float* inputs, int64_t cols,
                                        float* out, int64_t out_stride, int64_t b, int64_t batch, int64_t prefetch) {
  for (; b + NB <= batch; b += NB) {
    Int8Input x[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) x[n] = Int8Input::at<Bits>(inputs + (b + n) * cols, cols);
    if constexpr (Bits == 8) {
      int8_row_dots<NB>(static_cast<const int8_t*>(wt.qweight) + n_row * cols, cols, wt.scales[n_row], x,
                        out + b * out_stride, out_stride, prefetch);
    } else {
      int4_row_dots<NB>(wt, n_row, x, out + b * out_stride, out_stride, prefetch);
    }
  }
  if constexpr (NB > 1) {
    if (b < batch)
      int8_dots_over_batch<Bits, NB / 2>(wt, n_row, inputs, cols, out, out_stride, b, batch, prefetch);
  }
}

// out[b * out_stride + r] = in[b] . w[r] for a quantized w that int8_loops_take, the inputs rounded to int8: rows
// split over the team, each read once for up to 4 inputs.
template <int Bits>
AQUILA_INLINE void project_int8_inputs(const DecodeLinear& w, int64_t rows, int64_t cols, const float* in,
                                       float* out, int64_t out_stride, int64_t batch, int64_t prefetch,
                                       ProjectionInput& input) {
  const Weights wt = Weights::of(w.weight, w.scales, w.zeros, cols, Bits, w.group_size);
  const float* inputs = input.int8_bytes<Bits>(in, cols, cols, batch, wt.group_size);
#pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    int8_dots_over_batch<Bits, 4>(wt, r, inputs, cols, out + r, out_stride, 0, batch, prefetch);
}

AQUILA_TARGET_AVX512 __attribute__((noinline)) void project_int8_inputs_vnni(
    const DecodeLinear& w, int64_t rows, int64_t cols, const float* in, float* out, int64_t out_stride,
    int64_t batch, int64_t prefetch, ProjectionInput& input) {
  if (w.format == WeightFormat::int8) {
    project_int8_inputs<8>(w, rows, cols, in, out, out_stride, batch, prefetch, input);
  } else {
    project_int8_inputs<4>(w, rows, cols, in, out, out_stride, batch, prefetch, input);
  }
}

// out[b * rows + r] = in[b] . w[r] for the rows r of the linear w [rows, cols], as it is held, from the inputs in[b]
// (cols floats each) in fp32 or, for bf16 weights with bf16_inputs, rounded to bf16. W: the ISA's vector width;
// Bf16Dots: the ISA has vdpbf16ps.
template <int W, int A, typename T, bool Bf16Dots>
AQUILA_INLINE void project(const DecodeLinear& w, int64_t rows, int64_t cols, const float* __restrict in,
                           float* __restrict out, int64_t batch, int64_t prefetch, bool bf16_inputs, bool int8_inputs,
                           ProjectionInput& input) {
  if (w.format != WeightFormat::dense) {
    if (int8_inputs && W == 16 && has_vnni() && int8_loops_take(w, cols)) {
      project_int8_inputs_vnni(w, rows, cols, in, out, rows, batch, prefetch, input);
      return;
    }
    const auto quantized = W == 16 ? project_quantized_avx512 : W == 8 ? project_quantized_avx2
                                                                       : project_quantized_baseline;
    quantized(w, rows, cols, in, cols, out, rows, batch, prefetch, input, int8_inputs);
    return;
  }
  const T* weight = static_cast<const T*>(w.weight);
  using Fp32 = Fp32Products<W, T>;
  if constexpr (std::is_same_v<T, bf16>) {
    if (bf16_inputs) {
      if constexpr (Bf16Dots) {
        project_dense<Bf16Products, W, A>(weight, rows, cols, input.bf16_words(in, cols, cols, batch), cols, out,
                                          rows, batch, prefetch);
      } else {
        project_dense<Fp32, W, A>(weight, rows, cols, input.bf16_floats(in, cols, cols, batch), cols, out, rows,
                                  batch, prefetch);
      }
      return;
    }
  }
  project_dense<Fp32, W, A>(weight, rows, cols, in, cols, out, rows, batch, prefetch);
}

// normed = (residual (+)= x) / rms * weight, over one token's features.
template <typename T>
AQUILA_INLINE void add_and_norm(const float* __restrict x, float* __restrict residual, float* __restrict normed,
                                const T* __restrict weight, int64_t dim, float eps, bool first) {
  if (first) {
    for (int64_t j = 0; j < dim; ++j) residual[j] = x[j];
  } else {
    for (int64_t j = 0; j < dim; ++j) residual[j] += x[j];
  }
  const double sum = sum_over(dim, [&](int64_t j) { return residual[j] * residual[j]; });
  const float inverse = 1.0f / std::sqrt(static_cast<float>(sum / dim) + eps);
  for (int64_t j = 0; j < dim; ++j) normed[j] = residual[j] * inverse * to_float(weight[j]);
}

AQUILA_INLINE void rotate(float* __restrict x, const float* __restrict c, const float* __restrict s, int64_t half,
                          bool interleaved) {
  const int64_t stride = interleaved ? 2 : 1, partner = interleaved ? 1 : half;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i * stride], x2 = x[i * stride + partner];
    x[i * stride] = x1 * c[i] - x2 * s[i];
    x[i * stride + partner] = x2 * c[i] + x1 * s[i];
  }
}

// cos/sin of each sequence's position ([B, 2, half]), in double from the exact angle as the rotary kernel does.
std::vector<float> rotations(const DecodeStep& a) {
  const int64_t half = a.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(a.theta, -2.0 * i / a.head_dim);
  std::vector<float> cos_sin(a.batch * 2 * half);
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(a.lengths[b]) * inv_freq[i];
      cos_sin[(b * 2) * half + i] = static_cast<float>(std::cos(angle));
      cos_sin[(b * 2 + 1) * half + i] = static_cast<float>(std::sin(angle));
    }
  }
  return cos_sin;
}

// The step, run by every thread of the team: the work of each stage is split with orphaned `omp for`s. It is not
// itself the parallel region because GCC outlines a parallel region before inlining, into a function that would not
// carry the caller's ISA attributes.
template <int W, int A, typename T, bool Bf16Dots>
AQUILA_INLINE void decode_in_team(const DecodeStep& a, const float* cos_sin) {
  const int64_t B = a.batch, dim = a.dim, H = a.heads, KV = a.kv_heads, D = a.head_dim, F = a.hidden_dim;
  const int64_t half = D / 2, group = H / KV;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  float* x = a.workspace;  // [B, dim]: the input of the next stage (embedding, block output)
  float* residual = x + B * dim;
  float* normed = residual + B * dim;
  float* q = normed + B * dim;  // [B, H * D]
  float* k = q + B * H * D;     // [B, KV * D]
  float* v = k + B * KV * D;
  float* attended = v + B * KV * D;  // [B, H * D]
  float* gate = attended + B * H * D;  // [B, F]
  float* up = gate + B * F;
  float* scores = up + B * F;  // [B * H, max_len]
  ProjectionInput input{scores + B * H * a.max_len};  // [B, max(dim, H * D, F)]
  // out [B, rows] = in [B, cols] . w^T
  const auto linear = [&](const DecodeLinear& w, int64_t rows, int64_t cols, const float* in, float* out)
                          __attribute__((always_inline)) {
    project<W, A, T, Bf16Dots>(w, rows, cols, in, out, B, a.prefetch_bytes, a.bf16_inputs, a.int8_inputs, input);
  };

#pragma omp for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const T* row = static_cast<const T*>(a.embeddings) + a.tokens[b] * dim;
    for (int64_t j = 0; j < dim; ++j) x[b * dim + j] = to_float(row[j]);
  }
  for (int64_t l = 0; l < a.n_layers; ++l) {
    const DecodeLayer& w = a.layers[l];
    T* k_cache = static_cast<T*>(w.k_cache);
    T* v_cache = static_cast<T*>(w.v_cache);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      add_and_norm(x + b * dim, residual + b * dim, normed + b * dim, static_cast<const T*>(w.attention_norm), dim,
                   a.eps, l == 0);
    input.forget();  // normed is new: wq, wk and wv read it
    linear(w.wq, H * D, dim, normed, q);
    linear(w.wk, KV * D, dim, normed, k);
    linear(w.wv, KV * D, dim, normed, v);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const float* c = &cos_sin[(b * 2) * half];
      const float* s = &cos_sin[(b * 2 + 1) * half];
      for (int64_t h = 0; h < H; ++h) rotate(q + (b * H + h) * D, c, s, half, a.interleaved);
      const int64_t slot = (b * a.max_len + a.lengths[b]) * KV * D;
      for (int64_t h = 0; h < KV; ++h) {
        rotate(k + (b * KV + h) * D, c, s, half, a.interleaved);
        for (int64_t d = 0; d < D; ++d) {
          k_cache[slot + h * D + d] = from_float<T>(k[(b * KV + h) * D + d]);
          v_cache[slot + h * D + d] = from_float<T>(v[(b * KV + h) * D + d]);
        }
      }
    }
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < B * H; ++bh) {
      const int64_t b = bh / H, kv_head = (bh % H) / group, keys = a.lengths[b] + 1;
      const float* query = q + bh * D;
      float* p = scores + bh * a.max_len;
      const T* k_rows = k_cache + (b * a.max_len * KV + kv_head) * D;
      const T* v_rows = v_cache + (b * a.max_len * KV + kv_head) * D;
      float best = -__builtin_inff();
      for (int64_t j = 0; j < keys; ++j) {
        const T* key = k_rows + j * KV * D;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += query[d] * to_float(key[d]);
        p[j] = dot * scale;
        best = p[j] > best ? p[j] : best;
      }
      double total = 0.0;
      for (int64_t j = 0; j < keys; ++j) {
        p[j] = exp_nonpositive(p[j] - best);
        total += p[j];
      }
      float* out = attended + bh * D;
      for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
      for (int64_t j = 0; j < keys; ++j) {
        const T* value = v_rows + j * KV * D;
        const float weight = static_cast<float>(p[j] / total);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) out[d] += weight * to_float(value[d]);
      }
    }
    input.forget();
    linear(w.wo, dim, H * D, attended, x);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b)
      add_and_norm(x + b * dim, residual + b * dim, normed + b * dim, static_cast<const T*>(w.ffn_norm), dim, a.eps,
                   false);
    input.forget();  // w1 and w3 read the new normed
    linear(w.w1, F, dim, normed, gate);
    linear(w.w3, F, dim, normed, up);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < B * F; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
    input.forget();
    linear(w.w2, dim, F, gate, x);
  }
#pragma omp for schedule(static)
  for (int64_t b = 0; b < B; ++b)
    add_and_norm(x + b * dim, residual + b * dim, normed + b * dim, static_cast<const T*>(a.final_norm), dim, a.eps,
                 a.n_layers == 0);
  input.forget();
  linear(a.output, a.vocab, dim, normed, a.logits);
}

// What a team runs: a step, or one projection. in_team<W, A, T, Bf16Dots>() is run by every thread of the team.
struct StepJob {
  const DecodeStep& a;
  const float* cos_sin;
  bool bf16_inputs() const { return a.bf16_inputs; }
  template <int W, int A, typename T, bool Bf16Dots>
  AQUILA_INLINE void in_team() const {
    decode_in_team<W, A, T, Bf16Dots>(a, cos_sin);
  }
};

struct ProjectionJob {
  const DecodeProjection& a;
  bool bf16_inputs() const { return a.bf16_inputs; }
  template <int W, int A, typename T, bool Bf16Dots>
  AQUILA_INLINE void in_team() const {
    ProjectionInput input{a.workspace};
    project<W, A, T, Bf16Dots>(a.weight, a.rows, a.cols, a.in, a.out, a.batch, a.prefetch_bytes, a.bf16_inputs,
                               a.int8_inputs, input);
  }
};

// One body per ISA (the projections' vector width and accumulators, and whether bf16 products run on vdpbf16ps) and
// weight dtype, chosen at run time.
template <typename T, typename Job>
void job_baseline(const Job& job) {
  job.template in_team<4, 4, T, false>();
}
template <typename T, typename Job>
AQUILA_TARGET_AVX2 void job_avx2(const Job& job) {
  job.template in_team<8, 4, T, false>();
}
template <typename T, typename Job>
AQUILA_TARGET_AVX512 void job_avx512(const Job& job) {
  job.template in_team<16, 4, T, false>();
}
template <typename Job>
AQUILA_TARGET_AVX512 void job_avx512_bf16(const Job& job) {
  job.template in_team<16, 4, bf16, true>();
}

template <typename T, typename Job>
void run(const Job& job, int threads) {
  const SimdLevel level = simd_level();
  auto* body = level >= SimdLevel::avx512 ? job_avx512<T, Job>
               : level == SimdLevel::avx2 ? job_avx2<T, Job>
                                           : job_baseline<T, Job>;
  if constexpr (std::is_same_v<T, bf16>) {
    if (level == SimdLevel::avx512_bf16 && job.bf16_inputs()) body = job_avx512_bf16<Job>;
  }
#pragma omp parallel num_threads(threads)
  body(job);
}

// Runs the job in the body of dtype (fp32 or bf16: the step's, or a dense weight's, as `dtype_of` says in errors).
template <typename Job>
void run_in_dtype(const Job& job, DType dtype, const std::string& op, const std::string& dtype_of, int threads) {
  if (job.bf16_inputs() && dtype != DType::bf16) {
    throw std::invalid_argument("aquila " + op + ": bf16_inputs takes a bf16 step (bf16 dense weights)");
  }
  if (dtype == DType::f32) {
    run<float>(job, threads);
  } else if (dtype == DType::bf16) {
    run<bf16>(job, threads);
  } else {
    throw std::invalid_argument("aquila " + op + ": takes an fp32 or bf16 dtype (" + dtype_of + ")");
  }
}

void check_linear(const DecodeLinear& w, int64_t cols, const std::string& where) {
  if (!w.weight) throw std::invalid_argument(where + "weight is null");
  if (w.format == WeightFormat::dense) return;
  if (!w.scales) throw std::invalid_argument(where + "a quantized linear needs scales");
  if (w.format == WeightFormat::int8 && w.zeros) throw std::invalid_argument(where + "int8 takes no zeros");
  if (w.format == WeightFormat::int4 && (w.group_size < 2 || w.group_size % 2 != 0 || cols % w.group_size != 0)) {
    throw std::invalid_argument(where + "group_size must be even, >= 2 and divide in_features, got " +
                                std::to_string(w.group_size) + " for in_features " + std::to_string(cols));
  }
}

void check_prefetch(int64_t prefetch_bytes, const std::string& op) {
  if (prefetch_bytes < 0) {
    throw std::invalid_argument("aquila " + op + ": prefetch_bytes is " + std::to_string(prefetch_bytes) +
                                ", must be >= 0");
  }
}

}  // namespace

void decode_step(const DecodeStep& args, int threads) {
  for (int64_t b = 0; b < args.batch; ++b) {
    if (args.tokens[b] < 0 || args.tokens[b] >= args.vocab) {
      throw std::invalid_argument("aquila decode_step: tokens[" + std::to_string(b) + "] is " +
                                  std::to_string(args.tokens[b]) + ", outside the vocabulary [0, " +
                                  std::to_string(args.vocab) + ")");
    }
  }
  check_prefetch(args.prefetch_bytes, "decode_step");
  const int64_t dim = args.dim, attended = args.heads * args.head_dim;
  for (int64_t l = 0; l < args.n_layers; ++l) {
    const DecodeLayer& w = args.layers[l];
    const std::string layer = "layers[" + std::to_string(l) + "].";
    for (const auto& [linear, cols, name] : {std::tuple{&w.wq, dim, "wq"}, {&w.wk, dim, "wk"}, {&w.wv, dim, "wv"},
                                             {&w.wo, attended, "wo"}, {&w.w1, dim, "w1"},
                                             {&w.w2, args.hidden_dim, "w2"}, {&w.w3, dim, "w3"}})
      check_linear(*linear, cols, "aquila decode_step: " + layer + name + ": ");
  }
  check_linear(args.output, dim, "aquila decode_step: output: ");
  const std::vector<float> cos_sin = rotations(args);
  run_in_dtype(StepJob{args, cos_sin.data()}, args.dtype, "decode_step", "embeddings, norms, cache", threads);
}

void decode_projection(const DecodeProjection& args, int threads) {
  const std::string op = "decode_projection";
  if (args.batch < 0 || args.rows < 1 || args.cols < 1) {
    throw std::invalid_argument("aquila " + op + ": needs batch >= 0, rows >= 1 and cols >= 1, got batch " +
                                std::to_string(args.batch) + ", rows " + std::to_string(args.rows) + ", cols " +
                                std::to_string(args.cols));
  }
  check_prefetch(args.prefetch_bytes, op);
  check_linear(args.weight, args.cols, "aquila " + op + ": weight: ");
  if (args.batch == 0) return;
  if (!args.in || !args.out || !args.workspace) {
    throw std::invalid_argument("aquila " + op + ": in, out and workspace must not be null");
  }
  run_in_dtype(ProjectionJob{args}, args.dtype, op, "of a dense weight", threads);
}

}  // namespace aquila::cpu
