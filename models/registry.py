"""The model registry: one entry per rebuilt model, with its source seed and expected size."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch.nn as nn

from .blocks import FillChannels


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model.

    name: registry name. task: 1 (variable input channels) or 2 (2-4 layer
    network vs ResNet34). seed: the seed report it comes from ("ours" for the
    package's own). params: the exact trainable-parameter count of MODELS.md
    at the default options (None where MODELS.md gives none).
    channel_flexible: forward accepts ``channels=`` (x then holds only those).
    input_size: the only (H, W) the model accepts, or None for any size.
    dynamic: runs the chanflex ops (checked against the reference backend).
    """

    name: str
    builder: Callable[..., nn.Module]
    task: int
    seed: str
    summary: str
    params: Optional[int] = None
    channel_flexible: bool = False
    input_size: Optional[Tuple[int, int]] = None
    dynamic: bool = False


_REGISTRY: Dict[str, ModelInfo] = {}


def register(name: str, task: int, seed: str, summary: str, **info):
    """Decorator adding a builder ``f(num_classes, **options) -> nn.Module`` to the registry."""
    def add(builder):
        if builder.__module__ == "__main__":  # `python -m models.task1`: the package registered it already
            raise SystemExit("the model zoo's modules are not commands: run `python -m models --help`")
        if name in _REGISTRY:
            raise RuntimeError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, builder, task, seed, summary, **info)
        return builder
    return add


def list_models(task: Optional[int] = None) -> List[str]:
    """Registry names, in registration order (task 1 first), optionally of one task."""
    return [name for name, info in _REGISTRY.items() if task is None or info.task == task]


def model_info(name: str) -> ModelInfo:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; expected one of {list(_REGISTRY)}")
    return _REGISTRY[name]


def create(name: str, num_classes: int = 50, fill: Optional[str] = None, **options) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`.
        num_classes: classes of the head (ImageNet-mini: 50).
        fill: for a model that is not channel-flexible, wrap it in
            :class:`FillChannels` with this strategy ('replicate', 'mean',
            'zeros') so it accepts ``channels=`` like the flexible ones;
            ignored (allowed) for channel-flexible models.
        options: model-specific options (e.g. ``num_kernels`` of dy_vgg19).
    """
    info = model_info(name)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"create: expected num_classes to be a positive int, got {num_classes!r}")
    try:
        model = info.builder(num_classes, **options)
    except TypeError as err:
        raise ValueError(f"create({name!r}): bad options {sorted(options)}: {err}") from err
    if fill is not None and not info.channel_flexible:
        model = FillChannels(model, fill)
    return model
