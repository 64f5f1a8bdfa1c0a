// k nearest mesh vertices through the hierarchical search grid: the C++/OpenMP kernels (see knn.h).
//
// Build (every frame, exact): the grid is cut into tiles that the threads take one by one. A tile is
// refined recursively into octants; each block gets the list of vertices that can be among the K'
// nearest of one of its cell centres, filtered from its parent's list with the bound of
// knn_block_bound2 (the K'-th nearest distance from the block's middle plus the block's radius).
// Blocks of at most 64 cells select per cell over their list, cell after neighbouring cell: the K'
// picked for the previous cell bound the K'-th distance of the next one, so that only the few
// vertices under that bound are ranked. Lists keep the vertex order (ascending index) and are
// stored as coordinates, so the inner loops are contiguous (and use AVX-512 where available).
//
// Query: per point, its cell's K' candidates; brute force: per point, all vertices in blocks of
// 16 whose minimum is compared with the current k-th distance first.

// Distances must be rounded operation by operation like torch's elementwise ones: no contraction
// into fused multiply-adds (GCC contracts by default, even in ISO mode). This must come before
// every include: GCC does not inline functions compiled with other options into these (the hot
// loops use no std:: helpers for that reason too).
#pragma GCC optimize("fp-contract=off")

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "knn.h"

