// Occupancy-grid ray marching (Instant-NGP style): the math shared by the C++ (OpenMP) and the
// CUDA kernels, and the declarations of their raw-pointer host launchers.
//
// The sample set is defined on a per-ray lattice (talkcli/ops/raymarch.py is the spec):
//   t_0 = near + jitter * dt(near),  t_{k+1} = t_k + dt(t_k),  dt(t) = clamp(t * cone, step, max_step),
// a lattice point t < far is emitted iff the grid cell of p = o + t d is occupied, at most
// max_samples per ray. t, dt and p are computed with the same rounded operations, in the same
// order, as the PyTorch reference (no fused multiply-add: rm_mul / rm_add below), so both backends
// produce the same samples bit for bit. Empty space is skipped with a conservative DDA: from a
// lattice point in an empty cell the ray walks the following empty cells and then jumps along its
// lattice (exactly, see march_advance) past the stretch that surely lies in them.
#pragma once
#include <cstdint>
#include <cmath>

#include "common.h"

namespace tk {

// ---- arithmetic that the compilers must not contract into FMAs ---------------------------------
// nvcc contracts a*b+c across statements by default; the _rn intrinsics are never contracted.
// g++ does not contract in ISO mode (-std=c++17, which cpp_extension passes); cpu/raymarch.cpp
// additionally turns contraction off for its functions.
TK_HD float rm_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TK_HD double rm_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
TK_HD float rm_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TK_HD double rm_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
TK_HD float rm_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
TK_HD double rm_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}
TK_HD float rm_eps(float) { return 1.1920928955078125e-07f; }
TK_HD double rm_eps(double) { return 2.220446049250313e-16; }
template <typename T>
TK_HD T rm_inf() { return (T)INFINITY; }
template <typename T>
TK_HD T rm_abs(T x) { return x < T(0) ? -x : x; }
template <typename T>
TK_HD T rm_max(T a, T b) { return a > b ? a : b; }
template <typename T>
TK_HD T rm_min(T a, T b) { return a < b ? a : b; }

// ---- parameters ---------------------------------------------------------------------------------
// The occupancy grid: `res` cells per side, bit i = cell i = x + res*(y + res*z) (x fastest) is
// bit (i & 7) of bits[i >> 3]. Cell of a point p: floor((p - amin) * scale) with
// scale = res / (aabb_max - aabb_min) per axis (rounded once to T); outside [0, res) = no cell.
template <typename T>
struct MarchParams {
  const uint8_t* bits;
  int32_t res;
  int32_t max_samples;
  T amin[3];
  T scale[3];
  T step;      // smallest step (and the step when cone == 0)
  T cone;      // dt grows as t * cone ...
  T max_step;  // ... up to max_step
};

// dt(t) = clamp(t * cone, step, max_step) exactly as torch.clamp (NaN propagates).
template <typename T>
TK_HD T march_dt(T t, const MarchParams<T>& P) {
  T a = rm_mul(t, P.cone);
  T b = a < P.step ? P.step : a;
  return b > P.max_step ? P.max_step : b;
}

// Cell coordinates of o + t d (w, continuous) and whether it lies in the grid; *cell gets the
// linear index when it does.
template <typename T>
TK_HD bool march_cell(const T* o, const T* d, T t, const MarchParams<T>& P, T* w, int32_t* c,
                      int64_t* cell) {
  bool inside = true;
  for (int i = 0; i < 3; ++i) {
    T a = rm_mul(t, d[i]);
    T p = rm_add(o[i], a);
    w[i] = rm_mul(rm_sub(p, P.amin[i]), P.scale[i]);
    inside = inside && (w[i] >= T(0)) && (w[i] < (T)P.res);
  }
  if (!inside) return false;
  for (int i = 0; i < 3; ++i) c[i] = (int32_t)w[i];  // w >= 0: truncation == floor
  *cell = (int64_t)c[0] + (int64_t)P.res * ((int64_t)c[1] + (int64_t)P.res * (int64_t)c[2]);
  return true;
}

TK_HD bool march_occupied(const uint8_t* bits, int64_t cell) {
  return (bits[cell >> 3] >> (cell & 7)) & 1;
}

