// residual[..., idx] += y in place on the CPU. idx is unique, so rows are independent and no atomics are
// needed; the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "cpu/common.h"
#include "ops.h"

namespace dip_ext {

namespace {

// rows_y [R, k] (unit inner stride) added into rows_r [R, d] at columns idx.
void scatter_rows(at::Tensor& rows_r, const at::Tensor& rows_y, const at::Tensor& idx) {
  const int64_t R = rows_r.size(0), k = idx.numel(), rs = rows_r.stride(0), ys = rows_y.stride(0);
  if (R == 0 || k == 0) return;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  if (const auto plan = cpu::avx512_plan(ip, k, rows_r.size(1))) {
    at::parallel_for(0, R, cpu::grain_rows(k), [&](int64_t r0, int64_t r1) {
      cpu::avx512_scatter_add_rows(rows_r.scalar_type(), rows_r.mutable_data_ptr(), rs, rows_y.const_data_ptr(), ys,
                                   r0, r1, *plan);
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows_r.scalar_type(), "dip_ext_scatter_add", [&] {
    scalar_t* rp = rows_r.mutable_data_ptr<scalar_t>();
    const scalar_t* yp = rows_y.const_data_ptr<scalar_t>();
    at::parallel_for(0, R, cpu::grain_rows(k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* rr = rp + r * rs;
        const scalar_t* yr = yp + r * ys;
        for (int64_t j = 0; j < k; ++j) rr[ip[j]] = static_cast<scalar_t>(static_cast<float>(rr[ip[j]]) + static_cast<float>(yr[j]));
      }
    });
  });
}

}  // namespace

at::Tensor& scatter_add_cpu(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y, bool check_idx) {
  constexpr const char* op = "scatter_add_";
  const at::Tensor ix = check_scatter_add_args(op, residual, idx, y, check_idx);
  const at::Tensor rows_y = as_rows(y);
  return update_residual_rows(residual, [&](at::Tensor& rows) { scatter_rows(rows, rows_y, ix); });
}

at::Tensor& gemm_scatter_add_cpu(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& x,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 bool check_idx) {
  constexpr const char* op = "gemm_scatter_add_";
  const at::Tensor ix = check_gemm_scatter_add_args(op, residual, idx, x, weight, bias, check_idx);
  if (ix.numel() == 0) return residual;
  const at::Tensor y = linear_rows(as_rows(x), weight, bias);
  return update_residual_rows(residual, [&](at::Tensor& rows) { scatter_rows(rows, y, ix); });
}

}  // namespace dip_ext
