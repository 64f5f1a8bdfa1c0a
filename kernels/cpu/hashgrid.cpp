// Multi-resolution hash encoding on the CPU (C++17 + OpenMP, raw pointers; math in hashgrid.h).
//
// Memory, not arithmetic, bounds this op: every point reads 2^D random table rows per level, and
// a fine level's rows (2^T * F values: 4 MB for T = 19, F = 2) do not fit in L2. So all kernels
// walk the points level by level: while one level is processed its rows are what the caches
// (L3) hold. Within a level, points go in groups of 16: a group's corner rows and weights are
// computed together (vectorised) and its rows prefetched into L2, point by point, while an earlier
// group is blended (for_each_point), which keeps many cache misses in flight.
//
// Backward: the table gradient is a scatter-add in which each thread owns whole levels (no two
// threads write one row, no atomics); the owner zero-fills its level's rows right before the
// scatter. grad_out is first copied level-major so that a level reads its F columns contiguously
// (strided 8-byte reads cost a whole cache line each). The input gradient is owned by points.
//
// Outputs of many MB are page-faulted in 2 MB pages (madvise): in a VM, first touching 32 MB in
// 4 kB pages costs about as much as the whole forward pass.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "hashgrid.h"

namespace {

using tk::HashGridLevels;

constexpr int kGroup = 16;            // points located together (one AVX-512 vector of floats)
constexpr int64_t kBlock = 512;       // points per OpenMP work item
constexpr int64_t kChunk = 1 << 18;   // points per level-by-level pass (bounds the output footprint)

// Ask for transparent huge pages on [p, p + bytes) before it is first touched (a hint; no-op
// where unsupported or already populated).
inline void advise_huge(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < (size_t(4) << 20)) return;
  const uintptr_t page = 4096;
  const uintptr_t a = ((uintptr_t)p + page - 1) & ~(page - 1), e = ((uintptr_t)p + bytes) & ~(page - 1);
  if (e > a) madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// At least `count` values, 2 MB aligned and advised to huge pages; `*capacity` gets the values
// that fit in what was allocated (whole 2 MB pages).
template <class T>
T* huge_alloc(size_t count, size_t* capacity = nullptr) {
  const size_t align = size_t(2) << 20, bytes = std::max(align, (count * sizeof(T) + align - 1) / align * align);
  T* p = (T*)std::aligned_alloc(align, bytes);
  if (!p) throw std::bad_alloc();
  advise_huge(p, bytes);
  if (capacity) *capacity = bytes / sizeof(T);
  return p;
}

// A temporary array (2 MB aligned, huge pages).
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(size_t count) : p(huge_alloc<T>(count)) {}
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// A scratch array kept by the calling thread between calls (at most kChunk points' worth): the
// forward pass runs for every batch, and faulting in fresh pages each time (the kernel zeroes
// them) costs as much as a few levels of the pass.
template <class T>
T* reusable_scratch(size_t count) {
  struct Buffer {
    T* p = nullptr;
    size_t count = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (buf.count < count) {
    T* p = huge_alloc<T>(count, &buf.count);
    std::free(buf.p);
    buf.p = p;
  }
  return buf.p;
}

// What a level needs in the inner loop.
struct Level {
  float scale;
  uint32_t resolution, size, pow2_mask;
  bool hashed;
  int64_t offset;
};

inline Level level_of(const HashGridLevels& lv, int l) {
  return {lv.scale[l], lv.resolution[l], lv.size[l], tk::hg_pow2_mask(lv.size[l]), lv.hashed[l] != 0, lv.offset[l]};
}

// Corner rows, fractions and weights of a group of kGroup points on one level (structure of
// arrays: [corner or dimension][point]). The generic path is hashgrid.h's scalar math point by
// point; with AVX-512 the float path does the same arithmetic 16 points at a time (fma, floor
// by roundscale, truncating conversion: bit for bit tk::pos_fract and tk::grid_index).
// Points past the end of the range (a partial group) repeat the first point.
template <int D, bool Hashed, class T>
struct Group {
  static constexpr int C = 1 << D;
  alignas(64) uint32_t rows[C][kGroup];  // table rows relative to the level's offset
  alignas(64) T frac[D][kGroup];
  alignas(64) T w[C][kGroup];            // interpolation weights

  void locate(const T* x, int m, const Level& L) {
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value) {
      locate_avx512(x, m, L);
      return;
    }
#elif defined(__AVX2__) && defined(__FMA__)
    if constexpr (std::is_same<T, float>::value) {
      locate_avx2(x, m, L);
      return;
    }
#endif
    for (int j = 0; j < kGroup; ++j) {
      const T* xi = x + (j < m ? j : 0) * D;
      uint32_t cell[D], r[C];
      T f[D];
      for (int d = 0; d < D; ++d) tk::hg_pos_fract(xi[d], L.scale, &f[d], &cell[d]);
      tk::hg_corner_rows<D>(cell, L.resolution, L.size, Hashed, r);
      for (int d = 0; d < D; ++d) frac[d][j] = f[d];
      for (int b = 0; b < C; ++b) {
        rows[b][j] = r[b];
        w[b][j] = tk::hg_weight<D, T>(f, b);
      }
    }
  }

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
  // The same arithmetic 8 points at a time, twice per group (AVX2 + FMA: most x86 CPUs without
  // AVX-512, AMD EPYC among them): fma, floor by round-to-negative-infinity, truncating conversion,
  // 32-bit wrapping multiplies; bit for bit tk::pos_fract and tk::grid_index.
  void locate_avx2(const float* x, int m, const Level& L) {
    alignas(32) float xs[D][kGroup];
    for (int j = 0; j < kGroup; ++j)
      for (int d = 0; d < D; ++d) xs[d][j] = x[(j < m ? j : 0) * D + d];
    const __m256 scale = _mm256_set1_ps(L.scale), half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256i size = _mm256_set1_epi32((int)L.size), mask = _mm256_set1_epi32((int)L.pow2_mask);
    for (int h = 0; h < kGroup; h += 8) {
      __m256i lo[D], hi[D];
      __m256 f[D], g[D];
      uint32_t stride = 1;
      for (int d = 0; d < D; ++d) {
        const __m256 pos = _mm256_fmadd_ps(scale, _mm256_load_ps(xs[d] + h), half);
        const __m256 fl = _mm256_round_ps(pos, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        f[d] = _mm256_sub_ps(pos, fl);
        g[d] = _mm256_sub_ps(one, f[d]);
        _mm256_store_ps(frac[d] + h, f[d]);
        const __m256i cell = _mm256_cvttps_epi32(fl);
        const __m256i mul = _mm256_set1_epi32((int)(Hashed ? tk::hash_prime(d) : stride));
        lo[d] = _mm256_mullo_epi32(cell, mul);
        hi[d] = _mm256_mullo_epi32(_mm256_add_epi32(cell, _mm256_set1_epi32(1)), mul);
        stride *= L.resolution;
      }
      for (int b = 0; b < C; ++b) {
        __m256i v = (b & 1) ? hi[0] : lo[0];
        __m256 wv = (b & 1) ? f[0] : g[0];
        for (int d = 1; d < D; ++d) {
          const bool up = (b >> d) & 1;
          v = Hashed ? _mm256_xor_si256(v, up ? hi[d] : lo[d]) : _mm256_add_epi32(v, up ? hi[d] : lo[d]);
          wv = _mm256_mul_ps(wv, up ? f[d] : g[d]);
        }
        if (L.pow2_mask) {
          _mm256_store_si256((__m256i*)(rows[b] + h), _mm256_and_si256(v, mask));
        } else {
          _mm256_store_si256((__m256i*)(rows[b] + h), v);
          // v >= size (unsigned) for any lane: max_epu32(v, size) != size somewhere
          const __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(v, size), v);
          const __m256i eq = _mm256_cmpeq_epi32(v, size);
          if (_mm256_movemask_epi8(_mm256_or_si256(_mm256_andnot_si256(eq, ge), eq)))  // out of range: rare
            for (int j = h; j < h + 8; ++j) rows[b][j] = tk::hg_mod(rows[b][j], L.size, 0);
        }
        _mm256_store_ps(w[b] + h, wv);
      }
    }
  }
#endif

#if defined(__AVX512F__)
  void locate_avx512(const float* x, int m, const Level& L) {
    alignas(64) float buf[D * kGroup];
    if (m < kGroup) {
      for (int j = 0; j < kGroup; ++j)
        for (int d = 0; d < D; ++d) buf[j * D + d] = x[(j < m ? j : 0) * D + d];
      x = buf;
    }
    // de-interleave (x0 y0 z0 x1 ...) into one vector per dimension
    __m512 xs[D];
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 a0 = _mm512_loadu_ps(x), a1 = _mm512_loadu_ps(x + 16);
    for (int d = 0; d < D; ++d) {
      const __m512i idx = _mm512_add_epi32(_mm512_mullo_epi32(iota, _mm512_set1_epi32(D)), _mm512_set1_epi32(d));
      xs[d] = _mm512_permutex2var_ps(a0, idx, a1);  // elements 0..31
      if (D == 3) {                                 // elements 32..47
        const __mmask16 hi = _mm512_cmpge_epi32_mask(idx, _mm512_set1_epi32(32));
        xs[d] = _mm512_mask_permutexvar_ps(xs[d], hi, _mm512_sub_epi32(idx, _mm512_set1_epi32(32)),
                                           _mm512_loadu_ps(x + 32));
      }
    }
    const __m512 scale = _mm512_set1_ps(L.scale), half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f);
    __m512i lo[D], hi[D];
    __m512 f[D], g[D];  // fraction and 1 - fraction
    uint32_t stride = 1;
    for (int d = 0; d < D; ++d) {
      const __m512 pos = _mm512_fmadd_ps(scale, xs[d], half);
      const __m512 fl = _mm512_roundscale_ps(pos, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
      f[d] = _mm512_sub_ps(pos, fl);
      g[d] = _mm512_sub_ps(one, f[d]);
      _mm512_store_ps(frac[d], f[d]);
      const __m512i cell = _mm512_cvttps_epi32(fl);  // (int)floor, 0x80000000 out of range like (int) on x86
      const __m512i mul = _mm512_set1_epi32((int)(Hashed ? tk::hash_prime(d) : stride));
      lo[d] = _mm512_mullo_epi32(cell, mul);
      hi[d] = _mm512_mullo_epi32(_mm512_add_epi32(cell, _mm512_set1_epi32(1)), mul);
      stride *= L.resolution;
    }
    const __m512i size = _mm512_set1_epi32((int)L.size), mask = _mm512_set1_epi32((int)L.pow2_mask);
    for (int b = 0; b < C; ++b) {
      __m512i v = (b & 1) ? hi[0] : lo[0];
      __m512 wv = (b & 1) ? f[0] : g[0];
      for (int d = 1; d < D; ++d) {
        const bool up = (b >> d) & 1;
        v = Hashed ? _mm512_xor_si512(v, up ? hi[d] : lo[d]) : _mm512_add_epi32(v, up ? hi[d] : lo[d]);
        wv = _mm512_mul_ps(wv, up ? f[d] : g[d]);
      }
      if (L.pow2_mask) {
        _mm512_store_si512(rows[b], _mm512_and_si512(v, mask));
      } else {
        _mm512_store_si512(rows[b], v);
        if (_mm512_cmpge_epu32_mask(v, size))  // out-of-range dense index: rare
          for (int j = 0; j < kGroup; ++j) rows[b][j] = tk::hg_mod(rows[b][j], L.size, 0);
      }
      _mm512_store_ps(w[b], wv);
    }
  }
#endif
};

// GCC 12.2 at -O3 (its IPA mod/ref analysis) moved the zero-fill of grad_x and of a level's table
// gradient past the kernel that accumulates into it, returning zeros (seen for double with D = 2
// and F = 8). The per-level kernels are therefore kept out of interprocedural analysis. Once the
// points' loop became a lambda (for_each_point) that was not enough (zeros again for double: grad_x
// with D = 2 and 3, the table gradient with D = 3, F = 8), so the build turns the pass off
// (-fno-ipa-modref in talkcli/ops/_native.py; no measurable cost) and the first level's pass
// assigns grad_x instead of a zero-fill before it.
#if defined(__GNUC__) && !defined(__clang__)
#define TK_NOIPA __attribute__((noipa))
#else
#define TK_NOIPA
#endif

// Runs point(g, j, i) for every point i of [i0, i1), where g is i's located group and j its place
// in it. Groups are located kAhead groups before they are consumed; while point j of one group is
// consumed, the corner rows of point j of the group kAhead later are prefetched from `rows_of` (the
// table or its gradient, F values per row). Measured choices (bench/hashgrid_ab.sh, T = 19,
// 2026-12-01): spreading the prefetches over the consuming loop instead of issuing a group's 128
// at once, and prefetching into L2 only (prefetcht1; also for the gradient rows that are written)
// instead of into L1, whose few miss buffers then stall the demand loads. Forward 8.8 -> 12.2 M
// pts/s (AVX2 build 8.0 -> 10.8); table gradient 6.4 -> 7.2; with the input gradient 3.1 -> 3.7.
// Also tried: one group ahead instead of two (-3%), 64-bit gathers for the F = 2 blend (slower).
template <int D, int F, bool Hashed, class T, class R, class PointFn>
inline void for_each_point(const T* x, int64_t i0, int64_t i1, const Level& L, const R* rows_of, PointFn&& point) {
  constexpr int C = 1 << D, kAhead = 2, kRing = kAhead + 1;
  using G = Group<D, Hashed, T>;
  G gs[kRing];
  // a level whose rows fit in L2 (the coarse, dense ones) is served by the cache: prefetching it
  // would only cost instructions
  const bool far = (size_t)L.size * F * sizeof(R) > (size_t(256) << 10);
  auto count = [&](int64_t g0) { return (int)std::max<int64_t>(0, std::min<int64_t>(kGroup, i1 - g0)); };
  auto prefetch = [&](const G& g, int j) {
    for (int b = 0; b < C; ++b)
      __builtin_prefetch(rows_of + (size_t)g.rows[b][j] * F, 0, 2);
  };
  for (int k = 0; k < kAhead; ++k) {
    const int64_t g0 = i0 + k * kGroup;
    const int m = count(g0);
    if (!m) break;
    gs[k].locate(x + g0 * D, m, L);
    if (far)
      for (int j = 0; j < m; ++j) prefetch(gs[k], j);
  }
  int cur = 0;
  for (int64_t g0 = i0; g0 < i1; g0 += kGroup) {
    const int m = count(g0);
    const int64_t ga = g0 + kAhead * kGroup;
    const int ma = count(ga);
    G& ahead = gs[(cur + kAhead) % kRing];
    if (ma) ahead.locate(x + ga * D, ma, L);
    const G& g = gs[cur];
    if (far && ma == kGroup) {  // whole groups: constant trip counts
      for (int j = 0; j < kGroup; ++j) {
        prefetch(ahead, j);
        point(g, j, g0 + j);
      }
    } else if (!far && m == kGroup) {
      for (int j = 0; j < kGroup; ++j) point(g, j, g0 + j);
    } else {
      for (int j = 0; j < ma && far; ++j) prefetch(ahead, j);
      for (int j = 0; j < m; ++j) point(g, j, g0 + j);
    }
    cur = (cur + 1) % kRing;
  }
}

// ---------------------------------------------------------------- forward
// One level for points [i0, i1): out[i * F + f] (out: the level's (n, F) slice of the scratch).
template <int D, int F, bool Hashed, class T>
TK_NOIPA void forward_level(const T* x, int64_t i0, int64_t i1, const T* tab, const Level& L, T* out) {
  constexpr int C = 1 << D;
  for_each_point<D, F, Hashed>(x, i0, i1, L, tab, [&](const Group<D, Hashed, T>& g, int j, int64_t i) {
    T acc[F];
    for (int f = 0; f < F; ++f) acc[f] = T(0);
    for (int b = 0; b < C; ++b) {
      const T* e = tab + (size_t)g.rows[b][j] * F;
      for (int f = 0; f < F; ++f) acc[f] += g.w[b][j] * e[f];
    }
    T* o = out + i * F;
    for (int f = 0; f < F; ++f) o[f] = acc[f];
  });
}

// One output row from `row`: streamed past the caches when it is whole 32-byte-aligned vectors of
// floats (the output is written once and read later, so reading its lines in first is waste).
template <class T>
inline void store_row(T* dst, const T* row, int64_t count) {
#if defined(__AVX2__)
  if constexpr (std::is_same<T, float>::value) {
    if (count % 8 == 0 && ((uintptr_t)dst & 31) == 0) {
      for (int64_t k = 0; k < count; k += 8) _mm256_stream_ps(dst + k, _mm256_load_ps(row + k));
      return;
    }
  }
#endif
  std::memcpy(dst, row, (size_t)count * sizeof(T));
}

template <int D, int F, class T>
void forward(const T* x, int64_t n, const T* table, const HashGridLevels& lv, T* out) {
  const int nl = lv.n_levels;
  const int64_t stride = (int64_t)nl * F;
  advise_huge(out, (size_t)n * stride * sizeof(T));
  // Each level pass writes its F values per point into a level-major scratch (nl, chunk, F):
  // contiguous, so a pass streams 2^18 x 8 bytes instead of dirtying one cache line of `out` per
  // point (16 passes over a 32 MB output read and wrote 1 GB). One cache-friendly transpose then
  // fills `out`.
  const int64_t cn = std::min(n, kChunk);
  T* const lm = reusable_scratch<T>((size_t)cn * stride);
#pragma omp parallel
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk), m = c1 - c0;
    const T* xc = x + c0 * D;
    for (int l = 0; l < nl; ++l) {
      const Level L = level_of(lv, l);
      T* dst = lm + (size_t)l * m * F;
      // dynamic: each (row, level) is written once, whichever thread takes its block; a thread
      // slowed down by other processes then holds up nobody
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t blk = 0; blk < m; blk += kBlock) {
        const int64_t b1 = std::min(m, blk + kBlock);
        if (!lv.active[l]) {
          std::memset(dst + blk * F, 0, (size_t)(b1 - blk) * F * sizeof(T));
        } else if (L.hashed) {
          forward_level<D, F, true>(xc, blk, b1, table + L.offset * F, L, dst);
        } else {
          forward_level<D, F, false>(xc, blk, b1, table + L.offset * F, L, dst);
        }
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < m; blk += 64) {
      const int64_t b1 = std::min(m, blk + 64);
      for (int64_t i = blk; i < b1; ++i) {
        alignas(64) T row[tk::kHashGridMaxLevels * 8];
        for (int l = 0; l < nl; ++l)
          for (int f = 0; f < F; ++f) row[l * F + f] = lm[((size_t)l * m + i) * F + f];
        store_row(out + (c0 + i) * stride, row, stride);
      }
    }  // (barrier: the next chunk's passes overwrite the scratch)
  }
