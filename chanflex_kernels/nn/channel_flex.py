"""Channel-flexible convolutions: any subset of a known channel set, or any channel count.

- :class:`ChannelFlexConv2d`: a DynamicConv2d that knows its full channel set
  and runs on any non-empty subset, either the same for the whole batch
  (``channels=``, x holds only those channels, weights are sliced) or per
  sample (``channel_mask=``, x is full width). Its attention branch sees which
  channels are present, so the kernel mixing adapts to the channel set.
- :class:`FlexChannelConv2d`: seed 002's channel-count-agnostic layer, whose
  per-sample kernel is generated channel by channel by a shared generator.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..channels import ChannelSpec, check_channel_mask, normalize_channel_names, resolve_channels
from ..ops import per_sample_conv2d
from .dynamic_conv import DynamicConv2d, check_layer_input

__all__ = ["ChannelFlexConv2d", "FlexChannelConv2d"]


class ChannelFlexConv2d(DynamicConv2d):
    r"""Dynamic convolution over any subset of a known channel set, per sample.

    Same arguments as :class:`DynamicConv2d` (groups must be 1), plus:

    Args:
        channel_names: optional names of the ``in_channels`` channels, e.g.
            ``"RGB"`` or ``["B02", "B03", "B04", "B08"]``, usable in ``channels=``.
        rescale: scale each sample's input by ``C / |S|`` (S its present
            channels), like inverted dropout, so the expected pre-activation
            keeps its size when channels are missing. Default False.

    Forward:
        ``forward(x)``: x (B, C, H, W), every channel present.
        ``forward(x, channels=S)``: x (B, |S|, H, W) holds the channels S
        (indices or names, any order) for the whole batch; the kernels are
        sliced to S, so the conv's compute scales with |S|.
        ``forward(x, channel_mask=m)``: x (B, C, H, W), m (B, C) bool; sample
        b uses only its channels with ``m[b]`` true. Absent channels have no
        effect on the output or on any gradient, whatever their values (NaN
        included); they get a zero gradient.

    Attention:
        The branch input is ``[mean over H, W of the present channels (0 for
        absent ones), availability (1/0)]`` of width 2C, then Linear(2C ->
        hidden, no bias) -> ReLU -> Linear(hidden -> K) -> softmax(/T). The
        availability half lets each channel set pick its own kernel mix.
        Default hidden width as DynamicConv2d's (K when C == 3).

    The two calling forms agree: ``layer(x[:, S], channels=S)`` equals
    ``layer(x, channel_mask=mask_of(S))``, and a batch of mixed subsets
    equals per-sample calls.

    Example::

        >>> layer = ChannelFlexConv2d(3, 64, 3, padding=1, channel_names="RGB")
        >>> layer(rgb[:, [0, 2]], channels="RB").shape      # two channels, sliced weights
        >>> layer(rgb, channel_mask=torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool))
    """

    channel_flexible = True  # accepts channels= (the model zoo's channel-combination protocol)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 channel_names: Optional[Union[str, Sequence[str]]] = None, rescale: bool = False,
                 num_kernels: int = 4, reduction: float = 0.25, hidden_channels: Optional[int] = None,
                 temperature: float = 30.0):
        if groups != 1:
            raise ValueError(f"ChannelFlexConv2d: expected groups=1 (a channel subset cannot keep a group "
                             f"structure), got groups={groups}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, num_kernels=num_kernels, reduction=reduction,
                         hidden_channels=hidden_channels, temperature=temperature)
        self.channel_names = normalize_channel_names(channel_names, in_channels, "ChannelFlexConv2d")
        self.rescale = bool(rescale)
        # Pooled features of the present channels together with the availability mask.
        self.attn_reduce = nn.Linear(2 * in_channels, self.hidden_channels, bias=False, device=device, dtype=dtype)

    def channel_indices(self, channels: ChannelSpec):
        """The checked indices of a channel subset (names allowed)."""
        return resolve_channels(channels, self.in_channels, self.channel_names, "ChannelFlexConv2d")

    def attention(self, x: torch.Tensor, channels: Optional[ChannelSpec] = None,
                  channel_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Kernel attention (B, K) for the same inputs as forward."""
        x, _, attn, _ = self._prepare(x, channels, channel_mask)
        return attn

    def _prepare(self, x, channels, channel_mask):
        """(x to convolve, kernels, attention, unbatched) for a forward call, all checked."""
        where = "ChannelFlexConv2d"
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{where}: expected x to be a torch.Tensor, got {type(x).__name__}")
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
            if channel_mask is not None and isinstance(channel_mask, torch.Tensor) and channel_mask.dim() == 1:
                channel_mask = channel_mask.unsqueeze(0)
        if channels is not None and channel_mask is not None:
            raise ValueError(f"{where}: expected channels= or channel_mask=, not both")
        full = self.in_channels
        expected_width = full if channels is None else None
        if channels is not None:
            index = self.channel_indices(channels)
            expected_width = len(index)
        if x.dim() != 4 or x.shape[1] != expected_width:
            what = "all channels" if channels is None else f"the channels {channels!r}"
            raise ValueError(f"{where}: expected x of shape (B, {expected_width}, H, W) or ({expected_width}, H, W) "
                             f"holding {what}, got {tuple(x.shape)}")
        check_layer_input(where, x, self.weight)
        batch = x.shape[0]
        weight = self.weight

        if channels is not None:
            index_t = torch.tensor(index, device=x.device)
            pooled = x.new_zeros(batch, full).index_copy(1, index_t, x.mean(dim=(2, 3)))
            present = x.new_zeros(full).index_fill(0, index_t, 1.0).expand(batch, full)
            if index != list(range(full)):
                weight = weight.index_select(2, index_t)
            if self.rescale and len(index) < full:
                weight = weight * (full / len(index))
        elif channel_mask is not None:
            mask = check_channel_mask(channel_mask, batch, full, x.device, where)
            # where(), not a product: 0 * NaN would leak NaN from absent channels.
            x = torch.where(mask[:, :, None, None], x, x.new_zeros(()))
            pooled = x.mean(dim=(2, 3))
            present = mask.to(x.dtype)
            if self.rescale:
                x = x * (full / present.sum(dim=1))[:, None, None, None]
        else:
            pooled = x.mean(dim=(2, 3))
            present = x.new_ones(batch, full)
        attn = self._attention_from_features(torch.cat([pooled, present], dim=1))
        return x, weight, attn, unbatched

    def forward(self, x: torch.Tensor, channels: Optional[ChannelSpec] = None,
                channel_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, weight, attn, unbatched = self._prepare(x, channels, channel_mask)
        y = self._convolve(x, weight, attn)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.channel_names is not None:
            s += f", channel_names={''.join(self.channel_names) if all(len(n) == 1 for n in self.channel_names) else list(self.channel_names)!r}"
        return s + (", rescale=True" if self.rescale else "")


class FlexChannelConv2d(nn.Module):
    r"""Seed 002's channel-count-agnostic conv: a per-sample kernel generated channel by channel.

    For each input channel c of sample b, a shared generator maps the plane
    ``x[b, c]`` to a kernel slice (C_out, 1, kh, kw):
    ``Conv2d(1, 1, 3, padding='same') -> ReLU -> features -> Linear -> ReLU``.
    The slices of all channels form sample b's kernel (C_out, C, kh, kw), and the
    output is ``ReLU(conv2d(x[b], kernel_b, padding='same'))`` without bias. Any
    number of channels works, because every channel is treated alike.

    Args:
        out_channels: C_out (seed 002: 16).
        kernel_size: kernel of the generated conv (seed 002: 3).
        input_size: the seed's fixed form: features are the flattened plane, so
            the generator is Linear(H*W, C_out*kh*kw) and only inputs of this
            size work (seed 002: 128). None (default) for the size-invariant
            form: the plane is average-pooled to ``pool_size`` x ``pool_size``.
        pool_size: pooled side of the size-invariant form (default 8).

    Forward:
        ``forward(x, channel_mask=None)``: x (B, C, H, W) with any C >= 1; with
        a mask (B, C) bool, absent channels contribute nothing.

    The per-sample conv runs through :func:`chanflex_kernels.per_sample_conv2d`.
    """

    def __init__(self, out_channels: int = 16, kernel_size=3, *, input_size=None, pool_size: int = 8,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"FlexChannelConv2d: expected out_channels >= 1, got {out_channels!r}")
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.input_size = None if input_size is None else _pair(input_size)
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"FlexChannelConv2d: expected pool_size >= 1, got {pool_size!r}")
        self.pool_size = pool_size
        features = math.prod(self.input_size) if self.input_size is not None else pool_size * pool_size
        self.plane_conv = nn.Conv2d(1, 1, 3, padding="same", **factory)
        self.kernel_generator = nn.Linear(features, out_channels * math.prod(self.kernel_size), **factory)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample kernels (B, C_out, C, kh, kw) generated from x (B, C, H, W)."""
        batch, chans, height, width = x.shape
        planes = F.relu(self.plane_conv(x.reshape(batch * chans, 1, height, width)))
        if self.input_size is None:
            features = F.adaptive_avg_pool2d(planes, self.pool_size).flatten(1)
        else:
            features = planes.flatten(1)
        slices = F.relu(self.kernel_generator(features))
        return slices.view(batch, chans, self.out_channels, *self.kernel_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, channel_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        where = "FlexChannelConv2d"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] < 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{where}: expected x of shape (B, C, H, W) with C >= 1, got {shape}")
        if self.input_size is not None and tuple(x.shape[2:]) != self.input_size:
            raise ValueError(f"{where}: expected inputs of {self.input_size[0]}x{self.input_size[1]} (the generator "
                             f"is a Linear over H*W, as in seed 002), got {x.shape[2]}x{x.shape[3]}; "
                             f"use input_size=None for the size-invariant form")
        check_layer_input(where, x, self.plane_conv.weight)
        if channel_mask is not None:
            mask = check_channel_mask(channel_mask, x.shape[0], x.shape[1], x.device, where)
            x = torch.where(mask[:, :, None, None], x, x.new_zeros(()))
        return F.relu(per_sample_conv2d(x, self.kernels(x), padding="same"))

    def extra_repr(self) -> str:
        form = f"input_size={self.input_size}" if self.input_size is not None else f"pool_size={self.pool_size}"
        return f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, {form}"
