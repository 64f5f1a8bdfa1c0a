// Torch-level wrappers of the raymarch kernels (kernels/raymarch.h): input checks, output
// allocation on the input's device, float/double dispatch, CPU or CUDA launcher.
// talkcli/ops/raymarch.py is the spec and the only caller.
#pragma once
#include <array>
#include <optional>
#include <vector>

#include "../raymarch.h"  // kernels/raymarch.h (a plain "raymarch.h" would find this file)

namespace tk {
namespace raymarch_detail {

inline void check_rays(const at::Tensor& o, const at::Tensor& d) {
  TORCH_CHECK(o.dim() == 2 && o.size(1) == 3, "rays_o must be (R, 3), got ", o.sizes());
  TORCH_CHECK(d.sizes() == o.sizes(), "rays_d must have the shape of rays_o ", o.sizes(), ", got ", d.sizes());
  TK_CHECK_TENSOR(o, o.scalar_type());
  TK_CHECK_TENSOR(d, o.scalar_type());
  TK_CHECK_SAME_DEVICE(o, d);
}

inline void check_per_ray(const at::Tensor& x, const at::Tensor& o, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == o.size(0), name, " must be (R,) with R = ", o.size(0), ", got ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == o.scalar_type(), name, " must have the dtype of the rays (", o.scalar_type(),
              "), got ", x.scalar_type());
  TORCH_CHECK(x.device() == o.device(), name, " must be on the device of the rays");
}

inline void check_vec(const std::vector<double>& v, size_t n, const char* name) {
  TORCH_CHECK(v.size() == n, name, " must have ", n, " values, got ", v.size());
}

}  // namespace raymarch_detail

// (near, far) of each ray through the box aabb = (xmin, ymin, zmin, xmax, ymax, zmax).
inline std::vector<at::Tensor> raymarch_ray_aabb(const at::Tensor& rays_o, const at::Tensor& rays_d,
                                                 const std::vector<double>& aabb, double min_near) {
  raymarch_detail::check_rays(rays_o, rays_d);
  raymarch_detail::check_vec(aabb, 6, "aabb");
  TORCH_CHECK(rays_o.scalar_type() == at::kFloat || rays_o.scalar_type() == at::kDouble,
              "rays must be float32 or float64");
  const int64_t n = rays_o.size(0);
  at::Tensor near = at::empty({n}, rays_o.options());
  at::Tensor far = at::empty({n}, rays_o.options());
  AT_DISPATCH_FLOATING_TYPES(rays_o.scalar_type(), "raymarch_ray_aabb", [&] {
    std::array<scalar_t, 6> box;
    for (int i = 0; i < 6; ++i) box[i] = (scalar_t)aabb[i];
    const scalar_t mn = (scalar_t)min_near;
    tk::on_device(
        rays_o,
        [&] {
          tk_raymarch_aabb_cpu<scalar_t>(rays_o.data_ptr<scalar_t>(), rays_d.data_ptr<scalar_t>(), n, box.data(), mn,
                                         near.data_ptr<scalar_t>(), far.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_raymarch_aabb_cuda<scalar_t>(rays_o.data_ptr<scalar_t>(), rays_d.data_ptr<scalar_t>(), n, box.data(),
                                          mn, near.data_ptr<scalar_t>(), far.data_ptr<scalar_t>(),
                                          tk::current_stream());
#endif
        });
  });
  return {near, far};
}

// Packed samples of every ray: positions, directions, ts, deltas, ray_indices, ray_offsets.
inline std::vector<at::Tensor> raymarch_march(const at::Tensor& rays_o, const at::Tensor& rays_d,
                                              const at::Tensor& near, const at::Tensor& far,
                                              const std::optional<at::Tensor>& jitter, const at::Tensor& bitfield,
                                              int64_t resolution, const std::vector<double>& aabb_min,
                                              const std::vector<double>& scale, double step_size, double cone_angle,
                                              double max_step, int64_t max_samples) {
  using namespace raymarch_detail;
  check_rays(rays_o, rays_d);
  TORCH_CHECK(rays_o.scalar_type() == at::kFloat || rays_o.scalar_type() == at::kDouble,
              "rays must be float32 or float64");
  check_per_ray(near, rays_o, "near");
  check_per_ray(far, rays_o, "far");
  if (jitter.has_value()) check_per_ray(*jitter, rays_o, "jitter");
  TK_CHECK_TENSOR(bitfield, at::kByte);
  TK_CHECK_SAME_DEVICE(bitfield, rays_o);
  TORCH_CHECK(resolution >= 1 && resolution <= 2048, "resolution must be in 1..2048, got ", resolution);
  TORCH_CHECK(bitfield.dim() == 1 && bitfield.numel() >= (resolution * resolution * resolution + 7) / 8,
              "bitfield must hold ceil(resolution^3 / 8) bytes");
  check_vec(aabb_min, 3, "aabb_min");
  check_vec(scale, 3, "scale");
  TORCH_CHECK(step_size > 0, "step_size must be > 0");
  TORCH_CHECK(max_step >= step_size, "max_step must be >= step_size");
  TORCH_CHECK(max_samples >= 0 && max_samples <= (int64_t)INT32_MAX, "max_samples out of range");

  const int64_t n = rays_o.size(0);
  const auto opts = rays_o.options();
  const auto lopts = opts.dtype(at::kLong);
  at::Tensor counts = at::empty({n}, lopts);
  at::Tensor offsets = at::zeros({n + 1}, lopts);
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(rays_o.scalar_type(), "raymarch_march", [&] {
    tk::MarchParams<scalar_t> P;
    P.bits = bitfield.data_ptr<uint8_t>();
    P.res = (int32_t)resolution;
    P.max_samples = (int32_t)max_samples;
    for (int i = 0; i < 3; ++i) {
      P.amin[i] = (scalar_t)aabb_min[i];
      P.scale[i] = (scalar_t)scale[i];
    }
    P.step = (scalar_t)step_size;
    P.cone = (scalar_t)cone_angle;
    P.max_step = (scalar_t)max_step;
    const scalar_t* o = rays_o.data_ptr<scalar_t>();
    const scalar_t* d = rays_d.data_ptr<scalar_t>();
    const scalar_t* nr = near.data_ptr<scalar_t>();
    const scalar_t* fr = far.data_ptr<scalar_t>();
    const scalar_t* jt = jitter.has_value() ? jitter->data_ptr<scalar_t>() : nullptr;

    tk::on_device(
        rays_o, [&] { tk_raymarch_count_cpu<scalar_t>(o, d, nr, fr, jt, n, P, counts.data_ptr<int64_t>()); },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_raymarch_count_cuda<scalar_t>(o, d, nr, fr, jt, n, P, counts.data_ptr<int64_t>(), tk::current_stream());
#endif
        });
    if (n > 0) {
      at::Tensor tail = offsets.narrow(0, 1, n);
      at::cumsum_out(tail, counts, 0);
    }
    const int64_t total = offsets[n].item<int64_t>();  // one device sync on CUDA

    at::Tensor positions = at::empty({total, 3}, opts);
    at::Tensor directions = at::empty({total, 3}, opts);
    at::Tensor ts = at::empty({total}, opts);
    at::Tensor deltas = at::empty({total}, opts);
    at::Tensor ray_indices = at::empty({total}, lopts);
    if (total > 0) {
      tk::MarchOut<scalar_t> out{positions.data_ptr<scalar_t>(), directions.data_ptr<scalar_t>(),
                                 ts.data_ptr<scalar_t>(), deltas.data_ptr<scalar_t>(),
                                 ray_indices.data_ptr<int64_t>()};
      const int64_t* off = offsets.data_ptr<int64_t>();
      tk::on_device(
          rays_o, [&] { tk_raymarch_fill_cpu<scalar_t>(o, d, nr, fr, jt, n, P, off, out); },
          [&] {
#ifdef TALKCLI_WITH_CUDA
            tk_raymarch_fill_cuda<scalar_t>(o, d, nr, fr, jt, n, P, off, out, tk::current_stream());
#endif
          });
    }
    result = {positions, directions, ts, deltas, ray_indices, offsets};
  });
  return result;
}

// Gradients of the rays from those of positions = o + t d and directions = d (either may be None).
inline std::vector<at::Tensor> raymarch_march_backward(const std::optional<at::Tensor>& grad_positions,
                                                       const std::optional<at::Tensor>& grad_directions,
                                                       const at::Tensor& ts, const at::Tensor& ray_offsets) {
  TORCH_CHECK(ts.dim() == 1, "ts must be (S,)");
  TORCH_CHECK(ts.is_contiguous(), "ts must be contiguous");
  TK_CHECK_TENSOR(ray_offsets, at::kLong);
  TK_CHECK_SAME_DEVICE(ts, ray_offsets);
  TORCH_CHECK(ray_offsets.dim() == 1 && ray_offsets.numel() >= 1, "ray_offsets must be (R + 1,)");
  const int64_t s = ts.size(0);
  for (const auto* g : {&grad_positions, &grad_directions}) {
    if (!g->has_value()) continue;
    TK_CHECK_TENSOR(**g, ts.scalar_type());
    TK_CHECK_SAME_DEVICE(**g, ts);
    TORCH_CHECK((*g)->dim() == 2 && (*g)->size(0) == s && (*g)->size(1) == 3, "gradients must be (S, 3)");
  }
  const int64_t n = ray_offsets.numel() - 1;
  at::Tensor grad_o = at::empty({n, 3}, ts.options());
  at::Tensor grad_d = at::empty({n, 3}, ts.options());
  AT_DISPATCH_FLOATING_TYPES(ts.scalar_type(), "raymarch_march_backward", [&] {
    const scalar_t* gp = grad_positions.has_value() ? grad_positions->data_ptr<scalar_t>() : nullptr;
    const scalar_t* gd = grad_directions.has_value() ? grad_directions->data_ptr<scalar_t>() : nullptr;
    tk::on_device(
        ts,
        [&] {
          tk_raymarch_backward_cpu<scalar_t>(gp, gd, ts.data_ptr<scalar_t>(), ray_offsets.data_ptr<int64_t>(), n,
                                             grad_o.data_ptr<scalar_t>(), grad_d.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_raymarch_backward_cuda<scalar_t>(gp, gd, ts.data_ptr<scalar_t>(), ray_offsets.data_ptr<int64_t>(), n,
                                              grad_o.data_ptr<scalar_t>(), grad_d.data_ptr<scalar_t>(),
                                              tk::current_stream());
#endif
        });
  });
  return {grad_o, grad_d};
}

// Bitfield (ceil(numel / 8) bytes): bit i = density.flatten()[i] > threshold.
inline at::Tensor raymarch_pack(const at::Tensor& density, double threshold) {
  TORCH_CHECK(density.is_contiguous(), "density must be contiguous");
  const int64_t cells = density.numel();
  at::Tensor bits = at::empty({(cells + 7) / 8}, density.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(density.scalar_type(), "raymarch_pack", [&] {
    const scalar_t th = (scalar_t)threshold;
    tk::on_device(
        density,
        [&] { tk_raymarch_pack_cpu<scalar_t>(density.data_ptr<scalar_t>(), cells, th, bits.data_ptr<uint8_t>()); },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_raymarch_pack_cuda<scalar_t>(density.data_ptr<scalar_t>(), cells, th, bits.data_ptr<uint8_t>(),
                                          tk::current_stream());
#endif
        });
  });
  return bits;
}

// In place: density *= decay; density[cells[k]] = max(density[cells[k]], values[k]) (cells None:
// one value per cell, in order).
inline void raymarch_update(at::Tensor density, double decay, const std::optional<at::Tensor>& cells,
                            const at::Tensor& values) {
  TORCH_CHECK(density.is_contiguous(), "density must be contiguous");
  TK_CHECK_TENSOR(values, density.scalar_type());
  TK_CHECK_SAME_DEVICE(values, density);
  TORCH_CHECK(values.dim() == 1, "values must be (M,)");
  const int64_t m = values.numel();
  if (cells.has_value()) {
    TK_CHECK_TENSOR(*cells, at::kLong);
    TK_CHECK_SAME_DEVICE(*cells, density);
    TORCH_CHECK(cells->dim() == 1 && cells->numel() == m, "cells must be (M,) like values");
  } else {
    TORCH_CHECK(m == density.numel(), "without cells, values must hold one value per cell");
  }
  AT_DISPATCH_FLOATING_TYPES(density.scalar_type(), "raymarch_update", [&] {
    const int64_t* c = cells.has_value() ? cells->data_ptr<int64_t>() : nullptr;
    const scalar_t dc = (scalar_t)decay;
    tk::on_device(
        density,
        [&] {
          tk_raymarch_update_cpu<scalar_t>(density.data_ptr<scalar_t>(), density.numel(), dc, c,
                                           values.data_ptr<scalar_t>(), m);
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_raymarch_update_cuda<scalar_t>(density.data_ptr<scalar_t>(), density.numel(), dc, c,
                                            values.data_ptr<scalar_t>(), m, tk::current_stream());
#endif
        });
  });
}

inline void bind_raymarch(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("raymarch_ray_aabb", &raymarch_ray_aabb, "near/far of rays through a box", py::arg("rays_o"),
        py::arg("rays_d"), py::arg("aabb"), py::arg("min_near"));
  m.def("raymarch_march", &raymarch_march, "packed samples of rays in occupied cells", py::arg("rays_o"),
        py::arg("rays_d"), py::arg("near"), py::arg("far"), py::arg("jitter"), py::arg("bitfield"),
        py::arg("resolution"), py::arg("aabb_min"), py::arg("scale"), py::arg("step_size"), py::arg("cone_angle"),
        py::arg("max_step"), py::arg("max_samples"));
  m.def("raymarch_march_backward", &raymarch_march_backward, "ray gradients from sample gradients",
        py::arg("grad_positions"), py::arg("grad_directions"), py::arg("ts"), py::arg("ray_offsets"));
  m.def("raymarch_pack", &raymarch_pack, "occupancy bitfield from densities", py::arg("density"),
        py::arg("threshold"));
  m.def("raymarch_update", &raymarch_update, "in-place max-with-decay density update", py::arg("density"),
        py::arg("decay"), py::arg("cells"), py::arg("values"));
}

}  // namespace tk
