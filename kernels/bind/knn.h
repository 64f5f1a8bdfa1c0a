// Torch-level wrappers of the knn kernels (placeholder until the op lands).
#pragma once
namespace tk {
inline void bind_knn(pybind11::module_& m) { (void)m; }
}  // namespace tk
