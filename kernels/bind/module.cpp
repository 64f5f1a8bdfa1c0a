// The Python module of the native kernels: one torch-level wrapper header per op.
// TK_ONLY + TK_ONLY_<OP> build a module with one op (TALKCLI_KERNEL_ONLY=<op>, for development).
#include <torch/extension.h>
#ifdef TALKCLI_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include "bind/common.h"
#if !defined(TK_ONLY) || defined(TK_ONLY_HASHGRID)
#include "bind/hashgrid.h"
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_HASHGRID_BATCHED)
#include "bind/hashgrid_batched.h"
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_RAYMARCH)
#include "bind/raymarch.h"
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_COMPOSITE)
#include "bind/composite.h"
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_KNN)
#include "bind/knn.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef TALKCLI_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_HASHGRID)
  tk::bind_hashgrid(m);
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_HASHGRID_BATCHED)
  tk::bind_hashgrid_batched(m);
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_RAYMARCH)
  tk::bind_raymarch(m);
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_COMPOSITE)
  tk::bind_composite(m);
#endif
#if !defined(TK_ONLY) || defined(TK_ONLY_KNN)
  tk::bind_knn(m);
#endif
}
