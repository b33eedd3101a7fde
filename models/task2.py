"""Task 2 — a 2-4 layer network at >= 90% of ResNet34's accuracy: the seed models and their baselines."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from .blocks import SelfAttention, SqueezeExcitation
from .registry import register


# --- advanced_two_layer_cnn (seed 000) -------------------------------------------------

class DenseBlock(nn.Module):
    """Seed 000's dense block: convs 64->32, 96->32, 128->64 on the growing concatenation; out*0.2 + x."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, growth, 3, padding=1)
        self.conv2 = nn.Conv2d(channels + growth, growth, 3, padding=1)
        self.conv3 = nn.Conv2d(channels + 2 * growth, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = F.relu(self.conv1(x))
        x2 = F.relu(self.conv2(torch.cat([x, x1], 1)))
        out = self.conv3(torch.cat([x, x1, x2], 1))
        return out * 0.2 + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks in series; blocks(x)*0.2 + x."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.blocks = nn.Sequential(DenseBlock(channels), DenseBlock(channels), DenseBlock(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x) * 0.2 + x


class AdvancedTwoLayerCNN(nn.Module):
    """Seed 000: conv -> [RRDB(x) + SelfAttention(x)] -> conv -> GAP -> Linear.

    ``rrdb`` / ``attention`` switch the two parallel branches (the ablations);
    with neither, the middle is the identity.
    """

    def __init__(self, num_classes: int, rrdb: bool = True, attention: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.rrdb = RRDB(64) if rrdb else None
        self.attention = SelfAttention(64) if attention else None
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        branches = [m(x) for m in (self.rrdb, self.attention) if m is not None]
        x = sum(branches) if branches else x
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register("advanced_two_layer_cnn", 2, "000", "conv, RRDB + self-attention in parallel, conv, GAP, Linear",
          params=447_491)
def advanced_two_layer_cnn(num_classes):
    return AdvancedTwoLayerCNN(num_classes)


@register("advanced_two_layer_cnn_plain", 2, "000", "ablation: without both branches")
def advanced_two_layer_cnn_plain(num_classes):
    return AdvancedTwoLayerCNN(num_classes, rrdb=False, attention=False)


@register("advanced_two_layer_cnn_rrdb", 2, "000", "ablation: RRDB branch only")
def advanced_two_layer_cnn_rrdb(num_classes):
    return AdvancedTwoLayerCNN(num_classes, attention=False)


@register("advanced_two_layer_cnn_attention", 2, "000", "ablation: self-attention branch only")
def advanced_two_layer_cnn_attention(num_classes):
    return AdvancedTwoLayerCNN(num_classes, rrdb=False)


# --- rrdb_attention_se v1 / v2 (seed 004) -----------------------------------------------

class AttentionSE(nn.Module):
    """Self-attention followed by a squeeze-excitation block (64 -> 4 -> 64)."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.attention = SelfAttention(channels)
        self.se = SqueezeExcitation(channels, reduction=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.attention(x))


class ConvRRDB(nn.Module):
    """Seed 004's "RRDB": three 3x3 convs (ReLU after two), attention+SE, SE again; out*0.2 + x."""

    def __init__(self, channels: int = 64):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(channels, channels, 3, padding=1) for _ in range(3)])
        self.attention_se = AttentionSE(channels)
        self.se = SqueezeExcitation(channels, reduction=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.convs[0](x))
        out = F.relu(self.convs[1](out))
        out = self.se(self.attention_se(self.convs[2](out)))
        return out * 0.2 + x


