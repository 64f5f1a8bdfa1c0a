// hashgrid_batched on the CPU (C++17 + OpenMP). See kernels/hashgrid_batched.h for the op.
//
// The queries are counting-sorted by item (tk_hashgrid_batched_sort_cpu) and visited item after
// item: contiguous chunks of items go to the threads (dynamic schedule), an item's tables (M*S*F
// values, 40 KB for the MonoAvatar grids) stay in L1/L2 while its queries run, and the next item's
// tables are prefetched meanwhile.
// Forward: each query writes its own output rows.
// Backward to the tables: a sorted scatter without atomics: the thread that owns an item zeroes and
// accumulates that item's rows of the gradient, no other thread touches them. The input gradient
// of a query is computed in the same pass (same corners), or, without the sort, in a plain
// parallel loop over the queries when the tables need no gradient.
// Per level, the corners and weights come from tk::hgb::level_cell and the input gradient from
// tk::hgb::level_dx (shared with CUDA); the row arithmetic uses F-wide GCC vectors.
#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common.h"
#include "hashgrid_batched.h"

namespace {

using tk::hgb::Levels;
using tk::hgb::Shape;

inline bool level_on(const uint8_t* mask, int l) { return mask == nullptr || mask[l] != 0; }

// The table gradient is a fresh (V, M, S, F) buffer each backward, 80 MB for the MonoAvatar grids:
// big enough for the allocator to map new pages each time, and faulting in 4 KB pages costs more
// than the kernel itself. Asking for transparent huge pages on it (a hint; ignored where THP is
// off) cuts that several times. Only whole 2 MB pages inside the buffer are advised.
inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (bytes < (int64_t)(4 * kHuge)) return;
  const uintptr_t a = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + (uintptr_t)bytes) & ~(kHuge - 1);
  if (b > a) madvise(reinterpret_cast<void*>(a), b - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Items per work chunk of the item-ordered loops (contiguous ids, handed out dynamically).
constexpr int64_t kItemChunk = 8;
// Fewer queries than this run on the calling thread (a parallel region costs more than the work,
// and far more on a loaded machine: gradcheck makes thousands of tiny calls).
constexpr int64_t kMinParallelQueries = 1024;

// Ask for the lines of [p, p + bytes) to be brought into L2 (the next item's tables: a linear
// stream that the memory system serves at full bandwidth, where the hashed lookups alone would
// wait on one cache miss after another).
inline void prefetch_l2(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// Queries ahead whose own rows (x, grad_out, output) are prefetched in the item-ordered loops:
// with random item ids these rows lie anywhere, and the backward would wait on each load.
constexpr int64_t kQueryAhead = 8;

// Prefetch the lines of [p, p + bytes) into L1, for reading (rw = 0) or writing (rw = 1).
template <int RW>
inline void prefetch_rows(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
  const uintptr_t b = reinterpret_cast<uintptr_t>(p) + (uintptr_t)bytes;
  for (uintptr_t c = a; c < b; c += 64) __builtin_prefetch(reinterpret_cast<const void*>(c), RW, 3);
}

// Calls body(v, begin, end) for every item v in [0, V) in parallel, item after item within a chunk
// of kItemChunk ids owned by one thread; [begin, end) are v's positions in the sort. Before
// running an item, the tables of the next item with queries are prefetched.
template <class Body>
inline void for_each_item(const int64_t* start, int64_t V, const char* tables, int64_t item_bytes, Body body) {
  const int64_t chunks = (V + kItemChunk - 1) / kItemChunk;
  const bool parallel = start[V] >= kMinParallelQueries || V >= 64 * kItemChunk;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t v0 = ch * kItemChunk, v1 = std::min(V, v0 + kItemChunk);
    if (tables && start[v0] < start[v0 + 1]) prefetch_l2(tables + v0 * item_bytes, item_bytes);
    for (int64_t v = v0; v < v1; ++v) {
      if (tables) {
        int64_t n = v + 1;  // next item with queries (within this chunk or just after it)
        while (n < v1 && start[n] == start[n + 1]) ++n;
        if (n < V && start[n] < start[n + 1]) prefetch_l2(tables + n * item_bytes, item_bytes);
      }
      body(v, start[v], start[v + 1]);
    }
  }
}

// One table row (F values) as a GCC vector: the row loops below then compile to one vector op per
// corner, whatever the compiler would otherwise make of the loop over the grids. Alignment of the
// element type only (rows of F floats start at 4F-byte offsets, the tensor anywhere).
template <class T, int F>
struct RowVec {
  typedef T type __attribute__((vector_size(sizeof(T) * F), aligned(sizeof(T))));
};

template <class T, int F>
inline typename RowVec<T, F>::type load_row(const T* p) {
  typename RowVec<T, F>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T, int F>
inline void store_row(T* p, typename RowVec<T, F>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// All levels of one query (tk::hgb::forward_level with vector rows).
template <class T, int D, int F>
inline void forward_query(const T* x, const T* tab_v, const uint8_t* mask, int64_t q, T* out, const Shape& sh,
                          const Levels& lv) {
  using Row = typename RowVec<T, F>::type;
  constexpr int C = 1 << D;
  const int L = lv.n;
  const int64_t LF = (int64_t)L * F;
  const T* xq = x + q * D;
  T* out_q = out + q * sh.M * LF;
  for (int l = 0; l < L; ++l) {
    if (!level_on(mask, l)) {
      tk::hgb::zero_level<T, F>(sh.M, L, l, out_q);
      continue;
    }
    uint32_t idx[C];
    T w[C], frac[D];
    tk::hgb::level_cell<T, D>(xq, lv, l, idx, w, frac);
    const T* g = tab_v + (int64_t)lv.offset[l] * F;
    T* o = out_q + (int64_t)l * F;
    for (int64_t m = 0; m < sh.M; ++m, g += sh.S * F, o += LF) {
      Row acc = load_row<T, F>(g + (int64_t)idx[0] * F) * w[0];
      for (int c = 1; c < C; ++c) acc += load_row<T, F>(g + (int64_t)idx[c] * F) * w[c];
      store_row<T, F>(o, acc);
    }
  }
}

template <class T, int D, int F>
int64_t forward_impl(const T* x, const int64_t* item, const T* tables, const uint8_t* mask, const int64_t* order,
                     const int64_t* start, T* out, const Shape& sh, const Levels& lv) {
  const int64_t item_stride = sh.M * sh.S * F;
  const int64_t out_stride = sh.M * lv.n * F;
  if (order && start) {  // item after item (the sort holds valid ids only)
    for_each_item(start, sh.V, reinterpret_cast<const char*>(tables), item_stride * (int64_t)sizeof(T),
                  [&](int64_t v, int64_t begin, int64_t end) {
                    const T* tab_v = tables + v * item_stride;
                    for (int64_t i = begin; i < end; ++i) {
                      if (i + kQueryAhead < sh.Q) {
                        const int64_t qa = order[i + kQueryAhead];
                        prefetch_rows<0>(x + qa * D, D * sizeof(T));
                        prefetch_rows<1>(out + qa * out_stride, out_stride * sizeof(T));
                      }
                      forward_query<T, D, F>(x, tab_v, mask, order[i], out, sh, lv);
                    }
                  });
    return 0;
  }
  int64_t bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : bad) if (sh.Q >= kMinParallelQueries)
  for (int64_t i = 0; i < sh.Q; ++i) {
    const int64_t q = order ? order[i] : i;
    const int64_t v = item[q];
    if (v < 0 || v >= sh.V) {
      std::fill(out + q * out_stride, out + (q + 1) * out_stride, T(0));
      ++bad;
      continue;
    }
    forward_query<T, D, F>(x, tables + v * item_stride, mask, q, out, sh, lv);
  }
  return bad;
}

// All levels of one query: dtab_v (may be null) += ..., dx_q (may be null) = ...
// (tk::hgb::backward_level with vector rows).
template <class T, int D, int F>
inline void backward_query(const T* x, const T* go, const T* tab_v, T* dtab_v, T* dx, const uint8_t* mask, int64_t q,
                           const Shape& sh, const Levels& lv) {
  using Row = typename RowVec<T, F>::type;
  constexpr int C = 1 << D;
  const int64_t LF = (int64_t)lv.n * F;
  const T* xq = x + q * D;
  const T* go_q = go + q * sh.M * LF;
  T dxq[D];
  for (int d = 0; d < D; ++d) dxq[d] = T(0);
  for (int l = 0; l < lv.n; ++l) {
    if (!level_on(mask, l)) continue;
    uint32_t idx[C];
    T w[C], frac[D];
    tk::hgb::level_cell<T, D>(xq, lv, l, idx, w, frac);
    const int64_t off = (int64_t)lv.offset[l] * F;
    const T* gl = go_q + (int64_t)l * F;
    if (dtab_v) {
      T* dg = dtab_v + off;
      for (int64_t m = 0; m < sh.M; ++m, dg += sh.S * F) {
        const Row gm = load_row<T, F>(gl + m * LF);
        for (int c = 0; c < C; ++c) {
          T* row = dg + (int64_t)idx[c] * F;
          store_row<T, F>(row, load_row<T, F>(row) + gm * w[c]);
        }
      }
    }
    if (dx) {
      Row acc[C];  // per corner: sum over grids of go * table row (summed over features below)
      for (int c = 0; c < C; ++c) acc[c] = Row{};
      const T* tg = tab_v + off;
      for (int64_t m = 0; m < sh.M; ++m, tg += sh.S * F) {
        const Row gm = load_row<T, F>(gl + m * LF);
        for (int c = 0; c < C; ++c) acc[c] += gm * load_row<T, F>(tg + (int64_t)idx[c] * F);
      }
      T gc[C];
      for (int c = 0; c < C; ++c) {
        T s = T(0);
        for (int f = 0; f < F; ++f) s += acc[c][f];
        gc[c] = s;
      }
      tk::hgb::level_dx<T, D>(frac, gc, lv.scale[l], dxq);
    }
  }
  if (dx)
    for (int d = 0; d < D; ++d) dx[q * D + d] = dxq[d];
}

template <class T, int D, int F>
void backward_impl(const T* go, const T* x, const int64_t* item, const T* tables, const uint8_t* mask,
                   const int64_t* order, const int64_t* start, T* dx, T* dtables, const Shape& sh, const Levels& lv) {
  const int64_t item_stride = sh.M * sh.S * F;
  const int64_t go_stride = sh.M * lv.n * F;
  if (!dx && !dtables) return;
  if (dtables) advise_huge_pages(dtables, sh.V * item_stride * (int64_t)sizeof(T));
  if (order && start) {
    // Sorted scatter: item v (its rows of dtables, and dx of its queries) belongs to the one
    // thread that takes its chunk, so no two threads write the same row. The tables themselves
    // are read for dx only (prefetched then).
    for_each_item(start, sh.V, dx ? reinterpret_cast<const char*>(tables) : nullptr,
                  item_stride * (int64_t)sizeof(T), [&](int64_t v, int64_t begin, int64_t end) {
                    T* dtab_v = dtables ? dtables + v * item_stride : nullptr;
                    if (dtab_v) std::fill(dtab_v, dtab_v + item_stride, T(0));
                    const T* tab_v = tables + v * item_stride;
                    for (int64_t i = begin; i < end; ++i) {
                      if (i + kQueryAhead < sh.Q) {
                        const int64_t qa = order[i + kQueryAhead];
                        prefetch_rows<0>(x + qa * D, D * sizeof(T));
                        prefetch_rows<0>(go + qa * go_stride, go_stride * sizeof(T));
                      }
                      backward_query<T, D, F>(x, go, tab_v, dtab_v, dx, mask, order[i], sh, lv);
                    }
                  });
    return;
  }
  if (dtables) return;  // the wrapper always sorts for dtables
#pragma omp parallel for schedule(static) if (sh.Q >= kMinParallelQueries)
  for (int64_t q = 0; q < sh.Q; ++q) {
    const int64_t v = item[q];
    if (v < 0 || v >= sh.V) {
      for (int d = 0; d < D; ++d) dx[q * D + d] = T(0);
      continue;
    }
    backward_query<T, D, F>(x, go, tables + v * item_stride, (T*)nullptr, dx, mask, q, sh, lv);
  }
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
int64_t forward_any(const T* x, const int64_t* item, const T* tables, const uint8_t* mask, const int64_t* order,
                    const int64_t* start, T* out, const Shape& sh, const Levels& lv) {
  int64_t bad = 0;
#define TK_HGB_FWD(DD, FF) bad = forward_impl<T, DD, FF>(x, item, tables, mask, order, start, out, sh, lv)
  TK_HGB_DISPATCH(sh.D, sh.F, TK_HGB_FWD);
#undef TK_HGB_FWD
  return bad;
}

template <class T>
void backward_any(const T* go, const T* x, const int64_t* item, const T* tables, const uint8_t* mask,
                  const int64_t* order, const int64_t* start, T* dx, T* dtables, const Shape& sh, const Levels& lv) {
#define TK_HGB_BWD(DD, FF) backward_impl<T, DD, FF>(go, x, item, tables, mask, order, start, dx, dtables, sh, lv)
  TK_HGB_DISPATCH(sh.D, sh.F, TK_HGB_BWD);
#undef TK_HGB_BWD
}

}  // namespace

int64_t tk_hashgrid_batched_sort_cpu(const int64_t* item, int64_t Q, int64_t V, int64_t* order, int64_t* start) {
  std::fill(start, start + V + 1, int64_t(0));
  int64_t bad = 0;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t v = item[q];
    if (v < 0 || v >= V) ++bad;
    else ++start[v + 1];
  }
  for (int64_t v = 0; v < V; ++v) start[v + 1] += start[v];
  std::vector<int64_t> next(start, start + V);
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t v = item[q];
    if (v >= 0 && v < V) order[next[v]++] = q;
  }
  return bad;
}

