#include "checks.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <atomic>
#include <utility>
#include <vector>

namespace dip_ext {

void check_activation(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.defined(), "dip_ext.", op, ": ", name, " is undefined");
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "dip_ext.", op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 3, "dip_ext.", op, ": ", name,
                    " must have 2 dims [tokens, d] or 3 dims [batch, seq, d], got shape ", x.sizes());
}

void check_same_dtype(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                      const at::Tensor& b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "dip_ext.", op, ": ", name_a, " (", a.scalar_type(),
                   ") and ", name_b, " (", b.scalar_type(), ") must have the same dtype");
}

void check_same_device(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                       const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "dip_ext.", op, ": ", name_a, " is on ", a.device(), " but ",
                    name_b, " is on ", b.device(), "; move them to one device");
}

void check_vector(const char* op, const char* name, const at::Tensor& v, int64_t size) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == size, "dip_ext.", op, ": ", name, " must have shape [", size,
                    "], got ", v.sizes());
}

namespace {

std::atomic<CaptureQuery>& capture_query() {
  static std::atomic<CaptureQuery> query{nullptr};
  return query;
}

// [first, last] byte addresses a strided tensor can touch (numel > 0, non-negative strides).
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t span = 0;
  for (int64_t i = 0; i < t.dim(); ++i) span += t.stride(i) * (t.size(i) - 1);
  const auto first = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {first, first + static_cast<uintptr_t>((span + 1) * t.element_size()) - 1};
}

}  // namespace

void set_capture_query(CaptureQuery query) { capture_query().store(query); }

void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "dip_ext.", op, ": ", name,
                    " has elements that share memory (stride 0, e.g. an expand()ed tensor; strides ", t.strides(),
                    "), so an in-place update would write them more than once; pass ", name, ".clone()");
}

void check_no_overlap(const char* op, const char* out_name, const at::Tensor& out, const char* in_name,
                      const at::Tensor& in) {
  if (!out.defined() || !in.defined() || out.numel() == 0 || in.numel() == 0) return;
  if (!out.has_storage() || !in.has_storage()) return;
  const at::MemOverlapStatus status = at::get_overlap_status(out, in);
  bool overlap = status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  if (status == at::MemOverlapStatus::TooHard && out.storage().is_alias_of(in.storage())) {
    // Views of one storage that torch cannot decide (neither dense): refuse when their address ranges meet.
    const auto [a0, a1] = byte_range(out);
    const auto [b0, b1] = byte_range(in);
    overlap = a0 <= b1 && b0 <= a1;
  }
  TORCH_CHECK_VALUE(!overlap, "dip_ext.", op, ": ", in_name, " shares memory with ", out_name,
                    ", which the op writes in place (the result would depend on the order of the writes); pass ",
                    in_name, ".clone()");
}

at::Tensor checked_index(const char* op, const at::Tensor& idx, int64_t limit, bool unique, bool check_values,
                         const at::Tensor& like) {
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong || idx.scalar_type() == at::kInt, "dip_ext.", op,
                   ": idx must be int64 or int32, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.dim() == 1, "dip_ext.", op, ": idx must be 1-D, got shape ", idx.sizes());
  check_same_device(op, "idx", idx, "x", like);
  if (check_values && !idx.is_cpu()) {
    const CaptureQuery query = capture_query().load();
    TORCH_CHECK_VALUE(query == nullptr || !query(idx.device()), "dip_ext.", op,
                      ": check_idx=True reads idx on the host, which is not allowed while a CUDA graph is being "
                      "captured; validate the index set once before the capture (a call with check_idx=True) and "
                      "pass check_idx=False inside it");
  }
  at::Tensor out = idx.to(at::kLong).contiguous();
  if (check_values && out.numel() > 0) {
    const at::Tensor host = out.is_cpu() ? out : out.cpu();
    const int64_t* p = host.const_data_ptr<int64_t>();
    const int64_t n = host.numel();
    std::vector<bool> seen(unique ? static_cast<size_t>(limit) : 0, false);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t v = p[i];
      TORCH_CHECK_INDEX(v >= 0 && v < limit, "dip_ext.", op, ": idx[", i, "] = ", v,
                        " is out of range for a dimension of size ", limit);
      if (unique) {
        TORCH_CHECK_VALUE(!seen[v], "dip_ext.", op, ": idx has duplicate index ", v,
                          " (a scatter-add needs unique indices)");
        seen[v] = true;
      }
    }
  }
  return out;
}

