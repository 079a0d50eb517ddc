// CPU microbenchmarks: each dip_ext CPU op against the unfused ATen chain it replaces.
//
// Shapes (issue 2): tokens 256, d 2048, 60 % of the columns kept (a random sorted subset, k = 1228),
// 2048 outputs; fp32 and bf16. Names read "<op>/<impl>/<dtype>", impl being "ours" or "aten" (the chain).
// Counters: bytes_per_second on the op's minimal bytes (each input read once, each output written once)
// and, for the GEMM ops, FLOP/s. Wall time (UseRealTime) because the kernels run on torch's thread pool.
//
// Build and run: benchmarks/run_cpu_bench.sh (threads default to 2, the dev machine's core count).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "ops.h"

namespace {

constexpr int64_t kTokens = 256, kD = 2048, kOut = 2048;
constexpr double kKeep = 0.6;
constexpr double kEps = 1e-6;

int64_t kept() { return static_cast<int64_t>(kKeep * kD); }

// A random sorted subset of [0, d) of size k, fixed by the seed so every run measures the same set.
at::Tensor sorted_subset(int64_t d, int64_t k) {
  return std::get<0>(at::randperm(d, at::kLong).slice(0, 0, k).sort());
}

struct Inputs {
  at::Tensor x, w_norm, b_norm, idx, w_gather, w_scatter, x_scatter, y, residual;
  Inputs(at::ScalarType dt) {
    at::manual_seed(0);
    const auto o = at::TensorOptions().dtype(dt);
    const int64_t k = kept();
    x = at::randn({kTokens, kD}, o);
    w_norm = at::randn({kD}, o);
    b_norm = at::randn({kD}, o);
    idx = sorted_subset(kD, k);
    w_gather = at::randn({kOut, k}, o) * (1.0 / std::sqrt(double(k)));  // [out, k]
    x_scatter = at::randn({kTokens, kOut}, o);                         // the sub-block's inner activation
    w_scatter = at::randn({k, kOut}, o) * (1.0 / std::sqrt(double(kOut)));  // [k, in]
    y = at::randn({kTokens, k}, o);
    residual = at::randn({kTokens, kD}, o);
  }
};

Inputs& inputs(at::ScalarType dt) {
  static Inputs f32(at::kFloat), bf16(at::kBFloat16);
  return dt == at::kFloat ? f32 : bf16;
}

const char* dtype_name(at::ScalarType dt) { return dt == at::kFloat ? "f32" : "bf16"; }

// Registers one benchmark; `bytes` and `flops` are per iteration.
void add(const std::string& name, double bytes, double flops, std::function<void()> body) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
    for (auto _ : st) body();
    st.SetBytesProcessed(static_cast<int64_t>(bytes) * st.iterations());
    if (flops > 0) st.counters["FLOP/s"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  });
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// Paired timing, robust to other jobs sharing the cores: each iteration times ours and the ATen chain back to
// back (order alternating, so neither always runs on the other's warm caches) and the counters are the
// medians of ours_us, aten_us and of the per-pair ratio ours / aten.
void add_pair(const std::string& name, std::function<void()> ours, std::function<void()> aten) {
  auto* b = benchmark::RegisterBenchmark(name.c_str(), [=](benchmark::State& st) {
    using clock = std::chrono::steady_clock;
    std::vector<double> t_ours, t_aten, ratio;
    auto time = [](const std::function<void()>& f) {
      const auto t0 = clock::now();
      f();
      return std::chrono::duration<double, std::micro>(clock::now() - t0).count();
    };
    bool ours_first = true;
    for (auto _ : st) {
      double a, b;
      if (ours_first) {
        a = time(ours);
        b = time(aten);
      } else {
        b = time(aten);
        a = time(ours);
      }
      ours_first = !ours_first;
      t_ours.push_back(a);
      t_aten.push_back(b);
      ratio.push_back(a / b);
    }
    st.counters["ours_us"] = median(t_ours);
    st.counters["aten_us"] = median(t_aten);
    st.counters["ratio"] = median(ratio);
  });
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
}

