// residual[r, idx[j]] += y[r, j] in place. idx is unique, so every residual element has one writer: no
// atomics, deterministic. A block stages a tile of one row of y through shared memory (16-byte loads), then
// its threads walk the tile with consecutive j, so the residual read-modify-writes of a warp are coalesced
// whenever idx is sorted.
#include "common.cuh"
#include "kernels.h"

namespace dip_ext::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scatter_add_kernel(T* __restrict__ res, int64_t res_stride, const T* __restrict__ y, int64_t y_stride,
                       const int64_t* __restrict__ idx, int64_t rows, int64_t k) {
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * V;
  __shared__ __align__(16) unsigned char buf[kThreads * V * sizeof(T)];
  T* tile = reinterpret_cast<T*>(buf);
  const int t = static_cast<int>(threadIdx.x);
  for_each_row_tile<kTile>(rows, k, [&](int64_t r, int64_t j0, int64_t n) {
    const T* yr = y + r * y_stride + j0;
    const int64_t jv = static_cast<int64_t>(t) * V;
    if (jv + V <= n) {
      store_pack<T, V>(tile + jv, load_pack<T, V>(yr + jv));
    } else {
      for (int64_t j = jv; j < n; ++j) tile[j] = yr[j];
    }
    __syncthreads();
    T* rr = res + r * res_stride;
    const int64_t* ir = idx + j0;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const int64_t j = t + static_cast<int64_t>(e) * kThreads;
      if (j < n) {
        const int64_t c = ir[j];
        rr[c] = from_float<T>(to_float(rr[c]) + to_float(tile[j]));
      }
    }
    __syncthreads();  // the next unit overwrites the tile
  });
}

}  // namespace

template <typename T>
cudaError_t launch_scatter_add(T* residual, int64_t residual_stride, const T* y, int64_t y_stride,
                               const int64_t* idx, int64_t rows, int64_t k, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  constexpr int V = kVec16<T>;
  const bool vec = aligned16(y) && (y_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  // One block per (row, tile) unit; 16-byte loads of y need aligned rows.
  if (vec) {
    scatter_add_kernel<T, V><<<grid_for(rows * ceil_div(k, kThreads * V), 1), kThreads, 0, stream>>>(
        residual, residual_stride, y, y_stride, idx, rows, k);
  } else {
    scatter_add_kernel<T, 1><<<grid_for(rows * ceil_div(k, kThreads), 1), kThreads, 0, stream>>>(
        residual, residual_stride, y, y_stride, idx, rows, k);
  }
  return cudaGetLastError();
}

#define DIP_EXT_INSTANTIATE(T) \
  template cudaError_t launch_scatter_add<T>(T*, int64_t, const T*, int64_t, const int64_t*, int64_t, int64_t, \
                                             cudaStream_t);
DIP_EXT_FOR_EACH_DTYPE(DIP_EXT_INSTANTIATE)
#undef DIP_EXT_INSTANTIATE

}  // namespace dip_ext::cuda
