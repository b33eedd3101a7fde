"""Benchmark cases and the ratio table: ours vs a static conv (the floor) vs peers.

Shared by ``python -m chanflex_kernels.bench`` and the pytest-benchmark suite in
``benchmarks/``: the shapes, the providers and the timed step live here once.

    python -m chanflex_kernels.bench            # every shape: time and peak memory
    python -m chanflex_kernels.bench --quick    # ResNet18's four 3x3 stage convs (make demo)

Timing interleaves the providers run by run (static, chanflex, peers, static,
...) and takes medians, so slow phases of a shared machine hit all of them.
Peak memory is the rise of the process's peak resident set during one step,
measured in a fresh subprocess per (provider, shape, mode) with glibc's mmap
threshold fixed so freed buffers go back to the system (Linux only).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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

    name: str
    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1

    @property
    def id(self) -> str:
        return (f"{self.name}-B{self.batch}-C{self.in_channels}-O{self.out_channels}-{self.size}x{self.size}"
                f"-k{self.kernel}-s{self.stride}")

    @property
    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding)

    def at_batch(self, batch: int) -> "ConvShape":
        return ConvShape(self.name, batch, self.in_channels, self.out_channels, self.size, self.kernel,
                         self.stride, self.padding)


def _resnet18(name, c_in, c_out, size, kernel=3, stride=1):
    return ConvShape(f"resnet18.{name}", 32, c_in, c_out, size, kernel, stride, kernel // 2)


def _vgg19(name, c_in, c_out, size):
    return ConvShape(f"vgg19.{name}", 32, c_in, c_out, size)


# Every distinct conv of ResNet18 at 224 input and of VGG19(-BN) at 84 input, batch 32.
RESNET18_SHAPES = [
    _resnet18("conv1", 3, 64, 224, kernel=7, stride=2),
    _resnet18("layer1", 64, 64, 56),
    _resnet18("layer2.down3x3", 64, 128, 56, stride=2),
    _resnet18("layer2", 128, 128, 28),
    _resnet18("layer2.down1x1", 64, 128, 56, kernel=1, stride=2),
    _resnet18("layer3.down3x3", 128, 256, 28, stride=2),
    _resnet18("layer3", 256, 256, 14),
    _resnet18("layer3.down1x1", 128, 256, 28, kernel=1, stride=2),
    _resnet18("layer4.down3x3", 256, 512, 14, stride=2),
    _resnet18("layer4", 512, 512, 7),
    _resnet18("layer4.down1x1", 256, 512, 14, kernel=1, stride=2),
]
VGG19_SHAPES = [
    _vgg19("conv1_1", 3, 64, 84),
    _vgg19("conv1_2", 64, 64, 84),
    _vgg19("conv2_1", 64, 128, 42),
    _vgg19("conv2_2", 128, 128, 42),
    _vgg19("conv3_1", 128, 256, 21),
    _vgg19("conv3_x", 256, 256, 21),
    _vgg19("conv4_1", 256, 512, 10),
    _vgg19("conv4_x", 512, 512, 10),
    _vgg19("conv5_x", 512, 512, 5),
]
SHAPES = RESNET18_SHAPES + VGG19_SHAPES
QUICK_SHAPES = [s for s in RESNET18_SHAPES if s.name in ("resnet18.layer1", "resnet18.layer2",
                                                         "resnet18.layer3", "resnet18.layer4")]
SHAPES_BY_ID = {s.id: s for s in SHAPES + [s.at_batch(1) for s in SHAPES]}


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor         # (K, C_out, C_in, k, k)
    attn: torch.Tensor           # (B, K)
    static_weight: torch.Tensor  # (C_out, C_in, k, k) for the static conv
    grad_out: torch.Tensor

    def leaves(self):
        return (self.x, self.weight, self.attn, self.static_weight)


def make_inputs(shape: ConvShape, num_kernels: int = NUM_KERNELS, dtype=torch.float32,
                requires_grad: bool = False, seed: int = 0, device: str = "cpu") -> Inputs:
    """Random inputs for one shape on ``device``; leaves require grad when ``requires_grad``."""
    gen = torch.Generator().manual_seed(seed)
    k = shape.kernel
    w_shape = (shape.out_channels, shape.in_channels, k, k)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen, dtype=dtype)
    weight = torch.randn(num_kernels, *w_shape, generator=gen, dtype=dtype) * 0.05
    attn = torch.softmax(torch.randn(shape.batch, num_kernels, generator=gen, dtype=dtype), dim=1)
    static_weight = weight[0].clone()
    out_size = (shape.size + 2 * shape.padding - k) // shape.stride + 1
    grad_out = torch.randn(shape.batch, shape.out_channels, out_size, out_size, generator=gen, dtype=dtype)
    inputs = Inputs(*(t.to(device) for t in (x, weight, attn, static_weight, grad_out)))
    for t in inputs.leaves():
        t.requires_grad_(requires_grad)
    return inputs


def static_provider(inp: Inputs, conv: dict) -> torch.Tensor:
    return F.conv2d(inp.x, inp.static_weight, None, **conv)


def dynamic_provider(fn: Callable) -> Callable[[Inputs, dict], torch.Tensor]:
    return lambda inp, conv: fn(inp.x, inp.weight, inp.attn, None, **conv)


# provider name -> f(inputs, conv_args) -> output. "static" is the floor.
PROVIDERS: Dict[str, Callable[[Inputs, dict], torch.Tensor]] = {
    "static": static_provider,
    "chanflex": dynamic_provider(dynamic_conv2d),
    "batch_as_groups": dynamic_provider(dynamic_conv2d_grouped),
    "concat_k": dynamic_provider(dynamic_conv2d_concat_k),
    "per_sample_loop": dynamic_provider(dynamic_conv2d_reference),
}
PEERS = ("batch_as_groups", "concat_k", "per_sample_loop")


class Step:
    """One forward (or forward+backward) of a provider on a shape, as a callable."""

    def __init__(self, provider: str, shape: ConvShape, mode: str, num_kernels: int = NUM_KERNELS):
        if mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, got {mode!r}")
        if provider not in PROVIDERS:
            raise ValueError(f"expected provider in {tuple(PROVIDERS)}, got {provider!r}")
        self.fn = PROVIDERS[provider]
        self.mode = mode
        self.conv = shape.conv_args
        self.inputs = make_inputs(shape, num_kernels, requires_grad=(mode == "fwd+bwd"))

    def clear_grads(self) -> None:
        for t in self.inputs.leaves():
            t.grad = None

    def __call__(self) -> None:
        if self.mode == "fwd":
            with torch.no_grad():
                self.fn(self.inputs, self.conv)
            return
        self.clear_grads()
        self.fn(self.inputs, self.conv).backward(self.inputs.grad_out)


def time_interleaved(steps: Dict[str, Callable[[], None]], warmup: int = 1, repeats: int = 5) -> Dict[str, float]:
    """Median milliseconds of each step, running them in turn ``repeats`` times."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> str:
    """The CPU model and the instruction set of the CPU kernel's packed paths."""
    model = "unknown CPU"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model}, packed paths {torch.ops.chanflex.cpu_packed_isa()}"


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure_peak_here(provider: str, shape: ConvShape, mode: str) -> int:
    """Peak resident bytes one step adds on top of its inputs (run in a fresh process)."""
    step = Step(provider, shape, mode)
    step()  # warm-up: libraries allocate their persistent buffers
    step.clear_grads()
    # chanflex keeps its scratch buffers and freed large weight gradients for
    # the next call; release them so that the measured step's own memory,
    # the K-fold weight gradient included, is counted rather than reused.
    torch.ops.chanflex.cpu_release_scratch()
    gc.collect()
    baseline = _proc_status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    step()
    return (_proc_status_kib("VmHWM") - baseline) * 1024


