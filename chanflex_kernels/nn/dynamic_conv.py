"""DynamicConv2d: a drop-in nn.Conv2d whose kernel is an input-dependent mix of K kernels."""
from __future__ import annotations

import math
from typing import Callable, Collection, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..ops import dynamic_conv2d

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_temperature(value) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"DynamicConv2d: expected a finite temperature > 0, got {value}")
    return value


def check_layer_input(where: str, x: torch.Tensor, param: torch.Tensor) -> None:
    """Refuse an input the layer cannot run, before its attention branch fails less clearly.

    x must be a floating-point tensor on ``param``'s device and, outside
    ``torch.autocast`` (which casts inside), of ``param``'s dtype, as
    ``nn.Conv2d`` requires.
    """
    if not x.is_floating_point():
        raise ValueError(f"{where}: expected a floating-point input, got {x.dtype}")
    if x.device != param.device:
        raise ValueError(f"{where}: expected input on {param.device} (the layer's device), got {x.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{where}: expected input of dtype {param.dtype} (the layer's parameters'), got {x.dtype}; "
                         f"convert the input or the layer (.to(dtype)), or run under torch.autocast")


class DynamicConv2d(nn.Module):
    r"""Dynamic convolution (DY-CNN, Chen et al., CVPR 2020) with ``nn.Conv2d``'s signature.

    Each sample's kernel is ``sum_k pi_k(x) * weight[k]``, with attention
    ``pi(x) = softmax(fc2(relu(fc1(avgpool(x)))) / temperature)`` over K kernels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation,
        groups, bias, padding_mode, device, dtype: as ``nn.Conv2d`` (int or
            tuple; padding also 'same' or 'valid'; padding_mode 'zeros',
            'reflect', 'replicate' or 'circular').
        num_kernels: K, the number of kernels mixed (default 4).
        reduction: hidden width of the attention branch is
            ``int(in_channels * reduction) + 1`` (default 0.25), except
            ``num_kernels`` when ``in_channels == 3``.
        hidden_channels: overrides that hidden width.
        temperature: softmax temperature (> 0, default 30 as in the paper;
            anneal it with :func:`anneal_temperature`).

    Shapes:
        input (B, C_in, H, W) or (C_in, H, W); output as ``nn.Conv2d``.

    Parameters:
        weight (K, C_out, C_in/groups, kh, kw), each kernel initialised like
        ``nn.Conv2d``; bias (K, C_out) or None; attn_reduce (Linear C_in ->
        hidden, no bias); attn_expand (Linear hidden -> K). The buffer
        ``temperature`` is saved in the state dict.

    Example::

        >>> layer = DynamicConv2d(16, 32, 3, padding=1, num_kernels=4)
        >>> layer(torch.randn(8, 16, 28, 28)).shape
        torch.Size([8, 32, 28, 28])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding: Union[str, int, tuple] = 0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        num_kernels: int = 4,
        reduction: float = 0.25,
        hidden_channels: Optional[int] = None,
        temperature: float = 30.0,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups), ("num_kernels", num_kernels)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DynamicConv2d: expected {name} to be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"DynamicConv2d: expected groups to divide in_channels and out_channels, "
                             f"got in_channels={in_channels}, out_channels={out_channels}, groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"DynamicConv2d: expected padding_mode in {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        self.num_kernels = num_kernels
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"DynamicConv2d: expected padding 'same', 'valid', an int or a pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"DynamicConv2d: padding='same' needs stride 1, got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _pair(padding)
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1 or (
                not isinstance(self.padding, str) and min(self.padding) < 0):
            raise ValueError(f"DynamicConv2d: expected kernel_size, stride, dilation >= 1 and padding >= 0, got "
                             f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
                             f"padding={self.padding}")

        if hidden_channels is None:
            hidden_channels = num_kernels if in_channels == 3 else int(in_channels * reduction) + 1
        if not isinstance(hidden_channels, int) or hidden_channels < 1:
            raise ValueError(f"DynamicConv2d: expected hidden_channels >= 1, got {hidden_channels!r}")
        self.hidden_channels = hidden_channels

        self.weight = nn.Parameter(torch.empty(
            num_kernels, out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(num_kernels, out_channels, **factory)) if bias else None
        self.attn_reduce = nn.Linear(in_channels, hidden_channels, bias=False, **factory)
        self.attn_expand = nn.Linear(hidden_channels, num_kernels, **factory)
        self.register_buffer("temperature", torch.tensor(_check_temperature(temperature), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each of the K kernels (and biases) as ``nn.Conv2d`` does."""
        for k in range(self.num_kernels):
            nn.init.kaiming_uniform_(self.weight[k], a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.attn_reduce.reset_parameters()
        self.attn_expand.reset_parameters()

    def set_temperature(self, value: float) -> None:
        """Set the softmax temperature (finite, > 0)."""
        self.temperature.fill_(_check_temperature(value))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel attention for x (B, C_in, H, W): (B, K), rows summing to 1."""
        check_layer_input("DynamicConv2d", x, self.weight)
        return self._attention_from_features(x.mean(dim=(2, 3)))

    def _attention_from_features(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.attn_expand(F.relu(self.attn_reduce(features)))
        return torch.softmax(logits / self.temperature, dim=1)

    def _padding_amounts(self):
        """(left, right) padding per spatial dim, like nn.Conv2d's reversed padding."""
        if self.padding == "valid":
            return [(0, 0), (0, 0)]
        if self.padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
            return [(t // 2, t - t // 2) for t in totals]
        return [(p, p) for p in self.padding]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"DynamicConv2d: expected input of shape (B, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(x.shape)}")
        y = self._convolve(x, self.weight, self.attention(x))  # attention() checks x's dtype and device
        return y.squeeze(0) if unbatched else y

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The dynamic conv with this layer's geometry and padding mode."""
        padding = self.padding
        if self.padding_mode != "zeros":
            (top, bottom), (left, right) = self._padding_amounts()
            x = F.pad(x, (left, right, top, bottom), mode=self.padding_mode)
            padding = 0
        return dynamic_conv2d(x, weight, attn, self.bias, self.stride, padding, self.dilation, self.groups)

    def _apply(self, fn, recurse=True):
        """Module.to, .double(), .share_memory() and the like, with the (K, C_out, C_in/g, kh, kw) kernels.

        ``model.to(memory_format=torch.channels_last)`` converts every 4-D and 5-D
        tensor, and a 2-D layout needs rank 4: the kernel bank goes through fn as
        K * C_out 4-D kernels, then back to 5-D, contiguous (the layout the ops read).
        """
        def kernel_bank_fn(t):
            if t.dim() != 5 or not t.is_contiguous():
                return fn(t)
            return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2]).contiguous()

        return super()._apply(kernel_bank_fn, recurse)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", num_kernels={self.num_kernels}, temperature={float(self.temperature):g}"

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, num_kernels: int = 4, **kwargs) -> "DynamicConv2d":
        """A DynamicConv2d whose output equals ``conv``'s at initialisation.

        Every kernel (and bias) is a copy of the conv's; the attention rows sum
        to 1, so the mixed kernel is the conv's own (to float rounding).
        Extra keyword arguments (reduction, hidden_channels, temperature) pass on.
        """
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"DynamicConv2d.from_conv2d: expected an nn.Conv2d, got {type(conv).__name__}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype, num_kernels=num_kernels, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight.unsqueeze(0).expand_as(layer.weight))
            if conv.bias is not None:
                layer.bias.copy_(conv.bias.unsqueeze(0).expand_as(layer.bias))
        layer.train(conv.training)
        return layer


