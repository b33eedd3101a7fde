"""Benchmark cases and the ratio table: ours vs a static conv (the floor) vs peers.

Shared by ``python -m chanflex_kernels.bench`` and the pytest-benchmark suite in
``benchmarks/``: the shapes, the providers and the timed step live here once.

    python -m chanflex_kernels.bench            # every shape, fwd and fwd+bwd
    python -m chanflex_kernels.bench --quick    # a subset (what `make demo` runs)
"""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .ops import dynamic_conv2d
from .reference import dynamic_conv2d_concat_k, dynamic_conv2d_grouped, dynamic_conv2d_reference

NUM_KERNELS = 4
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class ConvShape:
    """One conv layer at a batch size: x (batch, in_channels, size, size)."""

    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    groups: int = 1

    @property
    def id(self) -> str:
        return (f"B{self.batch}-C{self.in_channels}-O{self.out_channels}-{self.size}x{self.size}"
                f"-k{self.kernel}-s{self.stride}" + (f"-g{self.groups}" if self.groups > 1 else ""))

    @property
    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)


# The 3x3 body convs of ResNet18 at 224 input, batch 32 fp32.
QUICK_SHAPES = [
    ConvShape(32, 64, 64, 56),
    ConvShape(32, 128, 128, 28),
    ConvShape(32, 256, 256, 14),
    ConvShape(32, 512, 512, 7),
]
SHAPES = QUICK_SHAPES


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor         # (K, C_out, C_in/groups, k, k)
    attn: torch.Tensor           # (B, K)
    static_weight: torch.Tensor  # (C_out, C_in/groups, k, k) for the static conv
    grad_out: torch.Tensor


def make_inputs(shape: ConvShape, num_kernels: int = NUM_KERNELS, dtype=torch.float32,
                requires_grad: bool = False, seed: int = 0) -> Inputs:
    """Random inputs for one shape; leaves require grad when ``requires_grad``."""
    gen = torch.Generator().manual_seed(seed)
    k = shape.kernel
    w_shape = (shape.out_channels, shape.in_channels // shape.groups, k, k)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen, dtype=dtype)
    weight = torch.randn(num_kernels, *w_shape, generator=gen, dtype=dtype) * 0.05
    attn = torch.softmax(torch.randn(shape.batch, num_kernels, generator=gen, dtype=dtype), dim=1)
    static_weight = weight[0].clone()
    out_size = (shape.size + 2 * shape.padding - k) // shape.stride + 1
    grad_out = torch.randn(shape.batch, shape.out_channels, out_size, out_size, generator=gen, dtype=dtype)
    for t in (x, weight, attn, static_weight):
        t.requires_grad_(requires_grad)
    return Inputs(x, weight, attn, static_weight, grad_out)


def _static(inp: Inputs, conv: dict) -> torch.Tensor:
    return F.conv2d(inp.x, inp.static_weight, None, **conv)


def _dynamic(fn: Callable) -> Callable[[Inputs, dict], torch.Tensor]:
    return lambda inp, conv: fn(inp.x, inp.weight, inp.attn, None, **conv)


# provider name -> f(inputs, conv_args) -> output. "static" is the floor.
PROVIDERS: Dict[str, Callable[[Inputs, dict], torch.Tensor]] = {
    "static": _static,
    "chanflex": _dynamic(dynamic_conv2d),
    "batch_as_groups": _dynamic(dynamic_conv2d_grouped),
    "concat_k": _dynamic(dynamic_conv2d_concat_k),
    "per_sample_loop": _dynamic(dynamic_conv2d_reference),
}
PEERS = ("batch_as_groups", "concat_k", "per_sample_loop")


def make_step(provider: str, shape: ConvShape, mode: str, num_kernels: int = NUM_KERNELS) -> Callable[[], None]:
    """A no-argument callable running one forward (or forward+backward) of provider on shape."""
    if mode not in MODES:
        raise ValueError(f"expected mode in {MODES}, got {mode!r}")
    if provider not in PROVIDERS:
        raise ValueError(f"expected provider in {tuple(PROVIDERS)}, got {provider!r}")
    fn = PROVIDERS[provider]
    inp = make_inputs(shape, num_kernels, requires_grad=(mode == "fwd+bwd"))
    conv = shape.conv_args

    def fwd():
        with torch.no_grad():
            fn(inp, conv)

    def fwd_bwd():
        for t in (inp.x, inp.weight, inp.attn, inp.static_weight):
            t.grad = None
        fn(inp, conv).backward(inp.grad_out)

    return fwd if mode == "fwd" else fwd_bwd


def time_ms(step: Callable[[], None], warmup: int = 1, repeats: int = 5) -> float:
    """Median wall time of ``step`` in milliseconds (CPU work is synchronous)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def ratio_table(shapes: List[ConvShape], modes=MODES, peers=("batch_as_groups",),
                repeats: int = 5, progress: Optional[Callable[[str], None]] = None) -> str:
    """Time static, chanflex and peers on every shape and mode; a markdown table.

    ``progress(what)`` is called after each timing, e.g. to advance a progress bar.
    """
    header = ["shape", "mode", "static ms", "chanflex ms", "chanflex/static"]
    for p in peers:
        header += [f"{p} ms", f"{p}/chanflex"]
    rows = []
    for shape in shapes:
        for mode in modes:
            ms = {}
            for provider in ("static", "chanflex", *peers):
                ms[provider] = time_ms(make_step(provider, shape, mode), repeats=repeats)
                if progress:
                    progress(f"{shape.id} {mode} {provider}")
            row = [shape.id, mode, f"{ms['static']:.1f}", f"{ms['chanflex']:.1f}",
                   f"{ms['chanflex'] / ms['static']:.2f}"]
            for p in peers:
                row += [f"{ms[p]:.1f}", f"{ms[p] / ms['chanflex']:.2f}"]
            rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset of shapes, fewer repeats")
    parser.add_argument("--peers", nargs="+", default=["batch_as_groups"], choices=PEERS,
                        help="peer implementations to time (default: batch_as_groups)")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 3 if args.quick else 7
    with tqdm(total=len(shapes) * len(MODES) * (2 + len(args.peers)), desc="timing", leave=False) as bar:
        def progress(what):
            bar.set_postfix_str(what)
            bar.update()
        table = ratio_table(shapes, peers=args.peers, repeats=repeats, progress=progress)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, K={NUM_KERNELS}, "
          f"median of {repeats} runs; ratios: lower chanflex/static is better, higher peer/chanflex is better")
    print(table)


if __name__ == "__main__":
    main()
