// hashgrid_batched: many small multi-resolution hash grids, M per item (mesh vertex), and each
// query evaluates the M grids of its own item at its coordinates in [0, 1]^D.
//
//   x (Q, D), item (Q,) int64 in [0, V), tables (V, M, S, F)  ->  out (Q, M, L*F)
//
// S = entries of one grid (all its levels, level l's rows at offset[l], hashspec layout). Per level
// the encoding is tiny-cuda-nn's: tk::pos_fract with the level scale, 2^D corners indexed by
// tk::grid_index (dense or hashed), multilinear weights, features level-major. A level switched off
// by the optional mask outputs zeros and gets no gradient.
//
// The math below is shared by kernels/cpu/hashgrid_batched.cpp and kernels/cuda/hashgrid_batched.cu:
// level_cell (corners, weights) and level_dx (input gradient) on both; forward_level and
// backward_level are one level of one query on CUDA, which the CPU kernel computes the same way
// with F-wide vector rows.
#pragma once
#include <cstdint>

#include "common.h"

// Unroll the small fixed loops (corners, dims, features) on the device; host compilers unroll
// them at -O3 by themselves (and would warn about the pragma).
#if defined(__CUDA_ARCH__)
#define TK_HGB_UNROLL _Pragma("unroll")
#else
#define TK_HGB_UNROLL
#endif

