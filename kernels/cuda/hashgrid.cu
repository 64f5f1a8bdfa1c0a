// Multi-resolution hash encoding on CUDA (raw pointers; the math is hashgrid.h's, shared with the
// CPU kernel). Same semantics as kernels/cpu/hashgrid.cpp:
// - forward: one thread per (point, level) writes that level's F outputs (zeros for a masked level);
// - table gradient: one thread per (point, level) scatters w_b * grad_out into the corner rows
//   with atomicAdd, after the whole gradient is zero-filled;
// - input gradient: one thread per point sums its levels' contributions in registers.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "hashgrid.h"

namespace {

using tk::HashGridLevels;

constexpr int kThreads = 256;

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

// Corner rows (absolute, offset included) and fractions of point x on level l.
template <int D, class T>
__device__ __forceinline__ void locate(const T* __restrict__ x, const HashGridLevels& lv, int l, int64_t* rows,
                                       T* frac) {
  uint32_t cell[D], r[1 << D];
#pragma unroll
  for (int d = 0; d < D; ++d) tk::hg_pos_fract(x[d], lv.scale[l], &frac[d], &cell[d]);
  tk::hg_corner_rows<D>(cell, lv.resolution[l], lv.size[l], lv.hashed[l] != 0, r);
#pragma unroll
  for (int b = 0; b < (1 << D); ++b) rows[b] = lv.offset[l] + (int64_t)r[b];
}

template <int D, int F, class T>
__global__ void forward_kernel(const T* __restrict__ x, int64_t n, const T* __restrict__ table, HashGridLevels lv,
                               T* __restrict__ out) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int l = blockIdx.y;
  if (i >= n || l >= lv.n_levels) return;
  T* o = out + i * ((int64_t)lv.n_levels * F) + (int64_t)l * F;
  T acc[F];
#pragma unroll
  for (int f = 0; f < F; ++f) acc[f] = T(0);
  if (lv.active[l]) {
    int64_t rows[1 << D];
    T frac[D];
    locate<D>(x + i * D, lv, l, rows, frac);
#pragma unroll
    for (int b = 0; b < (1 << D); ++b) {
      const T w = tk::hg_weight<D, T>(frac, b);
      const T* e = table + rows[b] * F;
#pragma unroll
      for (int f = 0; f < F; ++f) acc[f] += w * e[f];
    }
  }
#pragma unroll
  for (int f = 0; f < F; ++f) o[f] = acc[f];
}

template <int D, int F, class T>
__global__ void backward_table_kernel(const T* __restrict__ x, int64_t n, const T* __restrict__ grad_out,
                                      HashGridLevels lv, T* __restrict__ grad_table) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int l = blockIdx.y;
  if (i >= n || l >= lv.n_levels || !lv.active[l]) return;
  const T* g = grad_out + i * ((int64_t)lv.n_levels * F) + (int64_t)l * F;
  T gv[F];
#pragma unroll
  for (int f = 0; f < F; ++f) gv[f] = g[f];
  int64_t rows[1 << D];
  T frac[D];
  locate<D>(x + i * D, lv, l, rows, frac);
#pragma unroll
  for (int b = 0; b < (1 << D); ++b) {
    const T w = tk::hg_weight<D, T>(frac, b);
    T* e = grad_table + rows[b] * F;
#pragma unroll
    for (int f = 0; f < F; ++f) atomicAdd(e + f, w * gv[f]);
  }
}

template <int D, int F, class T>
__global__ void backward_input_kernel(const T* __restrict__ x, int64_t n, const T* __restrict__ table,
                                      const T* __restrict__ grad_out, HashGridLevels lv, T* __restrict__ grad_x) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T gx[D];
#pragma unroll
  for (int d = 0; d < D; ++d) gx[d] = T(0);
  for (int l = 0; l < lv.n_levels; ++l) {
    if (!lv.active[l]) continue;
    const T* g = grad_out + i * ((int64_t)lv.n_levels * F) + (int64_t)l * F;
    int64_t rows[1 << D];
    T frac[D];
    locate<D>(x + i * D, lv, l, rows, frac);
    const T scale = (T)lv.scale[l];
#pragma unroll
    for (int b = 0; b < (1 << D); ++b) {
      const T* e = table + rows[b] * F;
      T v = T(0);  // <grad_out[l], table[row_b]>
#pragma unroll
      for (int f = 0; f < F; ++f) v += g[f] * e[f];
#pragma unroll
      for (int k = 0; k < D; ++k) gx[k] += scale * v * tk::hg_dweight<D, T>(frac, b, k);
    }
  }
