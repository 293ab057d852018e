// Softmax cross-entropy on CUDA, loss and gradient in one kernel: the arithmetic of kernels.h (CrossEntropy).
//
// A row is covered by a row group of threads (see RowTiling): thread i owns the packs i, i + blockDim.x, ... of
// kVec elements each, 16 bytes' worth when pointers, strides and vocab allow 16-byte accesses, else 1. Pass 1 reads
// the row once and keeps, per thread, an online maximum m and sum of exp(z - m) (rescaled whenever m grows), plus
// the plain sum of z for label smoothing; the row group then combines them into lse. Pass 2 (only with grad) turns
// each logit into its gradient. Short rows stay in registers between the passes; longer ones are read again (from
// L2 where it still holds them): at most 2 reads and 1 write of the row with a gradient, 1 read without.
//
// grad may alias logits. Every element is read and written by the thread that owns it, loads before stores in that
// thread's program order, and z_t is loaded by the thread that owns the target before its first store; so no thread
// ever overwrites a logit that another still needs, and no synchronisation is needed for the aliasing.
//
// Precision: fp32 throughout, one rounding to the element type on the store. exp is exp2f((z - c) * log2(e)), which
// --use_fast_math turns into ex2.approx.ftz (relative error ~2 ulp); z - c is formed first so that the error does
// not grow with |z|. log(sum) is taken in double (one per row and thread; fast math leaves double alone), since the
// fp32 __logf that fast math substitutes for logf is off by up to 3 ulp of lse.
#include <cmath>

#include "cuda/common.cuh"

namespace aquila::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
// Block shapes. One row is in flight per row group, and its reductions stall the group, so an SM should hold
// several rows at once: the kernels use up to 64 registers, which leaves room for 1024 threads per SM.
// - Rows of up to kMaxCachedThreads * kCached elements stay in registers (kCached per thread) between the passes,
//   short rows sharing a block of at least kMinBlockThreads threads.
// - Longer rows are streamed twice by kStreamPacks packs' worth of threads, within [kMinStreamThreads, 1024]: a
//   longer row gets more threads, so that it is in flight on fewer SMs at once and the second read finds it in L2.
// Chosen from occupancy arithmetic, not tuned by measurement.
constexpr int kCached = 16;
constexpr int kMaxCachedThreads = 512;
constexpr int kMinBlockThreads = 256;
constexpr int kStreamPacks = 16;
constexpr int kMinStreamThreads = 256;
// Packs a streaming thread loads before it uses the first, enough bytes in flight to cover memory latency: 4 of
// 16 bytes, or 8 single elements.
constexpr int kUnrollPacked = 4;
constexpr int kUnrollScalar = 8;

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// A thread's share of a row: max of its logits, sum of exp(z - max) over the logits but the target, the target's
// exp(z_t - max) (kept apart: the gradient's p_t - 1 is -others / sum, which keeps its digits when p_t is near 1),
// and the sum of z.
struct Partial {
  float max = -INFINITY;
  float sum = 0.0f;
  float target = 0.0f;
  float sum_z = 0.0f;
};

// target: the target's index in this pack, or -1.
template <int kVec>
__device__ __forceinline__ void accumulate(const float (&z)[kVec], Partial& part, int target) {
  float pack_max = z[0], pack_sum_z = z[0];
#pragma unroll
  for (int e = 1; e < kVec; ++e) {
    pack_max = fmaxf(pack_max, z[e]);
    pack_sum_z += z[e];
  }
  part.sum_z += pack_sum_z;
  // Rescale once per pack when the maximum grows (rarely, after the first packs). From -inf the factor is 0.
  if (pack_max > part.max) {
    const float rescale = exp2f((part.max - pack_max) * kLog2e);
    part.sum *= rescale;
    part.target *= rescale;
    part.max = pack_max;
  }
  // While every logit seen is -inf (masked) or NaN, subtract 0 instead of -inf: exp gives 0 (or NaN), not NaN.
  const float m = part.max == -INFINITY ? 0.0f : part.max;
  float pack_sum = 0.0f;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const float term = exp2f((z[e] - m) * kLog2e);
    if (e == target) {
      part.target += term;
    } else {
      pack_sum += term;
    }
  }
  part.sum += pack_sum;
}

// g_j = p_j coef - smooth, p_j = exp(z_j - lse), coef = s + s_z 2 lambda lse and smooth = s eps / vocab; the
// target's -s (1 - eps) comes apart.
template <int kVec>
__device__ __forceinline__ void gradient(float (&v)[kVec], float lse, float coef, float smooth) {
#pragma unroll
  for (int e = 0; e < kVec; ++e) v[e] = exp2f((v[e] - lse) * kLog2e) * coef - smooth;
}