namespace tk {
namespace hgb {

constexpr int kMaxLevels = 32;

// Level geometry of one grid (HashGridSpec), passed by value (a kernel parameter on CUDA).
struct Levels {
  int n;                         // L
  float scale[kMaxLevels];       // s_l (float32, as tiny-cuda-nn)
  uint32_t res[kMaxLevels];      // grid points per side
  uint32_t size[kMaxLevels];     // rows of the level's table
  uint32_t offset[kMaxLevels];   // first row of the level inside one grid's table
  uint8_t hashed[kMaxLevels];    // 1: hashed index, 0: dense
};

// Sizes of one call.
struct Shape {
  int64_t Q;  // queries
  int64_t V;  // items
  int64_t M;  // grids per item
  int64_t S;  // rows per grid (all levels)
  int D;      // input dims (2 or 3)
  int F;      // features per level (1, 2, 4 or 8)
};

// pos_fract in the compute precision: float is tk::pos_fract itself; double (gradcheck) does the
// same in double, with the float32 level scale.
TK_HD void pos_fract_t(float x, float scale, float* frac, uint32_t* cell) { tk::pos_fract(x, scale, frac, cell); }

TK_HD void pos_fract_t(double x, float scale, double* frac, uint32_t* cell) {
#if defined(__CUDACC__)
  double pos = fma((double)scale, x, 0.5);
  double f = floor(pos);
#else
  double pos = std::fma((double)scale, x, 0.5);
  double f = std::floor(pos);
#endif
  *cell = (uint32_t)(int)f;
  *frac = pos - f;
}

// The 2^D corners of the cell holding xq on level l: their rows within the level (idx) and their
// multilinear weights (w). Corner c takes the upper neighbour along dim d when bit d of c is set.
template <class T, int D>
TK_HD void level_cell(const T* xq, const Levels& lv, int l, uint32_t* idx, T* w, T* frac) {
  uint32_t cell[D];
  for (int d = 0; d < D; ++d) pos_fract_t(xq[d], lv.scale[l], &frac[d], &cell[d]);
  const uint32_t res = lv.res[l], size = lv.size[l];
  const bool hashed = lv.hashed[l] != 0;
  const bool pow2 = (size & (size - 1)) == 0;
  TK_HGB_UNROLL
  for (int c = 0; c < (1 << D); ++c) {
    uint32_t p[D];
    T wc = T(1);
    TK_HGB_UNROLL
    for (int d = 0; d < D; ++d) {
      const uint32_t bit = (c >> d) & 1u;
      p[d] = cell[d] + bit;
      wc *= bit ? frac[d] : T(1) - frac[d];
    }
    // A power-of-two table (every hashed level: 2^T rows) takes the modulo as a mask: grid_index
    // modulo 2^31 (a constant, folded to a mask) then modulo size is the same as modulo size.
    idx[c] = pow2 ? (tk::grid_index<D>(p, res, 0x80000000u, hashed) & (size - 1))
                  : tk::grid_index<D>(p, res, size, hashed);
    w[c] = wc;
  }
}

// Forward of one query on one level: out_q[m*L*F + l*F + f] for every grid m of its item.
// tab_v: the item's tables (M, S, F).
template <class T, int D, int F>
TK_HD void forward_level(const T* xq, const T* tab_v, int64_t M, int64_t S, const Levels& lv, int l, T* out_q) {
  constexpr int C = 1 << D;
  uint32_t idx[C];
  T w[C], frac[D];
  level_cell<T, D>(xq, lv, l, idx, w, frac);
  const int64_t LF = (int64_t)lv.n * F;
  for (int64_t m = 0; m < M; ++m) {
    const T* g = tab_v + (m * S + lv.offset[l]) * F;
    T acc[F];
    TK_HGB_UNROLL
    for (int f = 0; f < F; ++f) acc[f] = T(0);
    TK_HGB_UNROLL
    for (int c = 0; c < C; ++c) {
      const T* row = g + (int64_t)idx[c] * F;
      TK_HGB_UNROLL
      for (int f = 0; f < F; ++f) acc[f] += w[c] * row[f];
    }
    T* o = out_q + m * LF + (int64_t)l * F;
    TK_HGB_UNROLL
    for (int f = 0; f < F; ++f) o[f] = acc[f];
  }
}

// A level that is off: zero output.
template <class T, int F>
TK_HD void zero_level(int64_t M, int L, int l, T* out_q) {
  for (int64_t m = 0; m < M; ++m)
    TK_HGB_UNROLL
    for (int f = 0; f < F; ++f) out_q[m * L * F + (int64_t)l * F + f] = T(0);
}

// dxq[d] += sum_c gc[c] * dw_c/dx_d for one level, gc[c] being dL/dw_c (the corner's table rows
// dotted with the output gradient, summed over the grids), with
// dw_c/dx_d = scale * (bit_d ? 1 : -1) * prod_{d' != d} (bit_d' ? frac : 1 - frac).
template <class T, int D>
TK_HD void level_dx(const T* frac, const T* gc, float scale, T* dxq) {
  TK_HGB_UNROLL
  for (int d = 0; d < D; ++d) {
    T sum = T(0);
    TK_HGB_UNROLL
    for (int c = 0; c < (1 << D); ++c) {
      T p = T(1);
      TK_HGB_UNROLL
      for (int e = 0; e < D; ++e) {
        if (e == d) continue;
        p *= ((c >> e) & 1) ? frac[e] : T(1) - frac[e];
      }
      sum += ((c >> d) & 1) ? gc[c] * p : -gc[c] * p;
    }
    dxq[d] += (T)scale * sum;
  }
}

// Backward of one query on one level, given go_q = dL/dout for the query (M, L*F):
//  - dtab_v (the item's (M, S, F) gradient, may be null): add(&dtab_v[row], w_c * go);
//  - dxq (may be null): dxq[d] += sum_m,f,c go[m,f] * T[m,c,f] * dw_c/dx_d (level_dx).
// The cell index has no gradient (floor), as in the reference.
template <class T, int D, int F, class Add>
TK_HD void backward_level(const T* xq, const T* tab_v, const T* go_q, int64_t M, int64_t S, const Levels& lv, int l,
                          T* dtab_v, T* dxq, Add add) {
  constexpr int C = 1 << D;
  uint32_t idx[C];
  T w[C], frac[D];
  level_cell<T, D>(xq, lv, l, idx, w, frac);
  const int64_t LF = (int64_t)lv.n * F;
  T gc[C];  // sum over grids and features of go * table value, per corner (for dx)
  TK_HGB_UNROLL
  for (int c = 0; c < C; ++c) gc[c] = T(0);
  for (int64_t m = 0; m < M; ++m) {
    const T* gm = go_q + m * LF + (int64_t)l * F;
    T g[F];
    TK_HGB_UNROLL
    for (int f = 0; f < F; ++f) g[f] = gm[f];
    const int64_t base = (m * S + lv.offset[l]) * F;
    if (dtab_v) {
      T* dg = dtab_v + base;
      TK_HGB_UNROLL
      for (int c = 0; c < C; ++c) {
        T* row = dg + (int64_t)idx[c] * F;
        TK_HGB_UNROLL
        for (int f = 0; f < F; ++f) add(&row[f], w[c] * g[f]);
      }
    }
    if (dxq) {
      const T* tg = tab_v + base;
      TK_HGB_UNROLL
      for (int c = 0; c < C; ++c) {
        const T* row = tg + (int64_t)idx[c] * F;
        T s = T(0);
        TK_HGB_UNROLL
        for (int f = 0; f < F; ++f) s += g[f] * row[f];
        gc[c] += s;
      }
    }
  }
  if (dxq) level_dx<T, D>(frac, gc, lv.scale[l], dxq);
}

}  // namespace hgb
}  // namespace tk

