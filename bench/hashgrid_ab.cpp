// A/B of the CPU hash-grid kernel across builds, in one process (bench/hashgrid_ab.sh builds it).
//
// This host's speed drifts by up to 1.5x between runs (other VMs share its caches), so two builds
// timed in separate runs cannot be compared. Here each build is an object file whose entry points
// were renamed to fwd_<k> / bwd_<k>; the calls alternate between builds and the medians are
// compared. Sizes are bench/kernels.py's: 2^18 uniform points, 16 levels, F = 2, base 16,
// finest 2048, table 2^T.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "hashgrid.h"

#define DECLARE(k)                                                                                          \
  __attribute__((weak)) void fwd_##k(const float*, int64_t, int, const float*, int, const tk::HashGridLevels&, \
                                     float*);                                                               \
  __attribute__((weak)) void bwd_##k(const float*, int64_t, int, const float*, const float*, int,            \
                                     const tk::HashGridLevels&, float*, int64_t, float*);
DECLARE(0) DECLARE(1) DECLARE(2) DECLARE(3)

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s BUILDS fwd|bwd|bwdx [LOG2_TABLE] [REPEAT]\n", argv[0]);
    return 2;
  }
  const int builds = std::atoi(argv[1]);
  const std::string what = argv[2];
  const int log2_table = argc > 3 ? std::atoi(argv[3]) : 19, repeat = argc > 4 ? std::atoi(argv[4]) : 40;
  decltype(&fwd_0) fwd[4] = {fwd_0, fwd_1, fwd_2, fwd_3};
  decltype(&bwd_0) bwd[4] = {bwd_0, bwd_1, bwd_2, bwd_3};
  const int64_t n = int64_t(1) << 18;
  // HashGridSpec(dims=3, levels=16, base_resolution=16, finest_resolution=2048): per-level scale
  // base * b^l - 1 with b = exp(ln(finest / base) / (levels - 1)), resolution ceil(scale) + 1
  tk::HashGridLevels lv{};
  lv.n_levels = 16;
  int64_t rows = 0;
  const double growth = std::exp(std::log(2048.0 / 16.0) / 15.0);
  for (int l = 0; l < 16; ++l) {
    const float scale = (float)(16.0 * std::pow(growth, l) - 1.0);
    const uint32_t res = (uint32_t)std::ceil(scale) + 1;
    const uint64_t dense = (uint64_t)res * res * res, cap = uint64_t(1) << log2_table;
    const uint64_t size = std::min<uint64_t>(cap, (dense + 7) / 8 * 8);
    lv.scale[l] = scale, lv.resolution[l] = res, lv.size[l] = (uint32_t)size, lv.offset[l] = rows;
    lv.hashed[l] = dense > cap, lv.active[l] = 1;
    rows += (int64_t)size;
  }
  std::vector<float> table(rows * 2), x(n * 3), grad_out(n * 32), out(n * 32), first(n * 32), gtab(rows * 2),
      gx(n * 3);
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> u(0, 1);
  for (auto& v : table) v = (u(rng) - 0.5f) * 2e-4f;
  for (auto& v : x) v = u(rng);
  for (auto& v : grad_out) v = u(rng) - 0.5f;
  auto call = [&](int k) {
    if (what == "fwd") fwd[k](x.data(), n, 3, table.data(), 2, lv, out.data());
    else bwd[k](x.data(), n, 3, table.data(), grad_out.data(), 2, lv, gtab.data(), rows, what == "bwdx" ? gx.data() : nullptr);
  };
  std::vector<std::vector<double>> times(builds);
  for (int r = -5; r < repeat; ++r)
    for (int k = 0; k < builds; ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      call(k);
      const auto t1 = std::chrono::steady_clock::now();
      if (r >= 0) times[k].push_back(std::chrono::duration<double>(t1 - t0).count());
      if (what == "fwd" && r == -5) {  // same values from every build
        if (k == 0) first = out;
        double diff = 0;
        for (int64_t i = 0; i < n * 32; ++i) diff = std::max(diff, (double)std::fabs(out[i] - first[i]));
        if (k > 0) std::printf("build %d: max |out - build 0's| = %g\n", k, diff);
      }
    }
  for (int k = 0; k < builds; ++k) {
    auto& t = times[k];
    std::sort(t.begin(), t.end());
    std::printf("build %d %s T=%d: median %.2f M pts/s (best %.2f) over %d calls\n", k, what.c_str(), log2_table,
                n / t[t.size() / 2] / 1e6, n / t[0] / 1e6, repeat);
  }
}