class RRDBAttentionSE(nn.Module):
    """Seed 004: conv (v1 3x3/1, v2 7x7/2) -> attention+SE -> RRDB -> conv -> GAP -> Linear."""

    def __init__(self, num_classes: int, stem_kernel: int = 3):
        super().__init__()
        stride = 1 if stem_kernel == 3 else 2
        self.conv1 = nn.Conv2d(3, 64, stem_kernel, stride, stem_kernel // 2)
        self.bn1 = nn.BatchNorm2d(64)
        self.attention_se = AttentionSE(64)
        self.rrdb = ConvRRDB(64)
        self.conv2 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.rrdb(self.attention_se(x))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register("rrdb_attention_se_v1", 2, "004", "3x3 stem, attention+SE, conv RRDB, conv, GAP", params=205_204)
def rrdb_attention_se_v1(num_classes):
    return RRDBAttentionSE(num_classes, stem_kernel=3)


@register("rrdb_attention_se_v2", 2, "004", "as v1 with a 7x7 stride-2 stem", params=212_884)
def rrdb_attention_se_v2(num_classes):
    return RRDBAttentionSE(num_classes, stem_kernel=7)


# --- densenet4 (seed 002) -------------------------------------------------------------

class Bottleneck(nn.Module):
    """Conv 3x3 (no bias), BN, ReLU, concatenated with the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, F.relu(self.bn(self.conv(x)))], 1)


class Transition(nn.Module):
    """Conv 1x1 (no bias), BN, ReLU, AvgPool 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.relu(self.bn(self.conv(x))))


class DenseNet4(nn.Module):
    """Seed 002's four-conv DenseNet: stem 7x7/2 -> bottleneck -> transition -> bottleneck -> BN -> GAP."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 512, 7, 2, 2, bias=False)
        self.bn1 = nn.BatchNorm2d(512)
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.features = nn.ModuleList([nn.Sequential(Bottleneck(512)), Transition(1024, 512),
                                       nn.Sequential(Bottleneck(512))])
        self.bn2 = nn.BatchNorm2d(1024)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(F.relu(self.bn1(self.conv1(x))))
        for layer in self.features:
            x = layer(x)
        x = F.relu(self.bn2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register("densenet4", 2, "002", "7x7 stem, two 512-channel bottlenecks with concatenation, transition",
          params=5_375_538)
def densenet4(num_classes):
    return DenseNet4(num_classes)


# --- simple_cnn (seed 001, reconstructed from the text) -------------------------------

class SimpleCNN(nn.Module):
    """Seed 001's Simple CNN, reconstructed from its description (no code was published).

    Dense block: conv 5x5 3->512, BN, ReLU. RRDB: three conv 3x3 + BN + ReLU
    layers of 32 channels on the growing concatenation (512, 544, 576 in),
    a 3x3 conv back to 512 with ReLU, plus the input; MaxPool 2.
    Self-attention at 512, AdaptiveAvgPool 1, Dropout 0.5, Linear.
    """

    def __init__(self, num_classes: int, growth: int = 32, dropout: float = 0.5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 512, 5, padding=2), nn.BatchNorm2d(512), nn.ReLU(inplace=True))
        self.dense = nn.ModuleList([nn.Sequential(nn.Conv2d(512 + i * growth, growth, 3, padding=1),
                                                  nn.BatchNorm2d(growth), nn.ReLU(inplace=True)) for i in range(3)])
        self.fuse = nn.Conv2d(512 + 3 * growth, 512, 3, padding=1)
        self.attention = SelfAttention(512)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        features = [x]
        for layer in self.dense:
            features.append(layer(torch.cat(features, 1)))
        x = F.max_pool2d(F.relu(self.fuse(torch.cat(features, 1))) + x, 2)
        x = F.adaptive_avg_pool2d(self.attention(x), 1)
        return self.fc(self.dropout(torch.flatten(x, 1)))


@register("simple_cnn", 2, "001", "dense 5x5 block, RRDB of 32-channel convs, self-attention (reconstructed)")
def simple_cnn(num_classes):
    return SimpleCNN(num_classes)


# --- ResNet34 baselines as the seeds built them (torchvision, untrained) ---------------------

@register("resnet34_tv_1000", 2, "000", "torchvision resnet34 with its 1000-way head (trained on 50 labels)",
          params=21_797_672)
def resnet34_tv_1000(num_classes):
    return torchvision.models.resnet34(num_classes=1000)  # the seed kept the 1000-way head whatever the classes


@register("resnet34_tv_relu_linear", 2, "002", "torchvision resnet34 -> ReLU -> Linear(1000, classes)",
          params=21_847_722)
def resnet34_tv_relu_linear(num_classes):
    return nn.Sequential(torchvision.models.resnet34(), nn.ReLU(), nn.Linear(1000, num_classes))


@register("resnet34_tv", 2, "torchvision", "torchvision resnet34(num_classes=classes), the standard form",
          params=21_310_322)
def resnet34_tv(num_classes):
    return torchvision.models.resnet34(num_classes=num_classes)
