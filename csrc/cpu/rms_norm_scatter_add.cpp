// Output RMSNorm folded into the residual update on the CPU (Gemma's sandwich norms under DISP): a block's
// output y is zero outside its output set idx, so its RMS over the full width d needs only the kept entries.
//   residual[r, idx[j]] += round(y[r, j] * rsqrt(sum_j y[r, j]^2 / d + eps) * (offset + weight[idx[j]]))
// Statistics in fp32; the normalised value is rounded to the dtype before the add, as the unfused model does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"
#include "cpu/common.h"
#include "ops.h"

namespace dip_ext {
namespace {

template <typename T>
float sum_squares(const T* y, int64_t k) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= k; i += 8)
    for (int l = 0; l < 8; ++l) {
      const float v = static_cast<float>(y[i + l]);
      acc[l] += v * v;
    }
  float tail = 0;
  for (; i < k; ++i) tail += static_cast<float>(y[i]) * static_cast<float>(y[i]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

template <typename T>
void rms_norm_scatter_rows(at::Tensor& rows_r, const at::Tensor& rows_y, const at::Tensor& weight,
                           const at::Tensor& idx, int64_t d, float eps, float offset) {
  const int64_t R = rows_r.size(0), k = idx.numel(), rs = rows_r.stride(0), ys = rows_y.stride(0);
  T* rp = rows_r.mutable_data_ptr<T>();
  const T* yp = rows_y.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const float inv_d = 1.f / static_cast<float>(d);
  at::parallel_for(0, R, cpu::grain_rows(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* yr = yp + r * ys;
      T* rr = rp + r * rs;
      const float rstd = 1.f / std::sqrt(sum_squares(yr, k) * inv_d + eps);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t c = ip[j];
        const T v = static_cast<T>(static_cast<float>(yr[j]) * rstd * (offset + static_cast<float>(wp[c])));
        rr[c] = static_cast<T>(static_cast<float>(rr[c]) + static_cast<float>(v));
      }
    }
  });
}

}  // namespace

at::Tensor& rms_norm_scatter_add_cpu(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y,
                                     const at::Tensor& weight, double eps, bool unit_offset, bool check_idx) {
  constexpr const char* op = "rms_norm_scatter_add_";
  const at::Tensor ix = check_rms_norm_scatter_add_args(op, residual, idx, y, weight, eps, check_idx);
  const int64_t d = residual.size(-1);
  const at::Tensor rows_y = as_rows(y);
  if (rows_y.size(0) == 0 || ix.numel() == 0) return residual;
  const at::Tensor w = weight.contiguous();
  return update_residual_rows(residual, [&](at::Tensor& rows) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "dip_ext_rms_norm_scatter_add", [&] {
      rms_norm_scatter_rows<scalar_t>(rows, rows_y, w, ix, d, static_cast<float>(eps), unit_offset ? 1.f : 0.f);
    });
  });
}

}  // namespace dip_ext