// The t interval in which the straight line w(t) = wo + t wd lies in the box [lo, hi] (slabs);
// empty (a > b) when it never does.
template <typename T>
TK_HD void march_slab(const T* wo, const T* wd, const T* lo, const T* hi, T* ta, T* tb) {
  T a = -rm_inf<T>(), b = rm_inf<T>();
  for (int i = 0; i < 3; ++i) {
    if (wd[i] == T(0)) {
      if (!(wo[i] >= lo[i] && wo[i] <= hi[i])) {
        a = rm_inf<T>();
        b = -rm_inf<T>();
      }
    } else {
      T t1 = (lo[i] - wo[i]) / wd[i];
      T t2 = (hi[i] - wo[i]) / wd[i];
      if (t1 > t2) {
        T s = t1;
        t1 = t2;
        t2 = s;
      }
      a = rm_max(a, t1);
      b = rm_min(b, t2);
    }
  }
  *ta = a;
  *tb = b;
}

// frexp / ldexp / floor for float and double on host and device.
TK_HD float rm_frexp(float x, int* e) {
#if defined(__CUDA_ARCH__)
  return frexpf(x, e);
#else
  return std::frexp(x, e);
#endif
}
TK_HD double rm_frexp(double x, int* e) {
#if defined(__CUDA_ARCH__)
  return ::frexp(x, e);
#else
  return std::frexp(x, e);
#endif
}
TK_HD float rm_ldexp(float x, int e) {
#if defined(__CUDA_ARCH__)
  return ldexpf(x, e);
#else
  return std::ldexp(x, e);
#endif
}
TK_HD double rm_ldexp(double x, int e) {
#if defined(__CUDA_ARCH__)
  return ::ldexp(x, e);
#else
  return std::ldexp(x, e);
#endif
}
TK_HD float rm_floor(float x) {
#if defined(__CUDA_ARCH__)
  return floorf(x);
#else
  return std::floor(x);
#endif
}
TK_HD double rm_floor(double x) {
#if defined(__CUDA_ARCH__)
  return ::floor(x);
#else
  return std::floor(x);
#endif
}
TK_HD int rm_mantissa_bits(float) { return 24; }
TK_HD int rm_mantissa_bits(double) { return 53; }
TK_HD float rm_min_jump_t(float) { return 1e-30f; }
TK_HD double rm_min_jump_t(double) { return 1e-300; }

// The first lattice point >= limit reached from t by t += dt(t) (t itself when t >= limit), or NaN
// when t stops increasing before (float precision). Exactly the same t as stepping one by one,
// but long stretches take O(1) per binade:
// - dt is non-decreasing in t (cone >= 0, rounding is monotone), so dt(t) == dt(end) means dt is
//   that constant D on the whole stretch [t, end] (with cone == 0 it always is);
// - in the binade [2^(e-1), 2^e) of t every float is a multiple of u = 2^(e - mantissa bits), so
//   round(t' + D) = t' + u * round(D / u) for every t' there as long as the sum stays below 2^e
//   and D / u is not a tie (fraction exactly 1/2): k steps add exactly k * inc, inc = round(t + D) - t
//   (k * inc and t + k * inc are exact: multiples of u below 2^e).
template <typename T>
TK_HD T march_advance(T t, T limit, const MarchParams<T>& P) {
  while (t < limit) {
    const T D = march_dt(t, P);
    if (t >= rm_min_jump_t(T(0)) && limit - t > T(8) * D) {
      int e;
      rm_frexp(t, &e);  // t = f 2^e, f in [0.5, 1)
      const T u = rm_ldexp(T(1), e - rm_mantissa_bits(T(0)));
      const T top = rm_ldexp(T(1), e) - u;  // the largest float of the binade
      const T end = limit < top ? limit : top;
      const T r = D / u;
      const T inc = rm_add(t, D) - t;
      if (r - rm_floor(r) != T(0.5) && inc > T(0) && (P.cone == T(0) || march_dt(end, P) == D)) {
        // k steps with t + k * inc <= end - inc (one step of slack for the rounded quotient)
        const T k = rm_floor((end - t) / inc) - T(1);
        if (k >= T(2)) {
          t = t + k * inc;
          continue;
        }
      }
    }
    const T tn = rm_add(t, D);
    if (!(tn > t)) return (T)NAN;
    t = tn;
  }
  return t;
}

