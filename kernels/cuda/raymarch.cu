// Occupancy-grid ray marching on CUDA: the same algorithm as kernels/cpu/raymarch.cpp, one thread
// per ray (count, fill at the scanned offsets, backward), one thread per byte (pack) or per cell /
// value (update; atomicMax on the bit pattern, valid for non-negative densities).
// The per-ray math is raymarch.h; its rm_mul/rm_add use the _rn intrinsics so that nvcc does not
// contract them into FMAs and the samples match the CPU kernel and the PyTorch reference.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "raymarch.h"

namespace {

constexpr int kThreads = 128;

inline int blocks_for(int64_t n) { return (int)((n + kThreads - 1) / kThreads); }

template <typename T>
__global__ void aabb_kernel(const T* __restrict__ o, const T* __restrict__ d, int64_t n, T amin0, T amin1, T amin2,
                            T amax0, T amax1, T amax2, T min_near, T* __restrict__ near, T* __restrict__ far) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const T amin[3] = {amin0, amin1, amin2};
  const T amax[3] = {amax0, amax1, amax2};
  tk::ray_aabb_one(o + 3 * r, d + 3 * r, amin, amax, min_near, near + r, far + r);
}

template <typename T>
__global__ void count_kernel(const T* __restrict__ o, const T* __restrict__ d, const T* __restrict__ near,
                             const T* __restrict__ far, const T* __restrict__ jitter, int64_t n,
                             tk::MarchParams<T> params, int64_t* __restrict__ counts) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
  const tk::MarchOut<T> none{nullptr, nullptr, nullptr, nullptr, nullptr};
  counts[r] = tk::march_ray<T, false>(o + 3 * r, d + 3 * r, near[r], far[r], jitter ? jitter[r] : T(0), params,
                                      none, r, 0);
}

template <typename T>
__global__ void fill_kernel(const T* __restrict__ o, const T* __restrict__ d, const T* __restrict__ near,
                            const T* __restrict__ far, const T* __restrict__ jitter, int64_t n,
                            tk::MarchParams<T> params, const int64_t* __restrict__ offsets, tk::MarchOut<T> out) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
  if (offsets[r + 1] == offsets[r]) return;
  tk::march_ray<T, true>(o + 3 * r, d + 3 * r, near[r], far[r], jitter ? jitter[r] : T(0), params, out, r,
                         offsets[r]);
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ gp, const T* __restrict__ gd, const T* __restrict__ ts,
                                const int64_t* __restrict__ offsets, int64_t n, T* __restrict__ grad_o,
                                T* __restrict__ grad_d) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n) return;
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

template <typename T>
__global__ void pack_kernel(const T* __restrict__ density, int64_t cells, T threshold, uint8_t* __restrict__ bits) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b * 8 >= cells) return;
  uint32_t v = 0;
  const int64_t first = b * 8;
  const int64_t count = cells - first < 8 ? cells - first : 8;
  for (int64_t j = 0; j < count; ++j) v |= (uint32_t)(density[first + j] > threshold) << j;
  bits[b] = (uint8_t)v;
}

template <typename T>
__global__ void decay_max_dense_kernel(T* __restrict__ density, int64_t n_cells, T decay, const T* __restrict__ values,
                                       int64_t m) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_cells) return;
  const T v = density[i] * decay;
  density[i] = (i < m && values[i] >= T(0) && values[i] > v) ? values[i] : v;
}

template <typename T>
__global__ void decay_kernel(T* __restrict__ density, int64_t n_cells, T decay) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n_cells) density[i] *= decay;
}

// max via the integer order of the bit patterns: for v >= 0 it is the float order, and any
// negative stored value (sign bit set) compares below it.
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
}
__device__ __forceinline__ void atomic_max_nonneg(double* addr, double v) {
  atomicMax(reinterpret_cast<long long*>(addr), (long long)__double_as_longlong(v));
}

template <typename T>
__global__ void scatter_max_kernel(T* __restrict__ density, int64_t n_cells, const int64_t* __restrict__ cells,
                                   const T* __restrict__ values, int64_t m) {
  const int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= m) return;
  const int64_t c = cells[k];
  const T v = values[k];
  if (c < 0 || c >= n_cells || !(v >= T(0))) return;  // out of range, negative or NaN: ignored
  atomic_max_nonneg(density + c, v);
}

}  // namespace