template <typename T, int kVec>
__device__ __forceinline__ void fill(T* row, int packs, float value) {
  float v[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) v[e] = value;
  for (int p = threadIdx.x; p < packs; p += blockDim.x) store_from_float(row + p * kVec, v);
}

// Calls fn(p, v) for each pack p = threadIdx.x + i * blockDim.x < packs of the row, v its elements in fp32. kUnroll
// packs are loaded before fn sees the first of them, and fn may store over the packs it is handed.
template <int kVec, int kUnroll, typename T, typename Fn>
__device__ __forceinline__ void stream_packs(const T* row, int packs, Fn&& fn) {
  const int stride = blockDim.x;
  int p = threadIdx.x;
  for (; p + (kUnroll - 1) * stride < packs; p += kUnroll * stride) {
    float v[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_as_float(row + (p + u * stride) * kVec, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) fn(p + u * stride, v[u]);
  }
  for (; p < packs; p += stride) {
    float v[kVec];
    load_as_float(row + p * kVec, v);
    fn(p, v);
  }
}

template <typename T, int kVec, int kItems>
__global__ void __launch_bounds__(1024) cross_entropy_kernel(const __grid_constant__ CrossEntropy a) {
  constexpr int kUnroll = kVec == 1 ? kUnrollScalar : kUnrollPacked;
  __shared__ float scratch[4][32];
  const int packs = static_cast<int>(a.vocab) / kVec;
  const bool smoothing = static_cast<float>(a.label_smoothing) != 0.0f;

  for (int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.y; first < a.rows;
       first += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    // Threads past the last row still take part in the reductions (they synchronise the block).
    const int64_t row = first + threadIdx.y;
    const bool live = row < a.rows;
    const T* z = static_cast<const T*>(a.logits) + row * a.logits_row_stride;
    const int64_t target = live ? a.targets[row] : 0;  // loaded early: pass 1 sums the target's term apart
    const bool ignored = target == a.ignore_index;
    const bool valid = !ignored && target >= 0 && target < a.vocab;
    const int t = valid ? static_cast<int>(target) : 0;
    const int target_pack = valid ? t / kVec : -1;
    const auto target_in = [&](int p) { return p == target_pack ? t % kVec : -1; };

    // Pass 1: lse (and sum z).
    Partial part;
    float cache[kItems > 0 ? kItems : 1][kVec];
    if constexpr (kItems > 0) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (live && p < packs) load_as_float(z + p * kVec, cache[k]);
      }
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (live && p < packs) accumulate(cache[k], part, target_in(p));
      }
    } else if (live) {
      stream_packs<kVec, kUnroll>(z, packs, [&](int p, float(&v)[kVec]) { accumulate(v, part, target_in(p)); });
    }
    const float row_max = row_group_max(part.max, scratch[0]);
    // A thread that saw only -inf (or nothing) holds sums of 0, or NaN: keep them as they are.
    const float to_row_max = part.max == -INFINITY ? 1.0f : exp2f((part.max - row_max) * kLog2e);
    const float others = row_group_sum(part.sum * to_row_max, scratch[1]);
    const float sum = others + row_group_sum(part.target * to_row_max, scratch[3]);
    const float sum_z = smoothing ? row_group_sum(part.sum_z, scratch[2]) : 0.0f;  // smoothing is uniform
    if (!live) continue;
    const float log_sum = static_cast<float>(log(static_cast<double>(sum)));
    const float lse = row_max + log_sum;

    // The loss. Only the thread that owns the target's pack reads or writes z_t, and it reads it here, before its
    // first store to the row.
    const bool owner = valid && (t / kVec) % static_cast<int>(blockDim.x) == static_cast<int>(threadIdx.x);
    const float eps = static_cast<float>(a.label_smoothing);
    const float z_loss = static_cast<float>(a.z_loss);
    // Correctly rounded divisions despite fast-math.
    const float smooth = __fdiv_rn(eps, static_cast<float>(a.vocab));
    float z_t[1] = {0.0f};
    if (owner) {
      // Through the same word type as the row's other loads and stores, so that type-based alias analysis cannot
      // move it past them.
      load_as_float(z + t, z_t);
      // lse - (1 - eps) z_t - eps mean(z) as log_sum + (1 - eps) (max - z_t) + eps (max - mean(z)): the terms of a
      // confident prediction's small loss are then small themselves, not the difference of two large ones.
      const float smoothing_term = smoothing ? eps * (row_max - __fdiv_rn(sum_z, static_cast<float>(a.vocab))) : 0.0f;
      a.loss[row] = log_sum + (1.0f - eps) * (row_max - z_t[0]) + smoothing_term + z_loss * lse * lse;
    }
    if (threadIdx.x == 0) {
      a.lse[row] = lse;
      if (!valid) a.loss[row] = ignored ? 0.0f : quiet_nan();
    }

    // Pass 2: the gradient.
    if (!a.grad) continue;
    T* grad = static_cast<T*>(a.grad) + row * a.grad_row_stride;
    if (!valid) {
      fill<T, kVec>(grad, packs, ignored ? 0.0f : quiet_nan());
      continue;
    }
    const float scale = a.grad_scale[0];
    const float z_loss_slope = z_loss * lse * 2.0f * a.grad_scale[1];  // of s_z lambda lse^2
    const float coef = scale + z_loss_slope;
    const float scaled_smooth = scale * smooth;
    const auto store_gradient = [&](int p, float(&v)[kVec]) {
      gradient(v, lse, coef, scaled_smooth);
      store_from_float(grad + p * kVec, v);
    };
    if constexpr (kItems > 0) {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int p = threadIdx.x + k * blockDim.x;
        if (p < packs) store_gradient(p, cache[k]);
      }
    } else {
      stream_packs<kVec, kUnroll>(z, packs, store_gradient);
    }
    // The target's element again, with its -s (1 - eps), over what this same thread stored above: p_t coef
    // - s (1 - eps) - s eps / V as (p_t - 1) coef + s_z 2 lambda lse + s eps - s eps / V with p_t - 1 = -others /
    // sum, in fp32 until the store.
    if (owner) {
      const float g_t[1] = {-__fdiv_rn(others, sum) * coef + z_loss_slope + scale * (eps - smooth)};
      store_from_float(grad + t, g_t);
    }
  }
}

