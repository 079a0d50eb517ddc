// Device helpers shared by the torch-free CUDA kernels: dtype conversion, 16-byte vector access, warp and
// block reductions, launch sizing. Included only by csrc/cuda/*.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

// Applies macro M to each element type the launchers are explicitly instantiated for.
#define DIP_EXT_FOR_EACH_DTYPE(M) M(float) M(__half) M(__nv_bfloat16)

namespace dip_ext::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Elements per 16-byte access.
template <typename T>
inline constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// N elements moved as one 16-byte (or narrower, for N < kVec16) transaction. `p` must be aligned to
// sizeof(T) * N; the launchers check that before choosing a vector path.
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}
// Weights are read exactly once per call: don't let them evict activations from L1.
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack_stream(const T* p) {
  static_assert(sizeof(Pack<T, N>) == 16 || N == 1, "streaming loads are 16-byte or scalar");
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
    return *reinterpret_cast<const Pack<T, N>*>(&u);
  } else {
    return *reinterpret_cast<const Pack<T, N>*>(p);
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over all threads of the block; every thread gets the result. `scratch` holds >= 32 floats and may be
// reused after the call returns (the trailing barrier protects it).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = lane < warps ? scratch[lane] : 0.f;
  t = warp_sum(t);
  __syncthreads();
  return t;
}

// Grid-stride walk over the (row, column tile) units of a [rows, k] problem, kTile columns per unit:
// body(r, j0, n) handles columns [j0, j0 + n) of row r. Every thread of the block sees the same units.
template <int64_t kTile, typename F>
__device__ __forceinline__ void for_each_row_tile(int64_t rows, int64_t k, F&& body) {
  const int64_t tiles_per_row = (k + kTile - 1) / kTile;
  const int64_t units = rows * tiles_per_row;
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) {
    const int64_t r = u / tiles_per_row;
    const int64_t j0 = (u - r * tiles_per_row) * kTile;
    body(r, j0, k - j0 < kTile ? k - j0 : kTile);
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride kernels never need more blocks than this to fill any current GPU several times over.
inline unsigned grid_for(int64_t work_items, int threads) {
  const int64_t blocks = ceil_div(work_items, threads);
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

}  // namespace dip_ext::cuda