def convert(model: nn.Module, num_kernels: int = 4,
            include: Union[None, Collection[str], Callable[[str, nn.Conv2d], bool]] = None,
            **kwargs) -> nn.Module:
    """Replace ``model``'s ``nn.Conv2d`` layers by :class:`DynamicConv2d` in place.

    Args:
        model: any module; returned for chaining.
        num_kernels: K of every new layer.
        include: which convs to convert: None (all), a collection of qualified
            names (as in ``model.named_modules()``), or a predicate
            ``f(name, conv) -> bool``.
        kwargs: passed to :meth:`DynamicConv2d.from_conv2d`.

    Each converted layer computes what the conv computed at the time of
    conversion (pretrained weights are kept in every kernel).

    Example::

        >>> model = convert(torchvision.models.resnet18(), num_kernels=4,
        ...                 include=lambda name, conv: conv.kernel_size == (3, 3))
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"convert: expected an nn.Module, got {type(model).__name__}")
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if include is None:
        selected = list(convs)
    elif callable(include):
        selected = [name for name, m in convs.items() if include(name, m)]
    else:
        unknown = sorted(set(include) - set(convs))
        if unknown:
            raise ValueError(f"convert: expected names of nn.Conv2d layers of the model, got unknown {unknown}")
        selected = [name for name in convs if name in set(include)]
    for name in selected:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, DynamicConv2d.from_conv2d(convs[name], num_kernels, **kwargs))
    return model


def anneal_temperature(model: nn.Module, epoch: float, start: float = 30.0, end: float = 1.0,
                       epochs: float = 10) -> float:
    """Set every DynamicConv2d's temperature on the paper's schedule; returns it.

    Linear from ``start`` at epoch 0 to ``end`` at ``epochs``, then constant
    (DY-CNN: 30 -> 1 over the first 10 epochs). ``epoch`` may be fractional.
    """
    if epochs <= 0:
        raise ValueError(f"anneal_temperature: expected epochs > 0, got {epochs}")
    if epoch < 0:
        raise ValueError(f"anneal_temperature: expected epoch >= 0, got {epoch}")
    value = start + (end - start) * min(epoch, epochs) / epochs
    for m in model.modules():
        if isinstance(m, DynamicConv2d):
            m.set_temperature(value)
    return value
