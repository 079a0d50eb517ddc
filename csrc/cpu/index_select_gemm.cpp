// x[..., idx] @ W^T on the CPU: a parallel column gather into a compact buffer, then MKL/oneDNN via at::mm.
#include <ATen/ATen.h>

#include "checks.h"
#include "cpu/common.h"
#include "ops.h"

namespace dip_ext {

at::Tensor index_select_gemm_cpu(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& bias, bool check_idx) {
  constexpr const char* op = "index_select_gemm";
  check_activation(op, "x", x);
  const at::Tensor ix = checked_index(op, idx, x.size(-1), /*unique=*/false, check_idx, x);
  check_linear(op, x, weight, bias, ix.numel());
  const at::Tensor gathered = cpu::gather_columns(as_rows(x), ix);
  return linear_rows(gathered, weight, bias).view(with_last_dim(x, weight.size(0)));
}

}  // namespace dip_ext