#if defined(__AVX2__)
  _mm_sfence();  // the streaming stores are visible before the caller reads `out`
#endif
}

// ---------------------------------------------------------------- backward
// Table gradient of one level from all points (by the thread that owns the level); go points at
// the level's (n, F) slice of the level-major grad_out.
template <int D, int F, bool Hashed, class T>
TK_NOIPA void backward_table_level(const T* x, int64_t n, const T* go, const Level& L, T* gtab) {
  constexpr int C = 1 << D;
  std::memset(gtab, 0, (size_t)L.size * F * sizeof(T));
  for_each_point<D, F, Hashed>(x, 0, n, L, gtab, [&](const Group<D, Hashed, T>& g, int j, int64_t i) {
    T gv[F];
    for (int f = 0; f < F; ++f) gv[f] = go[i * F + f];
    for (int b = 0; b < C; ++b) {
      T* e = gtab + (size_t)g.rows[b][j] * F;
      for (int f = 0; f < F; ++f) e[f] += g.w[b][j] * gv[f];
    }
  });
}

// Input gradient of points [i0, i1) from one level, added to grad_x (assigned when `first`):
// d out[l, f] / d x_k = scale_l * sum_b table[row_b, f] * d w_b / d frac_k.
template <int D, int F, bool Hashed, class T>
TK_NOIPA void backward_input_level(const T* x, int64_t i0, int64_t i1, const T* tab, const T* go, const Level& L,
                                   bool first, T* grad_x) {
  constexpr int C = 1 << D;
  const T scale = (T)L.scale;
  for_each_point<D, F, Hashed>(x, i0, i1, L, tab, [&](const Group<D, Hashed, T>& g, int j, int64_t i) {
    const T* gv = go + i * F;
    T v[C];  // <grad_out[l], table[row_b]>
    for (int b = 0; b < C; ++b) {
      const T* e = tab + (size_t)g.rows[b][j] * F;
      T s = T(0);
      for (int f = 0; f < F; ++f) s += gv[f] * e[f];
      v[b] = s;
    }
    T fr[D];
    for (int d = 0; d < D; ++d) fr[d] = g.frac[d][j];
    T* gx = grad_x + i * D;
    for (int k = 0; k < D; ++k) {
      T s = T(0);
      for (int b = 0; b < C; ++b) s += v[b] * tk::hg_dweight<D, T>(fr, b, k);
      gx[k] = first ? scale * s : gx[k] + scale * s;
    }
  });
}

