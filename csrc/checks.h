// Argument checks shared by the CPU and CUDA glue: every op validates here before any kernel runs, so
// bad input becomes a Python ValueError / IndexError / TypeError naming the op, never a crash.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace dip_ext {

// x must be fp32 / fp16 / bf16 with 2 or 3 dims ([tokens, d] or [batch, seq, d]).
void check_activation(const char* op, const char* name, const at::Tensor& x);
void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b);
void check_same_device(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                       const at::Tensor& b);
// A 1-D vector of exactly `size` elements (norm weight / bias, linear bias).
void check_vector(const char* op, const char* name, const at::Tensor& v, int64_t size);

// idx must be a 1-D int64/int32 tensor on `device`. With check_values, every entry must lie in [0, limit)
// and (when unique) appear once; that reads idx on the host (a sync on CUDA), so hot paths that
// validated their index sets once pass check_values = false. A host read is impossible while the current
// stream captures a CUDA graph: check_values there is refused with a ValueError naming the op (before any
// sync, so the capture stays valid). Returns a contiguous int64 copy or view.
at::Tensor checked_index(const char* op, const at::Tensor& idx, int64_t limit, bool unique, bool check_values,
                         const at::Tensor& like);

// Whether the current stream of a (non-CPU) device is capturing a CUDA graph. The CUDA glue installs the
// query when the extension loads; without it (CPU-only builds) nothing is ever capturing.
using CaptureQuery = bool (*)(const at::Device& device);
void set_capture_query(CaptureQuery query);

// Memory-overlap checks of the in-place ops (like torch's index_add_): a written tensor whose elements share
// memory (stride 0, e.g. expand()) is refused, and so is an input that shares memory with a written tensor
// (the same tensor, a view of it, or any tensor of its storage whose address range meets it). ValueError.
void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& t);
void check_no_overlap(const char* op, const char* out_name, const at::Tensor& out, const char* in_name,
                      const at::Tensor& in);

// t viewed as [rows, t.size(-1)] with unit stride in the last dim; copies only when no such view exists.
at::Tensor as_rows(const at::Tensor& t);

// weight [out, in_features] (and bias [out]) on x's device with x's dtype.
void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t in_features);
// residual [..., d] and y [..., k]: same dtype, device and leading (token) dims; residual without internal
// overlap and y not sharing memory with it.
void check_residual_update(const char* op, const at::Tensor& residual, const at::Tensor& y, const char* y_name);
// sum / sumsq float64 [d] and gram float64 [d, d] matching x's width and device; the three outputs share no
// memory with each other or with x.
void check_stats_args(const char* op, const at::Tensor& x, const at::Tensor& sum, const at::Tensor& sumsq,
                      const std::optional<at::Tensor>& gram);

// Whole-op argument checks shared by the CPU and CUDA glue; each returns the checked int64 idx.
// norm + gather: x [..., d], weight [d], bias [d] or none (same dtype / device), eps >= 0, idx over [0, d).
at::Tensor check_norm_gather_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                                  bool check_idx);
// scatter_add_: residual [..., d], y [..., len(idx)], unique idx over [0, d).
at::Tensor check_scatter_add_args(const char* op, const at::Tensor& residual, const at::Tensor& idx,
                                  const at::Tensor& y, bool check_idx);
// gemm_scatter_add_: residual [..., d], x [..., k_in], weight [len(idx), k_in], bias [len(idx)], unique idx.
at::Tensor check_gemm_scatter_add_args(const char* op, const at::Tensor& residual, const at::Tensor& idx,
                                       const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, bool check_idx);

// Shared glue helpers.
// rows [R, in] @ weight^T (+ bias) through the vendor GEMM (MKL/oneDNN on CPU, cuBLAS on CUDA).
at::Tensor linear_rows(const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// The shape of x with the last dim replaced by `last`.
std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last);

// Runs update(rows) on a [rows, d] view of residual; copies back only when no in-place view existed.
template <typename F>
at::Tensor& update_residual_rows(at::Tensor& residual, F&& update) {
  at::Tensor rows = as_rows(residual);
  update(rows);
  if (!rows.is_alias_of(residual)) residual.copy_(rows.view(residual.sizes()));
  return residual;
}

}  // namespace dip_ext

namespace dip_ext {
// rms_norm_scatter_add_: residual [..., d], y [..., len(idx)], weight [d] (residual's dtype / device),
// eps >= 0, unique idx over [0, d). Returns the checked int64 idx.
at::Tensor check_rms_norm_scatter_add_args(const char* op, const at::Tensor& residual, const at::Tensor& idx,
                                           const at::Tensor& y, const at::Tensor& weight, double eps,
                                           bool check_idx);
}  // namespace dip_ext
