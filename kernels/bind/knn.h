// Torch-level wrappers of the knn kernels (kernels/knn.h): the hierarchical search grid's build and
// query, and the brute-force k nearest vertices. The grid's corner `lo` comes as 3 Python floats
// (the values of the grid's lo tensor, exact in its dtype) and the cell size / its inverse as
// floats; they are rounded to the tensors' dtype here, as the reference rounds them.
#pragma once
#include <vector>

#include "../knn.h"  // kernels/knn.h (a plain "knn.h" would find this file)

namespace tk {
namespace knn_bind {

inline void check_xyz(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(1) == 3, "knn: ", name, " must have shape (n, 3), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "knn: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "knn: ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_points_verts(const at::Tensor& points, const at::Tensor& verts) {
  check_xyz(points, "points");
  check_xyz(verts, "verts");
  TK_CHECK_SAME_DEVICE(points, verts);
  TORCH_CHECK(points.scalar_type() == verts.scalar_type(), "knn: points and verts must have the same dtype");
  TORCH_CHECK(verts.size(0) < ((int64_t)1 << 31) - 1, "knn: too many vertices for int32 indices");
}

inline void check_lo(const std::vector<double>& lo) {
  TORCH_CHECK(lo.size() == 3, "knn: lo must have 3 values, got ", lo.size());
}

}  // namespace knn_bind

// verts (V, 3) float32/float64 -> candidates (R^3, K) int32.
inline at::Tensor knn_build(const at::Tensor& verts, const std::vector<double>& lo, double cell, int64_t resolution,
                            int64_t candidates) {
  knn_bind::check_xyz(verts, "verts");
  knn_bind::check_lo(lo);
  TORCH_CHECK(verts.size(0) >= 1, "knn_build: need at least one vertex");
  TORCH_CHECK(verts.size(0) < ((int64_t)1 << 31) - 1, "knn_build: too many vertices for int32 indices");
  TORCH_CHECK(resolution >= 1 && resolution <= 1024, "knn_build: resolution must be 1..1024, got ", resolution);
  TORCH_CHECK(candidates >= 1 && candidates <= kKnnMaxK, "knn_build: candidates must be 1..", kKnnMaxK, ", got ",
              candidates);
  TORCH_CHECK(std::isfinite(cell) && cell > 0, "knn_build: the cell size must be positive, got ", cell);
  const int R = (int)resolution, K = (int)candidates;
  const int64_t V = verts.size(0);
  at::Tensor cand = at::empty({(int64_t)R * R * R, K}, verts.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(verts.scalar_type(), "knn_build", [&] {
    const scalar_t lo_t[3] = {(scalar_t)lo[0], (scalar_t)lo[1], (scalar_t)lo[2]};
    const scalar_t cell_t = (scalar_t)cell;
    tk::on_device(
        verts,
        [&] { tk_knn_build_cpu(verts.data_ptr<scalar_t>(), V, lo_t, cell_t, R, K, cand.data_ptr<int32_t>()); },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          at::Tensor ws = at::empty({knn_cuda_workspace_ints(R, V)}, verts.options().dtype(at::kInt));
          tk_knn_build_cuda(verts.data_ptr<scalar_t>(), V, lo_t, cell_t, R, K, cand.data_ptr<int32_t>(),
                            ws.data_ptr<int32_t>(), tk::current_stream());
#endif
        });
  });
  return cand;
}

// points (N, 3), verts (V, 3), candidates (R^3, Kc) int32 -> (indices (N, k) int64, dist2 (N, k)).
inline std::vector<at::Tensor> knn_query(const at::Tensor& points, const at::Tensor& verts,
                                         const std::vector<double>& lo, double inv_cell, int64_t resolution,
                                         const at::Tensor& candidates, int64_t k) {
  knn_bind::check_points_verts(points, verts);
  knn_bind::check_lo(lo);
  TK_CHECK_TENSOR(candidates, at::kInt);
  TK_CHECK_SAME_DEVICE(points, candidates);
  TORCH_CHECK(resolution >= 1 && resolution <= 1024, "knn_query: resolution must be 1..1024, got ", resolution);
  const int R = (int)resolution;
  TORCH_CHECK(candidates.dim() == 2 && candidates.size(0) == (int64_t)R * R * R,
              "knn_query: candidates must have shape (resolution^3, K'), got ", candidates.sizes());
  const int Kc = (int)candidates.size(1);
  TORCH_CHECK(Kc >= 1 && Kc <= kKnnMaxK, "knn_query: 1..", kKnnMaxK, " candidates per cell, got ", Kc);
  TORCH_CHECK(k >= 1 && k <= Kc, "knn_query: k must be 1..", Kc, " (the candidates per cell), got ", k);
  TORCH_CHECK(std::isfinite(inv_cell) && inv_cell > 0, "knn_query: inv_cell must be positive, got ", inv_cell);
  const int64_t N = points.size(0), V = verts.size(0);
  at::Tensor idx = at::empty({N, k}, points.options().dtype(at::kLong));
  at::Tensor d2 = at::empty({N, k}, points.options());
  if (N == 0) return {idx, d2};
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "knn_query", [&] {
    const scalar_t lo_t[3] = {(scalar_t)lo[0], (scalar_t)lo[1], (scalar_t)lo[2]};
    const scalar_t inv_t = (scalar_t)inv_cell;
    tk::on_device(
        points,
        [&] {
          tk_knn_query_cpu(points.data_ptr<scalar_t>(), N, verts.data_ptr<scalar_t>(), V, lo_t, inv_t, R,
                           candidates.data_ptr<int32_t>(), Kc, (int)k, idx.data_ptr<int64_t>(),
                           d2.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_knn_query_cuda(points.data_ptr<scalar_t>(), N, verts.data_ptr<scalar_t>(), V, lo_t, inv_t, R,
                            candidates.data_ptr<int32_t>(), Kc, (int)k, idx.data_ptr<int64_t>(),
                            d2.data_ptr<scalar_t>(), tk::current_stream());
#endif
        });
  });
  return {idx, d2};
}

// points (N, 3), verts (V, 3) -> the k nearest of all vertices: (indices (N, k) int64, dist2 (N, k)).
inline std::vector<at::Tensor> knn_brute(const at::Tensor& points, const at::Tensor& verts, int64_t k) {
  knn_bind::check_points_verts(points, verts);
  TORCH_CHECK(k >= 1 && k <= kKnnMaxK, "knn_brute: k must be 1..", kKnnMaxK, ", got ", k);
  const int64_t N = points.size(0), V = verts.size(0);
  at::Tensor idx = at::empty({N, k}, points.options().dtype(at::kLong));
  at::Tensor d2 = at::empty({N, k}, points.options());
  if (N == 0) return {idx, d2};
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "knn_brute", [&] {
    tk::on_device(
        points,
        [&] {
          tk_knn_brute_cpu(points.data_ptr<scalar_t>(), N, verts.data_ptr<scalar_t>(), V, (int)k,
                           idx.data_ptr<int64_t>(), d2.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_knn_brute_cuda(points.data_ptr<scalar_t>(), N, verts.data_ptr<scalar_t>(), V, (int)k,
                            idx.data_ptr<int64_t>(), d2.data_ptr<scalar_t>(), tk::current_stream());
#endif
        });
  });
  return {idx, d2};
}

inline void bind_knn(pybind11::module_& m) {
  m.def("knn_build", &knn_build, "candidates (R^3, K') int32 of the hierarchical k-NN grid",
        pybind11::arg("verts"), pybind11::arg("lo"), pybind11::arg("cell"), pybind11::arg("resolution"),
        pybind11::arg("candidates"));
  m.def("knn_query", &knn_query, "k nearest among the cell's candidates: (indices int64, dist2)",
        pybind11::arg("points"), pybind11::arg("verts"), pybind11::arg("lo"), pybind11::arg("inv_cell"),
        pybind11::arg("resolution"), pybind11::arg("candidates"), pybind11::arg("k"));
  m.def("knn_brute", &knn_brute, "k nearest among all vertices: (indices int64, dist2)", pybind11::arg("points"),
        pybind11::arg("verts"), pybind11::arg("k"));
}

}  // namespace tk