namespace tk {
namespace {

constexpr int kTile = 16;      // cells per side of the tiles the threads take
constexpr int kLeafCells = 64;  // blocks of at most this many cells select per cell over their list
constexpr int kChunk = 16;     // vertices per step of the brute-force scans
constexpr int kRankMax = 64;   // selections among at most this many entries rank them all-pairs

// A list of vertices: coordinates (structure of arrays) and indices.
template <class T>
struct VertList {
  const T* x;
  const T* y;
  const T* z;
  const int32_t* id;
  int64_t n;
};

// Storage of one list; 16 spare entries for the whole-vector stores of the compactions.
template <class T>
struct ListBuffer {
  std::vector<T> x, y, z;
  std::vector<int32_t> id;
  explicit ListBuffer(int64_t cap) : x(cap + 16), y(cap + 16), z(cap + 16), id(cap + 16) {}
  VertList<T> list(int64_t n) const { return {x.data(), y.data(), z.data(), id.data(), n}; }
};

// The entries t of [0, n) with key[t] <= thr, in order: their positions into pos and keys into
// val (room for n + 16 each); returns their count. Branch-free.
template <class T>
int64_t compact_le(const T* __restrict key, int64_t n, T thr, int32_t* __restrict pos, T* __restrict val) {
  int64_t c = 0;
  for (int64_t t = 0; t < n; ++t) {
    pos[c] = (int32_t)t;
    val[c] = key[t];
    c += key[t] <= thr ? 1 : 0;
  }
  return c;
}

// The vertices t of L with key[t] <= thr, in order, into out; returns their count.
template <class T>
int64_t compact_list(const VertList<T>& L, const T* __restrict key, T thr, ListBuffer<T>& out) {
  T* __restrict ox = out.x.data();
  T* __restrict oy = out.y.data();
  T* __restrict oz = out.z.data();
  int32_t* __restrict oi = out.id.data();
  int64_t c = 0;
  for (int64_t t = 0; t < L.n; ++t) {
    ox[c] = L.x[t];
    oy[c] = L.y[t];
    oz[c] = L.z[t];
    oi[c] = L.id[t];
    c += key[t] <= thr ? 1 : 0;
  }
  return c;
}

// Rank by (value, position) of entry p among cd[0, c), cd padded with +inf to cp (a multiple of
// 16) entries: the number of entries before it.
template <class T>
int rank_of(const T* __restrict cd, int cp, int p) {
  const T dp = cd[p];
  int r = 0;
  for (int q = 0; q < cp; ++q) r += (int)(cd[q] < dp) | ((int)(cd[q] == dp) & (int)(q < p));
  return r;
}

// Rank by (value, index, position) of entry p among (cd, ci)[0, cp), cp a multiple of 16.
template <class T>
int rank_key(const T* __restrict cd, const int32_t* __restrict ci, int cp, int p) {
  const T dp = cd[p];
  const int32_t ip = ci[p];
  int r = 0;
  for (int q = 0; q < cp; ++q)
    r += (int)(cd[q] < dp) | ((int)(cd[q] == dp) & ((int)(ci[q] < ip) | ((int)(ci[q] == ip) & (int)(q < p))));
  return r;
}

// The squared distances cd and indices ci of the Kc candidates of a row (+inf and INT32_MAX for
// entries that are no vertex), padded with those to cp = Kc rounded up to 16.
template <class T>
void candidate_dists(const int32_t* row, int Kc, const T* verts, int64_t V, T px, T py, T pz, T* __restrict cd,
                     int32_t* __restrict ci) {
  const int cp = (Kc + 15) & ~15;
  for (int c = 0; c < Kc; ++c) {
    const int32_t v = row[c];
    const bool ok = v >= 0 && (int64_t)v < V;
    const int64_t u = ok ? v : 0;
    const T d = knn_dist2(px, py, pz, verts[3 * u], verts[3 * u + 1], verts[3 * u + 2]);
    cd[c] = ok ? d : std::numeric_limits<T>::infinity();
    ci[c] = ok ? v : std::numeric_limits<int32_t>::max();
  }
  for (int c = Kc; c < cp; ++c) {
    cd[c] = std::numeric_limits<T>::infinity();
    ci[c] = std::numeric_limits<int32_t>::max();
  }
}

#if defined(__AVX512F__)
template <>
int rank_key<float>(const float* __restrict cd, const int32_t* __restrict ci, int cp, int p) {
  const __m512 dp = _mm512_set1_ps(cd[p]);
  const __m512i ip = _mm512_set1_epi32(ci[p]);
  int r = 0;
  for (int q = 0; q < cp; q += 16) {
    const __m512 x = _mm512_loadu_ps(cd + q);
    const __m512i xi = _mm512_loadu_si512((const void*)(ci + q));
    const int before = p - q;
    const __mmask16 pos = before >= 16 ? (__mmask16)0xffff
                          : before <= 0 ? (__mmask16)0
                                        : (__mmask16)((1u << (unsigned)before) - 1u);
    const __mmask16 eq = _mm512_cmp_ps_mask(x, dp, _CMP_EQ_OQ);
    const __mmask16 m = _mm512_cmp_ps_mask(x, dp, _CMP_LT_OQ) |
                        (eq & (_mm512_cmplt_epi32_mask(xi, ip) | (_mm512_cmpeq_epi32_mask(xi, ip) & pos)));
    r += __builtin_popcount((unsigned)m);
  }
  return r;
}

template <>
int rank_of<float>(const float* __restrict cd, int cp, int p) {
  const __m512 dp = _mm512_set1_ps(cd[p]);
  int r = 0;
  for (int q = 0; q < cp; q += 16) {
    const __m512 x = _mm512_loadu_ps(cd + q);
    const int before = p - q;  // lanes i < before come before p in position
    const __mmask16 pos = before >= 16 ? (__mmask16)0xffff
                          : before <= 0 ? (__mmask16)0
                                        : (__mmask16)((1u << (unsigned)before) - 1u);
    const __mmask16 m = _mm512_cmp_ps_mask(x, dp, _CMP_LT_OQ) | _mm512_mask_cmp_ps_mask(pos, x, dp, _CMP_EQ_OQ);
    r += __builtin_popcount((unsigned)m);
  }
  return r;
}

// float: 16 at a time (compress in registers, then whole-vector stores: the memory form of
// vpcompress is slow on some CPUs).
inline __mmask16 le_mask(const float* key, int64_t t, int64_t n, __m512 th) {
  if (t + 16 <= n) return _mm512_cmp_ps_mask(_mm512_loadu_ps(key + t), th, _CMP_LE_OQ);
  const __mmask16 tail = (__mmask16)((1u << (unsigned)(n - t)) - 1u);
  return _mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, key + t), th, _CMP_LE_OQ);
}

inline __mmask16 tail_mask(int64_t t, int64_t n) {
  return t + 16 <= n ? (__mmask16)0xffff : (__mmask16)((1u << (unsigned)(n - t)) - 1u);
}

