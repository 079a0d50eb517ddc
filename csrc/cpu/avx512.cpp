// AVX-512 row kernels behind avx512.h. Compiled for any x86-64 target: the kernels carry a target attribute
// and only run after a CPUID check, so the library still loads and works (scalar paths) on older CPUs.
#include "cpu/avx512.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DIP_EXT_HAVE_AVX512_KERNELS 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 flags the intentionally undefined pass-through operand inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

namespace dip_ext::cpu {

#ifdef DIP_EXT_HAVE_AVX512_KERNELS
namespace {

#define DIP_EXT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define DIP_EXT_AVX512_INLINE __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline

bool cpu_has_avx512() {
  static const bool ok = [] {
    if (const char* off = std::getenv("DIP_EXT_NO_AVX512"); off && *off && *off != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return ok;
}

DIP_EXT_AVX512_INLINE __mmask16 low_mask(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

// 16 elements (the lanes in m; the others read as 0) widened to fp32.
template <typename T>
DIP_EXT_AVX512_INLINE __m512 load16(const T* p, __mmask16 m) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  } else {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
}

// The lanes in m of v rounded to T (round to nearest even, as c10's scalar conversions) and stored.
template <typename T>
DIP_EXT_AVX512_INLINE void store16(T* p, __mmask16 m, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, m, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
  }
}

template <typename T>
DIP_EXT_AVX512 void gather_rows(const T* x, int64_t xs, T* out, int64_t os, int64_t r0, int64_t r1,
                                const ColumnPlan& plan) {
  const int64_t blocks = static_cast<int64_t>(plan.mask.size());
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    T* orow = out + r * os;
    for (int64_t b = 0; b < blocks; ++b) {
      const __mmask16 m = plan.mask[b];
      if (!m) continue;
      const __mmask16 lo = low_mask(__builtin_popcount(m));
      // raw bits: a gather copies exactly, NaN payloads included
      if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(orow + plan.start[b], lo, _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(m, xr + 16 * b)));
      } else {
        const __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, xr + 16 * b));
        _mm256_mask_storeu_epi16(orow + plan.start[b], lo, _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(m, v)));
      }
    }
  }
}

template <typename T>
DIP_EXT_AVX512 void scatter_add_rows(T* res, int64_t rs, const T* y, int64_t ys, int64_t r0, int64_t r1,
                                     const ColumnPlan& plan) {
  const int64_t blocks = static_cast<int64_t>(plan.mask.size());
  for (int64_t r = r0; r < r1; ++r) {
    T* rr = res + r * rs;
    const T* yr = y + r * ys;
    for (int64_t b = 0; b < blocks; ++b) {
      const __mmask16 m = plan.mask[b];
      if (!m) continue;
      const __m512 yv = _mm512_maskz_expand_ps(m, load16(yr + plan.start[b], low_mask(__builtin_popcount(m))));
      store16(rr + 16 * b, m, _mm512_add_ps(load16(rr + 16 * b, m), yv));
    }
  }
}

enum class Reduce { kSum, kSumSq, kCenteredSumSq };

// One 16-lane term of a row reduction; lanes outside m read as 0 and must add 0.
template <Reduce R>
DIP_EXT_AVX512_INLINE __m512 term(__m512 v, __mmask16 m, __m512 mean) {
  if constexpr (R == Reduce::kSum) return v;
  if constexpr (R == Reduce::kSumSq) return _mm512_mul_ps(v, v);
  const __m512 c = _mm512_maskz_sub_ps(m, v, mean);
  return _mm512_mul_ps(c, c);
}

// Row reduction in fp32; two accumulators hide the add latency.
template <Reduce R, typename T>
DIP_EXT_AVX512_INLINE float row_sum(const T* x, int64_t d, float mean = 0.f) {
  const __m512 mv = _mm512_set1_ps(mean);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    a0 = _mm512_add_ps(a0, term<R>(load16(x + i, 0xFFFF), 0xFFFF, mv));
    a1 = _mm512_add_ps(a1, term<R>(load16(x + i + 16, 0xFFFF), 0xFFFF, mv));
  }
  for (; i < d; i += 16) {
    const __mmask16 m = d - i >= 16 ? __mmask16(0xFFFF) : low_mask(static_cast<int>(d - i));
    a0 = _mm512_add_ps(a0, term<R>(load16(x + i, m), m, mv));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

template <typename T, bool kLayerNorm>
DIP_EXT_AVX512 void norm_gather_rows(const T* x, int64_t xs, const T* w, const T* bias, float eps, T* out,
                                     int64_t os, int64_t r0, int64_t r1, const ColumnPlan& plan) {
  const int64_t d = plan.d, blocks = static_cast<int64_t>(plan.mask.size());
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * xs;
    float mean = 0.f, rstd;
    if constexpr (kLayerNorm) {
      mean = row_sum<Reduce::kSum>(xr, d) / static_cast<float>(d);
      rstd = 1.f / std::sqrt(row_sum<Reduce::kCenteredSumSq>(xr, d, mean) / static_cast<float>(d) + eps);
    } else {
      rstd = 1.f / std::sqrt(row_sum<Reduce::kSumSq>(xr, d) / static_cast<float>(d) + eps);
    }
    const __m512 mv = _mm512_set1_ps(mean), sv = _mm512_set1_ps(rstd);
    T* orow = out + r * os;
    for (int64_t b = 0; b < blocks; ++b) {
      const __mmask16 m = plan.mask[b];
      if (!m) continue;
      __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(load16(xr + 16 * b, m), mv), sv), load16(w + 16 * b, m));
      if constexpr (kLayerNorm) {
        if (bias) v = _mm512_add_ps(v, load16(bias + 16 * b, m));
      }
      store16(orow + plan.start[b], low_mask(__builtin_popcount(m)), _mm512_maskz_compress_ps(m, v));
    }
  }
}

