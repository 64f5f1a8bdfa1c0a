// Torch-level wrappers of the composite kernels (volume rendering of packed ray samples):
// composite_forward and composite_backward. talkcli/ops/composite.py is the caller and the spec.
#pragma once
#include <tuple>

#include "../composite.h"  // kernels/composite.h (not this file)

namespace tk {
namespace composite_detail {

// Shapes, dtypes and devices shared by forward and backward; returns the channel count.
inline int64_t check_samples(const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& deltas,
                             const at::Tensor& ts, const at::Tensor& ray_offsets, double stop_transmittance) {
  TORCH_CHECK(sigmas.scalar_type() == at::kFloat || sigmas.scalar_type() == at::kDouble,
              "composite: sigmas must be float32 or float64, got ", sigmas.scalar_type());
  const auto dtype = sigmas.scalar_type();
  TK_CHECK_TENSOR(sigmas, dtype);
  TK_CHECK_TENSOR(rgbs, dtype);
  TK_CHECK_TENSOR(deltas, dtype);
  TK_CHECK_TENSOR(ts, dtype);
  TK_CHECK_TENSOR(ray_offsets, at::kLong);
  TK_CHECK_SAME_DEVICE(sigmas, rgbs);
  TK_CHECK_SAME_DEVICE(sigmas, deltas);
  TK_CHECK_SAME_DEVICE(sigmas, ts);
  TK_CHECK_SAME_DEVICE(sigmas, ray_offsets);
  TORCH_CHECK(sigmas.dim() == 1, "composite: sigmas must be (S,), got ", sigmas.sizes());
  const int64_t n = sigmas.size(0);
  TORCH_CHECK(rgbs.dim() == 2 && rgbs.size(0) == n && rgbs.size(1) >= 1, "composite: rgbs must be (S=", n,
              ", C>=1), got ", rgbs.sizes());
  TORCH_CHECK(deltas.dim() == 1 && deltas.size(0) == n, "composite: deltas must be (S=", n, ",), got ",
              deltas.sizes());
  TORCH_CHECK(ts.dim() == 1 && ts.size(0) == n, "composite: ts must be (S=", n, ",), got ", ts.sizes());
  TORCH_CHECK(ray_offsets.dim() == 1 && ray_offsets.size(0) >= 1, "composite: ray_offsets must be (R+1,), got ",
              ray_offsets.sizes());
  TORCH_CHECK(stop_transmittance >= 0.0, "composite: stop_transmittance must be >= 0, not ", stop_transmittance);
  TORCH_CHECK(rgbs.size(1) <= (1 << 20), "composite: too many channels: ", rgbs.size(1));
  if (!ray_offsets.is_cuda()) {  // the packing contract, where checking it costs no device sync
    const int64_t* off = ray_offsets.data_ptr<int64_t>();
    const int64_t n_rays = ray_offsets.size(0) - 1;
    TORCH_CHECK_VALUE(off[0] == 0 && off[n_rays] == n, "composite: ray_offsets must run from 0 to S=", n,
                      ", got ", off[0], " .. ", off[n_rays]);
    for (int64_t r = 0; r < n_rays; ++r)
      TORCH_CHECK_VALUE(off[r] <= off[r + 1], "composite: ray_offsets must be non-decreasing (ray ", r, ")");
  }
  return rgbs.size(1);
}

}  // namespace composite_detail

// -> (rgb (R, C), opacity (R,), depth (R,), weights (S,))
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> composite_forward(
    const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& deltas, const at::Tensor& ts,
    const at::Tensor& ray_offsets, double stop_transmittance) {
  const int64_t channels =
      composite_detail::check_samples(sigmas, rgbs, deltas, ts, ray_offsets, stop_transmittance);
  const int64_t n = sigmas.size(0), n_rays = ray_offsets.size(0) - 1;
  auto rgb = at::empty({n_rays, channels}, sigmas.options());
  auto opacity = at::empty({n_rays}, sigmas.options());
  auto depth = at::empty({n_rays}, sigmas.options());
  // Every sample of a valid packing is written by its ray; on the GPU (offsets unchecked) start
  // from zeros so that samples outside every ray read as zero weight.
  auto weights = sigmas.is_cuda() ? at::zeros({n}, sigmas.options()) : at::empty({n}, sigmas.options());
  if (n_rays == 0) return {rgb, opacity, depth, weights};
  AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_forward", [&] {
    tk::on_device(
        sigmas,
        [&] {
          tk_composite_forward_cpu<scalar_t>(
              sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), deltas.data_ptr<scalar_t>(),
              ts.data_ptr<scalar_t>(), ray_offsets.data_ptr<int64_t>(), n_rays, n, (int)channels,
              stop_transmittance, rgb.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(),
              depth.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_composite_forward_cuda<scalar_t>(
              sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), deltas.data_ptr<scalar_t>(),
              ts.data_ptr<scalar_t>(), ray_offsets.data_ptr<int64_t>(), n_rays, n, (int)channels,
              stop_transmittance, rgb.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(),
              depth.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(), tk::current_stream());
#endif
        });
  });
  return {rgb, opacity, depth, weights};
}

