// Torch-level wrappers of the hash-grid kernels (kernels/hashgrid.h). The level geometry comes as
// the small CPU tensors of HashGridSpec.level_tensors("cpu") (scales f32 (L,), resolutions i32 (L,),
// sizes i32 (L,), offsets i64 (L+1,), hashed u8 (L,)) and an optional CPU level mask (L,) bool/u8;
// they are read on the host and travel to the kernels by value.
#pragma once
#include "../hashgrid.h"  // kernels/hashgrid.h (a plain "hashgrid.h" would find this file)

namespace tk {
namespace hashgrid_bind {

inline HashGridLevels levels_of(const at::Tensor& table, const at::Tensor& scales, const at::Tensor& resolutions,
                                const at::Tensor& sizes, const at::Tensor& offsets, const at::Tensor& hashed,
                                const c10::optional<at::Tensor>& level_mask) {
  for (const at::Tensor* t : {&scales, &resolutions, &sizes, &offsets, &hashed})
    TORCH_CHECK(!t->is_cuda() && t->dim() == 1, "hashgrid: level tensors must be 1-D CPU tensors");
  TK_CHECK_TENSOR(scales, at::kFloat);
  TK_CHECK_TENSOR(resolutions, at::kInt);
  TK_CHECK_TENSOR(sizes, at::kInt);
  TK_CHECK_TENSOR(offsets, at::kLong);
  TK_CHECK_TENSOR(hashed, at::kByte);
  const int64_t nl = scales.size(0);
  TORCH_CHECK(nl >= 1 && nl <= kHashGridMaxLevels, "hashgrid: 1..", kHashGridMaxLevels, " levels, got ", nl);
  TORCH_CHECK(resolutions.size(0) == nl && sizes.size(0) == nl && hashed.size(0) == nl &&
                  offsets.size(0) == nl + 1,
              "hashgrid: level tensors disagree on the number of levels");
  HashGridLevels lv{};
  lv.n_levels = (int)nl;
  const float* sc = scales.data_ptr<float>();
  const int32_t* res = resolutions.data_ptr<int32_t>();
  const int32_t* sz = sizes.data_ptr<int32_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const uint8_t* hs = hashed.data_ptr<uint8_t>();
  const int64_t rows = table.size(0);
  for (int64_t l = 0; l < nl; ++l) {
    TORCH_CHECK(sz[l] > 0 && res[l] > 0 && off[l] >= 0 && off[l] + sz[l] <= rows,
                "hashgrid: level ", l, " (offset ", off[l], ", size ", sz[l], ") does not fit the table's ", rows,
                " rows");
    // levels must not overlap: the CPU table gradient gives each level's rows to one thread
    TORCH_CHECK(off[l] + sz[l] <= off[l + 1], "hashgrid: level ", l, " overlaps the next one");
    lv.scale[l] = sc[l];
    lv.resolution[l] = (uint32_t)res[l];
    lv.size[l] = (uint32_t)sz[l];
    lv.offset[l] = off[l];
    lv.hashed[l] = hs[l] ? 1 : 0;
    lv.active[l] = 1;
  }
  if (level_mask.has_value() && level_mask->defined()) {
    const at::Tensor& m = *level_mask;
    TORCH_CHECK(!m.is_cuda() && m.dim() == 1 && m.size(0) == nl, "hashgrid: level_mask must be a CPU tensor (", nl,
                ",)");
    at::Tensor mb = m.to(at::kByte).contiguous();
    const uint8_t* mp = mb.data_ptr<uint8_t>();
    for (int64_t l = 0; l < nl; ++l) lv.active[l] = mp[l] ? 1 : 0;
  }
  return lv;
}

inline void check_inputs(const at::Tensor& x, const at::Tensor& table) {
  TORCH_CHECK(x.dim() == 2 && (x.size(1) == 2 || x.size(1) == 3), "hashgrid: x must be (N, 2) or (N, 3), got ",
              x.sizes());
  TORCH_CHECK(table.dim() == 2 && (table.size(1) == 1 || table.size(1) == 2 || table.size(1) == 4 ||
                                   table.size(1) == 8),
              "hashgrid: table must be (n_entries, F) with F in 1, 2, 4, 8, got ", table.sizes());
  TK_CHECK_SAME_DEVICE(x, table);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "hashgrid: x must be float32 or float64");
  TK_CHECK_TENSOR(x, x.scalar_type());
  TK_CHECK_TENSOR(table, x.scalar_type());
}

inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& table, int nl) {
  TK_CHECK_SAME_DEVICE(grad_out, x);
  TK_CHECK_TENSOR(grad_out, x.scalar_type());
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == x.size(0) && grad_out.size(1) == nl * table.size(1),
              "hashgrid: grad_out must be (N, L*F) = (", x.size(0), ", ", nl * table.size(1), "), got ",
              grad_out.sizes());
}

}  // namespace hashgrid_bind

