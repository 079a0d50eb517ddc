// Per-channel calibration statistics on the CPU, deterministic whatever the thread count: rows are cut into
// fixed chunks, each chunk sums in fp32, the chunk partials are added in order in fp64. The optional Gram
// matrix is an fp64 GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "ops.h"

namespace dip_ext {

namespace {
constexpr int64_t kChunkRows = 256;
}

void calibration_stats_cpu(const at::Tensor& x, at::Tensor& sum, at::Tensor& sumsq,
                           const std::optional<at::Tensor>& gram) {
  constexpr const char* op = "calibration_stats_";
  check_stats_args(op, x, sum, sumsq, gram);
  const at::Tensor rows = as_rows(x);
  const int64_t R = rows.size(0), d = rows.size(1), rs = rows.stride(0);
  if (R == 0 || d == 0) return;
  const int64_t chunks = (R + kChunkRows - 1) / kChunkRows;
  at::Tensor partial = at::empty({2, chunks, d}, x.options().dtype(at::kFloat));
  float* ps = partial.mutable_data_ptr<float>();
  float* pq = ps + chunks * d;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dip_ext_calibration_stats", [&] {
    const scalar_t* xp = rows.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* s = ps + c * d;
        float* q = pq + c * d;
        std::fill(s, s + d, 0.f);
        std::fill(q, q + d, 0.f);
        const int64_t r_end = std::min(R, (c + 1) * kChunkRows);
        for (int64_t r = c * kChunkRows; r < r_end; ++r) {
          const scalar_t* xr = xp + r * rs;
          for (int64_t j = 0; j < d; ++j) {
            const float v = static_cast<float>(xr[j]);
            s[j] += v;
            q[j] += v * v;
          }
        }
      }
    });
  });
  double* sp = sum.mutable_data_ptr<double>();
  double* qp = sumsq.mutable_data_ptr<double>();
  at::parallel_for(0, d, 256, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      double s = 0, q = 0;
      for (int64_t c = 0; c < chunks; ++c) {
        s += ps[c * d + j];
        q += pq[c * d + j];
      }
      sp[j] += s;
      qp[j] += q;
    }
  });
  if (gram) {
    // X^T X as an fp64 GEMM straight into the fp64 gram: exact to fp64 rounding whatever torch's float32
    // matmul precision says (with "medium", oneDNN may run fp32 GEMMs in bf16 on CPUs that have it).
    const at::Tensor xd = rows.to(at::kDouble);
    gram->addmm_(xd.t(), xd);
  }
}

}  // namespace dip_ext