template <>
int64_t compact_le<float>(const float* __restrict key, int64_t n, float thr, int32_t* __restrict pos,
                          float* __restrict val) {
  const __m512 th = _mm512_set1_ps(thr);
  __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0;
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = le_mask(key, t, n, th);
    _mm512_storeu_si512((void*)(pos + c), _mm512_maskz_compress_epi32(m, idx));
    _mm512_storeu_ps(val + c, _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(tail_mask(t, n), key + t)));
    c += __builtin_popcount((unsigned)m);
    idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
  }
  return c;
}

template <>
int64_t compact_list<float>(const VertList<float>& L, const float* __restrict key, float thr,
                            ListBuffer<float>& out) {
  const __m512 th = _mm512_set1_ps(thr);
  int64_t c = 0;
  for (int64_t t = 0; t < L.n; t += 16) {
    const __mmask16 m = le_mask(key, t, L.n, th), all = tail_mask(t, L.n);
    _mm512_storeu_ps(out.x.data() + c, _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(all, L.x + t)));
    _mm512_storeu_ps(out.y.data() + c, _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(all, L.y + t)));
    _mm512_storeu_ps(out.z.data() + c, _mm512_maskz_compress_ps(m, _mm512_maskz_loadu_ps(all, L.z + t)));
    _mm512_storeu_si512((void*)(out.id.data() + c),
                        _mm512_maskz_compress_epi32(m, _mm512_maskz_loadu_epi32(all, L.id + t)));
    c += __builtin_popcount((unsigned)m);
  }
  return c;
}
#endif

template <class T>
struct Builder {
  const T* cx;  // centre coordinate of each cell index along x, y, z (R each)
  const T* cy;
  const T* cz;
  int R;
  int K;
  int32_t* cand;
  // per thread
  std::vector<ListBuffer<T>>* buffers;  // one per recursion depth
  T* d2;                                // scratch, capacity V
  int32_t* sel;                         // scratch, capacity V + 16
  T* selv;                              // scratch, capacity V + 16

  // d2[t] = squared distance from (px, py, pz) to the list's vertex t.
  void distances(const VertList<T>& L, T px, T py, T pz) const {
    const T* __restrict lx = L.x;
    const T* __restrict ly = L.y;
    const T* __restrict lz = L.z;
    T* __restrict out = d2;
    for (int64_t t = 0; t < L.n; ++t) out[t] = knn_dist2(px, py, pz, lx[t], ly[t], lz[t]);
  }

  // The K entries of d2[0, n) first in (value, position) order, as positions bp (-1 when n < K)
  // and values bd. `thr` must be at least the K-th smallest value (or +inf): only the entries up
  // to it are ranked, usually a few more than K.
  void select(int64_t n, T thr, T* bd, int32_t* bp) const {
    const int64_t c = compact_le(d2, n, thr, sel, selv);
    for (int s = 0; s < K; ++s) {
      bd[s] = std::numeric_limits<T>::infinity();
      bp[s] = -1;
    }
    if (c > kRankMax) {
      for (int64_t q = 0; q < c; ++q)  // positions ascend: ties keep the first
        if (selv[q] < bd[K - 1]) knn_offer(bd, bp, K, selv[q], (int64_t)sel[q]);
      return;
    }
    // Few entries: each one's rank is the number of entries before it in (value, position) order
    // (the values padded with +inf to whole vectors).
    const int cp = ((int)c + 15) & ~15;
    for (int q = (int)c; q < cp; ++q) selv[q] = std::numeric_limits<T>::infinity();
    for (int p = 0; p < (int)c; ++p) {
      const int r = rank_of(selv, cp, p);
      if (r < K && selv[p] < std::numeric_limits<T>::infinity()) {
        bd[r] = selv[p];
        bp[r] = sel[p];
      }
    }
  }

  // An upper bound of the K-th smallest d2 from K entries picked before (positions bp): their
  // largest current value; +inf without K picks.
  T bound_from(const int32_t* bp) const {
    T m = 0;
    for (int s = 0; s < K; ++s) {
      if (bp[s] < 0) return std::numeric_limits<T>::infinity();
      m = d2[bp[s]] > m ? d2[bp[s]] : m;
    }
    return m;
  }

