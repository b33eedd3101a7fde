"""Backend selection for the chanflex ops.

| backend     | runs                                                         |
|-------------|--------------------------------------------------------------|
| ``auto``    | the kernel registered for the tensors' device: C++ on CPU,   |
|             | Triton on CUDA                                               |
| ``cpp``     | the compiled C++ kernel (CPU tensors only)                   |
| ``triton``  | the Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``)  |
| ``cuda``    | the CUDA C++ kernels (CUDA tensors; built with the extension |
|             | when torch has CUDA and nvcc is found)                       |
| ``reference`` | the pure-PyTorch per-sample loop of ``reference.py``       |

Select with :func:`set_backend`, the :func:`use_backend` context manager, or
the environment variable ``CHANFLEX_BACKEND`` (read at import).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "cpp", "triton", "cuda", "reference")
ENV_VAR = "CHANFLEX_BACKEND"


def _validated(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


_backend = _validated(os.environ.get(ENV_VAR, "auto"), f"environment variable {ENV_VAR}")


def get_backend() -> str:
    """The backend the chanflex ops use now (one of ``BACKENDS``)."""
    return _backend


def set_backend(name: str) -> None:
    """Use backend ``name`` (one of ``BACKENDS``) from now on."""
    global _backend
    _backend = _validated(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` inside a ``with`` block, then restore the previous one.

    Example::

        with chanflex_kernels.use_backend("reference"):
            y = layer(x)
    """
    global _backend
    previous = _backend
    _backend = _validated(name, "use_backend")
    try:
        yield
    finally:
        _backend = previous


def cuda_kernels_built() -> bool:
    """True when the compiled extension holds the CUDA C++ kernels (csrc/cuda/*.cu)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("chanflex::dynamic_conv2d_cuda", "CUDA")


def require_cuda_kernels(device: torch.device) -> None:
    """Raise a clear error when the cuda backend is selected but cannot run tensors on ``device``."""
    if device.type != "cuda":
        raise ValueError(f"dynamic_conv2d: backend 'cuda' runs CUDA tensors, got x on {device}")
    if not cuda_kernels_built():
        raise ValueError("dynamic_conv2d: backend 'cuda' needs the CUDA C++ kernels, which this build of "
                         "chanflex_kernels does not have (it builds them when torch has CUDA and nvcc is found; "
                         "see setup.py's FORCE_CUDA and CUDA_HOME)")


def require_triton() -> None:
    """Raise a clear error when the triton backend is selected but Triton cannot be used."""
    from . import triton as triton_backend

    if not triton_backend.AVAILABLE:
        raise ValueError(f"dynamic_conv2d: backend 'triton' needs the triton package, which failed to import: "
                         f"{triton_backend.UNAVAILABLE_REASON}")
