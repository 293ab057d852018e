// Rotary position embedding on CUDA: the same arithmetic as csrc/cpu/rotary.cpp.
//
// One block per token (b, s): its threads first compute the token's cos/sin once into shared memory, in double
// precision from the exact angle position * theta^(-2i/d), then rotate every head of the token. Threads are laid
// out (pair items of a head) x (heads), so no thread divides a flat index: the kernel stays memory bound.
#include <cmath>

#include "cuda/common.cuh"

namespace aquila::cuda {
namespace {

// inv_freq[i] = theta^(-2i/d) is computed on the host with the same std::pow as the CPU kernel and passed in the
// kernel's parameters (2 KiB, within the classic 4 KiB limit). Heads wider than 2 * kTableFreqs compute it on the
// device instead.
constexpr int kTableFreqs = 256;
struct FreqTable {
  double inv_freq[kTableFreqs];
};

constexpr int kMaxBlockThreads = 256;

// Each thread item rotates kPairs pairs of one head, in accesses of kWidth elements. In the interleaved layout the
// pairs (2i, 2i + 1) of an item are 2 * kPairs consecutive elements; in the rotate-half layout they are two runs of
// kPairs elements, i... and i + half...
template <typename T, int kPairs, int kWidth, bool kInterleaved>
__global__ void __launch_bounds__(kMaxBlockThreads)
    rotary_kernel(const __grid_constant__ Rotary a, const __grid_constant__ FreqTable table) {
  extern __shared__ float trig[];  // cos of each pair, then sin (negated for the inverse rotation)
  const int half = static_cast<int>(a.head_dim / 2);
  float* cos_of = trig;
  float* sin_of = trig + half;
  const int items = half / kPairs;  // per head
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int threads = blockDim.x * blockDim.y;
  const int heads = static_cast<int>(a.heads);
  const int64_t tokens = a.batch * a.seq;

  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    const int64_t b = token / a.seq, s = token - b * a.seq;
    const int64_t pos =
        a.positions ? a.positions[b * a.positions_stride_batch + s * a.positions_stride_seq] : a.offset + s;
    const int64_t table_at = b * a.table_stride_batch + s * a.table_stride_seq;
    for (int i = tid; i < half && a.cos; i += threads) {  // the caller's table
      cos_of[i] = a.cos[table_at + i];
      sin_of[i] = a.inverse ? -a.sin[table_at + i] : a.sin[table_at + i];
    }
    for (int i = tid; i < half && !a.cos; i += threads) {
      const double inv_freq = half <= kTableFreqs ? table.inv_freq[i] : pow(a.theta, -2.0 * i / a.head_dim);
      // Double trig is exact for any realistic position (fp32 would lose the angle past a few thousand tokens), is
      // untouched by --use_fast_math, and runs once per (token, pair), shared by all heads.
      double sin_d, cos_d;
      sincos(static_cast<double>(pos) * inv_freq, &sin_d, &cos_d);
      cos_of[i] = static_cast<float>(cos_d);
      sin_of[i] = static_cast<float>(a.inverse ? -sin_d : sin_d);
    }
    __syncthreads();

    const T* x = static_cast<const T*>(a.x) + b * a.x_stride_batch + s * a.x_stride_seq;
    T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + s * a.out_stride_seq;
    // A 32-bit head index (heads < 2^31 is checked on the host); the offsets are 64-bit products.
    for (int h = threadIdx.y; h < heads; h += blockDim.y) {
      // No __restrict__: out may be x (in place). Each thread reads its elements before writing them.
      const T* xh = x + h * a.x_stride_head;
      T* oh = out + h * a.out_stride_head;
      for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int i = item * kPairs;  // first pair of the item
        if constexpr (kInterleaved) {
          float v[2 * kPairs];
          load_as_float<2 * kPairs, kWidth>(xh + 2 * i, v);
#pragma unroll
          for (int k = 0; k < kPairs; ++k) {
            const float x1 = v[2 * k], x2 = v[2 * k + 1], c = cos_of[i + k], sn = sin_of[i + k];
            v[2 * k] = x1 * c - x2 * sn;
            v[2 * k + 1] = x2 * c + x1 * sn;
          }
          store_from_float<2 * kPairs, kWidth>(oh + 2 * i, v);
        } else {
          float u[kPairs], v[kPairs];
          load_as_float<kPairs, kWidth>(xh + i, u);
          load_as_float<kPairs, kWidth>(xh + half + i, v);
#pragma unroll
          for (int k = 0; k < kPairs; ++k) {
            const float x1 = u[k], x2 = v[k], c = cos_of[i + k], sn = sin_of[i + k];
            u[k] = x1 * c - x2 * sn;
            v[k] = x2 * c + x1 * sn;
          }
          store_from_float<kPairs, kWidth>(oh + i, u);
          store_from_float<kPairs, kWidth>(oh + half + i, v);
        }
      }
    }
    __syncthreads();  // the next token overwrites cos/sin
  }
}