// Calls f with a typed null pointer of the dtype's C++ type.
template <typename F>
void dispatch(c10::ScalarType dt, F f) {
  switch (dt) {
    case c10::ScalarType::Float: return f(static_cast<float*>(nullptr));
    case c10::ScalarType::Half: return f(static_cast<c10::Half*>(nullptr));
    case c10::ScalarType::BFloat16: return f(static_cast<c10::BFloat16*>(nullptr));
    default: TORCH_CHECK(false, "dip_ext: no AVX-512 kernel for ", dt);  // callers only pass the three
  }
}

}  // namespace

std::optional<ColumnPlan> avx512_plan(const int64_t* idx, int64_t k, int64_t d) {
  if (!cpu_has_avx512() || k == 0) return std::nullopt;
  for (int64_t j = 1; j < k; ++j)
    if (idx[j] <= idx[j - 1]) return std::nullopt;
  if (idx[0] < 0 || idx[k - 1] >= d) return std::nullopt;  // unchecked bad idx: leave it to the scalar path
  ColumnPlan p;
  p.d = d;
  const int64_t blocks = (d + 15) / 16;
  p.mask.assign(blocks, 0);
  p.start.assign(blocks, 0);
  for (int64_t j = 0; j < k; ++j) p.mask[idx[j] / 16] |= static_cast<uint16_t>(1u << (idx[j] % 16));
  int64_t pos = 0;
  for (int64_t b = 0; b < blocks; ++b) {
    p.start[b] = pos;
    pos += __builtin_popcount(p.mask[b]);
  }
  return p;
}

void avx512_gather_rows(c10::ScalarType dt, const void* x, int64_t xs, void* out, int64_t os, int64_t r0,
                        int64_t r1, const ColumnPlan& plan) {
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gather_rows(static_cast<const T*>(x), xs, static_cast<T*>(out), os, r0, r1, plan);
  });
}

void avx512_scatter_add_rows(c10::ScalarType dt, void* res, int64_t rs, const void* y, int64_t ys, int64_t r0,
                             int64_t r1, const ColumnPlan& plan) {
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    scatter_add_rows(static_cast<T*>(res), rs, static_cast<const T*>(y), ys, r0, r1, plan);
  });
}

void avx512_norm_gather_rows(c10::ScalarType dt, bool layer_norm, const void* x, int64_t xs, const void* w,
                             const void* b, float eps, void* out, int64_t os, int64_t r0, int64_t r1,
                             const ColumnPlan& plan) {
  dispatch(dt, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (layer_norm)
      norm_gather_rows<T, true>(static_cast<const T*>(x), xs, static_cast<const T*>(w), static_cast<const T*>(b),
                                eps, static_cast<T*>(out), os, r0, r1, plan);
    else
      norm_gather_rows<T, false>(static_cast<const T*>(x), xs, static_cast<const T*>(w), nullptr, eps,
                                 static_cast<T*>(out), os, r0, r1, plan);
  });
}

#else  // not x86-64 GCC/Clang: no plan, so the kernels below are never reached

std::optional<ColumnPlan> avx512_plan(const int64_t*, int64_t, int64_t) { return std::nullopt; }
void avx512_gather_rows(c10::ScalarType, const void*, int64_t, void*, int64_t, int64_t, int64_t,
                        const ColumnPlan&) {}
void avx512_scatter_add_rows(c10::ScalarType, void*, int64_t, const void*, int64_t, int64_t, int64_t,
                             const ColumnPlan&) {}
void avx512_norm_gather_rows(c10::ScalarType, bool, const void*, int64_t, const void*, const void*, float, void*,
                             int64_t, int64_t, int64_t, const ColumnPlan&) {}

#endif

}  // namespace dip_ext::cpu
