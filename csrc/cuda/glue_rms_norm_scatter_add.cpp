// CUDA glue of rms_norm_scatter_add_: the shared argument checks (checks.h), then the torch-free launcher of
// csrc/cuda/rms_norm_scatter_add.cu on the current stream. No host sync unless check_idx asks for the index scan.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "kernels.h"
#include "ops.h"

namespace dip_ext {
namespace {

template <typename T>
void launch(const char* op, at::Tensor& rows, const at::Tensor& rows_y, const at::Tensor& w, const at::Tensor& ix,
            int64_t d, double eps, bool unit_offset) {
  const cudaError_t err = cuda::launch_rms_norm_scatter_add<T>(
      reinterpret_cast<T*>(rows.mutable_data_ptr()), rows.stride(0),
      reinterpret_cast<const T*>(rows_y.const_data_ptr()), rows_y.stride(0),
      reinterpret_cast<const T*>(w.const_data_ptr()), ix.const_data_ptr<int64_t>(), rows.size(0), d, ix.numel(),
      static_cast<float>(eps), unit_offset ? 1.f : 0.f, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dip_ext.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

at::Tensor& rms_norm_scatter_add_cuda(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y,
                                      const at::Tensor& weight, double eps, bool unit_offset, bool check_idx) {
  constexpr const char* op = "rms_norm_scatter_add_";
  const at::Tensor ix = check_rms_norm_scatter_add_args(op, residual, idx, y, weight, eps, check_idx);
  const c10::cuda::CUDAGuard guard(residual.device());
  const int64_t d = residual.size(-1);
  const at::Tensor rows_y = as_rows(y);
  if (rows_y.size(0) == 0 || ix.numel() == 0) return residual;
  const at::Tensor w = weight.contiguous();
  return update_residual_rows(residual, [&](at::Tensor& rows) {
    switch (residual.scalar_type()) {
      case at::kFloat: launch<float>(op, rows, rows_y, w, ix, d, eps, unit_offset); break;
      case at::kHalf: launch<__half>(op, rows, rows_y, w, ix, d, eps, unit_offset); break;
      case at::kBFloat16: launch<__nv_bfloat16>(op, rows, rows_y, w, ix, d, eps, unit_offset); break;
      default: TORCH_CHECK_TYPE(false, "dip_ext.", op, ": unsupported dtype ", residual.scalar_type(), " on CUDA");
    }
  });
}

}  // namespace dip_ext