// out (N, L*F): level l's F features at columns l*F .. l*F+F-1; masked levels are zero.
inline at::Tensor hashgrid_forward(const at::Tensor& x, const at::Tensor& table, const at::Tensor& scales,
                                   const at::Tensor& resolutions, const at::Tensor& sizes, const at::Tensor& offsets,
                                   const at::Tensor& hashed, const c10::optional<at::Tensor>& level_mask) {
  hashgrid_bind::check_inputs(x, table);
  const HashGridLevels lv = hashgrid_bind::levels_of(table, scales, resolutions, sizes, offsets, hashed, level_mask);
  const int64_t n = x.size(0);
  const int dims = (int)x.size(1), features = (int)table.size(1);
  at::Tensor out = at::empty({n, (int64_t)lv.n_levels * features}, x.options());
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_forward", [&] {
    tk::on_device(
        x,
        [&] {
          tk_hashgrid_forward_cpu(x.data_ptr<scalar_t>(), n, dims, table.data_ptr<scalar_t>(), features, lv,
                                  out.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_hashgrid_forward_cuda(x.data_ptr<scalar_t>(), n, dims, table.data_ptr<scalar_t>(), features, lv,
                                   out.data_ptr<scalar_t>(), tk::current_stream());
#endif
        });
  });
  return out;
}

// (dL/dtable shaped like `table`, dL/dx (N, D)); each only when asked for (else None).
// dL/dx = sum over active levels of scale_l * sum over corners of
// <grad_out[l], table[corner]> * d weight / d fraction.
inline std::tuple<c10::optional<at::Tensor>, c10::optional<at::Tensor>> hashgrid_backward(
    const at::Tensor& x, const at::Tensor& table, const at::Tensor& grad_out, const at::Tensor& scales,
    const at::Tensor& resolutions, const at::Tensor& sizes, const at::Tensor& offsets, const at::Tensor& hashed,
    const c10::optional<at::Tensor>& level_mask, bool need_table, bool need_x) {
  hashgrid_bind::check_inputs(x, table);
  const HashGridLevels lv = hashgrid_bind::levels_of(table, scales, resolutions, sizes, offsets, hashed, level_mask);
  hashgrid_bind::check_grad_out(grad_out, x, table, lv.n_levels);
  const int64_t n = x.size(0), rows = table.size(0);
  const int dims = (int)x.size(1), features = (int)table.size(1);
  // written in full by the kernels (the CPU kernel zero-fills each level's rows right before its
  // scatter, while they are in cache)
  at::Tensor grad_table = need_table ? at::empty_like(table, at::MemoryFormat::Contiguous) : at::Tensor();
  at::Tensor grad_x = need_x ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::Tensor();
  if (need_table || need_x) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hashgrid_backward", [&] {
      scalar_t* gt = need_table ? grad_table.data_ptr<scalar_t>() : nullptr;
      scalar_t* gx = need_x ? grad_x.data_ptr<scalar_t>() : nullptr;
      tk::on_device(
          x,
          [&] {
            tk_hashgrid_backward_cpu(x.data_ptr<scalar_t>(), n, dims, table.data_ptr<scalar_t>(),
                                     grad_out.data_ptr<scalar_t>(), features, lv, gt, rows, gx);
          },
          [&] {
#ifdef TALKCLI_WITH_CUDA
            tk_hashgrid_backward_cuda(x.data_ptr<scalar_t>(), n, dims, table.data_ptr<scalar_t>(),
                                      grad_out.data_ptr<scalar_t>(), features, lv, gt, rows, gx,
                                      tk::current_stream());
#endif
          });
    });
  }
  return {need_table ? c10::optional<at::Tensor>(grad_table) : c10::nullopt,
          need_x ? c10::optional<at::Tensor>(grad_x) : c10::nullopt};
}

inline void bind_hashgrid(pybind11::module_& m) {
  using pybind11::arg;
  m.def("hashgrid_forward", &hashgrid_forward, "multi-resolution hash encoding: (N, D) -> (N, L*F)", arg("x"),
        arg("table"), arg("scales"), arg("resolutions"), arg("sizes"), arg("offsets"), arg("hashed"),
        arg("level_mask") = pybind11::none());
  m.def("hashgrid_backward", &hashgrid_backward,
        "hash encoding backward: (dL/dtable or None, dL/dx or None) from dL/dout", arg("x"), arg("table"),
        arg("grad_out"), arg("scales"), arg("resolutions"), arg("sizes"), arg("offsets"), arg("hashed"),
        arg("level_mask"), arg("need_table"), arg("need_x"));
}

}  // namespace tk
