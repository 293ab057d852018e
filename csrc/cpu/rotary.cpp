// Rotary position embedding on CPU. cos/sin are computed in double precision from the exact angle
// position * theta^(-2i/d), once per distinct position when the positions span fewer values than there are tokens
// (packed training batches: positions restart in every document), else once per token; each serves all heads.
#include <cmath>
#include <vector>

#include "cpu/common.h"

namespace aquila::cpu {
namespace {

// In the interleaved layout pair i is (2i, 2i + 1); in the rotate-half layout it is (i, i + half).
template <bool Interleaved, typename T>
AQUILA_INLINE void rotate_head(const T* __restrict x, T* __restrict out, const float* __restrict c,
                               const float* __restrict sn, int64_t half) {
  constexpr int64_t pair_stride = Interleaved ? 2 : 1;
  const int64_t partner = Interleaved ? 1 : half;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i * pair_stride]);
    const float x2 = to_float(x[i * pair_stride + partner]);
    out[i * pair_stride] = from_float<T>(x1 * c[i] - x2 * sn[i]);
    out[i * pair_stride + partner] = from_float<T>(x2 * c[i] + x1 * sn[i]);
  }
}

template <typename T>
AQUILA_SIMD_CLONES void rotary_kernel(const Rotary& a, int threads) {
  const int64_t half = a.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = std::pow(a.theta, -2.0 * i / a.head_dim);
  const double sign = a.inverse ? -1.0 : 1.0;
  // When every sequence of the batch has the same positions (or the caller's table is shared by the batch), a
  // position's cos/sin serve all of the batch.
  const bool same_positions = a.cos ? a.table_stride_batch == 0 || a.batch == 1
                                    : !a.positions || a.positions_stride_batch == 0 || a.batch == 1;
  const bool share = same_positions && a.seq >= threads;
  const int64_t work = share ? a.seq : a.batch * a.seq;
  const int64_t batch_per_item = share ? a.batch : 1;
  auto position_of = [&](int64_t b, int64_t s) {
    return a.positions ? a.positions[b * a.positions_stride_batch + s * a.positions_stride_seq] : a.offset + s;
  };
  // A table of cos/sin per distinct position, when that is less work than one per token.
  int64_t lowest = 0, span = 0;
  if (!share && a.positions && !a.cos && work > 0) {
    int64_t highest = position_of(0, 0);
    lowest = highest;
    for (int64_t item = 0; item < work; ++item) {
      const int64_t pos = position_of(item / a.seq, item % a.seq);
      lowest = pos < lowest ? pos : lowest;
      highest = pos > highest ? pos : highest;
    }
    if (highest - lowest < work) span = highest - lowest + 1;
  }
  std::vector<float> table_cos(span * half), table_sin(span * half);
  auto fill = [&](int64_t pos, float* c, float* sn) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos) * inv_freq[i];
      c[i] = static_cast<float>(std::cos(angle));
      sn[i] = static_cast<float>(sign * std::sin(angle));
    }
  };
  // The cos/sin of token (b, s): the caller's, or from its position.
  auto fill_token = [&](int64_t b, int64_t s, float* c, float* sn) {
    if (a.cos) {
      const int64_t at = b * a.table_stride_batch + s * a.table_stride_seq;
      for (int64_t i = 0; i < half; ++i) {
        c[i] = a.cos[at + i];
        sn[i] = static_cast<float>(sign) * a.sin[at + i];
      }
    } else {
      fill(position_of(b, s), c, sn);
    }
  };
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t p = 0; p < span; ++p) fill(lowest + p, &table_cos[p * half], &table_sin[p * half]);
    std::vector<float> cos_buf(half), sin_buf(half);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t first_b = share ? 0 : item / a.seq, s = item % a.seq;
      const float* c = cos_buf.data();
      const float* sn = sin_buf.data();
      if (span) {
        const int64_t pos = position_of(first_b, s);
        c = &table_cos[(pos - lowest) * half];
        sn = &table_sin[(pos - lowest) * half];
      } else {
        fill_token(first_b, s, cos_buf.data(), sin_buf.data());
      }
      for (int64_t b = first_b; b < first_b + batch_per_item; ++b) {
        for (int64_t h = 0; h < a.heads; ++h) {
          const T* x = static_cast<const T*>(a.x) + b * a.x_stride_batch + s * a.x_stride_seq + h * a.x_stride_head;
          T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + s * a.out_stride_seq + h * a.out_stride_head;
          if (a.interleaved) {
            rotate_head<true>(x, out, c, sn, half);
          } else {
            rotate_head<false>(x, out, c, sn, half);
          }
        }
      }
    }
  }
}

}  // namespace

void rotary(const Rotary& args, int threads) {
  dispatch_dtype(args.dtype, [&](auto* tag) { rotary_kernel<std::remove_pointer_t<decltype(tag)>>(args, threads); });
}

}  // namespace aquila::cpu
