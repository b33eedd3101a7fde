"""The Triton backend as torch.library ops.

- ``chanflex::dynamic_conv2d_triton`` and ``chanflex::dynamic_conv2d_backward_triton``:
  ``torch.library.triton_op``s (so ``torch.compile`` traces into the kernels),
  with the same fake kernels and autograd formula as ``chanflex::dynamic_conv2d``.
  They run CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``.
- The CUDA implementation of ``chanflex::dynamic_conv2d`` and its backward
  (the default backend's on CUDA tensors). The CUDA C++ kernels, when built,
  serve their own ops ``chanflex::dynamic_conv2d_cuda`` (backend ``cuda``)
  and do not take the default: they multiply on the CUDA cores, where these
  feed the tensor cores, and neither has been timed on a GPU yet (none has
  been lent); ``python -m chanflex_kernels.bench_gpu`` compares them. Should
  a build register C++ kernels for ``chanflex::dynamic_conv2d`` itself, those
  are kept.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch.library import triton_op

from .. import ops
from . import launch

FORWARD = "chanflex::dynamic_conv2d_triton"
BACKWARD = "chanflex::dynamic_conv2d_backward_triton"


@triton_op(FORWARD, mutates_args=())
def dynamic_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor, bias: Optional[torch.Tensor],
                          stride: List[int], padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """chanflex::dynamic_conv2d through the Triton kernels (see ``chanflex_kernels.triton.kernels``)."""
    return launch.forward(x, weight, attn, bias, stride, padding, dilation, groups)


@triton_op(BACKWARD, mutates_args=())
def dynamic_conv2d_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                   attn: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                                   padding: List[int], dilation: List[int], groups: int,
                                   output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """(grad_x, grad_weight, grad_attn, grad_bias); unrequested ones are empty tensors."""
    return launch.backward(grad_out, x, weight, attn, bias, stride, padding, dilation, groups, output_mask)


dynamic_conv2d_triton.register_fake(ops.dynamic_conv2d_fake)
dynamic_conv2d_backward_triton.register_fake(ops.dynamic_conv2d_backward_fake)
ops.register_op_autograd(FORWARD, BACKWARD)


# True when the compiled extension registered CUDA kernels for chanflex::dynamic_conv2d itself.
COMPILED_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("chanflex::dynamic_conv2d", "CUDA")
if not COMPILED_CUDA_KERNELS:
    torch.library.register_kernel("chanflex::dynamic_conv2d", "cuda", launch.forward)
    torch.library.register_kernel("chanflex::dynamic_conv2d_backward", "cuda", launch.backward)
