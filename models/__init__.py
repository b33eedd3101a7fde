"""The model zoo: the seed reports' models rebuilt on chanflex_kernels, plus ours.

Run from a checkout: ``import models; model = models.create("dy_vgg19", num_kernels=4)``.
``python -m models profile`` prints every model's parameters and per-image FLOPs.
Exact specifications and parameter counts: shared/MODELS.md.
"""
from .blocks import FillChannels, ResNet, SelfAttention, SqueezeExcitation
from .registry import ModelInfo, create, list_models, model_info
from . import task1, task2  # noqa: E402,F401  (register the models)

__all__ = ["FillChannels", "ModelInfo", "ResNet", "SelfAttention", "SqueezeExcitation", "create", "list_models",
           "model_info"]
