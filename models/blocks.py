"""Building blocks shared by the seed models: attention, SE, residual blocks, the ResNet body."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chanflex_kernels.channels import FILL_STRATEGIES, fill_channels


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019) through ``F.scaled_dot_product_attention``.

    q, k: 1x1 convs C -> C/8, v: 1x1 conv C -> C (all with bias); softmax over
    positions, no 1/sqrt(d) scaling (SAGAN's energy is the plain dot product);
    out = gamma * attention(x) + x with a scalar gamma starting at 0.
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // reduction, 1)
        self.key = nn.Conv2d(channels, channels // reduction, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # (B, 1, N, d): one head over N = H*W positions.
        q = self.query(x).flatten(2).transpose(1, 2).unsqueeze(1)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1)
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return self.gamma * out + x


class SqueezeExcitation(nn.Module):
    """SE block: GAP -> Linear C -> C/r -> ReLU -> Linear C/r -> C -> sigmoid, no biases; scales channels."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=(2, 3)))[:, :, None, None]


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1 conv+BN shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with a replaceable stem: stem -> BN -> ReLU -> [MaxPool 3/2/1] -> 4 stages -> GAP -> Linear.

    Args:
        blocks: basic blocks per stage, [2, 2, 2, 2] (ResNet18) or [3, 4, 6, 3] (ResNet34).
        num_classes: width of the head.
        stem: the first conv (-> 64 channels). A *channel-flexible* stem has a
            ``forward(x, channels=None, channel_mask=None)``-like signature and
            the attribute ``channel_flexible = True``; the model then accepts
            the same keywords and passes them on.
        maxpool: keep the 3/2/1 max-pool after the stem.
    """

    def __init__(self, blocks: Sequence[int], num_classes: int, stem: nn.Module, maxpool: bool = True):
        super().__init__()
        self.conv1 = stem
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        layers, in_channels = [], 64
        for stage, (count, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stride = 1 if stage == 0 else 2
            stage_blocks = []
            for i in range(count):
                stage_blocks.append(BasicBlock(in_channels, width, stride if i == 0 else 1))
                in_channels = width
            layers.append(nn.Sequential(*stage_blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(512, num_classes)

    @property
    def channel_flexible(self) -> bool:
        return getattr(self.conv1, "channel_flexible", False)

    def forward(self, x: torch.Tensor, **channel_kwargs) -> torch.Tensor:
        channel_kwargs = {k: v for k, v in channel_kwargs.items() if v is not None}
        if channel_kwargs and not self.channel_flexible:
            raise ValueError(f"{type(self.conv1).__name__} stem is not channel-flexible: got {sorted(channel_kwargs)}; "
                             f"use models.create(..., fill='replicate') for a fill strategy")
        x = self.conv1(x, **channel_kwargs) if channel_kwargs else self.conv1(x)
        x = self.maxpool(F.relu(self.bn1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FillChannels(nn.Module):
    """The channel-combination protocol for a static model: ``forward(x, channels=S)`` fills x to all channels.

    ``model(x)`` when x holds every channel; with ``channels=S`` x holds the
    channels S and the missing ones are filled by ``strategy``
    (:func:`chanflex_kernels.fill_channels`) before the wrapped model runs.
    """

    channel_flexible = True

    def __init__(self, model: nn.Module, strategy: str = "replicate", num_channels: int = 3,
                 channel_names: Optional[str] = "RGB"):
        super().__init__()
        self.model = model
        self.strategy = strategy
        self.num_channels = num_channels
        self.channel_names = channel_names
        if strategy not in FILL_STRATEGIES:
            raise ValueError(f"FillChannels: expected strategy in {FILL_STRATEGIES}, got {strategy!r}")

    def forward(self, x: torch.Tensor, channels=None) -> torch.Tensor:
        if channels is not None:
            x = fill_channels(x, channels, self.strategy, self.num_channels, self.channel_names)
        return self.model(x)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}"
