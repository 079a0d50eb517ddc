// CUDA implementations of the dip_ext ops: the same argument checks as the CPU glue (checks.h), then the
// torch-free launchers of csrc/cuda/*.cu on the current stream. GEMMs go to cuBLAS through at::mm on
// compacted contiguous operands. Nothing here synchronizes with the host unless check_idx asks for the
// index scan, so the check_idx=False calls are capturable by CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>

#include "checks.h"
#include "kernels.h"  // csrc/cuda/kernels.h, beside this file
#include "ops.h"

namespace dip_ext {
namespace {

// Calls f(std::type_identity<T>{}) with the CUDA element type of `dtype` (checks.h already limited it).
template <typename F>
void dispatch_dtype(const char* op, at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(std::type_identity<float>{}); break;
    case at::kHalf: f(std::type_identity<__half>{}); break;
    case at::kBFloat16: f(std::type_identity<__nv_bfloat16>{}); break;
    default: TORCH_CHECK_TYPE(false, "dip_ext.", op, ": unsupported dtype ", dtype, " on CUDA");
  }
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
const T* cptr_or_null(const at::Tensor& t) {
  return t.defined() ? cptr<T>(t) : nullptr;
}
template <typename T>
T* mptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "dip_ext.", op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor norm_gather(const char* op, bool layer_norm, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps, bool check_idx) {
  const at::Tensor ix = check_norm_gather_args(op, x, weight, bias, idx, eps, check_idx);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = as_rows(x);
  const int64_t R = rows.size(0), d = rows.size(1), k = ix.numel();
  at::Tensor out = at::empty({R, k}, x.options());
  if (R > 0 && k > 0) {
    const at::Tensor w = weight.contiguous();
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    dispatch_dtype(op, x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      check_launch(op, cuda::launch_norm_gather<T>(cptr<T>(rows), rows.stride(0), cptr<T>(w), cptr_or_null<T>(b),
                                                   ix.const_data_ptr<int64_t>(), mptr<T>(out), R, d, k,
                                                   static_cast<float>(eps), layer_norm,
                                                   c10::cuda::getCurrentCUDAStream()));
    });
  }
  return out.view(with_last_dim(x, k));
}

// rows_y [R, k] (unit inner stride) added into the row view rows_r [R, d] at columns idx.
void scatter_rows(const char* op, at::Tensor& rows_r, const at::Tensor& rows_y, const at::Tensor& idx) {
  const int64_t R = rows_r.size(0), k = idx.numel();
  if (R == 0 || k == 0) return;
  dispatch_dtype(op, rows_r.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(op, cuda::launch_scatter_add<T>(mptr<T>(rows_r), rows_r.stride(0), cptr<T>(rows_y),
                                                 rows_y.stride(0), idx.const_data_ptr<int64_t>(), R, k,
                                                 c10::cuda::getCurrentCUDAStream()));
  });
}

}  // namespace

at::Tensor rms_norm_gather_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx, double eps,
                                bool check_idx) {
  return norm_gather("rms_norm_gather", false, x, weight, std::nullopt, idx, eps, check_idx);
}

at::Tensor layer_norm_gather_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                                  bool check_idx) {
  return norm_gather("layer_norm_gather", true, x, weight, bias, idx, eps, check_idx);
}

at::Tensor index_select_gemm_cuda(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, bool check_idx) {
  constexpr const char* op = "index_select_gemm";
  check_activation(op, "x", x);
  const at::Tensor ix = checked_index(op, idx, x.size(-1), /*unique=*/false, check_idx, x);
  check_linear(op, x, weight, bias, ix.numel());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = as_rows(x);
  const int64_t R = rows.size(0), K = ix.numel(), N = weight.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (R >= 1 && R <= cuda::kGemvMaxTokens) {
    // Few tokens: weight bytes dominate; one kernel reads x[:, idx] directly while streaming the weight.
    const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
    const at::Tensor b = bias ? bias->contiguous() : at::Tensor();
    at::Tensor out = at::empty({R, N}, x.options());
    dispatch_dtype(op, x.scalar_type(), [&](auto tag) {
      using T = typename decltype(tag)::type;
      check_launch(op, cuda::launch_index_select_gemv<T>(cptr<T>(rows), rows.stride(0), ix.const_data_ptr<int64_t>(),
                                                         cptr<T>(w), w.stride(0), cptr_or_null<T>(b), mptr<T>(out),
                                                         R, K, N, stream));
    });
    return out.view(with_last_dim(x, N));
  }
  // Many tokens: compact the operand once, then cuBLAS at full speed.
  at::Tensor gathered = at::empty({R, K}, x.options());
  dispatch_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(op, cuda::launch_gather_columns<T>(cptr<T>(rows), rows.stride(0), ix.const_data_ptr<int64_t>(),
                                                    mptr<T>(gathered), R, K, stream));
  });
  return linear_rows(gathered, weight, bias).view(with_last_dim(x, N));
}

at::Tensor& scatter_add_cuda(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y, bool check_idx) {
  constexpr const char* op = "scatter_add_";
  const at::Tensor ix = check_scatter_add_args(op, residual, idx, y, check_idx);
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor rows_y = as_rows(y);
  return update_residual_rows(residual, [&](at::Tensor& rows) { scatter_rows(op, rows, rows_y, ix); });
}

at::Tensor& gemm_scatter_add_cuda(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& x,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool check_idx) {
  constexpr const char* op = "gemm_scatter_add_";
  const at::Tensor ix = check_gemm_scatter_add_args(op, residual, idx, x, weight, bias, check_idx);
  if (ix.numel() == 0) return residual;
  const c10::cuda::CUDAGuard guard(residual.device());
  const at::Tensor y = linear_rows(as_rows(x), weight, bias);
  return update_residual_rows(residual, [&](at::Tensor& rows) { scatter_rows(op, rows, y, ix); });
}

void calibration_stats_cuda(const at::Tensor& x, at::Tensor& sum, at::Tensor& sumsq,
                            const std::optional<at::Tensor>& gram) {
  constexpr const char* op = "calibration_stats_";
  check_stats_args(op, x, sum, sumsq, gram);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = as_rows(x);
  const int64_t R = rows.size(0), d = rows.size(1);
  if (R == 0 || d == 0) return;
  at::Tensor partial = at::empty({2 * cuda::stats_chunks(R) * d}, x.options().dtype(at::kFloat));
  dispatch_dtype(op, x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    check_launch(op, cuda::launch_calibration_stats<T>(cptr<T>(rows), rows.stride(0), R, d, mptr<float>(partial),
                                                       mptr<double>(sum), mptr<double>(sumsq),
                                                       c10::cuda::getCurrentCUDAStream()));
  });
  if (gram) {
    // X^T X in fp32 on cuBLAS (TF32 only if the user enabled it globally), accumulated into the fp64 gram.
    const at::Tensor xf = rows.to(at::kFloat);
    gram->add_(at::mm(xf.t(), xf));
  }
}

}  // namespace dip_ext