// Per-ray constants of the DDA: the straight line w(t) = wo + t wd in cell units, 1 / wd, the
// direction's sign per axis, and a margin (in cells) that bounds the rounding difference between
// that line and the exactly computed w = (o + t d - amin) * scale of any lattice point in or next to
// the grid. Skipped lattice points are those whose line position stays at least `margin` away
// from every cell that is not known empty, so they are surely in empty cells (or outside).
template <typename T>
struct MarchLine {
  T wo[3], wd[3], inv[3];
  int32_t sign[3];
  T margin;
};

template <typename T>
TK_HD void march_line(const T* o, const T* d, const MarchParams<T>& P, MarchLine<T>* L) {
  T big = T(0);
  for (int i = 0; i < 3; ++i) {
    L->wo[i] = (o[i] - P.amin[i]) * P.scale[i];
    L->wd[i] = d[i] * P.scale[i];
    L->sign[i] = L->wd[i] > T(0) ? 1 : (L->wd[i] < T(0) ? -1 : 0);
    L->inv[i] = L->sign[i] != 0 ? T(1) / L->wd[i] : rm_inf<T>();
    big = rm_max(big, T(3) * rm_abs(L->wo[i]) + (rm_abs(o[i]) + rm_abs(P.amin[i])) * P.scale[i]);
  }
  L->margin = T(16) * rm_eps(T(0)) * (big + T(3) * (T)P.res + T(1));
  for (int i = 0; i < 3; ++i) {
    if (!(rm_abs(L->inv[i]) < rm_inf<T>()) && L->sign[i] != 0) L->margin = rm_inf<T>();  // no skipping
  }
}

// One axis of the DDA walk: the cell coordinate, and when the line reaches the cell face ahead
// (te) and comes within the margin of it (ts); +inf on an axis the ray does not move along.
template <typename T>
struct MarchAxis {
  int32_t c, sign;
  int64_t stride;
  T wo, inv, face_e, face_s;  // face ahead = c + face_e; margin short of it = c + face_s
  T te, ts;

  TK_HD void init(int32_t cell, int32_t s, int64_t st, T w0, T iv, T m) {
    c = cell;
    sign = s;
    stride = st;
    wo = w0;
    inv = iv;
    face_e = s > 0 ? T(1) : T(0);
    face_s = s > 0 ? T(1) - m : m;
    update();
  }
  TK_HD void update() {
    if (sign == 0) {
      te = ts = rm_inf<T>();
    } else {
      te = ((T)c + face_e - wo) * inv;
      ts = ((T)c + face_s - wo) * inv;
    }
  }
};

// The ray's point at t (exact w, cell c) lies in an empty cell: walk the line from cell to cell
// (3D DDA) while the next cell is empty, and return the t up to which every lattice point is
// surely in one of the walked (empty) cells; +inf when the line leaves the grid that way, -inf
// when nothing can be skipped. A crossing from one cell to the next counts only when it is
// "clean": the other coordinates are at least `margin` from their cell faces there, so rounding
// cannot put a point into a cell next to the walked ones. (Three named axes rather than arrays
// indexed by the crossing axis: they stay in registers.)
template <typename T>
TK_HD T march_empty_run(const MarchLine<T>& L, const T* w, const int32_t* c, T far, const MarchParams<T>& P) {
  const T m = L.margin;
  for (int i = 0; i < 3; ++i) {
    const T f = w[i] - (T)c[i];
    if (!(f >= m && f <= T(1) - m)) return -rm_inf<T>();  // too close to a face
  }
  const int64_t res = P.res;
  MarchAxis<T> X, Y, Z;
  X.init(c[0], L.sign[0], 1, L.wo[0], L.inv[0], m);
  Y.init(c[1], L.sign[1], res, L.wo[1], L.inv[1], m);
  Z.init(c[2], L.sign[2], res * res, L.wo[2], L.inv[2], m);
  int64_t cell = (int64_t)c[0] + res * ((int64_t)c[1] + res * (int64_t)c[2]);
  const int max_cells = 3 * P.res + 3;
  for (int it = 0; it < max_cells; ++it) {
    const T safe = rm_min(X.ts, rm_min(Y.ts, Z.ts));
    MarchAxis<T>* A;
    bool clean;
    if (X.te <= Y.te && X.te <= Z.te) {
      A = &X;
      clean = Y.ts >= X.te && Z.ts >= X.te;
    } else if (Y.te <= Z.te) {
      A = &Y;
      clean = X.ts >= Y.te && Z.ts >= Y.te;
    } else {
      A = &Z;
      clean = X.ts >= Z.te && Y.ts >= Z.te;
    }
    if (!(A->te < far) || !clean) return safe;  // the ray ends here, or crosses near an edge
    A->c += A->sign;
    if (A->c < 0 || A->c >= P.res) return rm_inf<T>();  // left the grid: no more cells
    cell += A->sign > 0 ? A->stride : -A->stride;
    if (march_occupied(P.bits, cell)) return safe;
    A->update();
  }
  return rm_min(X.ts, rm_min(Y.ts, Z.ts));
}

