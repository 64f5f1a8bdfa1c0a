// Helpers for the torch-level wrappers in kernels/bind/*.h (only module.cpp includes these, after
// <torch/extension.h>). The kernels themselves (kernels/cpu, kernels/cuda) see raw pointers only.
#pragma once

#define TK_CHECK_TENSOR(x, dtype)                                                              \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous");                                 \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must be " #dtype ", got ", (x).scalar_type())

#define TK_CHECK_SAME_DEVICE(a, b) \
  TORCH_CHECK((a).device() == (b).device(), #a " and " #b " must be on the same device")

namespace tk {

// The current CUDA stream as an opaque pointer (the .cu launchers take cudaStream_t as void*).
inline void* current_stream() {
#ifdef TALKCLI_WITH_CUDA
  return (void*)at::cuda::getCurrentCUDAStream().stream();
#else
  return nullptr;
#endif
}

// Run `cpu()` for CPU tensors and `cuda()` for CUDA tensors (an error if built without CUDA).
template <class CpuFn, class CudaFn>
inline void on_device(const at::Tensor& t, CpuFn cpu, CudaFn cuda) {
  if (t.is_cuda()) {
#ifdef TALKCLI_WITH_CUDA
    cuda();
#else
    TORCH_CHECK(false, "talkcli kernels were built without CUDA");
#endif
  } else {
    cpu();
  }
}

}  // namespace tk
