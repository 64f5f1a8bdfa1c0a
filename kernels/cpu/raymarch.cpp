// Occupancy-grid ray marching on the CPU (OpenMP): ray/box entry, the two-pass packed march
// (count, then fill at the scanned offsets), its backward, and the occupancy grid's bit packing and
// max-with-decay density update. The per-ray math lives in raymarch.h (shared with CUDA).
//
// The samples must match the PyTorch reference bit for bit: no FMA contraction here (g++ does not
// contract in ISO C++ mode anyway; this makes it independent of the flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "raymarch.h"

namespace {

// Below these sizes a parallel region costs more than it saves (and on a busy machine waiting for
// a second thread that is not scheduled costs milliseconds).
constexpr int64_t kParallelRays = 16384;
constexpr int64_t kParallelElements = 1 << 16;

template <typename T>
tk::MarchOut<T> no_output() {
  return tk::MarchOut<T>{nullptr, nullptr, nullptr, nullptr, nullptr};
}

}  // namespace

template <typename T>
void tk_raymarch_aabb_cpu(const T* o, const T* d, int64_t n, const T* aabb, T min_near, T* near, T* far) {
#pragma omp parallel for schedule(static) if (n > kParallelRays)
  for (int64_t r = 0; r < n; ++r) {
    tk::ray_aabb_one(o + 3 * r, d + 3 * r, aabb, aabb + 3, min_near, near + r, far + r);
  }
}

template <typename T>
void tk_raymarch_count_cpu(const T* o, const T* d, const T* near, const T* far, const T* jitter, int64_t n,
                           tk::MarchParams<T> params, int64_t* counts) {
  const tk::MarchOut<T> none = no_output<T>();
  // Rays differ a lot in work (misses vs. long occupied stretches): dynamic chunks.
#pragma omp parallel for schedule(dynamic, 32) if (n > 64)
  for (int64_t r = 0; r < n; ++r) {
    counts[r] = tk::march_ray<T, false>(o + 3 * r, d + 3 * r, near[r], far[r], jitter ? jitter[r] : T(0), params,
                                        none, r, 0);
  }
}

template <typename T>
void tk_raymarch_fill_cpu(const T* o, const T* d, const T* near, const T* far, const T* jitter, int64_t n,
                          tk::MarchParams<T> params, const int64_t* offsets, tk::MarchOut<T> out) {
#pragma omp parallel for schedule(dynamic, 32) if (n > 64)
  for (int64_t r = 0; r < n; ++r) {
    if (offsets[r + 1] == offsets[r]) continue;
    tk::march_ray<T, true>(o + 3 * r, d + 3 * r, near[r], far[r], jitter ? jitter[r] : T(0), params, out, r,
                           offsets[r]);
  }
}

template <typename T>
void tk_raymarch_backward_cpu(const T* gp, const T* gd, const T* ts, const int64_t* offsets, int64_t n, T* grad_o,
                              T* grad_d) {
  // Samples of one ray are contiguous rows: a segmented sum per ray, no scatter.
#pragma omp parallel for schedule(dynamic, 64) if (offsets[n] > kParallelElements)
  for (int64_t r = 0; r < n; ++r) {
    T go[3] = {0, 0, 0}, gdir[3] = {0, 0, 0};
    for (int64_t s = offsets[r]; s < offsets[r + 1]; ++s) {
      for (int i = 0; i < 3; ++i) {
        if (gp) {
          go[i] += gp[3 * s + i];
          gdir[i] += gp[3 * s + i] * ts[s];
        }
        if (gd) gdir[i] += gd[3 * s + i];
      }
    }
    for (int i = 0; i < 3; ++i) {
      grad_o[3 * r + i] = go[i];
      grad_d[3 * r + i] = gdir[i];
    }
  }
}

template <typename T>
void tk_raymarch_pack_cpu(const T* density, int64_t cells, T threshold, uint8_t* bits) {
  const int64_t bytes = (cells + 7) / 8;
#pragma omp parallel for schedule(static) if (cells > kParallelElements)
  for (int64_t b = 0; b < bytes; ++b) {
    uint32_t v = 0;
    const int64_t first = b * 8;
    const int64_t count = std::min<int64_t>(8, cells - first);
    for (int64_t j = 0; j < count; ++j) v |= (uint32_t)(density[first + j] > threshold) << j;
    bits[b] = (uint8_t)v;
  }
}

template <typename T>
void tk_raymarch_update_cpu(T* density, int64_t n_cells, T decay, const int64_t* cells, const T* values,
                            int64_t m) {
  if (!cells) {  // one value per cell: an elementwise max
#pragma omp parallel for schedule(static) if (n_cells > kParallelElements)
    for (int64_t i = 0; i < n_cells; ++i) {
      const T v = density[i] * decay;
      density[i] = (i < m && values[i] >= T(0) && values[i] > v) ? values[i] : v;
    }
    return;
  }
  // Ownership partitioning: each thread decays its own contiguous range of cells, then applies
  // the values whose cell falls in that range (every thread reads the whole list; no atomics, and
  // the result does not depend on the order of duplicates since max commutes).
#pragma omp parallel if (n_cells + m > kParallelElements)
  {
    const int nt = omp_get_num_threads();
    const int tid = omp_get_thread_num();
    const int64_t lo = n_cells * tid / nt, hi = n_cells * (tid + 1) / nt;
    for (int64_t i = lo; i < hi; ++i) density[i] *= decay;
    for (int64_t k = 0; k < m; ++k) {
      const int64_t c = cells[k];
      if (c >= lo && c < hi && values[k] >= T(0) && values[k] > density[c]) density[c] = values[k];
    }
  }
}

#define TK_RAYMARCH_INSTANTIATE(T)                                                                             \
  template void tk_raymarch_aabb_cpu<T>(const T*, const T*, int64_t, const T*, T, T*, T*);                     \
  template void tk_raymarch_count_cpu<T>(const T*, const T*, const T*, const T*, const T*, int64_t,            \
                                         tk::MarchParams<T>, int64_t*);                                        \
  template void tk_raymarch_fill_cpu<T>(const T*, const T*, const T*, const T*, const T*, int64_t,             \
                                        tk::MarchParams<T>, const int64_t*, tk::MarchOut<T>);                  \
  template void tk_raymarch_backward_cpu<T>(const T*, const T*, const T*, const int64_t*, int64_t, T*, T*);    \
  template void tk_raymarch_pack_cpu<T>(const T*, int64_t, T, uint8_t*);                                       \
  template void tk_raymarch_update_cpu<T>(T*, int64_t, T, const int64_t*, const T*, int64_t);

TK_RAYMARCH_INSTANTIATE(float)
TK_RAYMARCH_INSTANTIATE(double)
