// Shared pieces of the CUDA kernels: element types and their fp32 conversions, packed (up to 16-byte) loads and
// stores, deterministic row reductions, and the host-side launch helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace aquila::cuda {

// ---------------------------------------------------------------------------------------------------------------
// Element types. Every kernel loads to fp32, computes in fp32 and rounds once, to nearest even, on the store.

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Calls fn with a null pointer of the element type that `dtype` names, so one template serves every dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::f32: fn(static_cast<float*>(nullptr)); return;
    case DType::f16: fn(static_cast<__half*>(nullptr)); return;
    case DType::bf16: fn(static_cast<__nv_bfloat16*>(nullptr)); return;
  }
  throw std::invalid_argument("aquila: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

// ---------------------------------------------------------------------------------------------------------------
// Packed memory access. N consecutive elements move in accesses of kWidth elements each; by default as wide as N
// allows, up to 16 bytes (one LDG.128 / STG.128). The pointer must be aligned to kWidth elements: the host picks
// the packed kernels only after checking pointers and strides, and falls back to kWidth = 1 otherwise. Each access
// moves an unsigned word of its size.

template <int Bytes>
struct Word;
template <>
struct Word<2> {
  using type = unsigned short;
};
template <>
struct Word<4> {
  using type = unsigned int;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<16> {
  using type = uint4;
};

// One store of a whole word. The compiler splits a plain 8- or 16-byte struct store into 4-byte stores whenever its
// address analysis loses track of the pieces (seen in loops with 64-bit offsets), so the wide ones are written in
// PTX. "memory" keeps them ordered with the C++ loads and stores around them (a thread may read back what it wrote).
template <typename Raw>
__device__ __forceinline__ void store_word(Raw* p, const Raw& v) {
  *p = v;
}
template <>
__device__ __forceinline__ void store_word<uint4>(uint4* p, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(__cvta_generic_to_global(p)), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}
template <>
__device__ __forceinline__ void store_word<uint2>(uint2* p, const uint2& v) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(__cvta_generic_to_global(p)), "r"(v.x), "r"(v.y) : "memory");
}

template <typename T, int N>
__host__ __device__ constexpr int widest_access() {
  return N * static_cast<int>(sizeof(T)) >= 16 ? 16 / static_cast<int>(sizeof(T)) : N;
}

template <int N, int kWidth = 0, typename T>
__device__ __forceinline__ void load_as_float(const T* p, float (&out)[N]) {
  constexpr int W = kWidth > 0 ? kWidth : widest_access<T, N>();
  static_assert(N % W == 0, "N must be a whole number of accesses");
  using Raw = typename Word<W * sizeof(T)>::type;
#pragma unroll
  for (int c = 0; c < N; c += W) {
    const Raw raw = *reinterpret_cast<const Raw*>(p + c);
    T v[W];
    memcpy(v, &raw, sizeof raw);
#pragma unroll
    for (int k = 0; k < W; ++k) out[c + k] = to_float(v[k]);
  }
}

template <int N, int kWidth = 0, typename T>
__device__ __forceinline__ void store_from_float(T* p, const float (&in)[N]) {
  constexpr int W = kWidth > 0 ? kWidth : widest_access<T, N>();
  static_assert(N % W == 0, "N must be a whole number of accesses");
  using Raw = typename Word<W * sizeof(T)>::type;
#pragma unroll
  for (int c = 0; c < N; c += W) {
    T v[W];
#pragma unroll
    for (int k = 0; k < W; ++k) v[k] = from_float<T>(in[c + k]);
    Raw raw;
    memcpy(&raw, v, sizeof raw);
    store_word(reinterpret_cast<Raw*>(p + c), raw);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions. A "row group" is the blockDim.x threads that share threadIdx.y (blockDim.x is a multiple of 32, the
// block has at most 32 warps). The sums are trees in a fixed order, so results are deterministic run to run.

__device__ __forceinline__ float warp_sum(float v) {
  // Butterfly: every lane ends with the same bits (each step adds the same two values, in either order).
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums v over the caller's row group; every thread of the group gets the total. Every thread of the block must call
// it (it may synchronise the block). scratch holds 32 floats; a caller that reduces again must pass other scratch
// (alternating two buffers is enough: no warp can get a whole reduction ahead of the others).
__device__ __forceinline__ float row_group_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return v;  // uniform across the block
  const int lane = threadIdx.x % 32;
  float* group = scratch + threadIdx.y * warps_per_row;
  if (lane == 0) group[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_sum(lane < warps_per_row ? group[lane] : 0.0f);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The maximum of v over the caller's row group (fmaxf: a NaN is dropped unless all values are NaN), on the same
// terms as row_group_sum: every thread of the block calls it, scratch holds 32 floats.
__device__ __forceinline__ float row_group_max(float v, float* scratch) {
  v = warp_max(v);
  const int warps_per_row = blockDim.x / 32;
  if (warps_per_row == 1) return v;
  const int lane = threadIdx.x % 32;
  float* group = scratch + threadIdx.y * warps_per_row;
  if (lane == 0) group[threadIdx.x / 32] = v;
  __syncthreads();
  return warp_max(lane < warps_per_row ? group[lane] : -INFINITY);
}

// ---------------------------------------------------------------------------------------------------------------
// Host side.

inline cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

inline bool is_aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Kernels grid-stride over their work, so a grid never needs more than grid.x's limit.
inline unsigned grid_size(int64_t blocks) { return static_cast<unsigned>(std::min<int64_t>(blocks, INT_MAX)); }

// A launch reports a bad configuration, or a missing driver (cudaErrorInsufficientDriver on a machine without a
// GPU), through cudaGetLastError; turn it into an exception that Python shows.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("aquila CUDA kernel ") + kernel + " failed: " + cudaGetErrorString(err));
  }
}

// How a row-wise kernel (RMSNorm) covers its rows: threads_per_row threads (a multiple of 32, at most 1024) per
// row, rows_per_block rows side by side in a block. Each thread owns the packs t, t + threads_per_row, ... of its
// row; `cached` says whether they fit in `items` packs per thread, so the kernel can keep the row in registers
// instead of reading it twice.
struct RowTiling {
  int threads_per_row;
  int rows_per_block;
  bool cached;
};

inline RowTiling row_tiling(int64_t packs, int items, int min_block_threads) {
  const int64_t needed = ceil_div(ceil_div(packs, items), 32) * 32;
  if (needed > 1024) return {1024, 1, false};
  const int threads = static_cast<int>(needed);
  // Short rows share a block: a 32-thread block per row would cap an SM at 32 blocks, half its warps.
  return {threads, std::max(1, min_block_threads / threads), true};
}

}  // namespace aquila::cuda
