"""Pure-PyTorch implementations of dynamic_conv2d: the oracle and the peers.

``dynamic_conv2d_reference`` is the definition of the op (a per-sample loop
over ``F.conv2d``); tests compare every backend with it in float64. The other
two are the formulations public DY-CNN / CondConv / ODConv code uses, kept here
as benchmark peers. Tests and benchmarks import these; nothing copies them.

All take the arguments of :func:`chanflex_kernels.dynamic_conv2d`:
x (B, C_in, H, W), weight (K, C_out, C_in/groups, kh, kw), attn (B, K),
bias (K, C_out) or None.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dynamic_conv2d_reference(x, weight, attn, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """y[b] = conv2d(x[b], sum_k attn[b,k] weight[k], sum_k attn[b,k] bias[k]), one sample at a time."""
    outputs = []
    for b in range(x.shape[0]):
        w = torch.tensordot(attn[b], weight, dims=1)
        bb = None if bias is None else attn[b] @ bias
        outputs.append(F.conv2d(x[b : b + 1], w, bb, stride, padding, dilation, groups))
    if not outputs:  # batch 0: the conv of an empty batch has the right shape
        return F.conv2d(x, weight[0], None if bias is None else bias[0], stride, padding, dilation, groups)
    return torch.cat(outputs)


def dynamic_conv2d_grouped(x, weight, attn, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The batch-as-groups trick: the batch folded into conv groups (B * |W| mixed weights)."""
    batch, in_channels, height, width = x.shape
    _, out_channels, *kernel = weight.shape
    mixed = (attn @ weight.flatten(1)).view(batch * out_channels, *kernel)
    mixed_bias = None if bias is None else (attn @ bias).flatten()
    y = F.conv2d(x.reshape(1, batch * in_channels, height, width), mixed, mixed_bias,
                 stride, padding, dilation, groups * batch)
    return y.view(batch, out_channels, *y.shape[2:])


def dynamic_conv2d_concat_k(x, weight, attn, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """CondConv's output mixing: all K convs as one wide static conv, outputs mixed by attn."""
    num_kernels, out_channels, *kernel = weight.shape
    # Order output channels (group, kernel, channel) so each conv group sees its own K kernels.
    wide = weight.view(num_kernels, groups, out_channels // groups, *kernel).transpose(0, 1)
    wide_bias = None
    if bias is not None:
        wide_bias = bias.view(num_kernels, groups, -1).transpose(0, 1).flatten()
    y = F.conv2d(x, wide.flatten(0, 2), wide_bias, stride, padding, dilation, groups)
    y = y.view(x.shape[0], groups, num_kernels, out_channels // groups, *y.shape[2:])
    return torch.einsum("bk,bgkchw->bgchw", attn, y).flatten(1, 2)
