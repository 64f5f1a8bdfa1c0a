// Volume rendering (front-to-back alpha compositing) of packed ray samples: the per-ray math
// shared by the C++ (OpenMP over rays) and CUDA (one thread per ray) kernels, and the raw-pointer
// launchers. The spec is talkcli/ops/composite.py (composite_reference).
//
// Ray r owns samples offsets[r] .. offsets[r+1]-1, front to back. Per sample:
//   alpha_i = 1 - exp(-sigma_i delta_i),  w_i = T_i alpha_i,  T_{i+1} = T_i exp(-sigma_i delta_i)
// and a ray stops (the rest get w = 0 and no gradient) at the first sample with T_i < stop.
// Backward with g_i = g_rgb . c_i + g_opacity + g_depth t_i and W = g_rgb . rgb + g_opacity
// opacity + g_depth depth (= sum of all active w_j g_j, from the forward outputs):
//   dL/dsigma_i = delta_i (T_{i+1} g_i - (W - sum_{j<=i} w_j g_j)),  dL/dc_i = w_i g_rgb.
// The backward recomputes T_i with exactly the forward's operations (exp by the fma-only
// composite_exp, then one multiply per sample), so both passes stop at the same sample.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#include "common.h"

namespace tk {

#if defined(_OPENMP) && !defined(__CUDACC__)
#define TK_COMPOSITE_SIMD _Pragma("omp simd")
#else
#define TK_COMPOSITE_SIMD
#endif

// Samples per block of the CPU kernels' vectorised exp pass (kBlocked below).
constexpr int kCompositeBlock = 64;

TK_HD uint32_t composite_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

TK_HD float composite_bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

// exp(x) in float32 without a library call, so that the CPU kernels vectorise it (within 2 ulp
// of expf): x = n ln2 + r with |r| <= ln2/2, exp(r) by its degree-7 Taylor polynomial, 2^n put
// into the exponent bits. Every multiply-add is an explicit fma so the result is the same in
// every context (vectorised or not, host or device). Inputs are clamped to [-87, 88]:
// exp(-87) = 1.6e-38 stands in for 0. NaN stays NaN.
TK_HD float composite_exp(float x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float kf = fmaf(x, 1.44269504088896341f, magic);
  const float n = kf - magic;
  float r = fmaf(n, -0.693145751953125f, x);  // ln2 split in a short high part ...
  r = fmaf(n, -1.428606765330187e-6f, r);     // ... and the rest
  float p = 1.0f / 5040.0f;
  p = fmaf(p, r, 1.0f / 720.0f);
  p = fmaf(p, r, 1.0f / 120.0f);
  p = fmaf(p, r, 1.0f / 24.0f);
  p = fmaf(p, r, 1.0f / 6.0f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  // n as an integer from kf's low mantissa bits (integer arithmetic: defined even for NaN).
  const uint32_t scale = (composite_float_bits(kf) - composite_float_bits(magic) + 127u) << 23;
  return p * composite_bits_float(scale);
}
TK_HD double composite_exp(double x) { return exp(x); }  // float64: gradcheck, accuracy first

// The samples of ray r, clamped to [0, n_samples] so that bad offsets cannot reach outside the
// arrays (the wrappers check the offsets where that is cheap).
TK_HD void composite_ray_range(const int64_t* offsets, int64_t r, int64_t n_samples, int64_t* begin,
                               int64_t* end) {
  int64_t b = offsets[r], e = offsets[r + 1];
  b = b < 0 ? 0 : (b > n_samples ? n_samples : b);
  e = e < b ? b : (e > n_samples ? n_samples : e);
  *begin = b;
  *end = e;
}

// exp(-sigma delta): the transmittance of one sample's interval (1 - alpha).
template <typename scalar_t>
TK_HD scalar_t composite_transmit(scalar_t sigma, scalar_t delta) {
  return composite_exp(-(sigma * delta));
}

// composite_transmit of n <= kCompositeBlock consecutive samples, vectorised (CPU). Not inlined
// on the host: its vector constants would otherwise stay in registers across the caller's scan
// loop and push the transmittance out to the stack.
#if defined(__CUDACC__)
#define TK_COMPOSITE_BLOCK_FN TK_HD
#else
#define TK_COMPOSITE_BLOCK_FN __attribute__((noinline))
#endif
template <typename scalar_t>
TK_COMPOSITE_BLOCK_FN void composite_transmit_block(const scalar_t* __restrict__ sigmas,
                                                    const scalar_t* __restrict__ deltas, int n,
                                                    scalar_t* __restrict__ out) {
  TK_COMPOSITE_SIMD
  for (int k = 0; k < n; ++k) out[k] = composite_transmit(sigmas[k], deltas[k]);
}

// Sums along a ray (colour, opacity, depth, and the backward's suffix sums) are accumulated in
// double also for float32 samples: the products of two floats are exact in double, so long rays
// lose no digits, and the backward's total-minus-prefix keeps its precision. Only the per-sample
// weights and transmittances are float.
using composite_acc_t = double;

// Forward of one ray. CC > 0: compile-time channel count (C must equal it); CC == 0: any C
// (the colour sums then take one extra pass per channel over the ray's stored weights).
// kBlocked (CPU): the exps of a block of samples are computed first in a vectorised loop, then
// the block is scanned; otherwise (GPU) sample by sample; both give the same bits.
// Writes the ray's rgb row, opacity, depth and all its weights.
template <typename scalar_t, int CC, bool kBlocked>
TK_HD void composite_forward_ray(const scalar_t* __restrict__ sigmas, const scalar_t* __restrict__ rgbs,
                                 const scalar_t* __restrict__ deltas, const scalar_t* __restrict__ ts,
                                 int64_t begin, int64_t end, int C, scalar_t stop,
                                 scalar_t* __restrict__ out_rgb, scalar_t* __restrict__ out_opacity,
                                 scalar_t* __restrict__ out_depth, scalar_t* __restrict__ weights) {
  using acc_t = composite_acc_t;
  const int nc = CC > 0 ? CC : C;
  acc_t acc[CC > 0 ? CC : 1];
  for (int c = 0; c < (CC > 0 ? CC : 1); ++c) acc[c] = acc_t(0);
  acc_t opacity = acc_t(0), depth = acc_t(0);
  scalar_t T = scalar_t(1);
  int64_t i = begin;
  bool stopped = false;
  while (i < end && !stopped) {
    const int n = end - i < kCompositeBlock ? (int)(end - i) : kCompositeBlock;
    scalar_t eb[kBlocked ? kCompositeBlock : 1];
    if constexpr (kBlocked) composite_transmit_block(sigmas + i, deltas + i, n, eb);
    for (int k = 0; k < n; ++k, ++i) {
      if (T < stop) {  // early termination: this sample and the rest get no weight
        stopped = true;
        break;
      }
      scalar_t e;
      if constexpr (kBlocked) {
        e = eb[k];
      } else {
        e = composite_transmit(sigmas[i], deltas[i]);
      }
      const scalar_t w = T * (scalar_t(1) - e);
      if constexpr (CC > 0) {
        const scalar_t* ci = rgbs + i * CC;
        for (int c = 0; c < CC; ++c) acc[c] += acc_t(w) * acc_t(ci[c]);
      }
      opacity += acc_t(w);
      depth += acc_t(w) * acc_t(ts[i]);
      weights[i] = w;
      T = T * e;
    }
  }
  const int64_t active_end = i;
  for (; i < end; ++i) weights[i] = scalar_t(0);  // terminated
  if constexpr (CC > 0) {
    for (int c = 0; c < CC; ++c) out_rgb[c] = scalar_t(acc[c]);
  } else {
    for (int c = 0; c < nc; ++c) {
      acc_t sum = acc_t(0);
      for (int64_t j = begin; j < active_end; ++j) sum += acc_t(weights[j]) * acc_t(rgbs[j * nc + c]);
      out_rgb[c] = scalar_t(sum);
    }
  }
  *out_opacity = scalar_t(opacity);
  *out_depth = scalar_t(depth);
}

// Backward of one ray: grad_sigmas and grad_rgbs of all its samples (zeros after termination).
// T and w are recomputed with the forward's exact operations.
template <typename scalar_t, int CC, bool kBlocked>
TK_HD void composite_backward_ray(const scalar_t* __restrict__ grad_rgb, scalar_t grad_opacity,
                                  scalar_t grad_depth, const scalar_t* __restrict__ sigmas,
                                  const scalar_t* __restrict__ rgbs, const scalar_t* __restrict__ deltas,
                                  const scalar_t* __restrict__ ts, int64_t begin, int64_t end, int C,
                                  scalar_t stop, const scalar_t* __restrict__ rgb, scalar_t opacity,
                                  scalar_t depth, scalar_t* __restrict__ grad_sigmas,
                                  scalar_t* __restrict__ grad_rgbs) {
  using acc_t = composite_acc_t;
  const int nc = CC > 0 ? CC : C;
  scalar_t gr[CC > 0 ? CC : 1];
  // W: the sum of w_j g_j over the whole ray, from the forward outputs.
  acc_t total = acc_t(grad_opacity) * acc_t(opacity) + acc_t(grad_depth) * acc_t(depth);
  for (int c = 0; c < nc; ++c) {
    if constexpr (CC > 0) gr[c] = grad_rgb[c];
    total += acc_t(grad_rgb[c]) * acc_t(rgb[c]);
  }
  acc_t prefix = acc_t(0);
  scalar_t T = scalar_t(1);
  int64_t i = begin;
  bool stopped = false;
  while (i < end && !stopped) {
    const int n = end - i < kCompositeBlock ? (int)(end - i) : kCompositeBlock;
    scalar_t eb[kBlocked ? kCompositeBlock : 1];
    if constexpr (kBlocked) composite_transmit_block(sigmas + i, deltas + i, n, eb);
    for (int k = 0; k < n; ++k, ++i) {
      if (T < stop) {
        stopped = true;
        break;
      }
      scalar_t e;
      if constexpr (kBlocked) {
        e = eb[k];
      } else {
        e = composite_transmit(sigmas[i], deltas[i]);
      }
      const scalar_t w = T * (scalar_t(1) - e);
      const scalar_t T_next = T * e;
      const scalar_t* ci = rgbs + i * nc;
      scalar_t* gci = grad_rgbs + i * nc;
      // g_i = dL/dw_i
      acc_t g = acc_t(grad_opacity) + acc_t(grad_depth) * acc_t(ts[i]);
      if constexpr (CC > 0) {
        for (int c = 0; c < CC; ++c) {
          g += acc_t(gr[c]) * acc_t(ci[c]);
          gci[c] = w * gr[c];
        }
      } else {
        for (int c = 0; c < nc; ++c) {
          g += acc_t(grad_rgb[c]) * acc_t(ci[c]);
          gci[c] = w * grad_rgb[c];
        }
      }
      prefix += acc_t(w) * g;
      // T_{i+1} g_i minus the suffix sum over the later active samples (total - prefix).
      grad_sigmas[i] = scalar_t(acc_t(deltas[i]) * (acc_t(T_next) * g - (total - prefix)));
      T = T_next;
    }
  }
  for (; i < end; ++i) {  // terminated: no gradient
    grad_sigmas[i] = scalar_t(0);
    for (int c = 0; c < nc; ++c) grad_rgbs[i * nc + c] = scalar_t(0);
  }
}

}  // namespace tk

// ---- launchers (float and double instantiated in kernels/cpu/composite.cpp and
// kernels/cuda/composite.cu). rgbs/rgb/grad_rgb/grad_rgbs are row-major with `channels` columns.

template <typename scalar_t>
void tk_composite_forward_cpu(const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                              const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                              int channels, double stop_transmittance, scalar_t* rgb, scalar_t* opacity,
                              scalar_t* depth, scalar_t* weights);

template <typename scalar_t>
void tk_composite_backward_cpu(const scalar_t* grad_rgb, const scalar_t* grad_opacity, const scalar_t* grad_depth,
                               const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                               const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                               int channels, double stop_transmittance, const scalar_t* rgb,
                               const scalar_t* opacity, const scalar_t* depth, scalar_t* grad_sigmas,
                               scalar_t* grad_rgbs);

template <typename scalar_t>
void tk_composite_forward_cuda(const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                               const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                               int channels, double stop_transmittance, scalar_t* rgb, scalar_t* opacity,
                               scalar_t* depth, scalar_t* weights, void* stream);

template <typename scalar_t>
void tk_composite_backward_cuda(const scalar_t* grad_rgb, const scalar_t* grad_opacity, const scalar_t* grad_depth,
                                const scalar_t* sigmas, const scalar_t* rgbs, const scalar_t* deltas,
                                const scalar_t* ts, const int64_t* offsets, int64_t n_rays, int64_t n_samples,
                                int channels, double stop_transmittance, const scalar_t* rgb,
                                const scalar_t* opacity, const scalar_t* depth, scalar_t* grad_sigmas,
                                scalar_t* grad_rgbs, void* stream);
