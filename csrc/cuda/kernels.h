// Host launchers of the torch-free DISP kernels (csrc/cuda/*.cu). This header includes only CUDA runtime
// headers so plain nvcc / g++ can use it without torch.
//
// Conventions for every launcher:
//  - T is float, __half or __nv_bfloat16 (each launcher is explicitly instantiated for all three).
//  - A "row view" is [rows, cols] with unit stride along cols and `*_stride` elements between rows.
//  - idx arrays are int64 on the device and already validated (range, uniqueness where stated).
//  - Nothing is launched when the work is empty; the return value is cudaGetLastError() after the
//    launch(es), so callers can turn launch failures into exceptions (cudaErrorNoKernelImageForDevice when
//    the build holds no code for the GPU).
//  - Every kernel declares __launch_bounds__ equal to the largest block it is launched with.
//  - 16-byte vector accesses are used when the pointers and row strides allow; otherwise scalar ones.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace dip_ext::cuda {

// out[r, j] = norm(x[r, :])[idx[j]] * weight[idx[j]] (+ bias[idx[j]]), statistics in fp32 over all d:
//   RMSNorm  (layer_norm = false): x * rsqrt(mean(x^2) + eps)
//   LayerNorm(layer_norm = true):  (x - mean) * rsqrt(var + eps), two-pass variance; bias may be null.
// x row view [rows, d]; weight / bias [d]; out contiguous [rows, k].
template <typename T>
cudaError_t launch_norm_gather(const T* x, int64_t x_stride, const T* weight, const T* bias, const int64_t* idx,
                               T* out, int64_t rows, int64_t d, int64_t k, float eps, bool layer_norm,
                               cudaStream_t stream);

// residual[r, idx[j]] += y[r, j] (added in fp32, rounded once). idx must be unique (no atomics).
// residual row view [rows, d] (d only bounds idx); y row view [rows, k].
template <typename T>
cudaError_t launch_scatter_add(T* residual, int64_t residual_stride, const T* y, int64_t y_stride,
                               const int64_t* idx, int64_t rows, int64_t k, cudaStream_t stream);

// out[r, j] = x[r, idx[j]]; x row view [rows, d]; out contiguous [rows, k].
template <typename T>
cudaError_t launch_gather_columns(const T* x, int64_t x_stride, const int64_t* idx, T* out, int64_t rows,
                                  int64_t k, cudaStream_t stream);

// Largest token count the index-select GEMV handles; more tokens go gather + cuBLAS. One: on the H200 the
// GEMV beat gather + cuBLAS at one token and took several times as long at 16 (benchmarks/RESULTS.md), where
// cuBLAS's time hardly grows with the token count.
inline constexpr int64_t kGemvMaxTokens = 1;

// y[0, n] = sum_j x[0, idx[j]] * w[n, j] (+ bias[n]), fp32 accumulation, for m_tokens == 1.
// x row view [m_tokens, d]; w row view [n_out, k] (w_stride >= k); bias [n_out] or null; y contiguous
// [m_tokens, n_out]; x_gathered: scratch of m_tokens * k elements owned by the caller. Two launches: the
// columns x[:, idx] are gathered ONCE into x_gathered (launch_gather_columns), then the GEMV streams w and
// stages contiguous slices of x_gathered through shared memory (every block reads them, so they must be cheap
// to read: contiguous 16-byte loads, no index lookups).
template <typename T>
cudaError_t launch_index_select_gemv(const T* x, int64_t x_stride, const int64_t* idx, const T* w,
                                     int64_t w_stride, const T* bias, T* y, int64_t m_tokens, int64_t k,
                                     int64_t n_out, T* x_gathered, cudaStream_t stream);

// Rows per fp32 partial of the statistics. The chunking depends on the row count only (never on the GPU), so
// results are reproducible: short inputs get short chunks (enough thread blocks to fill the GPU), long ones
// 256-row chunks (less partial traffic).
inline constexpr int64_t kStatsLongChunkRows = 256;
inline constexpr int64_t kStatsShortChunkRows = 64;
inline constexpr int64_t kStatsShortInputRows = 16384;
inline int64_t stats_chunk_rows(int64_t rows) {
  return rows < kStatsShortInputRows ? kStatsShortChunkRows : kStatsLongChunkRows;
}
inline int64_t stats_chunks(int64_t rows) {
  const int64_t c = stats_chunk_rows(rows);
  return (rows + c - 1) / c;
}

// sum[c] += sum_r x[r, c], sumsq[c] += sum_r x[r, c]^2. Deterministic two-stage reduction: stage 1 sums
// each chunk of stats_chunk_rows(rows) rows in fp32 in a fixed order into `partial` (fp32,
// 2 * stats_chunks(rows) * d, scratch owned by the caller); stage 2 adds the chunk partials of each channel in
// order in fp64. No host synchronization.
template <typename T>
cudaError_t launch_calibration_stats(const T* x, int64_t x_stride, int64_t rows, int64_t d, float* partial,
                                     double* sum, double* sumsq, cudaStream_t stream);

}  // namespace dip_ext::cuda

namespace dip_ext::cuda {
// Output RMSNorm folded into the residual update: for each row r, rstd = rsqrt(sum_j y[r, j]^2 / d + eps) in
// fp32, then residual[r, idx[j]] += round(y[r, j] * rstd * (offset + weight[idx[j]])) (the normalised value
// rounded to T, the sum added in fp32 and rounded once). idx must be unique (no atomics). residual row view
// [rows, d]; y row view [rows, k]; weight [d]; offset is 1 for Gemma's (1 + w) scale, else 0.
template <typename T>
cudaError_t launch_rms_norm_scatter_add(T* residual, int64_t residual_stride, const T* y, int64_t y_stride,
                                        const T* weight, const int64_t* idx, int64_t rows, int64_t d, int64_t k,
                                        float eps, float offset, cudaStream_t stream);
}  // namespace dip_ext::cuda
