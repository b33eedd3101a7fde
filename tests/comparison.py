"""Comparing an implementation of dynamic_conv2d with the float64 reference.

One tolerance table per dtype; tolerances are relative to the largest
magnitude of the expected tensor, so they do not depend on the scale of the
inputs. NaN never passes.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch

from chanflex_kernels.reference import dynamic_conv2d_reference

# dtype -> (rtol, atol as a fraction of max |expected|)
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One dynamic_conv2d configuration; layout is contiguous, channels_last or sliced."""

    batch: int
    in_channels: int
    out_channels: int
    height: int
    width: int
    kernel: Tuple[int, int] = (3, 3)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    num_kernels: int = 4
    bias: bool = True
    layout: str = "contiguous"

    @property
    def id(self) -> str:
        k, s, p, d = (f"{a}x{b}" for a, b in (self.kernel, self.stride, self.padding, self.dilation))
        return (f"B{self.batch}-C{self.in_channels}-O{self.out_channels}-{self.height}x{self.width}-k{k}-s{s}"
                f"-p{p}-d{d}-g{self.groups}-K{self.num_kernels}-{'bias' if self.bias else 'nobias'}-{self.layout}")

    @property
    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)


def make_inputs(case: Case, seed: int = 0):
    """float64 leaves (x, weight, attn, bias) for case; x laid out as case.layout."""
    gen = torch.Generator().manual_seed(seed)
    c = case
    if c.layout == "sliced":  # every other column of a wider tensor: non-contiguous
        x = torch.randn(c.batch, c.in_channels, c.height, 2 * c.width, generator=gen, dtype=torch.float64)[..., ::2]
    else:
        x = torch.randn(c.batch, c.in_channels, c.height, c.width, generator=gen, dtype=torch.float64)
        if c.layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c.num_kernels, c.out_channels, c.in_channels // c.groups, *c.kernel,
                         generator=gen, dtype=torch.float64)
    attn = torch.randn(c.batch, c.num_kernels, generator=gen, dtype=torch.float64)
    bias = torch.randn(c.num_kernels, c.out_channels, generator=gen, dtype=torch.float64) if c.bias else None
    return x, weight, attn, bias


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol_frac = TOLERANCES[dtype]
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol_frac * max(scale, 1e-30),
                               msg=lambda m: f"{what} ({dtype}): {m}")


def assert_matches_reference(fn: Callable, case: Case, dtype: torch.dtype = torch.float32,
                             seed: int = 0, grads: bool = True,
                             inputs: Optional[tuple] = None, device: str = "cpu") -> None:
    """fn's output and its gradients for x, weight, attn, bias equal the float64 reference's.

    fn runs on the inputs cast to ``dtype`` and moved to ``device`` (layout
    kept); the reference runs in float64 on the CPU on the same values (the
    inputs and grad_out rounded to ``dtype`` first, so that the tolerance
    measures fn's error, not the rounding of its inputs: a bfloat16 input
    is off by up to 2^-9 of itself, and a gradient that is a cancelling sum
    of many products inherits that times the products' size); one random
    grad_out is shared.
    """
    inputs = inputs if inputs is not None else make_inputs(case, seed)
    names = ("x", "weight", "attn", "bias")
    ref_in = [None if t is None else t.detach().to(dtype).to(torch.float64).requires_grad_(grads) for t in inputs]
    ours_in = [None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_(grads) for t in inputs]
    if ours_in[0] is not None and case.layout == "channels_last":
        ours_in[0] = ours_in[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_(grads)
    if ours_in[0] is not None and case.layout == "sliced":  # a cast copies densely: slice again
        wide = ours_in[0].new_zeros(*ours_in[0].shape[:3], 2 * ours_in[0].shape[3])
        wide[..., ::2] = ours_in[0].detach()
        ours_in[0] = wide[..., ::2].requires_grad_(grads)
    expected = dynamic_conv2d_reference(*ref_in, **case.conv_args)
    actual = fn(*ours_in, **case.conv_args)
    assert actual.dtype == dtype, f"output dtype: expected {dtype}, got {actual.dtype}"
    assert actual.shape == expected.shape, f"output shape: expected {tuple(expected.shape)}, got {tuple(actual.shape)}"
    assert actual.device.type == torch.device(device).type, f"output device: expected {device}, got {actual.device}"
    assert_close_scaled(actual.cpu(), expected, dtype, "output")
    if not grads:
        return
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_out = grad_out.to(dtype).to(torch.float64)
    leaves = [(n, r, o) for n, r, o in zip(names, ref_in, ours_in) if r is not None]
    ref_grads = torch.autograd.grad(expected, [r for _, r, _ in leaves], grad_out, allow_unused=True)
    our_grads = torch.autograd.grad(actual, [o for _, _, o in leaves], grad_out.to(device=device, dtype=dtype),
                                    allow_unused=True)
    for (name, r, o), rg, og in zip(leaves, ref_grads, our_grads):
        rg = torch.zeros_like(r) if rg is None else rg  # batch 0: the reference leaves some unused
        assert og is not None, f"no gradient reached {name}"
        assert og.shape == r.shape, f"grad of {name}: expected shape {tuple(r.shape)}, got {tuple(og.shape)}"
        assert_close_scaled(og.cpu(), rg, dtype, f"grad of {name}")
