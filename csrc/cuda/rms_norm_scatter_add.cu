// Output RMSNorm folded into the residual update (Gemma's sandwich norms under DISP). One block per row
// (grid-stride): the block sums y[r, :]^2 over the k kept entries (fp32, fixed order per launch shape), then
// its threads walk the row with consecutive j, so the residual read-modify-writes of a warp are coalesced
// whenever idx is sorted. idx is unique: every residual element has one writer, no atomics, deterministic.
#include "common.cuh"
#include "kernels.h"

namespace dip_ext::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_scatter_add_kernel(T* __restrict__ res, int64_t res_stride, const T* __restrict__ y, int64_t y_stride,
                                const T* __restrict__ weight, const int64_t* __restrict__ idx, int64_t rows,
                                float inv_d, int64_t k, float eps, float offset) {
  __shared__ float scratch[32];
  const int64_t t = threadIdx.x;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* yr = y + r * y_stride;
    float ss = 0.f;
    for (int64_t j = t; j < k; j += kThreads) {
      const float v = to_float(yr[j]);
      ss += v * v;
    }
    const float rstd = rsqrtf(block_sum(ss, scratch) * inv_d + eps);
    T* rr = res + r * res_stride;
    for (int64_t j = t; j < k; j += kThreads) {
      const int64_t c = idx[j];
      const T v = from_float<T>(to_float(yr[j]) * rstd * (offset + to_float(weight[c])));
      rr[c] = from_float<T>(to_float(rr[c]) + to_float(v));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_rms_norm_scatter_add(T* residual, int64_t residual_stride, const T* y, int64_t y_stride,
                                        const T* weight, const int64_t* idx, int64_t rows, int64_t d, int64_t k,
                                        float eps, float offset, cudaStream_t stream) {
  if (rows <= 0 || k <= 0) return cudaSuccess;
  rms_norm_scatter_add_kernel<T><<<grid_for(rows, 1), kThreads, 0, stream>>>(
      residual, residual_stride, y, y_stride, weight, idx, rows, 1.f / static_cast<float>(d), k, eps, offset);
  return cudaGetLastError();
}

#define DIP_EXT_INSTANTIATE(T)                                                                                   \
  template cudaError_t launch_rms_norm_scatter_add<T>(T*, int64_t, const T*, int64_t, const T*, const int64_t*, \
                                                      int64_t, int64_t, int64_t, float, float, cudaStream_t);
DIP_EXT_FOR_EACH_DTYPE(DIP_EXT_INSTANTIATE)
#undef DIP_EXT_INSTANTIATE

}  // namespace dip_ext::cuda