  // An upper bound of the K-th smallest d2 from p when the K-th smallest from m is dk (over a list
  // that the one from p contains): (sqrt(dk) + |p - m|)^2, widened for the rounding.
  static T bound_moved(T dk, const T* p, const T* m) {
    if (!(dk < std::numeric_limits<T>::infinity())) return std::numeric_limits<T>::infinity();
    double e2 = 0.0;
    for (int a = 0; a < 3; ++a) {
      const double e = (double)p[a] - (double)m[a];
      e2 += e * e;
    }
    const double u2 = knn_block_bound2((double)dk, e2);
    return u2 < (double)std::numeric_limits<T>::max() ? (T)u2 : std::numeric_limits<T>::infinity();
  }

  // Cells of the block: per cell the K nearest over the list. m, dk: a point and the K-th smallest
  // d2 from it over the list (for the first cell's threshold); then each cell's threshold comes
  // from the previous cell's picks.
  void leaf(int x0, int x1, int y0, int y1, int z0, int z1, const VertList<T>& L, const T* m, T dk) const {
    T bd[kKnnMaxK];
    int32_t bp[kKnnMaxK];
    bool first = true;
    // Snake order, so that consecutive cells are neighbours.
    int rows = 0;
    for (int l = z0; l < z1; ++l)
      for (int jj = 0; jj < y1 - y0; ++jj, ++rows)
        for (int ii = 0; ii < x1 - x0; ++ii) {
          const int j = ((l - z0) & 1) ? y1 - 1 - jj : y0 + jj;
          const int i = (rows & 1) ? x1 - 1 - ii : x0 + ii;
          const T c[3] = {cx[i], cy[j], cz[l]};
          distances(L, c[0], c[1], c[2]);
          select(L.n, first ? bound_moved(dk, c, m) : bound_from(bp), bd, bp);
          first = false;
          int32_t* row = cand + ((int64_t)i + (int64_t)R * ((int64_t)j + (int64_t)R * l)) * K;
          for (int s = 0; s < K; ++s) row[s] = bp[s] < 0 ? -1 : L.id[bp[s]];
        }
  }

  // A block of cells with the list of vertices that can be among the K nearest of its centres;
  // m, dk as for leaf.
  void block(int x0, int x1, int y0, int y1, int z0, int z1, const VertList<T>& L, const T* m, T dk,
             int depth) const {
    const int nx = x1 - x0, ny = y1 - y0, nz = z1 - z0;
    if ((int64_t)nx * ny * nz <= kLeafCells || L.n <= K) {
      leaf(x0, x1, y0, y1, z0, z1, L, m, dk);
      return;
    }
    const int xs[3] = {x0, nx > 1 ? x0 + (nx + 1) / 2 : x1, x1};
    const int ys[3] = {y0, ny > 1 ? y0 + (ny + 1) / 2 : y1, y1};
    const int zs[3] = {z0, nz > 1 ? z0 + (nz + 1) / 2 : z1, z1};
    ListBuffer<T>& buf = (*buffers)[depth + 1];
    T bd[kKnnMaxK];
    int32_t bp[kKnnMaxK];
    bool first = true;
    for (int c = 0; c < 8; ++c) {
      const int a0 = xs[c & 1], a1 = xs[(c & 1) + 1];
      const int b0 = ys[(c >> 1) & 1], b1 = ys[((c >> 1) & 1) + 1];
      const int e0 = zs[c >> 2], e1 = zs[(c >> 2) + 1];
      if (a0 >= a1 || b0 >= b1 || e0 >= e1) continue;
      // The box of the child's cell centres, its middle and radius, and the K-th nearest
      // distance from the middle over the list.
      const T bmin[3] = {cx[a0], cy[b0], cz[e0]};
      const T bmax[3] = {cx[a1 - 1], cy[b1 - 1], cz[e1 - 1]};
      T mc[3];
      double r2;
      knn_box_middle(bmin, bmax, mc, &r2);
      distances(L, mc[0], mc[1], mc[2]);
      select(L.n, first ? bound_moved(dk, mc, m) : bound_from(bp), bd, bp);
      first = false;
      const T dkc = bd[K - 1];
      const double u2d = knn_block_bound2((double)dkc, r2);
      const T u2 = u2d < (double)std::numeric_limits<T>::max() ? (T)u2d : std::numeric_limits<T>::infinity();
      // Keep the vertices within that bound of the box, in order.
      {
        const T* __restrict lx = L.x;
        const T* __restrict ly = L.y;
        const T* __restrict lz = L.z;
        T* __restrict out = d2;
        for (int64_t t = 0; t < L.n; ++t) out[t] = knn_box_dist2(lx[t], ly[t], lz[t], bmin, bmax);
      }
      const VertList<T> child = buf.list(compact_list(L, d2, u2, buf));
      block(a0, a1, b0, b1, e0, e1, child, mc, dkc, depth + 1);
    }
  }
};

