// Torch-level wrappers of the raymarch kernels (placeholder until the op lands).
#pragma once
namespace tk {
inline void bind_raymarch(pybind11::module_& m) { (void)m; }
}  // namespace tk
