// Multi-resolution hash encoding (Instant-NGP / tiny-cuda-nn definition): the per-level math
// shared by the C++ (OpenMP) and CUDA kernels, and the raw-pointer launchers.
//
// Input x (N, D) with D = 2 or 3, one flat table (n_entries, F) holding all levels (level l's rows
// start at offset[l]), output (N, L*F) level-major. On level l, x_d -> pos_fract(x_d, scale[l]) gives
// cell c_d and fraction f_d; the 2^D corners c + b (b in {0,1}^D, bit d of b is dimension d) are
// looked up at offset[l] + grid_index(c + b) and blended with weights prod_d (b_d ? f_d : 1 - f_d).
#pragma once
#include <cstdint>

#include "common.h"

namespace tk {

constexpr int kHashGridMaxLevels = 32;

// Per-level geometry (HashGridSpec's) and the level mask, passed by value (it also goes to the CUDA
// kernels as a launch parameter: about 700 bytes).
struct HashGridLevels {
  int n_levels;
  float scale[kHashGridMaxLevels];
  uint32_t resolution[kHashGridMaxLevels];
  uint32_t size[kHashGridMaxLevels];    // entries of the level's table
  int64_t offset[kHashGridMaxLevels];   // first row of the level in the flat table
  uint8_t hashed[kHashGridMaxLevels];
  uint8_t active[kHashGridMaxLevels];   // 0: masked level (zero output, no gradients)
};

// pos_fract in the kernel's working precision: float uses common.h's (fma, rounded once to float32
// as hashspec.pos_fract does for float32 inputs); double (gradcheck) computes scale * x + 0.5 in
// double like hashspec.pos_fract does for float64.
TK_HD void hg_pos_fract(float x, float scale, float* frac, uint32_t* cell) { pos_fract(x, scale, frac, cell); }
TK_HD void hg_pos_fract(double x, float scale, double* frac, uint32_t* cell) {
  double pos = x * (double)scale + 0.5;
#if defined(__CUDACC__)
  double f = floor(pos);
#else
  double f = std::floor(pos);
#endif
  *cell = (uint32_t)(int64_t)f;
  *frac = pos - f;
}

// v % size, with a mask when the size is a power of two (hashed levels: 2^T) and no division for
// in-range dense indices. pow2_mask is size - 1 for a power-of-two size, 0 otherwise.
TK_HD uint32_t hg_mod(uint32_t v, uint32_t size, uint32_t pow2_mask) {
  return pow2_mask ? (v & pow2_mask) : (v < size ? v : v % size);
}

TK_HD uint32_t hg_pow2_mask(uint32_t size) { return (size > 1 && (size & (size - 1)) == 0) ? size - 1 : 0u; }

// The table rows (relative to the level's offset) of the 2^D corners of `cell`, bit for bit
// tk::grid_index<D>(cell + b, ...): the per-dimension terms of coordinates c_d and c_d + 1 are
// formed once (dense: coordinate x stride, hashed: coordinate x prime) and combined per corner
// (sum, resp. xor; uint32 arithmetic like grid_index).
template <int D>
TK_HD void hg_corner_rows(const uint32_t* cell, uint32_t resolution, uint32_t size, bool hashed, uint32_t* rows) {
  uint32_t lo[D], hi[D];
  uint32_t stride = 1;
#pragma unroll
  for (int d = 0; d < D; ++d) {
    uint32_t m = hashed ? hash_prime(d) : stride;
    lo[d] = cell[d] * m;
    hi[d] = (cell[d] + 1u) * m;
    stride *= resolution;
  }
  const uint32_t mask = hg_pow2_mask(size);
#pragma unroll
  for (int b = 0; b < (1 << D); ++b) {
    uint32_t v = (b & 1) ? hi[0] : lo[0];
#pragma unroll
    for (int d = 1; d < D; ++d) {
      uint32_t t = ((b >> d) & 1) ? hi[d] : lo[d];
      v = hashed ? (v ^ t) : (v + t);
    }
    rows[b] = hg_mod(v, size, mask);
  }
}

// Interpolation weight of corner b and its derivative with respect to frac[k].
template <int D, class T>
TK_HD T hg_weight(const T* frac, int b) {
  T w = T(1);
#pragma unroll
  for (int d = 0; d < D; ++d) w *= ((b >> d) & 1) ? frac[d] : T(1) - frac[d];
  return w;
}

template <int D, class T>
TK_HD T hg_dweight(const T* frac, int b, int k) {
  T w = T(1);
#pragma unroll
  for (int d = 0; d < D; ++d) {
    if (d == k) w *= ((b >> d) & 1) ? T(1) : T(-1);
    else w *= ((b >> d) & 1) ? frac[d] : T(1) - frac[d];
  }
  return w;
}

}  // namespace tk

// ---- host launchers, float and double. x (n, dims), table (n_entries, features), out and
// grad_out (n, n_levels * features), grad_table like table (table_rows rows), grad_x like x; all
// contiguous, row-major. dims in {2, 3}, features in {1, 2, 4, 8}. Every output is written in full
// (masked levels: zero output, zero gradient rows). Backward computes the gradients whose pointer
// is not null (table is read only for grad_x). The CUDA launchers take device pointers and the
// cudaStream_t as void*.
void tk_hashgrid_forward_cpu(const float* x, int64_t n, int dims, const float* table, int features,
                             const tk::HashGridLevels& levels, float* out);
void tk_hashgrid_forward_cpu(const double* x, int64_t n, int dims, const double* table, int features,
                             const tk::HashGridLevels& levels, double* out);
void tk_hashgrid_backward_cpu(const float* x, int64_t n, int dims, const float* table, const float* grad_out,
                              int features, const tk::HashGridLevels& levels, float* grad_table, int64_t table_rows,
                              float* grad_x);
void tk_hashgrid_backward_cpu(const double* x, int64_t n, int dims, const double* table, const double* grad_out,
                              int features, const tk::HashGridLevels& levels, double* grad_table, int64_t table_rows,
                              double* grad_x);

void tk_hashgrid_forward_cuda(const float* x, int64_t n, int dims, const float* table, int features,
                              const tk::HashGridLevels& levels, float* out, void* stream);
void tk_hashgrid_forward_cuda(const double* x, int64_t n, int dims, const double* table, int features,
                              const tk::HashGridLevels& levels, double* out, void* stream);
void tk_hashgrid_backward_cuda(const float* x, int64_t n, int dims, const float* table, const float* grad_out,
                               int features, const tk::HashGridLevels& levels, float* grad_table, int64_t table_rows,
                               float* grad_x, void* stream);
void tk_hashgrid_backward_cuda(const double* x, int64_t n, int dims, const double* table, const double* grad_out,
                               int features, const tk::HashGridLevels& levels, double* grad_table, int64_t table_rows,
                               double* grad_x, void* stream);
