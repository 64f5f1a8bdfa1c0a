// k nearest mesh vertices through the hierarchical search grid: the CUDA kernels (see knn.h).
//
// Build (exact, the CPU kernel's bound-and-filter with one level of blocks):
//   1. one warp per tile of knn_cuda_tile(R, V)^3 cells: the K'-th nearest distance from the
//      middle of the tile's box of cell centres (per-lane top K', merged by lane 0), then the
//      vertices within knn_block_bound2 of that box, compacted in index order (ballot) into the
//      tile's list in the workspace;
//   2. one block per tile, a thread per cell: the K' nearest of the cell centre over the tile's
//      list, in (squared distance, index) order.
// Query: a thread per point over its cell's candidates. Brute force: a thread per point, the
// vertices staged through shared memory.
//
// All squared distances and cell centres go through knn.h's knn_dist2 / knn_centre, which use
// round-to-nearest intrinsics (no fused multiply-add), so they equal the CPU kernel's and torch's.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "common.h"
#include "knn.h"

namespace tk {
namespace {

template <class T>
struct Vec3 {
  T v[3];
};

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("knn: ") + what + ": " + cudaGetErrorString(err));
}

template <class T>
__device__ __forceinline__ T pos_inf() {
  return (T)INFINITY;
}

// Tile t's cell ranges [c0, c1) per axis.
__device__ __forceinline__ void tile_range(int64_t t, int tile, int nt, int R, int* c0, int* c1) {
  const int tc[3] = {(int)(t % nt), (int)((t / nt) % nt), (int)(t / ((int64_t)nt * nt))};
  for (int a = 0; a < 3; ++a) {
    c0[a] = tc[a] * tile;
    c1[a] = min(c0[a] + tile, R);
  }
}

constexpr int kWarp = 32;

// 1. Per tile: the list of vertices that can be among the K' nearest of one of its cell centres.
template <class T>
__global__ void __launch_bounds__(kWarp) knn_tile_lists_kernel(const T* __restrict__ verts, int64_t V, Vec3<T> lo,
                                                              T cell, int R, int K, int tile, int nt,
                                                              int32_t* __restrict__ counts,
                                                              int32_t* __restrict__ lists) {
  __shared__ T shared_best[kWarp * kKnnMaxK];
  __shared__ T shared_dk;
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x;
  int c0[3], c1[3];
  tile_range(t, tile, nt, R, c0, c1);
  T bmin[3], bmax[3], m[3];
  for (int a = 0; a < 3; ++a) {
    bmin[a] = knn_centre(lo.v[a], c0[a], cell);
    bmax[a] = knn_centre(lo.v[a], c1[a] - 1, cell);
  }
  double r2;
  knn_box_middle(bmin, bmax, m, &r2);

  // The K' smallest squared distances from m: per lane over a stride of the vertices, then merged.
  T best[kKnnMaxK];
  for (int s = 0; s < K; ++s) best[s] = pos_inf<T>();
  for (int64_t v = lane; v < V; v += kWarp)
    knn_offer_value(best, K, knn_dist2(m[0], m[1], m[2], verts[3 * v], verts[3 * v + 1], verts[3 * v + 2]));
  for (int s = 0; s < K; ++s) shared_best[lane * K + s] = best[s];
  __syncwarp();
  if (lane == 0) {
    for (int s = 0; s < K; ++s) best[s] = pos_inf<T>();
    for (int q = 0; q < kWarp * K; ++q) knn_offer_value(best, K, shared_best[q]);
    shared_dk = best[K - 1];
  }
  __syncwarp();
  const double u2d = knn_block_bound2((double)shared_dk, r2);
  const T u2 = (T)u2d;  // beyond T's range: +inf, keeps all

  // Keep the vertices within the bound of the box, in index order.
  int32_t* list = lists + t * V;
  int64_t n = 0;
  for (int64_t base = 0; base < V; base += kWarp) {
    const int64_t v = base + lane;
    bool keep = false;
    if (v < V) keep = knn_box_dist2(verts[3 * v], verts[3 * v + 1], verts[3 * v + 2], bmin, bmax) <= u2;
    const unsigned mask = __ballot_sync(0xffffffffu, keep);
    if (keep) list[n + __popc(mask & ((1u << lane) - 1u))] = (int32_t)v;
    n += __popc(mask);
  }
  if (lane == 0) counts[t] = (int32_t)n;
}

