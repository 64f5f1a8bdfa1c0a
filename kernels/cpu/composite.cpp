// Compositing of packed ray samples on the CPU: OpenMP over rays, each ray one sequential
// front-to-back pass (kernels/composite.h; the exps of each block of 64 samples are computed
// first in a vectorised loop). Every sample belongs to one ray, so every output is written by
// exactly one thread: no atomics and no reductions.
#include "composite.h"

namespace {

// Rays differ a lot in length (and early termination cuts some short): hand them out in chunks.
constexpr int kRayChunk = 32;

template <typename scalar_t, int CC>
void forward_rays(const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas, const scalar_t* ts,
                  const int64_t* offsets, int64_t n_rays, int64_t n_samples, int channels, scalar_t stop,
                  scalar_t* rgb, scalar_t* opacity, scalar_t* depth, scalar_t* weights) {
#pragma omp parallel for schedule(dynamic, kRayChunk) if (n_rays > kRayChunk)
  for (int64_t r = 0; r < n_rays; ++r) {
    int64_t begin, end;
    tk::composite_ray_range(offsets, r, n_samples, &begin, &end);
    tk::composite_forward_ray<scalar_t, CC, true>(sigmas, rgbs, deltas, ts, begin, end, channels, stop,
                                                  rgb + r * channels, opacity + r, depth + r, weights);
  }
}

template <typename scalar_t, int CC>
void backward_rays(const scalar_t* grad_rgb, const scalar_t* grad_opacity, const scalar_t* grad_depth,
                   const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas, const scalar_t* ts,
                   const int64_t* offsets, int64_t n_rays, int64_t n_samples, int channels, scalar_t stop,
                   const scalar_t* rgb, const scalar_t* opacity, const scalar_t* depth, scalar_t* grad_sigmas,
                   scalar_t* grad_rgbs) {
#pragma omp parallel for schedule(dynamic, kRayChunk) if (n_rays > kRayChunk)
  for (int64_t r = 0; r < n_rays; ++r) {
    int64_t begin, end;
    tk::composite_ray_range(offsets, r, n_samples, &begin, &end);
    tk::composite_backward_ray<scalar_t, CC, true>(grad_rgb + r * channels, grad_opacity[r], grad_depth[r],
                                                   sigmas, rgbs, deltas, ts, begin, end, channels, stop,
                                                   rgb + r * channels, opacity[r], depth[r], grad_sigmas, grad_rgbs);
  }
}

}  // namespace

template <typename scalar_t>
void tk_composite_forward_cpu(const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                              const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                              int channels, double stop_transmittance, scalar_t* rgb, scalar_t* opacity,
                              scalar_t* depth, scalar_t* weights) {
  const scalar_t stop = (scalar_t)stop_transmittance;
  switch (channels) {  // the common channel counts get unrolled loops and register accumulators
    case 1:
      forward_rays<scalar_t, 1>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                opacity, depth, weights);
      break;
    case 3:
      forward_rays<scalar_t, 3>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                opacity, depth, weights);
      break;
    case 4:
      forward_rays<scalar_t, 4>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                opacity, depth, weights);
      break;
    default:
      forward_rays<scalar_t, 0>(sigmas, rgbs, deltas, ts, offsets, n_rays, n_samples, channels, stop, rgb,
                                opacity, depth, weights);
  }
}

template <typename scalar_t>
void tk_composite_backward_cpu(const scalar_t* grad_rgb, const scalar_t* grad_opacity, const scalar_t* grad_depth,
                               const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                               const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                               int channels, double stop_transmittance, const scalar_t* rgb,
                               const scalar_t* opacity, const scalar_t* depth, scalar_t* grad_sigmas,
                               scalar_t* grad_rgbs) {
  const scalar_t stop = (scalar_t)stop_transmittance;
  switch (channels) {
    case 1:
      backward_rays<scalar_t, 1>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                 n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs);
      break;
    case 3:
      backward_rays<scalar_t, 3>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                 n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs);
      break;
    case 4:
      backward_rays<scalar_t, 4>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                 n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs);
      break;
    default:
      backward_rays<scalar_t, 0>(grad_rgb, grad_opacity, grad_depth, sigmas, rgbs, deltas, ts, offsets, n_rays,
                                 n_samples, channels, stop, rgb, opacity, depth, grad_sigmas, grad_rgbs);
  }
}

#define TK_COMPOSITE_INSTANTIATE(T)                                                                        \
  template void tk_composite_forward_cpu<T>(const T*, const T*, const T*, const T*, const int64_t*, int64_t, \
                                            int64_t, int, double, T*, T*, T*, T*);                          \
  template void tk_composite_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*,    \
                                             const T*, const int64_t*, int64_t, int64_t, int, double,       \
                                             const T*, const T*, const T*, T*, T*);
TK_COMPOSITE_INSTANTIATE(float)
TK_COMPOSITE_INSTANTIATE(double)
#undef TK_COMPOSITE_INSTANTIATE
