"""Test-session set-up that must happen before chanflex_kernels is imported.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: it must be
switched on before the kernels are defined, i.e. before chanflex_kernels is
imported. With a GPU the compiled kernels are tested on CUDA tensors instead.
An explicit TRITON_INTERPRET in the environment is respected either way.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