template <typename T>
void tk_raymarch_aabb_cuda(const T* o, const T* d, int64_t n, const T* aabb, T min_near, T* near, T* far,
                           void* stream) {
  if (n <= 0) return;
  aabb_kernel<T><<<blocks_for(n), kThreads, 0, (cudaStream_t)stream>>>(o, d, n, aabb[0], aabb[1], aabb[2], aabb[3],
                                                                       aabb[4], aabb[5], min_near, near, far);
}

template <typename T>
void tk_raymarch_count_cuda(const T* o, const T* d, const T* near, const T* far, const T* jitter, int64_t n,
                            tk::MarchParams<T> params, int64_t* counts, void* stream) {
  if (n <= 0) return;
  count_kernel<T><<<blocks_for(n), kThreads, 0, (cudaStream_t)stream>>>(o, d, near, far, jitter, n, params, counts);
}

template <typename T>
void tk_raymarch_fill_cuda(const T* o, const T* d, const T* near, const T* far, const T* jitter, int64_t n,
                           tk::MarchParams<T> params, const int64_t* offsets, tk::MarchOut<T> out, void* stream) {
  if (n <= 0) return;
  fill_kernel<T><<<blocks_for(n), kThreads, 0, (cudaStream_t)stream>>>(o, d, near, far, jitter, n, params, offsets,
                                                                       out);
}

template <typename T>
void tk_raymarch_backward_cuda(const T* gp, const T* gd, const T* ts, const int64_t* offsets, int64_t n, T* grad_o,
                               T* grad_d, void* stream) {
  if (n <= 0) return;
  backward_kernel<T><<<blocks_for(n), kThreads, 0, (cudaStream_t)stream>>>(gp, gd, ts, offsets, n, grad_o, grad_d);
}

template <typename T>
void tk_raymarch_pack_cuda(const T* density, int64_t cells, T threshold, uint8_t* bits, void* stream) {
  const int64_t bytes = (cells + 7) / 8;
  if (bytes <= 0) return;
  pack_kernel<T><<<blocks_for(bytes), kThreads, 0, (cudaStream_t)stream>>>(density, cells, threshold, bits);
}

template <typename T>
void tk_raymarch_update_cuda(T* density, int64_t n_cells, T decay, const int64_t* cells, const T* values, int64_t m,
                             void* stream) {
  if (n_cells <= 0) return;
  cudaStream_t s = (cudaStream_t)stream;
  if (!cells) {
    decay_max_dense_kernel<T><<<blocks_for(n_cells), kThreads, 0, s>>>(density, n_cells, decay, values, m);
    return;
  }
  decay_kernel<T><<<blocks_for(n_cells), kThreads, 0, s>>>(density, n_cells, decay);
  if (m > 0) scatter_max_kernel<T><<<blocks_for(m), kThreads, 0, s>>>(density, n_cells, cells, values, m);
}

#define TK_RAYMARCH_INSTANTIATE_CUDA(T)                                                                         \
  template void tk_raymarch_aabb_cuda<T>(const T*, const T*, int64_t, const T*, T, T*, T*, void*);              \
  template void tk_raymarch_count_cuda<T>(const T*, const T*, const T*, const T*, const T*, int64_t,            \
                                          tk::MarchParams<T>, int64_t*, void*);                                 \
  template void tk_raymarch_fill_cuda<T>(const T*, const T*, const T*, const T*, const T*, int64_t,             \
                                         tk::MarchParams<T>, const int64_t*, tk::MarchOut<T>, void*);           \
  template void tk_raymarch_backward_cuda<T>(const T*, const T*, const T*, const int64_t*, int64_t, T*, T*,     \
                                             void*);                                                            \
  template void tk_raymarch_pack_cuda<T>(const T*, int64_t, T, uint8_t*, void*);                                \
  template void tk_raymarch_update_cuda<T>(T*, int64_t, T, const int64_t*, const T*, int64_t, void*);

TK_RAYMARCH_INSTANTIATE_CUDA(float)
TK_RAYMARCH_INSTANTIATE_CUDA(double)
