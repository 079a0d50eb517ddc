// AVX-512 row kernels for the column gather / scatter of DISP, used when idx is strictly increasing.
//
// A sorted index set is a bit mask over the row: in each block of 16 columns the kept columns map to a
// CONTIGUOUS run of the compact row. So a gather is a masked load + vcompressps + store of popcount
// elements, and a scatter-add is a load of the run + vexpandps + masked add into the row, 16 columns a
// step, however short the runs of consecutive indices are. Chosen at run time (CPUID); callers fall back to
// their scalar loops for unsorted idx or CPUs without AVX-512 F/BW/VL. Each element sees the same float
// arithmetic as the scalar loops (fp16/bf16 widened to fp32, one rounding back).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace dip_ext::cpu {

struct ColumnPlan {
  int64_t d = 0;                // row width
  std::vector<uint16_t> mask;   // per 16-column block: which columns are kept
  std::vector<int64_t> start;   // per block: position in the compact row of its first kept column
};

// The plan for idx [k] over [0, d) when idx is strictly increasing and the CPU supports the kernels;
// std::nullopt otherwise (unsorted / repeated idx, another CPU, DIP_EXT_NO_AVX512 set in the environment).
std::optional<ColumnPlan> avx512_plan(const int64_t* idx, int64_t k, int64_t d);

// For rows r in [r0, r1): out[r, :] = x[r, idx]. Strides in elements; dtype float / half / bfloat16.
void avx512_gather_rows(c10::ScalarType dt, const void* x, int64_t x_stride, void* out, int64_t out_stride,
                        int64_t r0, int64_t r1, const ColumnPlan& plan);

// For rows r in [r0, r1): res[r, idx] += y[r, :] (in fp32, one rounding back to the dtype).
void avx512_scatter_add_rows(c10::ScalarType dt, void* res, int64_t res_stride, const void* y, int64_t y_stride,
                             int64_t r0, int64_t r1, const ColumnPlan& plan);

// For rows r in [r0, r1): out[r, :] = norm(x[r, :])[idx] with statistics over the full row in fp32.
// RMSNorm: x * rstd * w; LayerNorm: (x - mean) * rstd * w (+ b). b may be null.
void avx512_norm_gather_rows(c10::ScalarType dt, bool layer_norm, const void* x, int64_t x_stride, const void* w,
                             const void* b, float eps, void* out, int64_t out_stride, int64_t r0, int64_t r1,
                             const ColumnPlan& plan);

}  // namespace dip_ext::cpu