#pragma unroll
  for (int d = 0; d < D; ++d) grad_x[i * D + d] = gx[d];
}

// ---------------------------------------------------------------- launchers
template <int D, int F>
struct Launch {
  template <class T>
  static void forward(const T* x, int64_t n, const T* table, const HashGridLevels& lv, T* out, cudaStream_t s) {
    const dim3 grid((unsigned)((n + kThreads - 1) / kThreads), (unsigned)lv.n_levels);
    forward_kernel<D, F, T><<<grid, kThreads, 0, s>>>(x, n, table, lv, out);
    check_launch("hashgrid forward");
  }
  template <class T>
  static void backward(const T* x, int64_t n, const T* table, const T* grad_out, const HashGridLevels& lv,
                       T* grad_table, int64_t table_rows, T* grad_x, cudaStream_t s) {
    if (grad_table) {
      cudaMemsetAsync(grad_table, 0, (size_t)table_rows * F * sizeof(T), s);
      const dim3 grid((unsigned)((n + kThreads - 1) / kThreads), (unsigned)lv.n_levels);
      if (n > 0) backward_table_kernel<D, F, T><<<grid, kThreads, 0, s>>>(x, n, grad_out, lv, grad_table);
      check_launch("hashgrid table backward");
    }
    if (grad_x && n > 0) {
      backward_input_kernel<D, F, T><<<(unsigned)((n + kThreads - 1) / kThreads), kThreads, 0, s>>>(
          x, n, table, grad_out, lv, grad_x);
      check_launch("hashgrid input backward");
    }
  }
};

template <template <int, int> class Op, class Fn>
void dispatch(int dims, int features, Fn&& fn) {
  switch (dims * 16 + features) {
    case 2 * 16 + 1: fn(Op<2, 1>()); break;
    case 2 * 16 + 2: fn(Op<2, 2>()); break;
    case 2 * 16 + 4: fn(Op<2, 4>()); break;
    case 2 * 16 + 8: fn(Op<2, 8>()); break;
    case 3 * 16 + 1: fn(Op<3, 1>()); break;
    case 3 * 16 + 2: fn(Op<3, 2>()); break;
    case 3 * 16 + 4: fn(Op<3, 4>()); break;
    case 3 * 16 + 8: fn(Op<3, 8>()); break;
    default: throw std::runtime_error("hashgrid: dims must be 2 or 3 and features 1, 2, 4 or 8");
  }
}

template <class T>
void forward_cuda(const T* x, int64_t n, int dims, const T* table, int features, const HashGridLevels& lv, T* out,
                  void* stream) {
  if (n <= 0) return;
  dispatch<Launch>(dims, features, [&](auto op) { op.forward(x, n, table, lv, out, (cudaStream_t)stream); });
}

template <class T>
void backward_cuda(const T* x, int64_t n, int dims, const T* table, const T* grad_out, int features,
                   const HashGridLevels& lv, T* grad_table, int64_t table_rows, T* grad_x, void* stream) {
  dispatch<Launch>(dims, features, [&](auto op) {
    op.backward(x, n, table, grad_out, lv, grad_table, table_rows, grad_x, (cudaStream_t)stream);
  });
}

}  // namespace

void tk_hashgrid_forward_cuda(const float* x, int64_t n, int dims, const float* table, int features,
                              const tk::HashGridLevels& levels, float* out, void* stream) {
  forward_cuda(x, n, dims, table, features, levels, out, stream);
}
void tk_hashgrid_forward_cuda(const double* x, int64_t n, int dims, const double* table, int features,
                              const tk::HashGridLevels& levels, double* out, void* stream) {
  forward_cuda(x, n, dims, table, features, levels, out, stream);
}
void tk_hashgrid_backward_cuda(const float* x, int64_t n, int dims, const float* table, const float* grad_out,
                               int features, const tk::HashGridLevels& levels, float* grad_table, int64_t table_rows,
                               float* grad_x, void* stream) {
  backward_cuda(x, n, dims, table, grad_out, features, levels, grad_table, table_rows, grad_x, stream);
}
void tk_hashgrid_backward_cuda(const double* x, int64_t n, int dims, const double* table, const double* grad_out,
                               int features, const tk::HashGridLevels& levels, double* grad_table, int64_t table_rows,
                               double* grad_x, void* stream) {
  backward_cuda(x, n, dims, table, grad_out, features, levels, grad_table, table_rows, grad_x, stream);
}
