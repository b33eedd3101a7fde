"""Channel sets: naming and checking subsets, availability masks, random subsets, fills.

A channel-flexible layer knows its full channel set (C channels, optionally
named, e.g. "RGB" or ["B02", "B03", "B04", "B08"]). Callers say which
channels they hold either as a subset (indices or names, any order) or as a
per-sample availability mask (B, C) of bools. This module is the one place
that turns those into checked index lists and masks.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

ChannelSpec = Union[int, str, Sequence[Union[int, str]], torch.Tensor]

__all__ = [
    "ChannelSpec", "normalize_channel_names", "resolve_channels", "check_channel_mask", "mask_from_channels",
    "random_channel_mask", "RandomChannelSubsets", "fill_channels", "FILL_STRATEGIES",
]

FILL_STRATEGIES = ("replicate", "mean", "zeros")


def normalize_channel_names(names, num_channels: int, where: str) -> Optional[Tuple[str, ...]]:
    """Names as a tuple of distinct strings, one per channel ("RGB" means R, G, B)."""
    if names is None:
        return None
    names = tuple(names)  # a string becomes its characters
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{where}: expected channel_names to be non-empty strings, got {names!r}")
    if len(names) != num_channels:
        raise ValueError(f"{where}: expected {num_channels} channel names (one per input channel), "
                         f"got {len(names)}: {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: expected distinct channel names, got {names!r}")
    return names


def resolve_channels(channels: ChannelSpec, num_channels: int, names: Optional[Sequence[str]] = None,
                     where: str = "channels") -> List[int]:
    """Indices of a non-empty channel subset, in the order given.

    Args:
        channels: an index, a name, a sequence of indices and/or names, a
            string of one-character names ("RB" when the names are R, G, B),
            or a 1-D integer tensor.
        num_channels: C, the size of the full channel set.
        names: the channel names, or None.
        where: prefix of error messages.

    Raises:
        ValueError: indices out of range, unknown names, duplicates, an empty subset.
    """
    names = tuple(names) if names is not None else None
    if isinstance(channels, torch.Tensor):
        if channels.dim() > 1 or channels.dtype.is_floating_point or channels.dtype == torch.bool:
            raise ValueError(f"{where}: expected a 1-D integer tensor of channel indices, got a "
                             f"{channels.dim()}-D {channels.dtype} tensor")
        items = channels.reshape(-1).tolist()
    elif isinstance(channels, str):
        if names is not None and channels in names:
            items = [channels]
        elif names is not None and all(len(n) == 1 for n in names):
            items = list(channels)
        else:
            items = [channels]
    elif isinstance(channels, int) and not isinstance(channels, bool):
        items = [channels]
    elif isinstance(channels, Sequence):
        items = list(channels)
    else:
        raise ValueError(f"{where}: expected channel indices or names, got {type(channels).__name__}")

    if not items:
        raise ValueError(f"{where}: expected a non-empty channel subset, got {channels!r}")
    indices = []
    for item in items:
        if isinstance(item, str):
            if names is None:
                raise ValueError(f"{where}: got channel name {item!r}, but this layer has no channel names "
                                 f"(pass channel_names=... or use indices 0..{num_channels - 1})")
            if item not in names:
                raise ValueError(f"{where}: unknown channel name {item!r}, expected one of {list(names)}")
            indices.append(names.index(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < num_channels:
                raise ValueError(f"{where}: expected channel indices in [0, {num_channels - 1}], got {item}")
            indices.append(item)
        else:
            raise ValueError(f"{where}: expected channel indices (int) or names (str), got {item!r}")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{where}: expected distinct channels, got duplicates in {channels!r} (indices {indices})")
    return indices


def check_channel_mask(mask, batch: int, num_channels: int, device: torch.device, where: str) -> torch.Tensor:
    """Check an availability mask: (B, C) bool on x's device, at least one channel per sample."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{where}: expected channel_mask to be a bool tensor of shape ({batch}, {num_channels}), "
                         f"got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{where}: expected channel_mask of dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != (batch, num_channels):
        raise ValueError(f"{where}: expected channel_mask of shape (B, C) = ({batch}, {num_channels}), "
                         f"got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{where}: expected channel_mask on the device of x ({device}), got {mask.device}")
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"{where}: expected at least one present channel per sample, got none for samples "
                         f"{empty[:8].tolist()}{' ...' if empty.numel() > 8 else ''}")
    return mask


def mask_from_channels(channels: Sequence[int], num_channels: int, batch: int = 1,
                       device=None) -> torch.Tensor:
    """The (batch, C) availability mask of a channel subset."""
    mask = torch.zeros(batch, num_channels, dtype=torch.bool, device=device)
    mask[:, list(channels)] = True
    return mask