template <typename T, int kPairs, int kWidth, bool kInterleaved>
void launch(const Rotary& a, const FreqTable& table, cudaStream_t stream) {
  const int half = static_cast<int>(a.head_dim / 2);
  const int items = half / kPairs;
  // Threads along x cover a head's items (up to a warp), along y the heads; at least a warp, at most 256 threads.
  int tx = 1;
  while (tx < items && tx < 32) tx *= 2;
  const int ty = static_cast<int>(std::clamp<int64_t>(a.heads, std::max(1, 32 / tx), kMaxBlockThreads / tx));
  const size_t shared = 2 * static_cast<size_t>(half) * sizeof(float);
  rotary_kernel<T, kPairs, kWidth, kInterleaved>
      <<<grid_size(a.batch * a.seq), dim3(tx, ty), shared, stream>>>(a, table);
}

template <typename T>
void rotary_typed(const Rotary& a, const FreqTable& table, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t half = a.head_dim / 2;
  const bool aligned = is_aligned(a.x, 16) && is_aligned(a.out, 16) && a.x_stride_batch % kVec == 0 &&
                       a.x_stride_seq % kVec == 0 && a.x_stride_head % kVec == 0 && a.out_stride_batch % kVec == 0 &&
                       a.out_stride_seq % kVec == 0 && a.out_stride_head % kVec == 0;
  if (a.interleaved) {
    // A 16-byte access holds kVec / 2 whole pairs.
    if (aligned && half % (kVec / 2) == 0) {
      launch<T, kVec / 2, kVec, true>(a, table, stream);
    } else {
      launch<T, 1, 1, true>(a, table, stream);
    }
  } else {
    if (aligned && half % kVec == 0) {
      launch<T, kVec, kVec, false>(a, table, stream);
    } else {
      launch<T, 1, 1, false>(a, table, stream);
    }
  }
}

}  // namespace

void rotary(const Rotary& args, uintptr_t stream) {
  const int64_t half = args.head_dim / 2;
  if (args.batch <= 0 || args.seq <= 0 || args.heads <= 0 || half <= 0) return;
  // cos and sin of every pair live in shared memory: keep them within the default 48 KiB.
  if (2 * half * static_cast<int64_t>(sizeof(float)) > 48 * 1024) {
    throw std::invalid_argument("aquila: rotary supports head_dim <= 12289 on CUDA");
  }
  if (args.heads > INT_MAX) throw std::invalid_argument("aquila: rotary supports heads <= 2^31 - 1 on CUDA");
  FreqTable table{};
  if (half <= kTableFreqs) {
    for (int64_t i = 0; i < half; ++i) table.inv_freq[i] = std::pow(args.theta, -2.0 * i / args.head_dim);
  }
  dispatch_dtype(args.dtype,
                 [&](auto* tag) { rotary_typed<std::remove_pointer_t<decltype(tag)>>(args, table, as_stream(stream)); });
  check_launch("rotary");
}

}  // namespace aquila::cuda
