// Shared by the C++ (OpenMP) and CUDA kernels: host/device qualifiers and the math that both
// must compute bit for bit the same (the hash-grid indexing follows tiny-cuda-nn's definition).
#pragma once
#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define TK_HD __host__ __device__ __forceinline__
#else
#define TK_HD inline
#endif

namespace tk {

// tiny-cuda-nn's "coherent prime hash": xor of coordinate x prime, first prime 1 so that
// neighbours along x stay in one cache line.
TK_HD uint32_t hash_prime(int dim) {
  constexpr uint32_t primes[7] = {1u, 2654435761u, 805459861u, 3674653429u,
                                  2097192037u, 1434869437u, 2165219737u};
  return primes[dim];
}

// Index of integer grid point `p` (D coordinates) in a level of `resolution` cells per side
// whose table holds `table_size` entries: dense (row-major, x fastest) while the grid fits,
// hashed otherwise; always taken modulo the table size, as tiny-cuda-nn does.
template <int D>
TK_HD uint32_t grid_index(const uint32_t* p, uint32_t resolution, uint32_t table_size, bool hashed) {
  if (!hashed) {
    uint32_t index = 0, stride = 1;
    for (int d = 0; d < D; ++d) {
      index += p[d] * stride;
      stride *= resolution;
    }
    return index % table_size;
  }
  uint32_t h = 0;
  for (int d = 0; d < D; ++d) h ^= p[d] * hash_prime(d);
  return h % table_size;
}

// Position of x in [0, 1] on a level: scale*x + 0.5 rounded once (fma), split into the cell
// corner and the fraction inside the cell. The 0.5 offset staggers the levels (Instant-NGP, App. A).
TK_HD void pos_fract(float x, float scale, float* frac, uint32_t* cell) {
#if defined(__CUDACC__)
  float pos = fmaf(scale, x, 0.5f);
  float f = floorf(pos);
#else
  float pos = std::fma(scale, x, 0.5f);
  float f = std::floor(pos);
#endif
  *cell = (uint32_t)(int)f;
  *frac = pos - f;
}

TK_HD int div_up(int a, int b) { return (a + b - 1) / b; }

}  // namespace tk
