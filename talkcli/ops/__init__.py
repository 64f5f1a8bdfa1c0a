"""The hot ops of the avatar models, each with a pure-PyTorch reference (the spec) and native
C++/OpenMP and CUDA kernels (``kernels/``) behind one dispatch point per op.

``TALKCLI_KERNELS=auto|native|reference`` (or ``use_backend``) chooses; see ``_native``.
"""

from ._native import backend, set_backend, use_backend  # noqa: F401
