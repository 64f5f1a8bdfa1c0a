// Compositing of packed ray samples on the GPU: one thread per ray, the same sequential
// front-to-back pass as the CPU kernel (kernels/composite.h, per-sample variant kBlocked = false:
// the same bits as the CPU's blocked one, checked on the host by tests/test_ops_composite.py).
// Every output element is written by the thread of its ray, so no atomics are needed.
#include <cuda_runtime.h>

#include "common.h"
#include "composite.h"

namespace {

constexpr int kThreads = 128;

template <typename scalar_t, int CC>
__global__ void composite_forward_kernel(const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
                                         const scalar_t* __restrict__ deltas, const scalar_t* __restrict__ ts,
                                         const int64_t* __restrict__ offsets, int64_t n_rays, int64_t n_samples,
                                         int channels, scalar_t stop, scalar_t* __restrict__ rgb,
                                         scalar_t* __restrict__ opacity, scalar_t* __restrict__ depth,
                                         scalar_t* __restrict__ weights) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  int64_t begin, end;
  tk::composite_ray_range(offsets, r, n_samples, &begin, &end);
  tk::composite_forward_ray<scalar_t, CC, false>(sigmas, rgbs, deltas, ts, begin, end, channels, stop,
                                                 rgb + r * channels, opacity + r, depth + r, weights);
}

template <typename scalar_t, int CC>
__global__ void composite_backward_kernel(const scalar_t* __restrict__ grad_rgb,
                                          const scalar_t* __restrict__ grad_opacity,
                                          const scalar_t* __restrict__ grad_depth,
                                          const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
                                          const scalar_t* __restrict__ deltas, const scalar_t* __restrict__ ts,
                                          const int64_t* __restrict__ offsets, int64_t n_rays, int64_t n_samples,
                                          int channels, scalar_t stop, const scalar_t* __restrict__ rgb,
                                          const scalar_t* __restrict__ opacity, const scalar_t* __restrict__ depth,
                                          scalar_t* __restrict__ grad_sigmas, scalar_t* __restrict__ grad_rgbs) {
  const int64_t r = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= n_rays) return;
  int64_t begin, end;
  tk::composite_ray_range(offsets, r, n_samples, &begin, &end);
  tk::composite_backward_ray<scalar_t, CC, false>(grad_rgb + r * channels, grad_opacity[r], grad_depth[r],
                                                  sigmas, rgbs, deltas, ts, begin, end, channels, stop,
                                                  rgb + r * channels, opacity[r], depth[r], grad_sigmas, grad_rgbs);
}

inline unsigned int blocks_for(int64_t n_rays) { return (unsigned int)((n_rays + kThreads - 1) / kThreads); }

template <typename scalar_t, int CC>
void launch_forward(const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas, const scalar_t* ts,
                    const int64_t* offsets, int64_t n_rays, int64_t n_samples, int channels, scalar_t stop,
                    scalar_t* rgb, scalar_t* opacity, scalar_t* depth, scalar_t* weights, cudaStream_t stream) {
  composite_forward_kernel<scalar_t, CC><<<blocks_for(n_rays), kThreads, 0, stream>>>(
      sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb, opacity, depth, weights);
}

template <typename scalar_t, int CC>
void launch_backward(const scalar_t* grad_rgb, const scalar_t* grad_opacity, const scalar_t* grad_depth,
                     const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas, const scalar_t* ts,
                     const int64_t* offsets, int64_t n_rays, int64_t n_samples, int channels, scalar_t stop,
                     const scalar_t* rgb, const scalar_t* opacity, const scalar_t* depth, scalar_t* grad_sigmas,
                     scalar_t* grad_rgbs, cudaStream_t stream) {
  composite_backward_kernel<scalar_t, CC><<<blocks_for(n_rays), kThreads, 0, stream>>>(
      grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop,
      rgb, opacity, depth, grad_sigmas, grad_rgbs);
}

}  // namespace

template <typename scalar_t>
void tk_composite_forward_cuda(const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                               const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                               int channels, double stop_transmittance, scalar_t* rgb, scalar_t* opacity,
                               scalar_t* depth, scalar_t* weights, void* stream) {
  if (n_rays <= 0) return;
  const scalar_t stop = (scalar_t)stop_transmittance;
  cudaStream_t s = (cudaStream_t)stream;
  switch (channels) {  // the same specialisations as the CPU kernel
    case 1:
      launch_forward<scalar_t, 1>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                  opacity, depth, weights, s);
      break;
    case 3:
      launch_forward<scalar_t, 3>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                  opacity, depth, weights, s);
      break;
    case 4:
      launch_forward<scalar_t, 4>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                  opacity, depth, weights, s);
      break;
    default:
      launch_forward<scalar_t, 0>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                  opacity, depth, weights, s);
  }
}

template <typename scalar_t>
void tk_composite_backward_cuda(const scalar_t* grad_rgb, const scalar_t* grad_opacity, const scalar_t* grad_depth,
                                const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                                const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                                int channels, double stop_transmittance, const scalar_t* rgb,
                                const scalar_t* opacity, const scalar_t* depth, scalar_t* grad_sigmas,
                                scalar_t* grad_rgbs, void* stream) {
  if (n_rays <= 0) return;
  const scalar_t stop = (scalar_t)stop_transmittance;
  cudaStream_t s = (cudaStream_t)stream;
  switch (channels) {
    case 1:
      launch_backward<scalar_t, 1>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                   n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs, s);
      break;
    case 3:
      launch_backward<scalar_t, 3>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                   n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs, s);
      break;
    case 4:
      launch_backward<scalar_t, 4>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                   n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs, s);
      break;
    default:
      launch_backward<scalar_t, 0>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                   n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs, s);
  }
}

#define TK_COMPOSITE_INSTANTIATE(T)                                                                          \
  template void tk_composite_forward_cuda<T>(const T*, const T*, const T*, const T*, const int64_t*, int64_t, \
                                             int64_t, int, double, T*, T*, T*, T*, void*);                    \
  template void tk_composite_backward_cuda<T>(const T*, const T*, const T*, const T*, const T*, const T*,     \
                                              const T*, const int64_t*, int64_t, int64_t, int, double,        \
                                              const T*, const T*, const T*, T*, T*, void*);
TK_COMPOSITE_INSTANTIATE(float)
TK_COMPOSITE_INSTANTIATE(double)
#undef TK_COMPOSITE_INSTANTIATE
