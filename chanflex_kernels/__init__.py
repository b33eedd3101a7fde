"""chanflex_kernels: fast per-sample dynamic convolution and channel-flexible convolution."""
__version__ = "0.1.0"

import os as _os

import torch as _torch

try:
    from . import _C  # noqa: F401  (registers the chanflex ops and their kernels)
except ImportError as _err:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        f"chanflex_kernels: the compiled extension chanflex_kernels._C could not be imported from "
        f"{_os.path.dirname(__file__)} ({_err}). Build it with `pip install --no-build-isolation -e .` "
        f"(or `make setup`), or run Python from outside the source checkout after `pip install .`."
    ) from _err

from .backends import BACKENDS, get_backend, set_backend, use_backend
from .channels import RandomChannelSubsets, fill_channels, random_channel_mask, resolve_channels
from .evaluation import ChannelComboReport, evaluate_channel_combinations
from .nn import ChannelFlexConv2d, DynamicConv2d, FlexChannelConv2d, anneal_temperature, convert
from .ops import dynamic_conv2d, per_sample_conv2d
from . import triton  # noqa: E402  (registers the Triton ops when triton imports)

__all__ = [
    "BACKENDS", "ChannelComboReport", "ChannelFlexConv2d", "DynamicConv2d", "FlexChannelConv2d",
    "RandomChannelSubsets", "anneal_temperature", "convert", "dynamic_conv2d", "evaluate_channel_combinations",
    "fill_channels", "get_backend", "per_sample_conv2d", "random_channel_mask", "resolve_channels", "set_backend", "use_backend",
]