template <class T>
void build_impl(const T* verts, int64_t V, const T* lo, T cell, int R, int K, int32_t* cand) {
  if (R <= 0 || K <= 0) return;
  std::vector<T> cx(R), cy(R), cz(R);
  for (int i = 0; i < R; ++i) {
    cx[i] = knn_centre(lo[0], i, cell);
    cy[i] = knn_centre(lo[1], i, cell);
    cz[i] = knn_centre(lo[2], i, cell);
  }
  // All vertices as the root list (structure of arrays).
  std::vector<T> vx(V), vy(V), vz(V);
  std::vector<int32_t> vid(V);
  for (int64_t v = 0; v < V; ++v) {
    vx[v] = verts[3 * v];
    vy[v] = verts[3 * v + 1];
    vz[v] = verts[3 * v + 2];
    vid[v] = (int32_t)v;
  }
  const VertList<T> all{vx.data(), vy.data(), vz.data(), vid.data(), V};
  const int nt = div_up(R, kTile);
  const int64_t ntiles = (int64_t)nt * nt * nt;
  int depth = 2;
  for (int s = kTile; s > 1; s = (s + 1) / 2) ++depth;
#pragma omp parallel
  {
    std::vector<ListBuffer<T>> buffers;
    buffers.reserve(depth);
    for (int d = 0; d < depth; ++d) buffers.emplace_back(d == 0 ? 0 : V);
    std::vector<T> d2(std::max<int64_t>(V, 1));
    std::vector<int32_t> sel(V + 16);
    std::vector<T> selv(V + 16);
    Builder<T> b{cx.data(), cy.data(), cz.data(), R, K, cand, &buffers, d2.data(), sel.data(), selv.data()};
    const T nowhere[3] = {0, 0, 0};
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < ntiles; ++t) {
      const int tx = (int)(t % nt), ty = (int)((t / nt) % nt), tz = (int)(t / ((int64_t)nt * nt));
      const int x0 = tx * kTile, y0 = ty * kTile, z0 = tz * kTile;
      b.block(x0, std::min(x0 + kTile, R), y0, std::min(y0 + kTile, R), z0, std::min(z0 + kTile, R), all, nowhere,
              std::numeric_limits<T>::infinity(), 0);
    }
  }
}

template <class T>
void query_impl(const T* points, int64_t N, const T* verts, int64_t V, const T* lo, T inv_cell, int R,
                const int32_t* cand, int Kc, int k, int64_t* out_idx, T* out_d2) {
  constexpr int64_t kAhead = 16;  // prefetch the candidate row of the point this far ahead
#pragma omp parallel for schedule(static, 1024)
  for (int64_t n = 0; n < N; ++n) {
    if (n + kAhead < N) {
      const int64_t a = n + kAhead;
      const int32_t* ahead =
          cand + knn_cell_of(points[3 * a], points[3 * a + 1], points[3 * a + 2], lo, inv_cell, R) * Kc;
      __builtin_prefetch(ahead);
      __builtin_prefetch(ahead + Kc - 1);
    }
    const T px = points[3 * n], py = points[3 * n + 1], pz = points[3 * n + 2];
    const int32_t* row = cand + knn_cell_of(px, py, pz, lo, inv_cell, R) * Kc;
    // The candidates' squared distances (+inf for entries that are no vertex), padded to whole
    // vectors, then each one's rank by (distance, index, position): branch-free.
    alignas(64) T cd[kKnnMaxK];
    alignas(64) int32_t ci[kKnnMaxK];
    const int cp = (Kc + 15) & ~15;
    candidate_dists(row, Kc, verts, V, px, py, pz, cd, ci);
    T bd[kKnnMaxK + 1];
    int64_t bi[kKnnMaxK + 1];
    for (int s = 0; s < k; ++s) {
      bd[s] = std::numeric_limits<T>::infinity();
      bi[s] = -1;
    }
    for (int c = 0; c < Kc; ++c) {
      const int r = rank_key(cd, ci, cp, c);
      const int slot = (r < k && cd[c] < std::numeric_limits<T>::infinity()) ? r : k;  // k: discarded
      bd[slot] = cd[c];
      bi[slot] = ci[c];
    }
    for (int s = 0; s < k; ++s) {
      out_idx[n * k + s] = bi[s];
      out_d2[n * k + s] = bd[s];
    }
  }
}

