// The module's non-tensor face (pybind11). Tensor ops are reached through torch.ops.dip_ext.*; loading
// this module is what registers them.
#include <pybind11/pybind11.h>

#ifndef DIP_EXT_VERSION
#define DIP_EXT_VERSION "unknown"
#endif
#ifndef DIP_EXT_TORCH_VERSION
#define DIP_EXT_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["version"] = DIP_EXT_VERSION;
  info["torch_version"] = DIP_EXT_TORCH_VERSION;
#ifdef DIP_EXT_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = py::str(DIP_EXT_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::none();
#endif
#ifdef DIP_EXT_OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cxx_standard"] = static_cast<long>(__cplusplus);
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "dip_ext compiled core: DISP-LLM kernels registered as torch.ops.dip_ext.*";
  m.def("build_info", &build_info, "Version, torch version built against, CUDA kernels and archs, OpenMP.");
}
