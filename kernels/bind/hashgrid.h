// Torch-level wrappers of the hashgrid kernels (placeholder until the op lands).
#pragma once
namespace tk {
inline void bind_hashgrid(pybind11::module_& m) { (void)m; }
}  // namespace tk
