// Small helpers shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/avx512.h"

namespace dip_ext::cpu {

// Rows per parallel task: enough work per task to hide the threading overhead.
inline int64_t grain_rows(int64_t cols) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(cols, 1)); }

// out[r, j] = rows[r, idx[j]] for a [R, d] row view with unit inner stride; returns [R, k] contiguous.
inline at::Tensor gather_columns(const at::Tensor& rows, const at::Tensor& idx) {
  const int64_t R = rows.size(0), k = idx.numel(), rs = rows.stride(0);
  at::Tensor out = at::empty({R, k}, rows.options());
  if (R == 0 || k == 0) return out;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  if (const auto plan = avx512_plan(ip, k, rows.size(1))) {
    at::parallel_for(0, R, grain_rows(k), [&](int64_t r0, int64_t r1) {
      avx512_gather_rows(rows.scalar_type(), rows.const_data_ptr(), rs, out.mutable_data_ptr(), k, r0, r1, *plan);
    });
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "dip_ext_gather_columns", [&] {
    const scalar_t* xp = rows.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R, grain_rows(k), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * rs;
        scalar_t* orow = op + r * k;
        for (int64_t j = 0; j < k; ++j) orow[j] = xr[ip[j]];
      }
    });
  });
  return out;
}

}  // namespace dip_ext::cpu
