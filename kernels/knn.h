// k nearest mesh vertices of sample points through a coarse search grid (MonoAvatar++ Sec. 3.4,
// "hierarchical k-NN search"): per frame, every cell of an R^3 grid over the mesh's padded
// bounding box stores the K' vertices nearest to its centre; a query point then only compares
// against the K' candidates of its cell.
//
// Shared by kernels/cpu/knn.cpp and kernels/cuda/knn.cu: the arithmetic that must agree bit for bit
// with the PyTorch reference (talkcli/ops/knn.py) and between the two backends, the bounds that
// make the build exact, and the launcher declarations.
//
// Conventions (the reference defines them):
// - cell (i, j, l) has the flat index i + R * (j + R * l) (x fastest) and the centre
//   lo + (i + 0.5) * cell per axis, each operation rounded in the input precision;
// - a point's cell per axis is floor((p - lo) * inv_cell) clamped to [0, R - 1] (NaN -> 0);
// - squared distances are (dx*dx + dy*dy) + dz*dz, every operation rounded (no fused
//   multiply-add, so the values equal torch's elementwise ones; knn.cpp turns contraction off);
// - neighbours are ordered by (squared distance, vertex index): ties go to the lower index;
// - missing neighbours (fewer vertices than asked) are index -1 with squared distance +inf.
#pragma once
#include "common.h"