template <typename T, int kVec>
void launch(const CrossEntropy& a, cudaStream_t stream) {
  constexpr int kItems = kCached / kVec;
  const int64_t packs = a.vocab / kVec;
  const RowTiling tiling = row_tiling(packs, kItems, kMinBlockThreads);
  if (tiling.cached && tiling.threads_per_row <= kMaxCachedThreads) {
    const dim3 block(tiling.threads_per_row, tiling.rows_per_block);
    const unsigned grid = grid_size(ceil_div(a.rows, tiling.rows_per_block));
    cross_entropy_kernel<T, kVec, kItems><<<grid, block, 0, stream>>>(a);
  } else {
    const int64_t threads = ceil_div(ceil_div(packs, kStreamPacks), 32) * 32;
    const int block = static_cast<int>(std::clamp<int64_t>(threads, kMinStreamThreads, 1024));
    cross_entropy_kernel<T, kVec, 0><<<grid_size(a.rows), block, 0, stream>>>(a);
  }
}

template <typename T>
void run(const CrossEntropy& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = a.vocab % kVec == 0 && a.logits_row_stride % kVec == 0 && is_aligned(a.logits, 16) &&
                      (!a.grad || (a.grad_row_stride % kVec == 0 && is_aligned(a.grad, 16)));
  if (packed) {
    launch<T, kVec>(a, stream);
  } else {
    launch<T, 1>(a, stream);
  }
}

}  // namespace

void cross_entropy(const CrossEntropy& args, uintptr_t stream) {
  if (args.vocab < 1) throw std::invalid_argument("aquila: cross_entropy needs vocab >= 1");
  // Softcapped logits, class weights and the argmax go to the Triton kernel (aquila/kernels/cross_entropy.py's table
  // says so).
  if (args.softcap != 0.0) throw std::invalid_argument("aquila: the CUDA cross_entropy has no softcapping");
  if (args.class_weights || args.argmax) {
    throw std::invalid_argument("aquila: the CUDA cross_entropy has no class weights or argmax");
  }
  // Columns are indexed in 32 bits inside a row, with room for the streaming loop's look-ahead.
  if (args.vocab > INT_MAX / 2) throw std::invalid_argument("aquila: cross_entropy supports vocab <= 2^30 - 1");
  if (args.rows < 0) throw std::invalid_argument("aquila: cross_entropy needs rows >= 0");
  if (args.rows == 0) return;
  if (!args.logits || !args.targets || !args.loss || !args.lse) {
    throw std::invalid_argument("aquila: cross_entropy needs logits, targets, loss and lse");
  }
  if (args.grad && !args.grad_scale) throw std::invalid_argument("aquila: cross_entropy needs grad_scale with grad");
  if (args.grad == args.logits && args.grad_row_stride != args.logits_row_stride) {
    throw std::invalid_argument("aquila: cross_entropy in place needs grad_row_stride == logits_row_stride");
  }
  dispatch_dtype(args.dtype, [&](auto* tag) { run<std::remove_pointer_t<decltype(tag)>>(args, as_stream(stream)); });
  check_launch("cross_entropy");
}

}  // namespace aquila::cuda
