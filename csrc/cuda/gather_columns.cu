// out[r, j] = x[r, idx[j]]: the compact operand of the M > 16 index-select GEMM (cuBLAS follows). A block
// gathers a tile of one row with consecutive j per thread (coalesced reads for sorted idx) into shared
// memory, then writes it out with 16-byte stores.
#include "common.cuh"
#include "kernels.h"

namespace dip_ext::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gather_columns_kernel(const T* __restrict__ x, int64_t x_stride, const int64_t* __restrict__ idx,
                          T* __restrict__ out, int64_t rows, int64_t k) {
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * V;
  __shared__ __align__(16) unsigned char buf[kThreads * V * sizeof(T)];
  T* tile = reinterpret_cast<T*>(buf);
  const int t = static_cast<int>(threadIdx.x);
  for_each_row_tile<kTile>(rows, k, [&](int64_t r, int64_t j0, int64_t n) {
    const T* xr = x + r * x_stride;
    const int64_t* ir = idx + j0;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t j = t + static_cast<int64_t>(e) * kThreads;
      if (j < n) tile[j] = xr[ir[j]];
    }
    __syncthreads();
    T* orow = out + r * k + j0;
    const int64_t jv = static_cast<int64_t>(t) * V;
    if (jv + V <= n) {
      store_pack<T, V>(orow + jv, load_pack<T, V>(tile + jv));
    } else {
      for (int64_t j = jv; j < n; ++j) orow[j] = tile[j];
    }
    __syncthreads();  // the next unit overwrites the tile
  });
}

}  // namespace

template <typename T>
cudaError_t launch_gather_columns(const T* x, int64_t x_stride, const int64_t* idx, T* out, int64_t rows,
                                  int64_t k, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  constexpr int V = kVec16<T>;
  // out rows start 16-byte aligned only when k * sizeof(T) is a multiple of 16.
  const bool vec = aligned16(out) && (k * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  if (vec) {
    gather_columns_kernel<T, V><<<grid_for(rows * ceil_div(k, kThreads * V), 1), kThreads, 0, stream>>>(
        x, x_stride, idx, out, rows, k);
  } else {
    gather_columns_kernel<T, 1><<<grid_for(rows * ceil_div(k, kThreads), 1), kThreads, 0, stream>>>(
        x, x_stride, idx, out, rows, k);
  }
  return cudaGetLastError();
}

#define DIP_EXT_INSTANTIATE(T) \
  template cudaError_t launch_gather_columns<T>(const T*, int64_t, const int64_t*, T*, int64_t, int64_t, \
                                                cudaStream_t);
DIP_EXT_FOR_EACH_DTYPE(DIP_EXT_INSTANTIATE)
#undef DIP_EXT_INSTANTIATE

}  // namespace dip_ext::cuda
