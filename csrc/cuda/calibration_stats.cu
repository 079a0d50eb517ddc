// Per-channel sum and sum of squares of x [rows, d], deterministic whatever the GPU or launch: rows are cut
// into chunks of stats_chunk_rows(rows) rows (64 for short inputs, so that even 1-2k rows give several thread
// blocks per SM; 256 for long ones); one block sums one chunk of 32 * V columns: each of its 8 warps sums its
// fixed eighth of the chunk's rows in order in fp32 and the 8 warp partials are added in warp order (stage 1,
// one read of x with 16-byte loads); then each channel adds its chunk partials in chunk order in fp64 into the
// running fp64 sums (stage 2).
#include "common.cuh"
#include "kernels.h"

namespace dip_ext::cuda {
namespace {

constexpr int kWarps = 8;
static_assert(kStatsShortChunkRows % kWarps == 0 && kStatsLongChunkRows % kWarps == 0,
              "a chunk splits evenly over the warps");
constexpr unsigned kMaxGridY = 65535;
constexpr int kFinalThreads = 256;

template <typename T, int V>
__global__ void __launch_bounds__(kWarps * 32)
    stats_partial_kernel(const T* __restrict__ x, int64_t x_stride, int64_t rows, int64_t d, int64_t chunk_rows,
                         int64_t chunks, float* __restrict__ partial) {
  constexpr int kCols = 32 * V;  // columns per block
  __shared__ float s_part[kWarps][kCols];
  __shared__ float q_part[kWarps][kCols];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kCols + lane * V;
  float* part_s = partial;
  float* part_q = partial + chunks * d;

  for (int64_t chunk = blockIdx.y; chunk < chunks; chunk += gridDim.y) {
    float s[V], q[V];
#pragma unroll
    for (int e = 0; e < V; ++e) s[e] = q[e] = 0.f;
    const int64_t rows_per_warp = chunk_rows / kWarps;
    const int64_t r_begin = chunk * chunk_rows + static_cast<int64_t>(warp) * rows_per_warp;
    const int64_t r_end = r_begin + rows_per_warp < rows ? r_begin + rows_per_warp : rows;
    if (c0 + V <= d) {
#pragma unroll 8
      for (int64_t r = r_begin; r < r_end; ++r) {
        const Pack<T, V> p = load_pack<T, V>(x + r * x_stride + c0);
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const float v = to_float(p.v[e]);
          s[e] += v;
          q[e] += v * v;
        }
      }
    } else if (c0 < d) {  // the last, partial column group of a row (scalar path only)
      for (int64_t r = r_begin; r < r_end; ++r) {
#pragma unroll
        for (int e = 0; e < V; ++e) {
          if (c0 + e < d) {
            const float v = to_float(x[r * x_stride + c0 + e]);
            s[e] += v;
            q[e] += v * v;
          }
        }
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) {
      s_part[warp][lane * V + e] = s[e];
      q_part[warp][lane * V + e] = q[e];
    }
    __syncthreads();
    for (int col = static_cast<int>(threadIdx.x); col < kCols; col += kWarps * 32) {
      const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + col;
      if (c < d) {
        float ts = 0.f, tq = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          ts += s_part[w][col];
          tq += q_part[w][col];
        }
        part_s[chunk * d + c] = ts;
        part_q[chunk * d + c] = tq;
      }
    }
    __syncthreads();  // the next chunk overwrites the shared partials
  }
}

__global__ void __launch_bounds__(kFinalThreads)
    stats_final_kernel(const float* __restrict__ partial, int64_t chunks, int64_t d, double* __restrict__ sum,
                       double* __restrict__ sumsq) {
  const float* part_q = partial + chunks * d;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < d;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double s = 0, q = 0;
    for (int64_t i = 0; i < chunks; ++i) {
      s += static_cast<double>(partial[i * d + c]);
      q += static_cast<double>(part_q[i * d + c]);
    }
    sum[c] += s;
    sumsq[c] += q;
  }
}

template <typename T, int V>
void launch_partials(const T* x, int64_t x_stride, int64_t rows, int64_t d, float* partial, cudaStream_t stream) {
  const int64_t chunks = stats_chunks(rows);
  const dim3 grid(static_cast<unsigned>(ceil_div(d, 32 * V)),
                  static_cast<unsigned>(chunks < kMaxGridY ? chunks : kMaxGridY));
  stats_partial_kernel<T, V><<<grid, kWarps * 32, 0, stream>>>(x, x_stride, rows, d, stats_chunk_rows(rows), chunks,
                                                                partial);
}

}  // namespace

template <typename T>
cudaError_t launch_calibration_stats(const T* x, int64_t x_stride, int64_t rows, int64_t d, float* partial,
                                     double* sum, double* sumsq, cudaStream_t stream) {
  if (rows <= 0 || d <= 0) return cudaSuccess;
  constexpr int V = kVec16<T>;
  if (ceil_div(d, 32) >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const bool vec = aligned16(x) && (x_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 && d % V == 0;
  if (vec) launch_partials<T, V>(x, x_stride, rows, d, partial, stream);
  else launch_partials<T, 1>(x, x_stride, rows, d, partial, stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  stats_final_kernel<<<grid_for(d, kFinalThreads), kFinalThreads, 0, stream>>>(partial, stats_chunks(rows), d, sum,
                                                                              sumsq);
  return cudaGetLastError();
}

#define DIP_EXT_INSTANTIATE(T) \
  template cudaError_t launch_calibration_stats<T>(const T*, int64_t, int64_t, int64_t, float*, double*, double*, \
                                                   cudaStream_t);
DIP_EXT_FOR_EACH_DTYPE(DIP_EXT_INSTANTIATE)
#undef DIP_EXT_INSTANTIATE

}  // namespace dip_ext::cuda
