// Torch-level wrappers of the composite kernels (placeholder until the op lands).
#pragma once
namespace tk {
inline void bind_composite(pybind11::module_& m) { (void)m; }
}  // namespace tk
