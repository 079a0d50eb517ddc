// Operator schemas (the one place they are written) and the CPU / CUDA implementations behind them.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(dip_ext, m) {
  m.def("rms_norm_gather(Tensor x, Tensor weight, Tensor idx, float eps, bool check_idx=True) -> Tensor");
  m.def("layer_norm_gather(Tensor x, Tensor weight, Tensor? bias, Tensor idx, float eps, "
        "bool check_idx=True) -> Tensor");
  m.def("index_select_gemm(Tensor x, Tensor idx, Tensor weight, Tensor? bias=None, bool check_idx=True) -> Tensor");
  // The in-place ops return nothing: torch.compile cannot functionalize a custom op whose output aliases
  // an input (Tensor(a!) -> Tensor(a!)). The Python face (dip_ext.ops) returns residual.
  m.def("scatter_add_(Tensor(a!) residual, Tensor idx, Tensor y, bool check_idx=True) -> ()");
  m.def("gemm_scatter_add_(Tensor(a!) residual, Tensor idx, Tensor x, Tensor weight, Tensor? bias=None, "
        "bool check_idx=True) -> ()");
  m.def("calibration_stats_(Tensor x, Tensor(a!) sum, Tensor(b!) sumsq, Tensor(c!)? gram=None) -> ()");
}

namespace {
// Adapters from the C++ functions (which return the residual, handy in C++) to the void schemas above.
template <auto F>
void scatter_void(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y, bool check_idx) {
  F(residual, idx, y, check_idx);
}
template <auto F>
void gemm_scatter_void(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, bool check_idx) {
  F(residual, idx, x, weight, bias, check_idx);
}
}  // namespace

TORCH_LIBRARY_IMPL(dip_ext, CPU, m) {
  m.impl("rms_norm_gather", &dip_ext::rms_norm_gather_cpu);
  m.impl("layer_norm_gather", &dip_ext::layer_norm_gather_cpu);
  m.impl("index_select_gemm", &dip_ext::index_select_gemm_cpu);
  m.impl("scatter_add_", &scatter_void<&dip_ext::scatter_add_cpu>);
  m.impl("gemm_scatter_add_", &gemm_scatter_void<&dip_ext::gemm_scatter_add_cpu>);
  m.impl("calibration_stats_", &dip_ext::calibration_stats_cpu);
}

#ifdef DIP_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(dip_ext, CUDA, m) {
  m.impl("rms_norm_gather", &dip_ext::rms_norm_gather_cuda);
  m.impl("layer_norm_gather", &dip_ext::layer_norm_gather_cuda);
  m.impl("index_select_gemm", &dip_ext::index_select_gemm_cuda);
  m.impl("scatter_add_", &scatter_void<&dip_ext::scatter_add_cuda>);
  m.impl("gemm_scatter_add_", &gemm_scatter_void<&dip_ext::gemm_scatter_add_cuda>);
  m.impl("calibration_stats_", &dip_ext::calibration_stats_cuda);
}
#endif

// Output RMSNorm folded into the residual update (in place, returns nothing like the other in-place ops).
TORCH_LIBRARY_FRAGMENT(dip_ext, m) {
  m.def("rms_norm_scatter_add_(Tensor(a!) residual, Tensor idx, Tensor y, Tensor weight, float eps, "
        "bool unit_offset=False, bool check_idx=True) -> ()");
}

namespace {
template <auto F>
void rms_norm_scatter_void(at::Tensor& residual, const at::Tensor& idx, const at::Tensor& y, const at::Tensor& weight,
                           double eps, bool unit_offset, bool check_idx) {
  F(residual, idx, y, weight, eps, unit_offset, check_idx);
}
}  // namespace

TORCH_LIBRARY_IMPL(dip_ext, CPU, m) {
  m.impl("rms_norm_scatter_add_", &rms_norm_scatter_void<&dip_ext::rms_norm_scatter_add_cpu>);
}

#ifdef DIP_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(dip_ext, CUDA, m) {
  m.impl("rms_norm_scatter_add_", &rms_norm_scatter_void<&dip_ext::rms_norm_scatter_add_cuda>);
}
#endif