def random_channel_mask(batch: int, num_channels: int, p: float = 0.5, generator: Optional[torch.Generator] = None,
                        device=None) -> torch.Tensor:
    """Per-sample random channel subsets (seed 004's v4 idea, drawn per sample).

    Each sample, with probability ``p``, keeps a random subset whose size is
    uniform in 1..C (so it may still be the full set); otherwise all channels.
    Returns a (batch, C) bool mask. Drawn on the CPU (for the generator), then moved.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_channel_mask: expected 0 <= p <= 1, got {p}")
    if batch < 0 or num_channels < 1:
        raise ValueError(f"random_channel_mask: expected batch >= 0 and num_channels >= 1, "
                         f"got batch={batch}, num_channels={num_channels}")
    dropped = torch.rand(batch, generator=generator) < p
    sizes = torch.randint(1, num_channels + 1, (batch,), generator=generator)
    # A uniformly random subset of each size: the channels ranked lowest by random scores.
    ranks = torch.rand(batch, num_channels, generator=generator).argsort(dim=1).argsort(dim=1)
    subset = ranks < sizes[:, None]
    mask = torch.where(dropped[:, None], subset, torch.ones_like(subset))
    return mask.to(device) if device is not None else mask


class RandomChannelSubsets(nn.Module):
    """Training aid: draws a random channel-availability mask per sample.

    In training mode ``forward(x)`` returns ``random_channel_mask(B, C, p)``
    for x of shape (B, C, ...); in eval mode all channels are present. Feed
    the mask to a channel-flexible layer as ``channel_mask=``.

    Example::

        >>> drop = RandomChannelSubsets(3, p=0.5)
        >>> mask = drop(images)                 # (B, 3) bool
        >>> y = flex_layer(images, channel_mask=mask)
    """

    def __init__(self, num_channels: int, p: float = 0.5, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"RandomChannelSubsets: expected num_channels >= 1, got {num_channels!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomChannelSubsets: expected 0 <= p <= 1, got {p}")
        self.num_channels = num_channels
        self.p = p
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(f"RandomChannelSubsets: expected x of shape (B, {self.num_channels}, ...), "
                             f"got {tuple(x.shape)}")
        if not self.training:
            return torch.ones(x.shape[0], self.num_channels, dtype=torch.bool, device=x.device)
        return random_channel_mask(x.shape[0], self.num_channels, self.p, self.generator, x.device)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, p={self.p}"


def fill_channels(x: torch.Tensor, channels: ChannelSpec, strategy: str = "replicate", num_channels: int = 3,
                  names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Widen x, holding only ``channels`` of a C-channel set, to all C channels for a static model.

    Present channels keep their own positions; each missing position gets:
    - 'replicate': a copy of the nearest present channel (by index, lower on
      ties); with one channel present this is seed 000's "one channel x3";
    - 'mean': the mean of the present channels; with two of three present
      this is seed 000's "two channels plus their mean" (seed 000 appended the
      mean as the last channel; here it takes the missing channel's place);
    - 'zeros': zeros.

    Args:
        x: (B, len(channels), H, W).
        channels: the channels x holds (indices or names), in x's order.
        strategy: 'replicate', 'mean' or 'zeros'.
        num_channels: C (default 3).
        names: channel names for name lookups, e.g. "RGB".
    """
    if strategy not in FILL_STRATEGIES:
        raise ValueError(f"fill_channels: expected strategy in {FILL_STRATEGIES}, got {strategy!r}")
    names = normalize_channel_names(names, num_channels, "fill_channels")
    index = resolve_channels(channels, num_channels, names, "fill_channels")
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != len(index):
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"fill_channels: expected x of shape (B, {len(index)}, H, W) for channels {index}, "
                         f"got {shape}")
    if strategy == "mean" and not x.is_floating_point():
        raise ValueError(f"fill_channels: expected a floating-point x for strategy 'mean', got {x.dtype}")
    present = {c: i for i, c in enumerate(index)}
    mean = x.mean(dim=1) if strategy == "mean" else None
    planes = []
    for c in range(num_channels):
        if c in present:
            planes.append(x[:, present[c]])
        elif strategy == "zeros":
            planes.append(torch.zeros_like(x[:, 0]))
        elif strategy == "mean":
            planes.append(mean)
        else:
            nearest = min(index, key=lambda p: (abs(p - c), p))
            planes.append(x[:, present[nearest]])
    return torch.stack(planes, dim=1)