at::Tensor as_rows(const at::Tensor& t) {
  const int64_t cols = t.size(-1);
  // explicit row count: reshape({-1, 0}) is ambiguous and throws for an empty index set
  const int64_t n_rows = cols > 0 ? t.numel() / cols : c10::multiply_integers(t.sizes().slice(0, t.dim() - 1));
  at::Tensor rows = t.reshape({n_rows, cols});
  if (cols > 0 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

void check_linear(const char* op, const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& bias, int64_t in_features) {
  check_same_device(op, "weight", weight, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  TORCH_CHECK_VALUE(weight.dim() == 2, "dip_ext.", op, ": weight must be 2-D [out, in], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == in_features, "dip_ext.", op, ": weight has ", weight.size(1),
                    " columns but the input has ", in_features, " features (len(idx) for a gather)");
  if (bias) {
    check_same_device(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "x", x);
    check_vector(op, "bias", *bias, weight.size(0));
  }
}

void check_residual_update(const char* op, const at::Tensor& residual, const at::Tensor& y, const char* y_name) {
  check_activation(op, "residual", residual);
  check_activation(op, y_name, y);
  check_same_device(op, y_name, y, "residual", residual);
  check_same_dtype(op, y_name, y, "residual", residual);
  TORCH_CHECK_VALUE(y.dim() == residual.dim() && y.sizes().slice(0, y.dim() - 1) ==
                                                     residual.sizes().slice(0, residual.dim() - 1),
                    "dip_ext.", op, ": ", y_name, " has shape ", y.sizes(), " but residual has shape ",
                    residual.sizes(), "; their leading (token) dims must match");
  check_no_internal_overlap(op, "residual", residual);
  check_no_overlap(op, "residual", residual, y_name, y);
}

void check_stats_args(const char* op, const at::Tensor& x, const at::Tensor& sum, const at::Tensor& sumsq,
                      const std::optional<at::Tensor>& gram) {
  check_activation(op, "x", x);
  const int64_t d = x.size(-1);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"sum", &sum}, {"sumsq", &sumsq}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kDouble, "dip_ext.", op, ": ", name, " must be float64");
    check_same_device(op, name, *t, "x", x);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == d && t->is_contiguous(), "dip_ext.", op,
                      ": the statistics have width ", t->dim() == 1 ? t->size(0) : -1,
                      " but x has width ", d, " (statistics fed a different width?)");
  }
  if (gram) {
    TORCH_CHECK_TYPE(gram->scalar_type() == at::kDouble, "dip_ext.", op, ": gram must be float64");
    check_same_device(op, "gram", *gram, "x", x);
    TORCH_CHECK_VALUE(gram->dim() == 2 && gram->size(0) == d && gram->size(1) == d, "dip_ext.", op,
                      ": gram must have shape [", d, ", ", d, "], got ", gram->sizes());
    check_no_internal_overlap(op, "gram", *gram);
  }
  check_no_overlap(op, "sum", sum, "sumsq", sumsq);
  check_no_overlap(op, "sum", sum, "x", x);
  check_no_overlap(op, "sumsq", sumsq, "x", x);
  if (gram) {
    check_no_overlap(op, "gram", *gram, "sum", sum);
    check_no_overlap(op, "gram", *gram, "sumsq", sumsq);
    check_no_overlap(op, "gram", *gram, "x", x);
  }
}

at::Tensor check_norm_gather_args(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& idx, double eps,
                                  bool check_idx) {
  check_activation(op, "x", x);
  const int64_t d = x.size(-1);
  check_same_device(op, "weight", weight, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  check_vector(op, "weight", weight, d);
  if (bias) {
    check_same_device(op, "bias", *bias, "x", x);
    check_same_dtype(op, "bias", *bias, "x", x);
    check_vector(op, "bias", *bias, d);
  }
  TORCH_CHECK_VALUE(eps >= 0, "dip_ext.", op, ": eps must be >= 0, got ", eps);
  return checked_index(op, idx, d, /*unique=*/false, check_idx, x);
}

at::Tensor check_scatter_add_args(const char* op, const at::Tensor& residual, const at::Tensor& idx,
                                  const at::Tensor& y, bool check_idx) {
  check_residual_update(op, residual, y, "y");
  check_no_overlap(op, "residual", residual, "idx", idx);
  at::Tensor ix = checked_index(op, idx, residual.size(-1), /*unique=*/true, check_idx, residual);
  TORCH_CHECK_VALUE(y.size(-1) == ix.numel(), "dip_ext.", op, ": y has ", y.size(-1), " columns but idx has ",
                    ix.numel(), " entries");
  return ix;
}

at::Tensor check_gemm_scatter_add_args(const char* op, const at::Tensor& residual, const at::Tensor& idx,
                                       const at::Tensor& x, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, bool check_idx) {
  check_residual_update(op, residual, x, "x");
  at::Tensor ix = checked_index(op, idx, residual.size(-1), /*unique=*/true, check_idx, residual);
  check_linear(op, x, weight, bias, x.size(-1));
  check_no_overlap(op, "residual", residual, "weight", weight);
  if (bias) check_no_overlap(op, "residual", residual, "bias", *bias);
  check_no_overlap(op, "residual", residual, "idx", idx);
  TORCH_CHECK_VALUE(weight.size(0) == ix.numel(), "dip_ext.", op, ": weight has ", weight.size(0),
                    " rows (outputs) but idx has ", ix.numel(), " entries");
  return ix;
}

at::Tensor linear_rows(const at::Tensor& rows, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, rows, weight.t()) : at::mm(rows, weight.t());
}

std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = last;
  return s;
}

}  // namespace dip_ext

namespace dip_ext {

at::Tensor check_rms_norm_scatter_add_args(const char* op, const at::Tensor& residual, const at::Tensor& idx,
                                           const at::Tensor& y, const at::Tensor& weight, double eps,
                                           bool check_idx) {
  at::Tensor ix = check_scatter_add_args(op, residual, idx, y, check_idx);
  check_same_device(op, "weight", weight, "residual", residual);
  check_same_dtype(op, "weight", weight, "residual", residual);
  check_vector(op, "weight", weight, residual.size(-1));
  TORCH_CHECK_VALUE(eps >= 0, "dip_ext.", op, ": eps must be >= 0, got ", eps);
  return ix;
}

}  // namespace dip_ext