// Gradients of the forward's rgb/opacity/depth -> (grad_sigmas (S,), grad_rgbs (S, C)).
inline std::tuple<at::Tensor, at::Tensor> composite_backward(
    const at::Tensor& grad_rgb, const at::Tensor& grad_opacity, const at::Tensor& grad_depth,
    const at::Tensor& sigmas, const at::Tensor& rgbs, const at::Tensor& deltas, const at::Tensor& ts,
    const at::Tensor& ray_offsets, const at::Tensor& rgb, const at::Tensor& opacity, const at::Tensor& depth,
    double stop_transmittance) {
  const int64_t channels =
      composite_detail::check_samples(sigmas, rgbs, deltas, ts, ray_offsets, stop_transmittance);
  const int64_t n = sigmas.size(0), n_rays = ray_offsets.size(0) - 1;
  const auto dtype = sigmas.scalar_type();
  TK_CHECK_TENSOR(grad_rgb, dtype);
  TK_CHECK_TENSOR(grad_opacity, dtype);
  TK_CHECK_TENSOR(grad_depth, dtype);
  TK_CHECK_TENSOR(rgb, dtype);
  TK_CHECK_TENSOR(opacity, dtype);
  TK_CHECK_TENSOR(depth, dtype);
  for (const at::Tensor* t : {&grad_rgb, &grad_opacity, &grad_depth, &rgb, &opacity, &depth})
    TK_CHECK_SAME_DEVICE(sigmas, *t);
  TORCH_CHECK(grad_rgb.dim() == 2 && grad_rgb.size(0) == n_rays && grad_rgb.size(1) == channels &&
                  rgb.sizes() == grad_rgb.sizes(),
              "composite: rgb and grad_rgb must be (R=", n_rays, ", C=", channels, ")");
  for (const at::Tensor* t : {&grad_opacity, &grad_depth, &opacity, &depth})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n_rays, "composite: per-ray tensors must be (R=", n_rays,
                ",), got ", t->sizes());
  auto grad_sigmas = sigmas.is_cuda() ? at::zeros({n}, sigmas.options()) : at::empty({n}, sigmas.options());
  auto grad_rgbs =
      sigmas.is_cuda() ? at::zeros({n, channels}, sigmas.options()) : at::empty({n, channels}, sigmas.options());
  if (n_rays == 0) return {grad_sigmas, grad_rgbs};
  AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_backward", [&] {
    tk::on_device(
        sigmas,
        [&] {
          tk_composite_backward_cpu<scalar_t>(
              grad_rgb.data_ptr<scalar_t>(), grad_opacity.data_ptr<scalar_t>(), grad_depth.data_ptr<scalar_t>(),
              sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), deltas.data_ptr<scalar_t>(),
              ts.data_ptr<scalar_t>(), ray_offsets.data_ptr<int64_t>(), n_rays, n, (int)channels,
              stop_transmittance, rgb.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(),
              depth.data_ptr<scalar_t>(), grad_sigmas.data_ptr<scalar_t>(), grad_rgbs.data_ptr<scalar_t>());
        },
        [&] {
#ifdef TALKCLI_WITH_CUDA
          tk_composite_backward_cuda<scalar_t>(
              grad_rgb.data_ptr<scalar_t>(), grad_opacity.data_ptr<scalar_t>(), grad_depth.data_ptr<scalar_t>(),
              sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), deltas.data_ptr<scalar_t>(),
              ts.data_ptr<scalar_t>(), ray_offsets.data_ptr<int64_t>(), n_rays, n, (int)channels,
              stop_transmittance, rgb.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(),
              depth.data_ptr<scalar_t>(), grad_sigmas.data_ptr<scalar_t>(), grad_rgbs.data_ptr<scalar_t>(),
              tk::current_stream());
#endif
        });
  });
  return {grad_sigmas, grad_rgbs};
}

inline void bind_composite(pybind11::module_& m) {
  m.def("composite_forward", &composite_forward,
        "Composite packed samples -> (rgb, opacity, depth, weights)", pybind11::arg("sigmas"),
        pybind11::arg("rgbs"), pybind11::arg("deltas"), pybind11::arg("ts"), pybind11::arg("ray_offsets"),
        pybind11::arg("stop_transmittance"));
  m.def("composite_backward", &composite_backward,
        "Gradients of composite_forward's rgb/opacity/depth -> (grad_sigmas, grad_rgbs)",
        pybind11::arg("grad_rgb"), pybind11::arg("grad_opacity"), pybind11::arg("grad_depth"),
        pybind11::arg("sigmas"), pybind11::arg("rgbs"), pybind11::arg("deltas"), pybind11::arg("ts"),
        pybind11::arg("ray_offsets"), pybind11::arg("rgb"), pybind11::arg("opacity"), pybind11::arg("depth"),
        pybind11::arg("stop_transmittance"));
}

}  // namespace tk
