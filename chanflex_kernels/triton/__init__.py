"""The Triton backend: fused implicit-GEMM kernels for dynamic_conv2d.

Importing this package registers ``chanflex::dynamic_conv2d_triton`` (and its
backward) and the CUDA implementation of ``chanflex::dynamic_conv2d`` (see
``op.py``). ``AVAILABLE`` is False when triton does not
import; ``UNAVAILABLE_REASON`` says why. To run the kernels on CPU tensors set
``TRITON_INTERPRET=1`` before importing chanflex_kernels.
"""
try:
    import triton as _triton  # noqa: F401
except ImportError as _err:  # pragma: no cover - triton ships with torch's CUDA wheels
    AVAILABLE, UNAVAILABLE_REASON = False, str(_err)
else:
    AVAILABLE, UNAVAILABLE_REASON = True, ""
    from . import op  # noqa: F401  (registers the ops)
    from .launch import Tiling, interpreting
    from .op import dynamic_conv2d_triton, dynamic_conv2d_backward_triton
