"""Task 1 — a conv module for variable input channels: the seed models and ours.

Every stem that handles channel subsets follows one protocol:
``forward(x, channels=None)``, where x holds the listed channels of R, G, B
(indices or names; all three when None).
"""
from __future__ import annotations

import math
import random
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from chanflex_kernels import (ChannelFlexConv2d, DynamicConv2d, FlexChannelConv2d, RandomChannelSubsets, convert,
                              dynamic_conv2d, per_sample_conv2d, resolve_channels)

from .blocks import ResNet
from .registry import register

RGB = "RGB"


def _subset(x: torch.Tensor, channels, where: str):
    """Checked indices of the channels x holds (all of R, G, B when None)."""
    index = resolve_channels(channels if channels is not None else list(range(x.shape[1])), 3, RGB, where)
    if x.dim() != 4 or x.shape[1] != len(index):
        raise ValueError(f"{where}: expected x of shape (B, {len(index)}, H, W) for channels {index}, "
                         f"got {tuple(x.shape)}")
    return index


def check_input_size(x: torch.Tensor, size: int, where: str) -> None:
    if x.dim() != 4 or tuple(x.shape[2:]) != (size, size):
        raise ValueError(f"{where}: expected inputs of {size}x{size} (a Linear over the flattened map fixes the "
                         f"size, as in seed 002), got shape {tuple(x.shape)}")


# --- VGG19-BN (seed 000) ---------------------------------------------------------

VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG19(nn.Module):
    """VGG19 with BatchNorm (configuration E), AdaptiveAvgPool 7x7 and one Linear(25088, classes)."""

    def __init__(self, num_classes: int, conv=None):
        super().__init__()
        conv = conv or (lambda cin, cout: nn.Conv2d(cin, cout, 3, padding=1))
        layers, in_channels = [], 3
        for v in VGG19_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [conv(in_channels, v), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                in_channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Linear(512 * 7 * 7, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


@register("raw_vgg19", 1, "000", "VGG19-BN, ordinary convs with bias", params=21_289_842)
def raw_vgg19(num_classes):
    return VGG19(num_classes)


@register("dy_vgg19", 1, "000", "VGG19-BN, every conv a DynamicConv2d without bias (option num_kernels, K=4)",
          params=81_885_642, dynamic=True)
def dy_vgg19(num_classes, num_kernels: int = 4):
    return VGG19(num_classes, lambda cin, cout: DynamicConv2d(cin, cout, 3, padding=1, bias=False,
                                                              num_kernels=num_kernels))


# --- ResNet18/34 with the 3x3 stem and the dynamic stems (seed 004) --------------

def _plain_stem():
    return nn.Conv2d(3, 64, 3, 1, 1, bias=False)


@register("resnet18", 1, "004", "ResNet18, 3x3 stride-1 stem, maxpool", params=11_194_482)
def resnet18(num_classes):
    return ResNet([2, 2, 2, 2], num_classes, _plain_stem())


@register("resnet34", 2, "004", "ResNet34, 3x3 stride-1 stem, maxpool (seed 004's baseline)", params=21_302_642)
def resnet34(num_classes):
    return ResNet([3, 4, 6, 3], num_classes, _plain_stem())


class GeneratedKernelStem(nn.Module):
    """v1: a per-sample kernel generated from the channel means.

    GAP of the 3 channels (absent ones read 0) -> Linear(3, 64*3*9) -> Tanh
    gives each sample a (64, 3, 3, 3) kernel; the present channels' slices
    convolve x; plus a learnable zero-initialised bias(64).
    """

    channel_flexible = True

    def __init__(self, out_channels: int = 64, kernel_size: int = 3):
        super().__init__()
        self.out_channels, self.kernel_size = out_channels, kernel_size
        self.generator = nn.Linear(3, out_channels * 3 * kernel_size * kernel_size)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor, channels=None) -> torch.Tensor:
        index = _subset(x, channels, "GeneratedKernelStem")
        index_t = torch.tensor(index, device=x.device)
        pooled = x.new_zeros(x.shape[0], 3).index_copy(1, index_t, x.mean(dim=(2, 3)))
        k = self.kernel_size
        kernels = torch.tanh(self.generator(pooled)).view(-1, self.out_channels, 3, k, k).index_select(2, index_t)
        return per_sample_conv2d(x, kernels, padding=k // 2) + self.bias[None, :, None, None]


class SubsetSizeGeneratorStem(nn.Module):
    """v2 (and v4 with channel_drop): one kernel generator per subset size.

    For n channels: GAP -> Linear(n, 64*n*9) (no Tanh, no bias term) -> a
    (64, n, 3, 3) kernel per sample. Only the number of channels matters.
    With ``channel_drop`` p > 0 (v4), each training batch with probability p
    keeps a random subset of size uniform in {1, 2, 3}.
    """

    channel_flexible = True

    def __init__(self, out_channels: int = 64, kernel_size: int = 3, channel_drop: float = 0.0):
        super().__init__()
        if not 0.0 <= channel_drop <= 1.0:
            raise ValueError(f"SubsetSizeGeneratorStem: expected 0 <= channel_drop <= 1, got {channel_drop}")
        self.out_channels, self.kernel_size, self.channel_drop = out_channels, kernel_size, channel_drop
        self.generators = nn.ModuleDict({str(n): nn.Linear(n, out_channels * n * kernel_size * kernel_size)
                                         for n in (1, 2, 3)})

    def forward(self, x: torch.Tensor, channels=None) -> torch.Tensor:
        _subset(x, channels, "SubsetSizeGeneratorStem")
        if self.training and self.channel_drop > 0 and channels is None and random.random() < self.channel_drop:
            keep = sorted(random.sample(range(x.shape[1]), random.randint(1, x.shape[1])))
            x = x[:, keep]
        n, k = x.shape[1], self.kernel_size
        kernels = self.generators[str(n)](x.mean(dim=(2, 3))).view(-1, self.out_channels, n, k, k)
        return per_sample_conv2d(x, kernels, padding=k // 2)


class SeedDynamicStem(nn.Module):
    """v3: DY-CNN stem as seed 004 built it (attention layers kept as modules).

    K=4 kernels (4, 64, 3, 3, 3), no bias; attention GAP -> 1x1 conv n->1 (no
    bias) -> ReLU -> 1x1 conv 1->4 -> softmax(z / 34). With n < 3 channels the
    first n weight slots are used, whichever channels they are (the seed's rule).
    """

    channel_flexible = True

    def __init__(self, out_channels: int = 64, num_kernels: int = 4, temperature: float = 34.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_kernels, out_channels, 3, 3, 3))
        for k in range(num_kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        self.attn_reduce = nn.Conv2d(3, 1, 1, bias=False)
        self.attn_expand = nn.Conv2d(1, num_kernels, 1)
        self.temperature = temperature

    def forward(self, x: torch.Tensor, channels=None) -> torch.Tensor:
        n = len(_subset(x, channels, "SeedDynamicStem"))
        pooled = x.mean(dim=(2, 3), keepdim=True)
        hidden = F.relu(F.conv2d(pooled, self.attn_reduce.weight[:, :n]))
        attn = torch.softmax(self.attn_expand(hidden).flatten(1) / self.temperature, dim=1)
        return dynamic_conv2d(x, self.weight[:, :, :n], attn, None, padding=1)


@register("resnet18_v1", 1, "004", "ResNet18, per-sample generated stem kernel (Tanh, bias), no maxpool",
          params=11_199_730, channel_flexible=True, dynamic=True)
def resnet18_v1(num_classes):
    return ResNet([2, 2, 2, 2], num_classes, GeneratedKernelStem(), maxpool=False)


@register("resnet18_v2", 1, "004", "ResNet18, stem kernel generator per subset size",
          params=11_204_274, channel_flexible=True, dynamic=True)
def resnet18_v2(num_classes):
    return ResNet([2, 2, 2, 2], num_classes, SubsetSizeGeneratorStem())


@register("resnet18_v3", 1, "004", "ResNet18, DY-CNN stem (K=4, T=34), first-n weight slots",
          params=11_199_677, channel_flexible=True, dynamic=True)
def resnet18_v3(num_classes):
    return ResNet([2, 2, 2, 2], num_classes, SeedDynamicStem())


@register("resnet18_v4", 1, "004", "v2 plus random channel drop per training batch (p=0.5)",
          params=11_204_274, channel_flexible=True, dynamic=True)
def resnet18_v4(num_classes, channel_drop: float = 0.5):
    return ResNet([2, 2, 2, 2], num_classes, SubsetSizeGeneratorStem(channel_drop=channel_drop))


# --- seed 001: a ResNet18 whose first conv slices its weights --------------------

class SlicingConv2d(nn.Conv2d):
    """Seed 001's DynamicConv2D: weights for the maximum channel count, sliced to the channels present.

    With ``channels=S`` the weight slices S are used; without, the first
    x.shape[1] slices (the seed's rule for fewer channels).
    """

    channel_flexible = True

    def forward(self, x: torch.Tensor, channels=None) -> torch.Tensor:
        if channels is None:
            if x.dim() != 4 or not 1 <= x.shape[1] <= self.in_channels:
                raise ValueError(f"SlicingConv2d: expected x of shape (B, 1..{self.in_channels}, H, W), "
                                 f"got {tuple(x.shape)}")
            weight = self.weight[:, :x.shape[1]]
        else:
            weight = self.weight[:, _subset(x, channels, "SlicingConv2d")]
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation)


@register("slicing_resnet18", 1, "001", "ResNet18 whose stem slices its weights to the channels present (stem layout "
          "assumed torchvision's 7x7/2 with bias: seed 001 published no code)",
          channel_flexible=True)
def slicing_resnet18(num_classes):
    return ResNet([2, 2, 2, 2], num_classes, SlicingConv2d(3, 64, 7, 2, 3, bias=True))


# --- seed 002: the flex-channel CNN and its 3-layer baseline -------------------------

class FlexChannelCNN(nn.Module):
    """Seed 002's flex_channel_cnn: FlexChannelConv2d(16) then two convs and a two-Linear head.

    Any number of input channels. ``input_size=128`` is the published,
    fixed-size form (the generator and the head flatten 128x128 maps); None
    gives the size-invariant variant (pooled generator, adaptive pool 14x14
    before the head, identical shapes at 128).
    """

    channel_flexible = True

    def __init__(self, num_classes: int, input_size: Optional[int] = 128):
        super().__init__()
        self.input_size = input_size
        self.flex = FlexChannelConv2d(16, 3, input_size=input_size)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.conv3 = nn.Conv2d(32, 32, 3)
        self.pool = nn.Identity() if input_size is not None else nn.AdaptiveAvgPool2d(14)
        self.fc1 = nn.Linear(32 * 14 * 14, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor, channels=None) -> torch.Tensor:
        if channels is not None:
            _subset(x, channels, "FlexChannelCNN")
        if self.input_size is not None:
            check_input_size(x, self.input_size, "flex_channel_cnn")
        x = F.max_pool2d(F.relu(self.flex(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)
        return self.fc2(self.fc1(torch.flatten(self.pool(x), 1)))


class ThreeLayerCNN(nn.Module):
    """Seed 002's baseline: three 3x3 convs (p1, p1, p0) with ReLU and MaxPool 2, Linear 7200->128->classes."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1),
                                    nn.Conv2d(32, 32, 3)])
        self.fc1 = nn.Linear(32 * 15 * 15, 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, 128, "layer_3_cnn")
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.fc2(self.fc1(torch.flatten(x, 1)))


@register("flex_channel_cnn", 1, "002", "flex layer (per-channel generated kernels) + 2 convs, 128x128 only",
          channel_flexible=True, input_size=(128, 128), dynamic=True)
def flex_channel_cnn(num_classes):
    return FlexChannelCNN(num_classes, input_size=128)


@register("flex_channel_cnn_pooled", 1, "002+ours", "flex_channel_cnn in a size-invariant form (pooling)",
          channel_flexible=True, dynamic=True)
def flex_channel_cnn_pooled(num_classes):
    return FlexChannelCNN(num_classes, input_size=None)


@register("layer_3_cnn", 1, "002", "3-layer CNN baseline of seed 002, 128x128 only", input_size=(128, 128))
def layer_3_cnn(num_classes):
    return ThreeLayerCNN(num_classes)


# --- ours -------------------------------------------------------------------------

@register("dy_resnet18", 1, "ours", "resnet18 with every conv (stem, 3x3, 1x1 shortcuts) a DynamicConv2d",
          dynamic=True)
def dy_resnet18(num_classes, num_kernels: int = 4):
    return convert(resnet18(num_classes), num_kernels=num_kernels)


class ChannelFlexStem(nn.Module):
    """A ChannelFlexConv2d stem that, in training, draws random channel subsets per sample."""

    channel_flexible = True

    def __init__(self, num_kernels: int = 4, channel_dropout: float = 0.5):
        super().__init__()
        self.conv = ChannelFlexConv2d(3, 64, 3, 1, 1, bias=False, channel_names=RGB, num_kernels=num_kernels)
        self.dropout = RandomChannelSubsets(3, p=channel_dropout)

    def forward(self, x: torch.Tensor, channels=None, channel_mask=None) -> torch.Tensor:
        if self.training and channels is None and channel_mask is None and self.dropout.p > 0:
            channel_mask = self.dropout(x)
        return self.conv(x, channels=channels, channel_mask=channel_mask)


@register("flexdy_resnet18", 1, "ours", "dy_resnet18 with a channel-flexible dynamic stem and per-sample "
          "channel dropout in training", channel_flexible=True, dynamic=True)
def flexdy_resnet18(num_classes, num_kernels: int = 4, channel_dropout: float = 0.5):
    model = ResNet([2, 2, 2, 2], num_classes, ChannelFlexStem(num_kernels, channel_dropout))
    return convert(model, num_kernels=num_kernels, include=lambda name, conv: not name.startswith("conv1"))
