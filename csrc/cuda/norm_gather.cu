// Fused RMSNorm / LayerNorm + column gather: one read of each row (16-byte loads into a shared-memory row
// cache), statistics in fp32 over all d, then only the kept columns idx are normalized and written.
// Rows of d <= kWarpRowMaxD get one warp each (8 rows per block); wider rows get a whole block, so the
// reduction never leaves one SM and each row is read from DRAM exactly once.
#include <climits>

#include "common.cuh"
#include "kernels.h"

namespace dip_ext::cuda {
namespace {

constexpr int kWarpRowMaxD = 1024;
constexpr int kWarpRowsPerBlock = 8;
constexpr int kSmemBudget = 48 * 1024;  // default dynamic shared memory limit, no opt-in needed
// Block sizes of the two variants: 8 warps (one row each), or one block of 128..kMaxRowThreads per row. The
// launch bounds promise the compiler no more, so it never allocates more registers than such a block can get;
// their minimum of one resident block keeps ptxas (13.0) from trading registers for occupancy (it spilled).
constexpr int kWarpVariantThreads = kWarpRowsPerBlock * 32;
constexpr int kMaxRowThreads = 1024;

// One group of threads (a warp, or the whole block when kBlockGroup) normalizes one row at a time.
template <typename T, bool kLayerNorm, bool kBlockGroup>
__global__ void __launch_bounds__(kBlockGroup ? kMaxRowThreads : kWarpVariantThreads, 1)
    norm_gather_kernel(const T* __restrict__ x, int64_t x_stride, const T* __restrict__ w, const T* __restrict__ b,
                       const int64_t* __restrict__ idx, T* __restrict__ out, int64_t rows, int d, int k, float eps,
                       bool cache, bool vec) {
  constexpr int V = kVec16<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int group_size = kBlockGroup ? static_cast<int>(blockDim.x) : 32;
  const int groups = kBlockGroup ? 1 : static_cast<int>(blockDim.x) / 32;
  const int g = kBlockGroup ? 0 : static_cast<int>(threadIdx.x) / 32;
  const int t = kBlockGroup ? static_cast<int>(threadIdx.x) : static_cast<int>(threadIdx.x) & 31;
  const int d_pad = (d + V - 1) / V * V;  // keeps every group's cache 16-byte aligned
  T* row_cache = reinterpret_cast<T*>(smem) + static_cast<int64_t>(g) * d_pad;
  float* scratch = reinterpret_cast<float*>(smem + (cache ? static_cast<size_t>(groups) * d_pad * sizeof(T) : 0));
  const float inv_d = 1.f / static_cast<float>(d);

  auto group_sum = [&](float v) { return kBlockGroup ? block_sum(v, scratch) : warp_sum(v); };
  auto group_sync = [&]() {
    if constexpr (kBlockGroup) __syncthreads();
    else __syncwarp();
  };

  for (int64_t r = static_cast<int64_t>(blockIdx.x) * groups + g; r < rows;
       r += static_cast<int64_t>(gridDim.x) * groups) {
    const T* xr = x + r * x_stride;
    // Pass 1 (the only DRAM read): fill the cache, accumulate sum (LayerNorm) or sum of squares (RMSNorm).
    float acc = 0.f;
    int tail = 0;
    if (vec) {
      const int nv = d / V;
      for (int i = t; i < nv; i += group_size) {
        const Pack<T, V> p = load_pack<T, V>(xr + static_cast<int64_t>(i) * V);
        if (cache) store_pack<T, V>(row_cache + i * V, p);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float v = to_float(p.v[e]);
          acc += kLayerNorm ? v : v * v;
        }
      }
      tail = nv * V;
    }
    for (int c = tail + t; c < d; c += group_size) {
      const T xv = xr[c];
      if (cache) row_cache[c] = xv;
      const float v = to_float(xv);
      acc += kLayerNorm ? v : v * v;
    }
    if constexpr (!kBlockGroup) __syncwarp();  // cache writes visible to the warp (block_sum syncs the block)
    const float total = group_sum(acc);
    const T* src = cache ? row_cache : xr;
    float mean = 0.f, rstd;
    if constexpr (kLayerNorm) {
      mean = total * inv_d;
      // Two-pass variance (as the CPU kernel): no cancellation for rows with a large mean.
      float sq = 0.f;
      for (int c = t; c < d; c += group_size) {
        const float v = to_float(src[c]) - mean;
        sq += v * v;
      }
      rstd = 1.f / sqrtf(group_sum(sq) * inv_d + eps);
    } else {
      rstd = 1.f / sqrtf(total * inv_d + eps);
    }
    T* orow = out + r * k;
    for (int j = t; j < k; j += group_size) {
      const int64_t c = idx[j];
      float v = (to_float(src[c]) - mean) * rstd * to_float(w[c]);
      if (kLayerNorm && b != nullptr) v += to_float(b[c]);
      orow[j] = from_float<T>(v);
    }
    group_sync();  // the next row overwrites the cache
  }
}

template <typename T, bool kLayerNorm>
cudaError_t launch(const T* x, int64_t x_stride, const T* w, const T* b, const int64_t* idx, T* out, int64_t rows,
                   int64_t d, int64_t k, float eps, cudaStream_t stream) {
  constexpr int V = kVec16<T>;
  if (d > INT_MAX || k > INT_MAX) return cudaErrorInvalidValue;
  const bool vec = aligned16(x) && (x_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
  const int64_t d_pad = (d + V - 1) / V * V;
  if (d <= kWarpRowMaxD) {
    const int64_t blocks = ceil_div(rows, kWarpRowsPerBlock);
    const size_t smem = static_cast<size_t>(kWarpRowsPerBlock) * d_pad * sizeof(T);  // <= 32 KiB
    norm_gather_kernel<T, kLayerNorm, false><<<grid_for(blocks, 1), kWarpVariantThreads, smem, stream>>>(
        x, x_stride, w, b, idx, out, rows, static_cast<int>(d), static_cast<int>(k), eps, true, vec);
  } else {
    // About two 16-byte vectors per thread keeps enough loads in flight without idle threads.
    int64_t threads = (ceil_div(d, 2 * V) + 31) / 32 * 32;
    threads = threads < 128 ? 128 : (threads > kMaxRowThreads ? kMaxRowThreads : threads);
    const size_t cache_bytes = static_cast<size_t>(d_pad) * sizeof(T);
    const bool cache = cache_bytes + 32 * sizeof(float) <= static_cast<size_t>(kSmemBudget);
    const size_t smem = (cache ? cache_bytes : 0) + 32 * sizeof(float);
    norm_gather_kernel<T, kLayerNorm, true><<<grid_for(rows, 1), static_cast<unsigned>(threads), smem, stream>>>(
        x, x_stride, w, b, idx, out, rows, static_cast<int>(d), static_cast<int>(k), eps, cache, vec);
  }
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_norm_gather(const T* x, int64_t x_stride, const T* weight, const T* bias, const int64_t* idx,
                               T* out, int64_t rows, int64_t d, int64_t k, float eps, bool layer_norm,
                               cudaStream_t stream) {
  if (rows <= 0 || k <= 0 || d <= 0) return cudaSuccess;
  return layer_norm ? launch<T, true>(x, x_stride, weight, bias, idx, out, rows, d, k, eps, stream)
                    : launch<T, false>(x, x_stride, weight, nullptr, idx, out, rows, d, k, eps, stream);
}

#define DIP_EXT_INSTANTIATE(T)                                                                                \
  template cudaError_t launch_norm_gather<T>(const T*, int64_t, const T*, const T*, const int64_t*, T*, int64_t, \
                                             int64_t, int64_t, float, bool, cudaStream_t);
DIP_EXT_FOR_EACH_DTYPE(DIP_EXT_INSTANTIATE)
#undef DIP_EXT_INSTANTIATE

}  // namespace dip_ext::cuda