// Output pointers of the fill pass (FILL = false: count only).
template <typename T>
struct MarchOut {
  T* positions;    // (S, 3)
  T* directions;   // (S, 3)
  T* ts;           // (S,)
  T* deltas;       // (S,)
  int64_t* rays;   // (S,)
};

// March one ray; returns how many samples it emits. With FILL, writes them at rows base...
// Every lattice point that is not skipped is tested with the exact arithmetic of the reference.
template <typename T, bool FILL>
TK_HD int64_t march_ray(const T* o, const T* d, T near, T far, T jitter, const MarchParams<T>& P,
                        const MarchOut<T>& out, int64_t ray, int64_t base) {
  int64_t n = 0;
  if (P.max_samples <= 0) return 0;
  T t = rm_add(near, rm_mul(jitter, march_dt(near, P)));
  if (!(t < far)) return 0;
  MarchLine<T> L;
  march_line(o, d, P, &L);

  while (t < far) {
    T w[3];
    int32_t c[3] = {0, 0, 0};
    int64_t cell = 0;
    const bool inside = march_cell(o, d, t, P, w, c, &cell);
    const T dt = march_dt(t, P);
    if (inside && march_occupied(P.bits, cell)) {
      if (FILL) {
        const int64_t row = base + n;
        for (int i = 0; i < 3; ++i) {
          out.positions[row * 3 + i] = rm_add(o[i], rm_mul(t, d[i]));
          out.directions[row * 3 + i] = d[i];
        }
        out.ts[row] = t;
        out.deltas[row] = dt;
        out.rays[row] = ray;
      }
      if (++n >= P.max_samples) break;
      const T tn = rm_add(t, dt);
      if (!(tn > t)) break;  // t no longer increases (float precision): the ray ends
      t = tn;
      continue;
    }
    // Empty cell or outside the grid: skip the lattice points before skip_to.
    T skip_to;
    if (inside) {
      skip_to = march_empty_run(L, w, c, far, P);
    } else {
      // Outside: skip to where the line comes within the margin of the grid; stop when it never
      // does again.
      T lo[3], hi[3], ta, tb;
      for (int i = 0; i < 3; ++i) {
        lo[i] = -L.margin;
        hi[i] = (T)P.res + L.margin;
      }
      march_slab(L.wo, L.wd, lo, hi, &ta, &tb);
      if (!(ta <= tb) || t >= tb) break;
      skip_to = ta;
    }
    const T tn = rm_add(t, dt);
    if (!(tn > t)) break;
    t = march_advance(tn, skip_to < far ? skip_to : (skip_to >= far ? far : tn), P);  // NaN: no skip
    if (t != t) break;  // stopped increasing
  }
  return n;
}