// 2. Per cell of the tile: the K' nearest over the tile's list.
template <class T>
__global__ void knn_cell_select_kernel(const T* __restrict__ verts, int64_t V, Vec3<T> lo, T cell, int R, int K,
                                       int tile, int nt, const int32_t* __restrict__ counts,
                                       const int32_t* __restrict__ lists, int32_t* __restrict__ cand) {
  const int64_t t = blockIdx.x;
  int c0[3], c1[3];
  tile_range(t, tile, nt, R, c0, c1);
  const int w = c1[0] - c0[0], h = c1[1] - c0[1], d = c1[2] - c0[2];
  const int cells = w * h * d;
  const int32_t* list = lists + t * V;
  const int64_t n = counts[t];
  for (int q = threadIdx.x; q < cells; q += blockDim.x) {
    const int i = c0[0] + q % w, j = c0[1] + (q / w) % h, l = c0[2] + q / (w * h);
    const T cx = knn_centre(lo.v[0], i, cell), cy = knn_centre(lo.v[1], j, cell), cz = knn_centre(lo.v[2], l, cell);
    T bd[kKnnMaxK];
    int32_t bi[kKnnMaxK];
    for (int s = 0; s < K; ++s) {
      bd[s] = pos_inf<T>();
      bi[s] = -1;
    }
    for (int64_t e = 0; e < n; ++e) {
      const int64_t v = list[e];
      const T d2 = knn_dist2(cx, cy, cz, __ldg(verts + 3 * v), __ldg(verts + 3 * v + 1), __ldg(verts + 3 * v + 2));
      if (d2 <= bd[K - 1]) knn_offer(bd, bi, K, d2, v);
    }
    int32_t* row = cand + ((int64_t)i + (int64_t)R * ((int64_t)j + (int64_t)R * l)) * K;
    for (int s = 0; s < K; ++s) row[s] = bi[s];
  }
}

template <class T>
__global__ void knn_query_kernel(const T* __restrict__ points, int64_t N, const T* __restrict__ verts, int64_t V,
                                 Vec3<T> lo, T inv_cell, int R, const int32_t* __restrict__ cand, int Kc, int k,
                                 int64_t* __restrict__ out_idx, T* __restrict__ out_d2) {
  const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const T px = points[3 * n], py = points[3 * n + 1], pz = points[3 * n + 2];
  const int32_t* row = cand + knn_cell_of(px, py, pz, lo.v, inv_cell, R) * Kc;
  T bd[kKnnMaxK];
  int64_t bi[kKnnMaxK];
  for (int s = 0; s < k; ++s) {
    bd[s] = pos_inf<T>();
    bi[s] = -1;
  }
  for (int c = 0; c < Kc; ++c) {
    const int64_t v = row[c];
    if (v < 0 || v >= V) continue;
    const T d2 = knn_dist2(px, py, pz, __ldg(verts + 3 * v), __ldg(verts + 3 * v + 1), __ldg(verts + 3 * v + 2));
    knn_offer(bd, bi, k, d2, v);
  }
  for (int s = 0; s < k; ++s) {
    out_idx[n * k + s] = bi[s];
    out_d2[n * k + s] = bd[s];
  }
}

constexpr int kBruteThreads = 128;
constexpr int kBruteTile = 256;  // vertices staged in shared memory per step

template <class T>
__global__ void __launch_bounds__(kBruteThreads) knn_brute_kernel(const T* __restrict__ points, int64_t N,
                                                                  const T* __restrict__ verts, int64_t V, int k,
                                                                  int64_t* __restrict__ out_idx,
                                                                  T* __restrict__ out_d2) {
  __shared__ T sx[kBruteTile], sy[kBruteTile], sz[kBruteTile];
  const int64_t n = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = n < N;
  T px = 0, py = 0, pz = 0;
  if (active) {
    px = points[3 * n];
    py = points[3 * n + 1];
    pz = points[3 * n + 2];
  }
  T bd[kKnnMaxK];
  int64_t bi[kKnnMaxK];
  for (int s = 0; s < k; ++s) {
    bd[s] = pos_inf<T>();
    bi[s] = -1;
  }
  for (int64_t v0 = 0; v0 < V; v0 += kBruteTile) {
    const int m = (int)min((int64_t)kBruteTile, V - v0);
    __syncthreads();
    for (int q = threadIdx.x; q < m; q += blockDim.x) {
      sx[q] = verts[3 * (v0 + q)];
      sy[q] = verts[3 * (v0 + q) + 1];
      sz[q] = verts[3 * (v0 + q) + 2];
    }
    __syncthreads();
    if (active)
      for (int q = 0; q < m; ++q) {
        const T d2 = knn_dist2(px, py, pz, sx[q], sy[q], sz[q]);
        if (d2 <= bd[k - 1]) knn_offer(bd, bi, k, d2, v0 + q);
      }
  }
  if (!active) return;
  for (int s = 0; s < k; ++s) {
    out_idx[n * k + s] = bi[s];
    out_d2[n * k + s] = bd[s];
  }
}

