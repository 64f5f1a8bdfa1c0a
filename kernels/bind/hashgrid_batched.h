// Torch-level wrappers of the hashgrid_batched kernels (placeholder until the op lands).
#pragma once
namespace tk {
inline void bind_hashgrid_batched(pybind11::module_& m) { (void)m; }
}  // namespace tk