def peak_memory_bytes(provider: str, shape: ConvShape, mode: str) -> Optional[int]:
    """Peak memory of one step in a subprocess; None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-m", "chanflex_kernels.bench", "--peak-memory-of",
                           provider, shape.id, mode], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak memory of {provider} on {shape.id} ({mode}) failed:\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1])


@dataclass
class Row:
    shape: str
    mode: str
    static_ms: float
    chanflex_ms: float
    best_peer: str
    best_peer_ms: float
    static_peak_mb: Optional[float] = None
    chanflex_peak_mb: Optional[float] = None
    # cpu_round_trip_ns() just before and just after the row's timing
    round_trip_ns: Optional[Tuple[float, float]] = None

    @property
    def ours_over_static(self) -> float:
        return self.chanflex_ms / self.static_ms

    @property
    def peer_over_ours(self) -> float:
        return self.best_peer_ms / self.chanflex_ms

    @property
    def memory_ratio(self) -> Optional[float]:
        if self.static_peak_mb is None or self.chanflex_peak_mb is None:
            return None
        return self.chanflex_peak_mb / max(self.static_peak_mb, 1e-9)


def cpu_round_trip_ns() -> float:
    """Round trip of a cache line between the process's first two CPUs, in ns (NaN with one CPU).

    On the development VM it told apart two modes of the host that move the
    ratios (see csrc/cpu/core_probe.cpp). It waits a moment first, so that
    the thread pool's workers, which spin a while after a parallel region,
    do not compete with the probe's threads.
    """
    time.sleep(0.1)
    return torch.ops.chanflex.cpu_core_round_trip_ns()


def measure(shapes: Sequence[ConvShape], modes: Sequence[str] = MODES, peers: Sequence[str] = PEERS,
            repeats: int = 5, memory: bool = True, progress: Optional[Callable[[str], None]] = None) -> List[Row]:
    """Time static, chanflex and peers (and peak memory of static and chanflex) per shape and mode."""
    rows = []
    for shape in shapes:
        for mode in modes:
            steps = {p: Step(p, shape, mode) for p in ("static", "chanflex", *peers)}
            before = cpu_round_trip_ns()
            ms = time_interleaved(steps, repeats=repeats)
            after = cpu_round_trip_ns()
            del steps
            best = min(peers, key=ms.get) if peers else "static"
            row = Row(shape.id, mode, ms["static"], ms["chanflex"], best, ms[best], round_trip_ns=(before, after))
            if memory:
                mb = {p: peak_memory_bytes(p, shape, mode) for p in ("static", "chanflex")}
                if None not in mb.values():
                    row.static_peak_mb, row.chanflex_peak_mb = (mb[p] / 2**20 for p in ("static", "chanflex"))
            rows.append(row)
            if progress:
                progress(f"{shape.id} {mode}")
    return rows


def markdown(rows: Sequence[Row]) -> str:
    header = ["shape", "mode", "static ms", "chanflex ms", "chanflex/static", "best peer", "peer ms",
              "peer/chanflex", "peak MB static", "peak MB chanflex", "peak chanflex/static", "CPU round trip ns"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mem = (["-", "-", "-"] if r.memory_ratio is None else
               [f"{r.static_peak_mb:.1f}", f"{r.chanflex_peak_mb:.1f}", f"{r.memory_ratio:.2f}"])
        trip = "-" if r.round_trip_ns is None else "/".join(f"{ns:.0f}" for ns in r.round_trip_ns)
        lines.append("| " + " | ".join([r.shape, r.mode, f"{r.static_ms:.1f}", f"{r.chanflex_ms:.1f}",
                                        f"{r.ours_over_static:.2f}", r.best_peer, f"{r.best_peer_ms:.1f}",
                                        f"{r.peer_over_ours:.2f}", *mem, trip]) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="ResNet18's four 3x3 stage convs, the batch_as_groups peer, 3 repeats")
    parser.add_argument("--batch1", action="store_true", help="also batch-1 inference (fwd) of every shape")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per provider (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--peak-memory-of", nargs=3, metavar=("PROVIDER", "SHAPE_ID", "MODE"),
                        help=argparse.SUPPRESS)  # internal: one measurement, in its own process
    args = parser.parse_args(argv)
    if args.peak_memory_of:
        provider, shape_id, mode = args.peak_memory_of
        print(_measure_peak_here(provider, SHAPES_BY_ID[shape_id], mode))
        return
    shapes = QUICK_SHAPES if args.quick else SHAPES
    peers = ("batch_as_groups",) if args.quick else PEERS
    repeats = args.repeats or (3 if args.quick else 5)
    jobs = [(shapes, MODES)] + ([([s.at_batch(1) for s in shapes], ("fwd",))] if args.batch1 else [])
    rows = []
    with tqdm(total=sum(len(s) * len(m) for s, m in jobs), desc="benchmark", leave=False) as bar:
        def progress(what):
            bar.set_postfix_str(what)
            bar.update()
        for job_shapes, modes in jobs:
            rows += measure(job_shapes, modes, peers, repeats, memory=not args.no_memory, progress=progress)
    print(f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, K={NUM_KERNELS}, "
          f"median of {repeats} interleaved runs; chanflex/static: lower is better, "
          f"peer/chanflex: higher is better; CPU round trip: a cache line between the first two CPUs "
          f"before/after the row's timing (ns; on the development VM 60-90 near, 330-600 far apart)")
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)


if __name__ == "__main__":
    main()
