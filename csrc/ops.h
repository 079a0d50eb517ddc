// dip_ext operator declarations: one place for the C++ signatures behind the schemas in registration.cpp.
//
// Every op has a CPU implementation (csrc/cpu) and, in CUDA builds, a CUDA one (csrc/cuda/glue.cpp on top
// of the torch-free kernels in csrc/cuda/*.cu). Both call the same argument checks (checks.h) first.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace dip_ext {

// y = rms_norm(x over its full last dim d) * weight, then only the columns idx.
// x [..., d] (2-D or 3-D), weight [d], idx [k] int64/int32 -> y [..., k] (x's dtype).
at::Tensor rms_norm_gather_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx,
                               double eps, bool check_idx);
at::Tensor layer_norm_gather_cpu(const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                                 bool check_idx);
// y = x[..., idx] @ weight^T (+ bias). x [..., d], weight [n, k] with k = len(idx) -> y [..., n].
at::Tensor index_select_gemm_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, bool check_idx);
// residual[..., idx] += y, in place. residual [..., d], y [..., k]; idx unique.
at::Tensor& scatter_add_cpu(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y, bool check_idx);
// residual[..., idx] += x @ weight^T (+ bias), in place. x [..., k_in], weight [len(idx), k_in].
at::Tensor& gemm_scatter_add_cpu(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& x,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 bool check_idx);
// Accumulates per-channel sum and sum of squares (fp64, [d]) and optionally gram += X^T X (fp64, [d, d])
// over all leading dims of x [..., d]. Deterministic: fixed row chunks, fp32 partials, fp64 final sum. The
// Gram product is fp64 on the CPU and an fp32 GEMM with TF32 disabled on CUDA, whatever torch's matmul
// precision settings. Never reads device memory on the host.
void calibration_stats_cpu(const at::Tensor& x, at::Tensor& sum, at::Tensor& sumsq,
                           const std::optional<at::Tensor>& gram);

#ifdef DIP_EXT_WITH_CUDA
at::Tensor rms_norm_gather_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& idx,
                                double eps, bool check_idx);
at::Tensor layer_norm_gather_cuda(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                                  bool check_idx);
at::Tensor index_select_gemm_cuda(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, bool check_idx);
at::Tensor& scatter_add_cuda(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y, bool check_idx);
at::Tensor& gemm_scatter_add_cuda(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& x,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool check_idx);
void calibration_stats_cuda(const at::Tensor& x, at::Tensor& sum, at::Tensor& sumsq,
                            const std::optional<at::Tensor>& gram);
#endif

}  // namespace dip_ext

namespace dip_ext {
// Output RMSNorm + scatter-add (a block's output y is zero outside idx, so its RMS over the full width d needs
// only the kept entries): residual[..., idx[j]] += y[..., j] * rsqrt(sum_j y^2 / d + eps) * (o + weight[idx[j]]),
// o = 1 when unit_offset (Gemma's (1 + w) scale) else 0; statistics in fp32, the normalised value rounded to
// the dtype before the add. residual [..., d], y [..., k], weight [d]; idx unique.
at::Tensor& rms_norm_scatter_add_cpu(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y,
                                     const at::Tensor& weight, double eps, bool unit_offset, bool check_idx);
#ifdef DIP_EXT_WITH_CUDA
at::Tensor& rms_norm_scatter_add_cuda(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y,
                                      const at::Tensor& weight, double eps, bool unit_offset, bool check_idx);
#endif
}  // namespace dip_ext