bool tk_hashgrid_batched_sort_valid_cpu(const int64_t* item, int64_t Q, int64_t V, const int64_t* order,
                                        const int64_t* start) {
  if (start[0] != 0 || start[V] != Q) return false;
  std::vector<uint8_t> seen(Q, 0);  // order must be a permutation, bucket v holding item v's queries
  for (int64_t v = 0; v < V; ++v) {
    if (start[v + 1] < start[v]) return false;
    for (int64_t i = start[v]; i < start[v + 1]; ++i) {
      const int64_t q = order[i];
      if (q < 0 || q >= Q || seen[q] || item[q] != v) return false;
      seen[q] = 1;
    }
  }
  return true;
}

int64_t tk_hashgrid_batched_forward_cpu(const float* x, const int64_t* item, const float* tables,
                                        const uint8_t* level_mask, const int64_t* order, const int64_t* start,
                                        float* out, const Shape& shape, const Levels& levels) {
  return forward_any<float>(x, item, tables, level_mask, order, start, out, shape, levels);
}

int64_t tk_hashgrid_batched_forward_cpu(const double* x, const int64_t* item, const double* tables,
                                        const uint8_t* level_mask, const int64_t* order, const int64_t* start,
                                        double* out, const Shape& shape, const Levels& levels) {
  return forward_any<double>(x, item, tables, level_mask, order, start, out, shape, levels);
}

void tk_hashgrid_batched_backward_cpu(const float* grad_out, const float* x, const int64_t* item, const float* tables,
                                      const uint8_t* level_mask, const int64_t* order, const int64_t* start,
                                      float* dx, float* dtables, const Shape& shape, const Levels& levels) {
  backward_any<float>(grad_out, x, item, tables, level_mask, order, start, dx, dtables, shape, levels);
}

void tk_hashgrid_batched_backward_cpu(const double* grad_out, const double* x, const int64_t* item,
                                      const double* tables, const uint8_t* level_mask, const int64_t* order,
                                      const int64_t* start, double* dx, double* dtables, const Shape& shape,
                                      const Levels& levels) {
  backward_any<double>(grad_out, x, item, tables, level_mask, order, start, dx, dtables, shape, levels);
}