// Entry and exit of one ray through the box (slabs). Rays that miss (or whose segment in the
// box ends before min_near, or with NaN coordinates) get near = far = min_near.
template <typename T>
TK_HD void ray_aabb_one(const T* o, const T* d, const T* amin, const T* amax, T min_near, T* near,
                        T* far) {
  T n = min_near, f = rm_inf<T>();
  bool bad = false;
  for (int i = 0; i < 3; ++i) {
    T lo, hi;
    if (d[i] == T(0)) {
      const bool in = o[i] >= amin[i] && o[i] <= amax[i];
      lo = in ? -rm_inf<T>() : rm_inf<T>();
      hi = in ? rm_inf<T>() : -rm_inf<T>();
    } else {
      const T t1 = (amin[i] - o[i]) / d[i];
      const T t2 = (amax[i] - o[i]) / d[i];
      lo = t1 < t2 ? t1 : t2;
      hi = t1 < t2 ? t2 : t1;
    }
    bad = bad || (lo != lo) || (hi != hi);
    n = lo > n ? lo : n;
    f = hi < f ? hi : f;
  }
  const bool miss = bad || !(f > n);
  *near = miss ? min_near : n;
  *far = miss ? min_near : f;
}

}  // namespace tk

// ---- host launchers (T = float or double; explicitly instantiated in the .cpp / .cu) ------------
// ray_aabb: o, d (n, 3); aabb = {min xyz, max xyz} (a host array); near, far (n,).
template <typename T>
void tk_raymarch_aabb_cpu(const T* o, const T* d, int64_t n, const T* aabb, T min_near, T* near, T* far);
// count: samples of each ray into counts (n,).
template <typename T>
void tk_raymarch_count_cpu(const T* o, const T* d, const T* near, const T* far, const T* jitter /*nullable*/,
                           int64_t n, tk::MarchParams<T> params, int64_t* counts);
// fill: offsets (n + 1,) = exclusive scan of counts.
template <typename T>
void tk_raymarch_fill_cpu(const T* o, const T* d, const T* near, const T* far, const T* jitter /*nullable*/,
                          int64_t n, tk::MarchParams<T> params, const int64_t* offsets, tk::MarchOut<T> out);
// backward of positions = o + t d and directions = d: per-ray sums over the packed rows.
template <typename T>
void tk_raymarch_backward_cpu(const T* grad_positions /*nullable*/, const T* grad_directions /*nullable*/,
                              const T* ts, const int64_t* offsets, int64_t n, T* grad_o, T* grad_d);
// pack: bit i of bits (ceil(cells / 8) bytes) = density[i] > threshold.
template <typename T>
void tk_raymarch_pack_cpu(const T* density, int64_t cells, T threshold, uint8_t* bits);
// update: density *= decay, then density[cells[m]] = max(density[cells[m]], values[m])
// (cells == nullptr: values has one entry per cell); out-of-range cells and negative or NaN values
// are ignored (densities are non-negative: the CUDA kernel takes the max on the bit patterns).
template <typename T>
void tk_raymarch_update_cpu(T* density, int64_t n_cells, T decay, const int64_t* cells /*nullable*/,
                            const T* values, int64_t m);

template <typename T>
void tk_raymarch_aabb_cuda(const T* o, const T* d, int64_t n, const T* aabb, T min_near, T* near, T* far,
                           void* stream);
template <typename T>
void tk_raymarch_count_cuda(const T* o, const T* d, const T* near, const T* far, const T* jitter, int64_t n,
                            tk::MarchParams<T> params, int64_t* counts, void* stream);
template <typename T>
void tk_raymarch_fill_cuda(const T* o, const T* d, const T* near, const T* far, const T* jitter, int64_t n,
                           tk::MarchParams<T> params, const int64_t* offsets, tk::MarchOut<T> out, void* stream);
template <typename T>
void tk_raymarch_backward_cuda(const T* grad_positions, const T* grad_directions, const T* ts,
                               const int64_t* offsets, int64_t n, T* grad_o, T* grad_d, void* stream);
template <typename T>
void tk_raymarch_pack_cuda(const T* density, int64_t cells, T threshold, uint8_t* bits, void* stream);
template <typename T>
void tk_raymarch_update_cuda(T* density, int64_t n_cells, T decay, const int64_t* cells, const T* values,
                             int64_t m, void* stream);