namespace tk {

// The largest K' (candidates per cell) and k (neighbours per query) the kernels handle: their
// selection buffers are fixed-size arrays.
constexpr int kKnnMaxK = 64;

// --- rounding-exact arithmetic -------------------------------------------------------------------
TK_HD float knn_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TK_HD double knn_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
TK_HD float knn_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TK_HD double knn_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Squared distance between (ax, ay, az) and (bx, by, bz): (dx*dx + dy*dy) + dz*dz.
template <class T>
TK_HD T knn_dist2(T ax, T ay, T az, T bx, T by, T bz) {
  const T dx = ax - bx, dy = ay - by, dz = az - bz;
  return knn_add(knn_add(knn_mul(dx, dx), knn_mul(dy, dy)), knn_mul(dz, dz));
}

// Coordinate of the centre of cell i along an axis: lo + (i + 0.5) * cell.
template <class T>
TK_HD T knn_centre(T lo, int i, T cell) {
  return knn_add(lo, knn_mul((T)i + (T)0.5, cell));
}

// The cell of coordinate x along an axis: floor((x - lo) * inv_cell) clamped to [0, R - 1].
template <class T>
TK_HD int knn_axis_cell(T x, T lo, T inv_cell, int R) {
  const T t = knn_mul(x - lo, inv_cell);
  if (!(t >= (T)0)) return 0;  // also NaN
  if (t >= (T)R) return R - 1;
  return (int)t;  // t >= 0: truncation is floor
}

template <class T>
TK_HD int64_t knn_cell_of(T x, T y, T z, const T* lo, T inv_cell, int R) {
  const int64_t i = knn_axis_cell(x, lo[0], inv_cell, R);
  const int64_t j = knn_axis_cell(y, lo[1], inv_cell, R);
  const int64_t l = knn_axis_cell(z, lo[2], inv_cell, R);
  return i + (int64_t)R * (j + (int64_t)R * l);
}

// --- selection -----------------------------------------------------------------------------------
// (d, id) before (bd, bid): nearer, or as near with the lower index. An entry with d = +inf never
// precedes the empty slot (+inf, -1), so unreachable vertices read as missing.
template <class T>
TK_HD bool knn_before(T d, int64_t id, T bd, int64_t bid) {
  return d < bd || (d == bd && bid >= 0 && id < bid);
}

// Offer (d, id) to the k best so far, kept sorted in (bd, bi); slots start as (+inf, -1).
template <class T, class I>
TK_HD void knn_offer(T* bd, I* bi, int k, T d, int64_t id) {
  if (!knn_before(d, id, bd[k - 1], (int64_t)bi[k - 1])) return;
  int p = k - 1;
  while (p > 0 && knn_before(d, id, bd[p - 1], (int64_t)bi[p - 1])) {
    bd[p] = bd[p - 1];
    bi[p] = bi[p - 1];
    --p;
  }
  bd[p] = d;
  bi[p] = (I)id;
}

// Offer d to the k smallest values so far (sorted, start +inf); bd[k - 1] is then the k-th smallest.
template <class T>
TK_HD void knn_offer_value(T* bd, int k, T d) {
  if (!(d < bd[k - 1])) return;
  int p = k - 1;
  while (p > 0 && d < bd[p - 1]) {
    bd[p] = bd[p - 1];
    --p;
  }
  bd[p] = d;
}

// --- the bound that makes the grid build exact ---------------------------------------------------
// A block of cells whose centres lie in the box [bmin, bmax]; m is a point (rounded to T) near the
// box's middle and r2 the squared distance from m to the farthest box corner (computed in double).
// If dk2 is the K'-th smallest squared distance from m to some set S of vertices, then every centre
// c of the block has K' vertices (those of S) within sqrt(dk2) + r of it, so its K' nearest lie
// within that radius, and only vertices whose distance to the box is at most that can be among
// them. knn_block_bound2 returns that radius squared, widened (relative 1e-5, far above the few
// ulps by which the T-rounded distances differ from the exact ones) so that no vertex the rounded
// selection could pick is filtered out.
TK_HD double knn_block_bound2(double dk2, double r2) {
  const double u = (sqrt(dk2) + sqrt(r2)) * (1.0 + 1e-5);
  return u * u * (1.0 + 1e-5);
}

// Squared distance from (x, y, z) to the box [bmin, bmax] (0 inside).
template <class T>
TK_HD T knn_box_dist2(T x, T y, T z, const T* bmin, const T* bmax) {
  T ex = bmin[0] - x, fx = x - bmax[0];
  T ey = bmin[1] - y, fy = y - bmax[1];
  T ez = bmin[2] - z, fz = z - bmax[2];
  ex = ex > fx ? ex : fx;
  ey = ey > fy ? ey : fy;
  ez = ez > fz ? ez : fz;
  ex = ex > (T)0 ? ex : (T)0;
  ey = ey > (T)0 ? ey : (T)0;
  ez = ez > (T)0 ? ez : (T)0;
  return ex * ex + ey * ey + ez * ez;
}

// The middle m (rounded to T) of the box of cell centres [bmin, bmax] and the squared distance r2
// from m to the farthest corner, in double.
template <class T>
TK_HD void knn_box_middle(const T* bmin, const T* bmax, T* m, double* r2) {
  double s = 0.0;
  for (int a = 0; a < 3; ++a) {
    m[a] = (T)(0.5 * ((double)bmin[a] + (double)bmax[a]));
    const double lo = (double)m[a] - (double)bmin[a], hi = (double)bmax[a] - (double)m[a];
    const double e = lo > hi ? lo : hi;
    s += e * e;
  }
  *r2 = s;
}

// The CUDA build filters the vertices once per tile of kKnnCudaTile^3 cells (a smaller tile when
// the per-tile lists would exceed ~256 MiB) and then selects per cell; its workspace holds, per
// tile, the list of surviving vertex indices and their count.
constexpr int kKnnCudaTile = 4;
inline int knn_cuda_tile(int R, int64_t V) {
  int t = kKnnCudaTile;
  while (t < R) {
    const int64_t nt = (int64_t)div_up(R, t);
    if (nt * nt * nt * (V + 1) * 4 <= ((int64_t)1 << 28)) break;
    t *= 2;
  }
  return t;
}
inline int64_t knn_cuda_workspace_ints(int R, int64_t V) {
  const int64_t nt = (int64_t)div_up(R, knn_cuda_tile(R, V));
  return nt * nt * nt * (V + 1);
}

// --- host launchers (raw pointers; contiguous row-major arrays) ----------------------------------
// build: verts (V, 3) -> cand (R^3, K) int32, per cell the K vertices nearest to its centre in
//   (squared distance, index) order, -1 where V < K. lo: the grid's corner (3 values), cell: the
//   cell size. Exact: equal to a brute-force selection over all vertices.
// query: points (N, 3) -> out_idx (N, k) int64, out_d2 (N, k): the k nearest of each point among
//   the candidates of its cell (cand (R^3, Kc) from the build; entries outside [0, V) skipped).
// brute: points (N, 3) -> the k nearest among all V vertices.
void tk_knn_build_cpu(const float* verts, int64_t V, const float* lo, float cell, int R, int K, int32_t* cand);
void tk_knn_build_cpu(const double* verts, int64_t V, const double* lo, double cell, int R, int K, int32_t* cand);
void tk_knn_query_cpu(const float* points, int64_t N, const float* verts, int64_t V, const float* lo,
                      float inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx, float* out_d2);
void tk_knn_query_cpu(const double* points, int64_t N, const double* verts, int64_t V, const double* lo,
                      double inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx,
                      double* out_d2);
void tk_knn_brute_cpu(const float* points, int64_t N, const float* verts, int64_t V, int k, int64_t* out_idx,
                      float* out_d2);
void tk_knn_brute_cpu(const double* points, int64_t N, const double* verts, int64_t V, int k, int64_t* out_idx,
                      double* out_d2);

// CUDA: pointers on the device except lo (host, 3 values); workspace: knn_cuda_workspace_ints(R, V)
// int32 on the device.
void tk_knn_build_cuda(const float* verts, int64_t V, const float* lo, float cell, int R, int K, int32_t* cand,
                       int32_t* workspace, void* stream);
void tk_knn_build_cuda(const double* verts, int64_t V, const double* lo, double cell, int R, int K,
                       int32_t* cand, int32_t* workspace, void* stream);
void tk_knn_query_cuda(const float* points, int64_t N, const float* verts, int64_t V, const float* lo,
                       float inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx, float* out_d2,
                       void* stream);
void tk_knn_query_cuda(const double* points, int64_t N, const double* verts, int64_t V, const double* lo,
                       double inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx,
                       double* out_d2, void* stream);
void tk_knn_brute_cuda(const float* points, int64_t N, const float* verts, int64_t V, int k, int64_t* out_idx,
                       float* out_d2, void* stream);
void tk_knn_brute_cuda(const double* points, int64_t N, const double* verts, int64_t V, int k, int64_t* out_idx,
                       double* out_d2, void* stream);

}  // namespace tk
