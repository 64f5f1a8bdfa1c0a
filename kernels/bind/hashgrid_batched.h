// Torch-level wrappers of the hashgrid_batched kernels (many small hash grids, one item per query).
// Python: talkcli/ops/hashgrid_batched.py. Level geometry comes as lists (HashGridSpec), the optional
// level mask as a (L,) uint8 tensor on the inputs' device.
#pragma once
#include <optional>
#include <tuple>
#include <vector>

#include "../hashgrid_batched.h"  // kernels/hashgrid_batched.h (a plain "hashgrid_batched.h" would find this file)

namespace tk {
namespace hgb_bind {

inline hgb::Levels make_levels(const std::vector<double>& scales, const std::vector<int64_t>& resolutions,
                               const std::vector<int64_t>& sizes, const std::vector<int64_t>& offsets,
                               const std::vector<int64_t>& hashed, int64_t S) {
  const int64_t L = (int64_t)scales.size();
  TORCH_CHECK(L >= 1 && L <= hgb::kMaxLevels, "hashgrid_batched: 1 to ", hgb::kMaxLevels, " levels, got ", L);
  TORCH_CHECK((int64_t)resolutions.size() == L && (int64_t)sizes.size() == L && (int64_t)hashed.size() == L &&
                  (int64_t)offsets.size() == L + 1,
              "hashgrid_batched: level lists of inconsistent lengths");
  TORCH_CHECK(offsets[0] == 0 && offsets[L] == S, "hashgrid_batched: tables hold ", S,
              " rows per grid but the levels need ", offsets[L]);
  hgb::Levels lv{};
  lv.n = (int)L;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(sizes[l] >= 1 && offsets[l + 1] - offsets[l] == sizes[l] && resolutions[l] >= 1 &&
                    resolutions[l] <= 0xFFFFFFFFll && offsets[l + 1] <= 0xFFFFFFFFll,
                "hashgrid_batched: bad geometry of level ", l);
    lv.scale[l] = (float)scales[l];
    lv.res[l] = (uint32_t)resolutions[l];
    lv.size[l] = (uint32_t)sizes[l];
    lv.offset[l] = (uint32_t)offsets[l];
    lv.hashed[l] = hashed[l] ? 1 : 0;
  }
  return lv;
}

// Checks the inputs and returns the call's sizes.
inline hgb::Shape check_inputs(const at::Tensor& x, const at::Tensor& item, const at::Tensor& tables,
                               const std::optional<at::Tensor>& level_mask, int64_t L) {
  TORCH_CHECK(tables.dim() == 4, "hashgrid_batched: tables must be (V, M, S, F), got ", tables.sizes());
  TORCH_CHECK(tables.is_contiguous(), "tables must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kFloat || tables.scalar_type() == at::kDouble,
              "hashgrid_batched: tables must be float32 or float64");
  TK_CHECK_TENSOR(x, tables.scalar_type());
  TK_CHECK_TENSOR(item, at::kLong);
  TK_CHECK_SAME_DEVICE(x, tables);
  TK_CHECK_SAME_DEVICE(item, tables);
  TORCH_CHECK(x.dim() == 2 && (x.size(1) == 2 || x.size(1) == 3), "hashgrid_batched: x must be (Q, 2 or 3), got ",
              x.sizes());
  TORCH_CHECK(item.dim() == 1 && item.size(0) == x.size(0), "hashgrid_batched: item must be (Q,) = (", x.size(0),
              ",), got ", item.sizes());
  const int64_t F = tables.size(3);
  TORCH_CHECK(F == 1 || F == 2 || F == 4 || F == 8, "hashgrid_batched: 1, 2, 4 or 8 features per level, got ", F);
  TORCH_CHECK(tables.size(1) >= 1, "hashgrid_batched: need at least one grid per item");
  if (level_mask.has_value()) {
    const at::Tensor& m = *level_mask;
    TK_CHECK_TENSOR(m, at::kByte);
    TK_CHECK_SAME_DEVICE(m, tables);
    TORCH_CHECK(m.dim() == 1 && m.size(0) == L, "hashgrid_batched: level_mask must be (", L, ",), got ", m.sizes());
  }
  return hgb::Shape{x.size(0), tables.size(0), tables.size(1), tables.size(2), (int)x.size(1), (int)F};
}

inline const uint8_t* mask_ptr(const std::optional<at::Tensor>& level_mask) {
  return level_mask.has_value() ? level_mask->data_ptr<uint8_t>() : nullptr;
}

// (order (Q,), start (V+1,)): the queries sorted by item (counting sort, stable; CPU).
inline std::tuple<at::Tensor, at::Tensor> sort_by_item(const at::Tensor& item, int64_t n_items) {
  TK_CHECK_TENSOR(item, at::kLong);
  TORCH_CHECK(item.dim() == 1, "hashgrid_batched_sort: item must be (Q,)");
  TORCH_CHECK(!item.is_cuda(), "hashgrid_batched_sort: CPU tensors only");
  TORCH_CHECK(n_items >= 0, "hashgrid_batched_sort: n_items must be >= 0");
  at::Tensor order = at::empty({item.size(0)}, item.options());
  at::Tensor start = at::empty({n_items + 1}, item.options());
  const int64_t bad = tk_hashgrid_batched_sort_cpu(item.data_ptr<int64_t>(), item.size(0), n_items,
                                                   order.data_ptr<int64_t>(), start.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(bad == 0, "hashgrid_batched: ", bad, " item ids outside [0, ", n_items, ")");
  return {order, start};
}

// A sort passed in from Python (both or neither of order, start) must be a sort of item: the
// kernels index with it unchecked.
inline void check_sort(const at::Tensor& item, const hgb::Shape& sh, const std::optional<at::Tensor>& order,
                       const std::optional<at::Tensor>& start) {
  TORCH_CHECK(order.has_value() == start.has_value(), "hashgrid_batched: pass both order and start, or neither");
  if (!order.has_value()) return;
  TK_CHECK_TENSOR(*order, at::kLong);
  TK_CHECK_TENSOR(*start, at::kLong);
  TORCH_CHECK(!order->is_cuda() && !start->is_cuda() && !item.is_cuda(),
              "hashgrid_batched: the sort is for CPU tensors");
  TORCH_CHECK(order->dim() == 1 && order->size(0) == sh.Q && start->dim() == 1 && start->size(0) == sh.V + 1,
              "hashgrid_batched: order must be (Q,) and start (V+1,)");
  TORCH_CHECK(tk_hashgrid_batched_sort_valid_cpu(item.data_ptr<int64_t>(), sh.Q, sh.V, order->data_ptr<int64_t>(),
                                                 start->data_ptr<int64_t>()),
              "hashgrid_batched: (order, start) is not the sort of item (hashgrid_batched_sort)");
}

inline at::Tensor forward(const at::Tensor& x, const at::Tensor& item, const at::Tensor& tables,
                          const std::vector<double>& scales, const std::vector<int64_t>& resolutions,
                          const std::vector<int64_t>& sizes, const std::vector<int64_t>& offsets,
                          const std::vector<int64_t>& hashed, const std::optional<at::Tensor>& level_mask,
                          const std::optional<at::Tensor>& order, const std::optional<at::Tensor>& start) {
  const hgb::Levels lv = make_levels(scales, resolutions, sizes, offsets, hashed, tables.size(2));
  const hgb::Shape sh = check_inputs(x, item, tables, level_mask, lv.n);
  check_sort(item, sh, order, start);
  at::Tensor out = at::empty({sh.Q, sh.M, (int64_t)lv.n * sh.F}, tables.options());
  if (sh.Q == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(tables.scalar_type(), "hashgrid_batched_forward", [&] {
    tk::on_device(
        tables,
        [&] {
          const int64_t bad = tk_hashgrid_batched_forward_cpu(
              x.data_ptr<scalar_t>(), item.data_ptr<int64_t>(), tables.data_ptr<scalar_t>(), mask_ptr(level_mask),
              order.has_value() ? order->data_ptr<int64_t>() : nullptr,
              start.has_value() ? start->data_ptr<int64_t>() : nullptr, out.data_ptr<scalar_t>(), sh, lv);
          TORCH_CHECK_VALUE(bad == 0, "hashgrid_batched: ", bad, " item ids outside [0, ", sh.V, ")");
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_hashgrid_batched_forward_cuda(x.data_ptr<scalar_t>(), item.data_ptr<int64_t>(),
                                           tables.data_ptr<scalar_t>(), mask_ptr(level_mask),
                                           out.data_ptr<scalar_t>(), sh, lv, tk::current_stream());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
        });
  });
  return out;
}

// (dx or None, dtables or None). On the CPU the table gradient uses the sort (order, start) from
// hashgrid_batched_sort, computed here when not given.
inline std::tuple<at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& item, const at::Tensor& tables,
    const std::vector<double>& scales, const std::vector<int64_t>& resolutions, const std::vector<int64_t>& sizes,
    const std::vector<int64_t>& offsets, const std::vector<int64_t>& hashed,
    const std::optional<at::Tensor>& level_mask, std::optional<at::Tensor> order, std::optional<at::Tensor> start,
    bool need_dx, bool need_dtables) {
  const hgb::Levels lv = make_levels(scales, resolutions, sizes, offsets, hashed, tables.size(2));
  const hgb::Shape sh = check_inputs(x, item, tables, level_mask, lv.n);
  TK_CHECK_TENSOR(grad_out, tables.scalar_type());
  TK_CHECK_SAME_DEVICE(grad_out, tables);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == sh.Q && grad_out.size(1) == sh.M &&
                  grad_out.size(2) == (int64_t)lv.n * sh.F,
              "hashgrid_batched: grad_out must be (Q, M, L*F), got ", grad_out.sizes());
  at::Tensor dx, dtables;
  if (need_dx) dx = at::empty_like(x);
  if (need_dtables) dtables = at::empty_like(tables);
  if (!need_dx && !need_dtables) return {dx, dtables};
  if (sh.Q == 0) {
    if (need_dtables) dtables.zero_();
    return {dx, dtables};
  }
  if (!tables.is_cuda()) {
    if (need_dtables && !order.has_value() && !start.has_value())
      std::tie(order, start) = sort_by_item(item, sh.V);
    else
      check_sort(item, sh, order, start);
  }
  AT_DISPATCH_FLOATING_TYPES(tables.scalar_type(), "hashgrid_batched_backward", [&] {
    scalar_t* dx_p = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    scalar_t* dt_p = need_dtables ? dtables.data_ptr<scalar_t>() : nullptr;
    tk::on_device(
        tables,
        [&] {
          tk_hashgrid_batched_backward_cpu(
              grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), item.data_ptr<int64_t>(),
              tables.data_ptr<scalar_t>(), mask_ptr(level_mask),
              order.has_value() ? order->data_ptr<int64_t>() : nullptr,
              start.has_value() ? start->data_ptr<int64_t>() : nullptr, dx_p, dt_p, sh, lv);
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_hashgrid_batched_backward_cuda(grad_out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                            item.data_ptr<int64_t>(), tables.data_ptr<scalar_t>(),
                                            mask_ptr(level_mask), dx_p, dt_p, sh, lv, tk::current_stream());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
        });
  });
  return {dx, dtables};
}

}  // namespace hgb_bind

inline void bind_hashgrid_batched(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("hashgrid_batched_sort", &hgb_bind::sort_by_item, "queries sorted by item: (order (Q,), start (V+1,))",
        py::arg("item"), py::arg("n_items"));
  m.def("hashgrid_batched_forward", &hgb_bind::forward, "batched hash encoding (Q, M, L*F)", py::arg("x"),
        py::arg("item"), py::arg("tables"), py::arg("scales"), py::arg("resolutions"), py::arg("sizes"),
        py::arg("offsets"), py::arg("hashed"), py::arg("level_mask") = py::none(), py::arg("order") = py::none(),
        py::arg("start") = py::none());
  m.def("hashgrid_batched_backward", &hgb_bind::backward, "gradients (dx or None, dtables or None)",
        py::arg("grad_out"), py::arg("x"), py::arg("item"), py::arg("tables"), py::arg("scales"),
        py::arg("resolutions"), py::arg("sizes"), py::arg("offsets"), py::arg("hashed"),
        py::arg("level_mask") = py::none(), py::arg("order") = py::none(), py::arg("start") = py::none(),
        py::arg("need_dx") = true, py::arg("need_dtables") = true);
}

}  // namespace tk