void register_all(at::ScalarType dt) {
  Inputs& in = inputs(dt);
  const double es = static_cast<double>(at::elementSize(dt));
  const int64_t k = kept();
  const std::string sfx = std::string("/") + dtype_name(dt);
  std::optional<at::Tensor> none;

  // norm + gather: read x once, write the kept columns (weights are negligible but counted).
  const double norm_bytes = es * (kTokens * kD + kTokens * k + 2 * kD);
  add("rms_norm_gather/ours" + sfx, norm_bytes, 0, [&in] {
    benchmark::DoNotOptimize(dip_ext::rms_norm_gather_cpu(in.x, in.w_norm, in.idx, kEps, false));
  });
  add("rms_norm_gather/aten" + sfx, norm_bytes, 0, [&in] {
    benchmark::DoNotOptimize(at::rms_norm(in.x, {kD}, in.w_norm, kEps).index_select(-1, in.idx));
  });
  add("layer_norm_gather/ours" + sfx, norm_bytes, 0, [&in] {
    benchmark::DoNotOptimize(dip_ext::layer_norm_gather_cpu(in.x, in.w_norm, in.b_norm, in.idx, kEps, false));
  });
  add("layer_norm_gather/aten" + sfx, norm_bytes, 0, [&in] {
    benchmark::DoNotOptimize(at::layer_norm(in.x, {kD}, in.w_norm, in.b_norm, kEps).index_select(-1, in.idx));
  });

  // index-select GEMM: x [T, d] gathered to [T, k] @ W^T [k, out].
  const double gemm_bytes = es * (kTokens * kD + kOut * k + kTokens * kOut);
  const double gemm_flops = 2.0 * kTokens * k * kOut;
  add("index_select_gemm/ours" + sfx, gemm_bytes, gemm_flops, [&in, none] {
    benchmark::DoNotOptimize(dip_ext::index_select_gemm_cpu(in.x, in.idx, in.w_gather, none, false));
  });
  add("index_select_gemm/aten" + sfx, gemm_bytes, gemm_flops, [&in] {
    benchmark::DoNotOptimize(at::linear(in.x.index_select(-1, in.idx), in.w_gather));
  });
  // The floor: the GEMM alone on an operand gathered beforehand.
  const at::Tensor pre = in.x.index_select(-1, in.idx).contiguous();
  add("index_select_gemm/mm_pregathered" + sfx, gemm_bytes, gemm_flops, [&in, pre] {
    benchmark::DoNotOptimize(at::linear(pre, in.w_gather));
  });

  // scatter-add: read y, read + write the kept columns of the residual.
  const double scatter_bytes = es * (kTokens * k * 3);
  add("scatter_add_/ours" + sfx, scatter_bytes, 0, [&in] {
    dip_ext::scatter_add_cpu(in.residual, in.idx, in.y, false);
  });
  add("scatter_add_/aten" + sfx, scatter_bytes, 0, [&in] { in.residual.index_add_(-1, in.idx, in.y); });

  // GEMM + scatter-add: x_scatter [T, out] @ W^T [out, k] added into residual[:, idx].
  const double gs_bytes = es * (kTokens * kOut + k * kOut + 2 * kTokens * k);
  const double gs_flops = 2.0 * kTokens * kOut * k;
  add("gemm_scatter_add_/ours" + sfx, gs_bytes, gs_flops, [&in, none] {
    dip_ext::gemm_scatter_add_cpu(in.residual, in.idx, in.x_scatter, in.w_scatter, none, false);
  });
  add("gemm_scatter_add_/aten" + sfx, gs_bytes, gs_flops, [&in] {
    in.residual.index_add_(-1, in.idx, at::linear(in.x_scatter, in.w_scatter));
  });

  // output RMSNorm + scatter-add (Gemma's sandwich norms): read y, read + write the kept residual columns.
  const double rnsa_bytes = es * (kTokens * k * 3 + kD);
  add("rms_norm_scatter_add_/ours" + sfx, rnsa_bytes, 0, [&in] {
    dip_ext::rms_norm_scatter_add_cpu(in.residual, in.idx, in.y, in.w_norm, kEps, true, false);
  });
  add("rms_norm_scatter_add_/aten" + sfx, rnsa_bytes, 0, [&in] {
    const at::Tensor yf = in.y.to(at::kFloat);
    const at::Tensor rstd = at::rsqrt(yf.pow(2).sum(-1, true) / static_cast<double>(kD) + kEps);
    const at::Tensor scale = in.w_norm.to(at::kFloat).index_select(0, in.idx) + 1.0;
    in.residual.index_add_(-1, in.idx, (yf * rstd * scale).to(in.y.scalar_type()));
  });

  // The four issue-2 targets, paired (see add_pair). The in-place pairs keep adding into one residual; its
  // values grow linearly, far from overflow, so the timing does not change over a run.
  add_pair("pair/rms_norm_gather" + sfx,
           [&in] { benchmark::DoNotOptimize(dip_ext::rms_norm_gather_cpu(in.x, in.w_norm, in.idx, kEps, false)); },
           [&in] { benchmark::DoNotOptimize(at::rms_norm(in.x, {kD}, in.w_norm, kEps).index_select(-1, in.idx)); });
  add_pair("pair/index_select_gemm" + sfx,
           [&in, none] { benchmark::DoNotOptimize(dip_ext::index_select_gemm_cpu(in.x, in.idx, in.w_gather, none, false)); },
           [&in] { benchmark::DoNotOptimize(at::linear(in.x.index_select(-1, in.idx), in.w_gather)); });
  add_pair("pair/scatter_add_" + sfx, [&in] { dip_ext::scatter_add_cpu(in.residual, in.idx, in.y, false); },
           [&in] { in.residual.index_add_(-1, in.idx, in.y); });
  add_pair("pair/gemm_scatter_add_" + sfx,
           [&in, none] { dip_ext::gemm_scatter_add_cpu(in.residual, in.idx, in.x_scatter, in.w_scatter, none, false); },
           [&in] { in.residual.index_add_(-1, in.idx, at::linear(in.x_scatter, in.w_scatter)); });

  // calibration statistics (sum and sum of squares, no gram): read x once.
  const double st_bytes = es * kTokens * kD;
  at::Tensor sum = at::zeros({kD}, at::kDouble), sumsq = at::zeros({kD}, at::kDouble);
  add("calibration_stats/ours" + sfx, st_bytes, 0, [&in, sum, sumsq]() mutable {
    dip_ext::calibration_stats_cpu(in.x, sum, sumsq, std::nullopt);
  });
  add("calibration_stats/aten" + sfx, st_bytes, 0, [&in, sum, sumsq]() mutable {
    const at::Tensor xf = in.x.to(at::kFloat);
    sum.add_(xf.sum(0));
    sumsq.add_(xf.square().sum(0));
  });
}

}  // namespace

int main(int argc, char** argv) {
  // Torch threads: DIP_EXT_BENCH_THREADS or 2 (the dev machine). Set before any ATen work.
  const char* env = std::getenv("DIP_EXT_BENCH_THREADS");
  at::set_num_threads(env ? std::atoi(env) : 2);
  benchmark::AddCustomContext("torch_threads", std::to_string(at::get_num_threads()));
  benchmark::AddCustomContext("shape", "tokens 256, d 2048, keep 60% (k 1228), out 2048");
  register_all(at::kFloat);
  register_all(at::kBFloat16);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
