// Fused norm + column gather on the CPU: statistics over the full row, only the kept columns written.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"
#include "cpu/common.h"
#include "ops.h"

namespace dip_ext {
namespace {

// Eight independent partial sums let the compiler vectorize the reduction without -ffast-math.
template <typename T, typename F>
inline float row_reduce(const T* x, int64_t d, F f) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += f(static_cast<float>(x[i + l]));
  float tail = 0;
  for (; i < d; ++i) tail += f(static_cast<float>(x[i]));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

template <typename T, bool kLayerNorm>
void norm_gather_rows(const at::Tensor& rows, const at::Tensor& weight, const at::Tensor* bias,
                      const at::Tensor& idx, float eps, at::Tensor& out) {
  const int64_t R = rows.size(0), d = rows.size(1), k = idx.numel(), rs = rows.stride(0);
  const T* xp = rows.const_data_ptr<T>();
  const T* wp = weight.const_data_ptr<T>();
  const T* bp = bias ? bias->const_data_ptr<T>() : nullptr;
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, R, cpu::grain_rows(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = xp + r * rs;
      float mean = 0.f, rstd;
      if constexpr (kLayerNorm) {
        mean = row_reduce(xr, d, [](float v) { return v; }) / static_cast<float>(d);
        const float var = row_reduce(xr, d, [mean](float v) { return (v - mean) * (v - mean); }) / d;
        rstd = 1.f / std::sqrt(var + eps);
      } else {
        rstd = 1.f / std::sqrt(row_reduce(xr, d, [](float v) { return v * v; }) / d + eps);
      }
      T* orow = op + r * k;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t c = ip[j];
        float v = (static_cast<float>(xr[c]) - mean) * rstd * static_cast<float>(wp[c]);
        if constexpr (kLayerNorm) {
          if (bp) v += static_cast<float>(bp[c]);
        }
        orow[j] = static_cast<T>(v);
      }
    }
  });
}

at::Tensor norm_gather(const char* op, bool layer_norm, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                       bool check_idx) {
  const at::Tensor ix = check_norm_gather_args(op, x, weight, bias, idx, eps, check_idx);
  const int64_t d = x.size(-1);
  const at::Tensor rows = as_rows(x);
  at::Tensor out = at::empty({rows.size(0), ix.numel()}, x.options());
  if (rows.size(0) > 0 && ix.numel() > 0) {
    const at::Tensor w = weight.contiguous();
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    if (const auto plan = cpu::avx512_plan(ix.const_data_ptr<int64_t>(), ix.numel(), d)) {
      at::parallel_for(0, rows.size(0), cpu::grain_rows(d), [&](int64_t r0, int64_t r1) {
        cpu::avx512_norm_gather_rows(x.scalar_type(), layer_norm, rows.const_data_ptr(), rows.stride(0),
                                     w.const_data_ptr(), bias ? b.const_data_ptr() : nullptr,
                                     static_cast<float>(eps), out.mutable_data_ptr(), ix.numel(), r0, r1, *plan);
      });
      return out.view(with_last_dim(x, ix.numel()));
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dip_ext_norm_gather", [&] {
      if (layer_norm)
        norm_gather_rows<scalar_t, true>(rows, w, bias ? &b : nullptr, ix, static_cast<float>(eps), out);
      else
        norm_gather_rows<scalar_t, false>(rows, w, nullptr, ix, static_cast<float>(eps), out);
    });
  }
  return out.view(with_last_dim(x, ix.numel()));
}

}  // namespace

at::Tensor rms_norm_gather_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, double eps,
                               bool check_idx) {
  return norm_gather("rms_norm_gather", false, x, weight, std::nullopt, idx, eps, check_idx);
}

at::Tensor layer_norm_gather_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                                 bool check_idx) {
  return norm_gather("layer_norm_gather", true, x, weight, bias, idx, eps, check_idx);
}

}  // namespace dip_ext