template <class T>
void build_cuda(const T* verts, int64_t V, const T* lo, T cell, int R, int K, int32_t* cand, int32_t* workspace,
                void* stream) {
  if (R <= 0 || K <= 0 || K > kKnnMaxK || V <= 0) return;
  cudaStream_t s = (cudaStream_t)stream;
  const int tile = knn_cuda_tile(R, V);
  const int nt = div_up(R, tile);
  const int64_t ntiles = (int64_t)nt * nt * nt;
  int32_t* counts = workspace;
  int32_t* lists = workspace + ntiles;
  const Vec3<T> lo3{{lo[0], lo[1], lo[2]}};
  knn_tile_lists_kernel<T><<<(unsigned)ntiles, kWarp, 0, s>>>(verts, V, lo3, cell, R, K, tile, nt, counts, lists);
  check_launch("tile lists");
  const int cells = tile * tile * tile;
  const int threads = cells < 256 ? (cells + kWarp - 1) / kWarp * kWarp : 256;
  knn_cell_select_kernel<T><<<(unsigned)ntiles, threads, 0, s>>>(verts, V, lo3, cell, R, K, tile, nt, counts, lists,
                                                                 cand);
  check_launch("cell select");
}

template <class T>
void query_cuda(const T* points, int64_t N, const T* verts, int64_t V, const T* lo, T inv_cell, int R,
                const int32_t* cand, int Kc, int k, int64_t* out_idx, T* out_d2, void* stream) {
  if (N <= 0 || k <= 0 || k > kKnnMaxK) return;
  const Vec3<T> lo3{{lo[0], lo[1], lo[2]}};
  const int threads = 256;
  const unsigned blocks = (unsigned)((N + threads - 1) / threads);
  knn_query_kernel<T><<<blocks, threads, 0, (cudaStream_t)stream>>>(points, N, verts, V, lo3, inv_cell, R, cand, Kc,
                                                                     k, out_idx, out_d2);
  check_launch("query");
}

template <class T>
void brute_cuda(const T* points, int64_t N, const T* verts, int64_t V, int k, int64_t* out_idx, T* out_d2,
                void* stream) {
  if (N <= 0 || k <= 0 || k > kKnnMaxK) return;
  const unsigned blocks = (unsigned)((N + kBruteThreads - 1) / kBruteThreads);
  knn_brute_kernel<T><<<blocks, kBruteThreads, 0, (cudaStream_t)stream>>>(points, N, verts, V, k, out_idx, out_d2);
  check_launch("brute force");
}

}  // namespace

void tk_knn_build_cuda(const float* verts, int64_t V, const float* lo, float cell, int R, int K, int32_t* cand,
                       int32_t* workspace, void* stream) {
  build_cuda(verts, V, lo, cell, R, K, cand, workspace, stream);
}
void tk_knn_build_cuda(const double* verts, int64_t V, const double* lo, double cell, int R, int K,
                       int32_t* cand, int32_t* workspace, void* stream) {
  build_cuda(verts, V, lo, cell, R, K, cand, workspace, stream);
}
void tk_knn_query_cuda(const float* points, int64_t N, const float* verts, int64_t V, const float* lo,
                       float inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx, float* out_d2,
                       void* stream) {
  query_cuda(points, N, verts, V, lo, inv_cell, R, cand, Kc, k, out_idx, out_d2, stream);
}
void tk_knn_query_cuda(const double* points, int64_t N, const double* verts, int64_t V, const double* lo,
                       double inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx,
                       double* out_d2, void* stream) {
  query_cuda(points, N, verts, V, lo, inv_cell, R, cand, Kc, k, out_idx, out_d2, stream);
}
void tk_knn_brute_cuda(const float* points, int64_t N, const float* verts, int64_t V, int k, int64_t* out_idx,
                       float* out_d2, void* stream) {
  brute_cuda(points, N, verts, V, k, out_idx, out_d2, stream);
}
void tk_knn_brute_cuda(const double* points, int64_t N, const double* verts, int64_t V, int k, int64_t* out_idx,
                       double* out_d2, void* stream) {
  brute_cuda(points, N, verts, V, k, out_idx, out_d2, stream);
}

}  // namespace tk
