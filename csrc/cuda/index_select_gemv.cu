// Decode-time index-select GEMV for one token: y[0, n] = sum_j x[0, idx[j]] * w[n, j] (+ bias[n]).
// With so few tokens the weight bytes dominate, so the kernel streams w once with 16-byte loads (evict-first).
// Every block needs all of x[:, idx], so the columns are gathered ONCE per call into a contiguous scratch
// (launch_gather_columns, a few KB) and each block copies contiguous slices of it into a shared-memory tile
// with 16-byte loads: no per-block index lookups or scattered reads. Each warp owns kRW output rows; lanes
// split k, accumulate in fp32, and a warp shuffle reduction finishes each dot product (deterministic).
#include "common.cuh"
#include "kernels.h"

namespace dip_ext::cuda {
namespace {

constexpr int kTileBytes = 32 * 1024;  // activation tile per block, under the 48 KiB default limit

template <int kM>
struct GemvConfig {
  // More tokens reuse each weight load more, so each warp takes more rows. 8 warps per block: fewer blocks,
  // each copying the activation tile once, while N / 16 blocks still fill the GPU at LLM widths.
  static constexpr int kRowsPerWarp = kM >= 8 ? 4 : 2;
  static constexpr int kWarps = 8;
  static constexpr int kRowsPerBlock = kRowsPerWarp * kWarps;
};

template <typename T, int V, int kM>
__global__ void __launch_bounds__(GemvConfig<kM>::kWarps * 32)
    index_select_gemv_kernel(const T* __restrict__ xg, const T* __restrict__ w, int64_t w_stride,
                             const T* __restrict__ bias, T* __restrict__ y, int M, int64_t K, int64_t N, int KT) {
  // xg: the gathered activations, contiguous [M, K]; with V > 1, K % V == 0 and xg is 16-byte aligned.
  constexpr int kRW = GemvConfig<kM>::kRowsPerWarp;
  extern __shared__ __align__(16) unsigned char smem[];
  T* xt = reinterpret_cast<T*>(smem);  // [M][KT] activations of the current k tile
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * GemvConfig<kM>::kWarps + warp) * kRW;

  float acc[kRW][kM];
#pragma unroll
  for (int q = 0; q < kRW; ++q)
#pragma unroll
    for (int m = 0; m < kM; ++m) acc[q][m] = 0.f;

  Pack<T, V> zero;
#pragma unroll
  for (int e = 0; e < V; ++e) zero.v[e] = from_float<T>(0.f);

  for (int64_t k0 = 0; k0 < K; k0 += KT) {
    const int kt = static_cast<int>(K - k0 < KT ? K - k0 : KT);
    __syncthreads();  // every warp is done with the previous tile
    const int nv = kt / V;  // kt is a multiple of V whenever V > 1
    for (int i = static_cast<int>(threadIdx.x); i < M * nv; i += static_cast<int>(blockDim.x)) {
      const int m = i / nv, jv = (i - m * nv) * V;
      store_pack<T, V>(xt + m * KT + jv, load_pack<T, V>(xg + m * K + k0 + jv));
    }
    __syncthreads();
    // kt is a multiple of V whenever V > 1 (the launcher only vectorizes when k is).
#pragma unroll 2
    for (int j = lane * V; j < kt; j += 32 * V) {
      Pack<T, V> wv[kRW];
#pragma unroll
      for (int q = 0; q < kRW; ++q) {
        const int64_t n = n0 + q;
        wv[q] = n < N ? load_pack_stream<T, V>(w + n * w_stride + k0 + j) : zero;
      }
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m < M) {
          const Pack<T, V> xv = load_pack<T, V>(xt + m * KT + j);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float xf = to_float(xv.v[e]);
#pragma unroll
            for (int q = 0; q < kRW; ++q) acc[q][m] += xf * to_float(wv[q].v[e]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int q = 0; q < kRW; ++q) {
    const int64_t n = n0 + q;
    const float b = (bias != nullptr && n < N) ? to_float(bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      if (m < M) {
        const float s = warp_sum(acc[q][m]);
        if (lane == m && n < N) y[m * N + n] = from_float<T>(s + b);
      }
    }
  }
}

template <typename T, int V, int kM>
void launch_bucket(const T* xg, const T* w, int64_t w_stride, const T* bias, T* y, int M, int64_t K, int64_t N,
                   cudaStream_t stream) {
  using C = GemvConfig<kM>;
  constexpr int kStep = 32 * V;
  // Largest k tile (a multiple of one warp-wide step) whose M rows fit in kTileBytes; no larger than k.
  int64_t kt = kTileBytes / (static_cast<int64_t>(M) * sizeof(T)) / kStep * kStep;
  const int64_t k_round = ceil_div(K > 0 ? K : 1, kStep) * kStep;
  if (kt > k_round) kt = k_round;
  if (kt < kStep) kt = kStep;
  const size_t smem = static_cast<size_t>(M) * kt * sizeof(T);
  const int64_t blocks = ceil_div(N, C::kRowsPerBlock);
  index_select_gemv_kernel<T, V, kM><<<static_cast<unsigned>(blocks), C::kWarps * 32, smem, stream>>>(
      xg, w, w_stride, bias, y, M, K, N, static_cast<int>(kt));
}

template <typename T, int V>
void launch_vec(const T* xg, const T* w, int64_t w_stride, const T* bias, T* y, int M, int64_t K, int64_t N,
                cudaStream_t stream) {
  static_assert(kGemvMaxTokens == 1, "add a token bucket (launch_bucket<T, V, kM>) for each new token count");
  launch_bucket<T, V, 1>(xg, w, w_stride, bias, y, M, K, N, stream);
}

}  // namespace

template <typename T>
cudaError_t launch_index_select_gemv(const T* x, int64_t x_stride, const int64_t* idx, const T* w,
                                     int64_t w_stride, const T* bias, T* y, int64_t m_tokens, int64_t k,
                                     int64_t n_out, T* x_gathered, cudaStream_t stream) {
  if (m_tokens <= 0 || n_out <= 0) return cudaSuccess;
  if (m_tokens > kGemvMaxTokens || ceil_div(n_out, 8) >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  constexpr int V = kVec16<T>;
  const int M = static_cast<int>(m_tokens);
  if (k > 0) {
    const cudaError_t err = launch_gather_columns<T>(x, x_stride, idx, x_gathered, m_tokens, k, stream);
    if (err != cudaSuccess) return err;
  }
  const bool vec = aligned16(w) && (w_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0 && k % V == 0 &&
                   aligned16(x_gathered);
  if (vec) launch_vec<T, V>(x_gathered, w, w_stride, bias, y, M, k, n_out, stream);
  else launch_vec<T, 1>(x_gathered, w, w_stride, bias, y, M, k, n_out, stream);
  return cudaGetLastError();
}

#define DIP_EXT_INSTANTIATE(T)                                                                                    \
  template cudaError_t launch_index_select_gemv<T>(const T*, int64_t, const int64_t*, const T*, int64_t, const T*, \
                                                   T*, int64_t, int64_t, int64_t, T*, cudaStream_t);
DIP_EXT_FOR_EACH_DTYPE(DIP_EXT_INSTANTIATE)
#undef DIP_EXT_INSTANTIATE

}  // namespace dip_ext::cuda