template <int D, int F, class T>
void backward(const T* x, int64_t n, const T* table, const T* grad_out, const HashGridLevels& lv, T* grad_table,
              int64_t table_rows, T* grad_x) {
  const int nl = lv.n_levels;
  const int64_t stride = (int64_t)nl * F;
  // active levels, largest first so that the dynamic schedule of the table gradient balances
  int order[tk::kHashGridMaxLevels];
  int na = 0;
  for (int l = 0; l < nl; ++l)
    if (lv.active[l]) order[na++] = l;
  std::stable_sort(order, order + na, [&](int a, int b) { return lv.size[a] > lv.size[b]; });
  // rows of grad_table that no active level owns (masked levels, rows past the last level)
  int64_t gaps[2 * tk::kHashGridMaxLevels + 2][2];
  int ngaps = 0;
  if (grad_table) {
    advise_huge(grad_table, (size_t)table_rows * F * sizeof(T));
    int64_t start = 0;
    for (int l = 0; l < nl; ++l) {
      if (!lv.active[l]) continue;
      if (lv.offset[l] > start) gaps[ngaps][0] = start, gaps[ngaps++][1] = lv.offset[l];
      start = std::max(start, lv.offset[l] + (int64_t)lv.size[l]);
    }
    if (table_rows > start) gaps[ngaps][0] = start, gaps[ngaps++][1] = table_rows;
  }
  Scratch<T> gol((size_t)n * na * F);  // grad_out of the active levels, level-major (na, n, F)
#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 16)
    for (int64_t blk = 0; blk < n; blk += 64) {
      const int64_t b1 = std::min(n, blk + 64);
      for (int k = 0; k < na; ++k) {
        T* dst = gol.p + (size_t)k * n * F;
        const T* src = grad_out + order[k] * F;
        for (int64_t i = blk; i < b1; ++i)
          for (int f = 0; f < F; ++f) dst[i * F + f] = src[i * stride + f];
      }
    }  // (barrier)
    if (grad_table) {
#pragma omp for schedule(static) nowait
      for (int k = 0; k < ngaps; ++k)
        std::memset(grad_table + gaps[k][0] * F, 0, (size_t)(gaps[k][1] - gaps[k][0]) * F * sizeof(T));
#pragma omp for schedule(dynamic, 1) nowait
      for (int k = 0; k < na; ++k) {
        const Level L = level_of(lv, order[k]);
        const T* go = gol.p + (size_t)k * n * F;
        T* gtab = grad_table + L.offset * F;
        if (L.hashed) backward_table_level<D, F, true>(x, n, go, L, gtab);
        else backward_table_level<D, F, false>(x, n, go, L, gtab);
      }
    }
    if (grad_x) {
      // level after level (a barrier between them), each block of points by one thread; the
      // first level assigns grad_x, the others add to it
      if (na == 0) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n * D; ++i) grad_x[i] = T(0);
      }
      for (int k = 0; k < na; ++k) {
        const Level L = level_of(lv, order[k]);
        const T* go = gol.p + (size_t)k * n * F;
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < n; blk += kBlock) {
          const int64_t b1 = std::min(n, blk + kBlock);
          if (L.hashed) backward_input_level<D, F, true>(x, blk, b1, table + L.offset * F, go, L, k == 0, grad_x);
          else backward_input_level<D, F, false>(x, blk, b1, table + L.offset * F, go, L, k == 0, grad_x);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- dispatch on D and F
template <template <int, int> class Op, class... Args>
void dispatch(int dims, int features, Args&&... args) {
  switch (dims * 16 + features) {
    case 2 * 16 + 1: Op<2, 1>::run(args...); break;
    case 2 * 16 + 2: Op<2, 2>::run(args...); break;
    case 2 * 16 + 4: Op<2, 4>::run(args...); break;
    case 2 * 16 + 8: Op<2, 8>::run(args...); break;
    case 3 * 16 + 1: Op<3, 1>::run(args...); break;
    case 3 * 16 + 2: Op<3, 2>::run(args...); break;
    case 3 * 16 + 4: Op<3, 4>::run(args...); break;
    case 3 * 16 + 8: Op<3, 8>::run(args...); break;
    default: break;  // the torch wrapper rejects other shapes
  }
}

template <int D, int F>
struct Forward {
  template <class T>
  static void run(const T* x, int64_t n, const T* table, const HashGridLevels& lv, T* out) {
    forward<D, F>(x, n, table, lv, out);
  }
};
template <int D, int F>
struct Backward {
  template <class T>
  static void run(const T* x, int64_t n, const T* table, const T* grad_out, const HashGridLevels& lv, T* grad_table,
                  int64_t table_rows, T* grad_x) {
    backward<D, F>(x, n, table, grad_out, lv, grad_table, table_rows, grad_x);
  }
};

}  // namespace

#define TK_HASHGRID_CPU(T)                                                                                      \
  void tk_hashgrid_forward_cpu(const T* x, int64_t n, int dims, const T* table, int features,                  \
                               const tk::HashGridLevels& levels, T* out) {                                     \
    if (n > 0) dispatch<Forward>(dims, features, x, n, table, levels, out);                                    \
  }                                                                                                             \
  void tk_hashgrid_backward_cpu(const T* x, int64_t n, int dims, const T* table, const T* grad_out,            \
                                int features, const tk::HashGridLevels& levels, T* grad_table,                 \
                                int64_t table_rows, T* grad_x) {                                               \
    if (n == 0 && grad_table) std::memset(grad_table, 0, (size_t)table_rows * features * sizeof(T));           \
    if (n > 0 && (grad_table || grad_x))                                                                        \
      dispatch<Backward>(dims, features, x, n, table, grad_out, levels, grad_table, table_rows, grad_x);       \
  }

TK_HASHGRID_CPU(float)
TK_HASHGRID_CPU(double)
#undef TK_HASHGRID_CPU
