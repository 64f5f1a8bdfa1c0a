// hashgrid_batched on CUDA (raw CUDA, no torch headers). Same math as the CPU kernel: the per-level
// functions of kernels/hashgrid_batched.h.
//  - forward: one thread per (query, level); neighbouring threads share a query, hence an item;
//  - backward: one thread per query (all levels: dx summed in registers, written once); the table
//    gradient by atomicAdd into dtables, zeroed first with cudaMemsetAsync.
// Item ids outside [0, V) give zero output and no gradient.
#include <cuda_runtime.h>

#include "common.h"
#include "hashgrid_batched.h"

namespace {

using tk::hgb::Levels;
using tk::hgb::Shape;

constexpr int kThreads = 256;

struct AtomicAdd {
  template <class T>
  TK_HD void operator()(T* p, T v) const {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
};

template <class T, int D, int F>
__global__ void forward_kernel(const T* __restrict__ x, const int64_t* __restrict__ item, const T* __restrict__ tables,
                               const uint8_t* __restrict__ mask, T* __restrict__ out, Shape sh, Levels lv) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int L = lv.n;
  if (t >= sh.Q * L) return;
  const int64_t q = t / L;
  const int l = (int)(t - q * L);
  const int64_t v = item[q];
  T* out_q = out + q * sh.M * L * F;
  if (v < 0 || v >= sh.V || (mask != nullptr && mask[l] == 0)) {
    tk::hgb::zero_level<T, F>(sh.M, L, l, out_q);
    return;
  }
  tk::hgb::forward_level<T, D, F>(x + q * D, tables + v * sh.M * sh.S * F, sh.M, sh.S, lv, l, out_q);
}

template <class T, int D, int F>
__global__ void backward_kernel(const T* __restrict__ go, const T* __restrict__ x, const int64_t* __restrict__ item,
                                const T* __restrict__ tables, const uint8_t* __restrict__ mask, T* __restrict__ dx,
                                T* __restrict__ dtables, Shape sh, Levels lv) {
  const int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= sh.Q) return;
  const int64_t v = item[q];
  T dxq[D];
  TK_HGB_UNROLL
  for (int d = 0; d < D; ++d) dxq[d] = T(0);
  if (v >= 0 && v < sh.V) {
    const int64_t item_stride = sh.M * sh.S * F;
    const T* tab_v = tables + v * item_stride;
    T* dtab_v = dtables ? dtables + v * item_stride : nullptr;
    const T* go_q = go + q * sh.M * lv.n * F;
    for (int l = 0; l < lv.n; ++l) {
      if (mask != nullptr && mask[l] == 0) continue;
      tk::hgb::backward_level<T, D, F>(x + q * D, tab_v, go_q, sh.M, sh.S, lv, l, dtab_v, dx ? dxq : nullptr,
                                       AtomicAdd());
    }
  }
  if (dx) {
    TK_HGB_UNROLL
    for (int d = 0; d < D; ++d) dx[q * D + d] = dxq[d];
  }
}

template <class T, int D, int F>
void forward_launch(const T* x, const int64_t* item, const T* tables, const uint8_t* mask, T* out, const Shape& sh,
                    const Levels& lv, cudaStream_t stream) {
  const int64_t n = sh.Q * lv.n;
  if (n == 0) return;
  const unsigned blocks = (unsigned)((n + kThreads - 1) / kThreads);
  forward_kernel<T, D, F><<<blocks, kThreads, 0, stream>>>(x, item, tables, mask, out, sh, lv);
}

template <class T, int D, int F>
void backward_launch(const T* go, const T* x, const int64_t* item, const T* tables, const uint8_t* mask, T* dx,
                     T* dtables, const Shape& sh, const Levels& lv, cudaStream_t stream) {
  if (dtables) cudaMemsetAsync(dtables, 0, sizeof(T) * (size_t)(sh.V * sh.M * sh.S * F), stream);
  if (sh.Q == 0 || (!dx && !dtables)) return;
  const unsigned blocks = (unsigned)((sh.Q + kThreads - 1) / kThreads);
  backward_kernel<T, D, F><<<blocks, kThreads, 0, stream>>>(go, x, item, tables, mask, dx, dtables, sh, lv);
}

// Runtime (D, F) -> template instance (unsupported pairs are refused by the torch wrapper).
#define TK_HGB_DISPATCH(D, F, CALL)                         \
  do {                                                      \
    if (D == 3 && F == 4) { CALL(3, 4); }                   \
    else if (D == 3 && F == 2) { CALL(3, 2); }              \
    else if (D == 3 && F == 1) { CALL(3, 1); }              \
    else if (D == 3 && F == 8) { CALL(3, 8); }              \
    else if (D == 2 && F == 4) { CALL(2, 4); }              \
    else if (D == 2 && F == 2) { CALL(2, 2); }              \
    else if (D == 2 && F == 1) { CALL(2, 1); }              \
    else if (D == 2 && F == 8) { CALL(2, 8); }              \
  } while (0)

template <class T>
void forward_any(const T* x, const int64_t* item, const T* tables, const uint8_t* mask, T* out, const Shape& sh,
                 const Levels& lv, void* stream) {
  cudaStream_t s = (cudaStream_t)stream;
#define TK_HGB_FWD(DD, FF) forward_launch<T, DD, FF>(x, item, tables, mask, out, sh, lv, s)
  TK_HGB_DISPATCH(sh.D, sh.F, TK_HGB_FWD);
#undef TK_HGB_FWD
}

template <class T>
void backward_any(const T* go, const T* x, const int64_t* item, const T* tables, const uint8_t* mask, T* dx,
                  T* dtables, const Shape& sh, const Levels& lv, void* stream) {
  cudaStream_t s = (cudaStream_t)stream;
#define TK_HGB_BWD(DD, FF) backward_launch<T, DD, FF>(go, x, item, tables, mask, dx, dtables, sh, lv, s)
  TK_HGB_DISPATCH(sh.D, sh.F, TK_HGB_BWD);
#undef TK_HGB_BWD
}

}  // namespace

void tk_hashgrid_batched_forward_cuda(const float* x, const int64_t* item, const float* tables,
                                      const uint8_t* level_mask, float* out, const Shape& shape, const Levels& levels,
                                      void* stream) {
  forward_any<float>(x, item, tables, level_mask, out, shape, levels, stream);
}

void tk_hashgrid_batched_forward_cuda(const double* x, const int64_t* item, const double* tables,
                                      const uint8_t* level_mask, double* out, const Shape& shape,
                                      const Levels& levels, void* stream) {
  forward_any<double>(x, item, tables, level_mask, out, shape, levels, stream);
}

void tk_hashgrid_batched_backward_cuda(const float* grad_out, const float* x, const int64_t* item,
                                       const float* tables, const uint8_t* level_mask, float* dx, float* dtables,
                                       const Shape& shape, const Levels& levels, void* stream) {
  backward_any<float>(grad_out, x, item, tables, level_mask, dx, dtables, shape, levels, stream);
}

void tk_hashgrid_batched_backward_cuda(const double* grad_out, const double* x, const int64_t* item,
                                       const double* tables, const uint8_t* level_mask, double* dx, double* dtables,
                                       const Shape& shape, const Levels& levels, void* stream) {
  backward_any<double>(grad_out, x, item, tables, level_mask, dx, dtables, shape, levels, stream);
}