template <class T>
void brute_impl(const T* points, int64_t N, const T* verts, int64_t V, int k, int64_t* out_idx, T* out_d2) {
  // Vertices as padded structure of arrays (padding at +inf never enters the selection).
  const int64_t Vp = (V + kChunk - 1) / kChunk * kChunk;
  std::vector<T> vx(Vp, std::numeric_limits<T>::infinity()), vy(Vp, (T)0), vz(Vp, (T)0);
  for (int64_t v = 0; v < V; ++v) {
    vx[v] = verts[3 * v];
    vy[v] = verts[3 * v + 1];
    vz[v] = verts[3 * v + 2];
  }
  const T* __restrict X = vx.data();
  const T* __restrict Y = vy.data();
  const T* __restrict Z = vz.data();
#pragma omp parallel for schedule(static, 64)
  for (int64_t n = 0; n < N; ++n) {
    const T px = points[3 * n], py = points[3 * n + 1], pz = points[3 * n + 2];
    T bd[kKnnMaxK];
    int64_t bi[kKnnMaxK];
    for (int s = 0; s < k; ++s) {
      bd[s] = std::numeric_limits<T>::infinity();
      bi[s] = -1;
    }
    T d[kChunk];
    for (int64_t v0 = 0; v0 < Vp; v0 += kChunk) {
      T lo = std::numeric_limits<T>::infinity();
      for (int t = 0; t < kChunk; ++t) {
        d[t] = knn_dist2(px, py, pz, X[v0 + t], Y[v0 + t], Z[v0 + t]);
        lo = d[t] < lo ? d[t] : lo;
      }
      if (!(lo <= bd[k - 1])) continue;
      const int m = (int)std::min<int64_t>(kChunk, V - v0);
      for (int t = 0; t < m; ++t)
        if (d[t] <= bd[k - 1]) knn_offer(bd, bi, k, d[t], v0 + t);
    }
    for (int s = 0; s < k; ++s) {
      out_idx[n * k + s] = bi[s];
      out_d2[n * k + s] = bd[s];
    }
  }
}

}  // namespace

void tk_knn_build_cpu(const float* verts, int64_t V, const float* lo, float cell, int R, int K, int32_t* cand) {
  build_impl(verts, V, lo, cell, R, K, cand);
}
void tk_knn_build_cpu(const double* verts, int64_t V, const double* lo, double cell, int R, int K, int32_t* cand) {
  build_impl(verts, V, lo, cell, R, K, cand);
}
void tk_knn_query_cpu(const float* points, int64_t N, const float* verts, int64_t V, const float* lo,
                      float inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx, float* out_d2) {
  query_impl(points, N, verts, V, lo, inv_cell, R, cand, Kc, k, out_idx, out_d2);
}
void tk_knn_query_cpu(const double* points, int64_t N, const double* verts, int64_t V, const double* lo,
                      double inv_cell, int R, const int32_t* cand, int Kc, int k, int64_t* out_idx,
                      double* out_d2) {
  query_impl(points, N, verts, V, lo, inv_cell, R, cand, Kc, k, out_idx, out_d2);
}
void tk_knn_brute_cpu(const float* points, int64_t N, const float* verts, int64_t V, int k, int64_t* out_idx,
                      float* out_d2) {
  brute_impl(points, N, verts, V, k, out_idx, out_d2);
}
void tk_knn_brute_cpu(const double* points, int64_t N, const double* verts, int64_t V, int k, int64_t* out_idx,
                      double* out_d2) {
  brute_impl(points, N, verts, V, k, out_idx, out_d2);
}

}  // namespace tk