// ---- host launchers (raw pointers; float and double) ----------------------------------------------
// level_mask: (L,) uint8, nonzero = level on; may be null (all on).

// Counting sort of the queries by item (stable): order (Q,) lists the queries item after item, the
// queries of item v being order[start[v] .. start[v+1]); start has V+1 entries. Returns how many
// ids lie outside [0, V) (those are left out of order).
int64_t tk_hashgrid_batched_sort_cpu(const int64_t* item, int64_t Q, int64_t V, int64_t* order, int64_t* start);
// Whether (order, start) is such a sort of item (an O(Q) guard before the kernels trust a sort
// that came from Python).
bool tk_hashgrid_batched_sort_valid_cpu(const int64_t* item, int64_t Q, int64_t V, const int64_t* order,
                                        const int64_t* start);

// out (Q, M, L*F), every element written. With the sort (order, start; else both null) the queries
// are visited item after item, an item's tables in cache. Returns how many item ids lie outside
// [0, V) (their output is zero; never any with the sort, which holds valid ids only).
int64_t tk_hashgrid_batched_forward_cpu(const float* x, const int64_t* item, const float* tables,
                                        const uint8_t* level_mask, const int64_t* order, const int64_t* start,
                                        float* out, const tk::hgb::Shape& shape, const tk::hgb::Levels& levels);
int64_t tk_hashgrid_batched_forward_cpu(const double* x, const int64_t* item, const double* tables,
                                        const uint8_t* level_mask, const int64_t* order, const int64_t* start,
                                        double* out, const tk::hgb::Shape& shape, const tk::hgb::Levels& levels);

// Gradients from grad_out (Q, M, L*F). dx (Q, D) and dtables (V, M, S, F) may each be null (not
// wanted); neither needs initialising. dtables needs the sort (order, start): item after item, each
// item's rows are written by one thread only (no atomics). dx alone works with or without it.
void tk_hashgrid_batched_backward_cpu(const float* grad_out, const float* x, const int64_t* item, const float* tables,
                                      const uint8_t* level_mask, const int64_t* order, const int64_t* start,
                                      float* dx, float* dtables, const tk::hgb::Shape& shape,
                                      const tk::hgb::Levels& levels);
void tk_hashgrid_batched_backward_cpu(const double* grad_out, const double* x, const int64_t* item,
                                      const double* tables, const uint8_t* level_mask, const int64_t* order,
                                      const int64_t* start, double* dx, double* dtables,
                                      const tk::hgb::Shape& shape, const tk::hgb::Levels& levels);

// CUDA (same semantics; ids outside [0, V) give zero output and no gradient; dtables by atomics).
void tk_hashgrid_batched_forward_cuda(const float* x, const int64_t* item, const float* tables,
                                      const uint8_t* level_mask, float* out, const tk::hgb::Shape& shape,
                                      const tk::hgb::Levels& levels, void* stream);
void tk_hashgrid_batched_forward_cuda(const double* x, const int64_t* item, const double* tables,
                                      const uint8_t* level_mask, double* out, const tk::hgb::Shape& shape,
                                      const tk::hgb::Levels& levels, void* stream);
void tk_hashgrid_batched_backward_cuda(const float* grad_out, const float* x, const int64_t* item,
                                       const float* tables, const uint8_t* level_mask, float* dx, float* dtables,
                                       const tk::hgb::Shape& shape, const tk::hgb::Levels& levels, void* stream);
void tk_hashgrid_batched_backward_cuda(const double* grad_out, const double* x, const int64_t* item,
                                       const double* tables, const uint8_t* level_mask, double* dx,
                                       double* dtables, const tk::hgb::Shape& shape,
                                       const tk::hgb::Levels& levels, void* stream);
