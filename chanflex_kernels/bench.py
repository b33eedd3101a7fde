"""Benchmark cases and the ratio table: ours vs a static conv (the floor) vs peers.

Shared by ``python -m chanflex_kernels.bench`` and the pytest-benchmark suite in
``benchmarks/``: the shapes, the providers and the timed step live here once.

    python -m chanflex_kernels.bench            # every shape: time and peak memory
    python -m chanflex_kernels.bench --quick    # ResNet18's four 3x3 stage convs (make demo)
    python -m chanflex_kernels.bench --shapes resnet18.layer3,resnet18.layer4 --no-memory   # some layers
    python -m chanflex_kernels.bench --json run.json --plot run.png   # keep the rows, draw the ratios
    python -m chanflex_kernels.bench --quick --dtype bfloat16   # every provider in bfloat16 (what autocast runs)
    python -m chanflex_kernels.bench --from-json run.json --plot run.png  # table, targets, plot of a saved run
    python -m chanflex_kernels.bench --depthwise  # MobileNetV2's depthwise convs (no targets there)

After the table it checks the rows against the CPU targets (SPEC section 8,
set at batch 32: ``CPU_TARGETS``) and lists what each one met and missed.

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
import re
import statistics
import subprocess
import sys
import time
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .files import atomic_write
from .ops import dynamic_conv2d
from .reference import dynamic_conv2d_concat_k, dynamic_conv2d_grouped, dynamic_conv2d_reference

NUM_KERNELS = 4
MODES = ("fwd", "fwd+bwd")
# --dtype's choices: every provider's tensors in this dtype (the CPU targets are set in float32).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_DTYPE = "float32"


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
    groups: int = 1

    @property
    def id(self) -> str:
        return (f"{self.name}-B{self.batch}-C{self.in_channels}-O{self.out_channels}-{self.size}x{self.size}"
                f"-k{self.kernel}-s{self.stride}" + (f"-g{self.groups}" if self.groups > 1 else ""))

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, groups=self.groups)

    def at_batch(self, batch: int) -> "ConvShape":
        return ConvShape(self.name, batch, self.in_channels, self.out_channels, self.size, self.kernel,
                         self.stride, self.padding, self.groups)


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


def _mobilenet_v2_dw(channels, size, stride=1):
    return ConvShape(f"mobilenet_v2.dw{channels}_{size}" + ("s2" if stride == 2 else ""), 32, channels, channels,
                     size, 3, stride, 1, groups=channels)


# Every distinct depthwise conv of MobileNetV2 at 224 input (DY-CNN's dynamic
# MobileNetV2 makes them dynamic), batch 32. Outside the CPU targets, which are
# set on SHAPES: --depthwise measures them.
DEPTHWISE_SHAPES = [
    _mobilenet_v2_dw(32, 112),
    _mobilenet_v2_dw(96, 112, stride=2),
    _mobilenet_v2_dw(144, 56),
    _mobilenet_v2_dw(144, 56, stride=2),
    _mobilenet_v2_dw(192, 28),
    _mobilenet_v2_dw(192, 28, stride=2),
    _mobilenet_v2_dw(384, 14),
    _mobilenet_v2_dw(576, 14),
    _mobilenet_v2_dw(576, 14, stride=2),
    _mobilenet_v2_dw(960, 7),
]
ALL_SHAPES = SHAPES + DEPTHWISE_SHAPES


def select_shapes(names: str) -> List[ConvShape]:
    """The shapes of ALL_SHAPES named in a comma-separated list ("resnet18.layer3,vgg19.conv5_x"), in its order."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [s.name for s in ALL_SHAPES]
    unknown = [n for n in wanted if n not in known]
    if not wanted or unknown:
        raise ValueError(f"expected comma-separated layer names from {', '.join(known)}; "
                         f"got {', '.join(unknown) if unknown else repr(names)}")
    return [s for s in ALL_SHAPES if s.name in wanted]


_SHAPE_ID = re.compile(r"^(?P<name>[^-]+)-B(?P<batch>\d+)-")


def shape_name_and_batch(shape_id: str) -> Tuple[str, int]:
    """("resnet18.layer3", 32) from a ConvShape id such as "resnet18.layer3-B32-C256-..."."""
    match = _SHAPE_ID.match(shape_id)
    if match is None:
        raise ValueError(f"expected a shape id like 'resnet18.layer3-B32-C256-O256-14x14-k3-s1', got {shape_id!r}")
    return match["name"], int(match["batch"])


def shape_by_id(shape_id: str) -> ConvShape:
    """The shape of ALL_SHAPES, at any batch, whose id this is."""
    name, batch = shape_name_and_batch(shape_id)
    base = {s.name: s for s in ALL_SHAPES}.get(name)
    shape = base.at_batch(batch) if base is not None else None
    if shape is None or shape.id != shape_id:
        raise ValueError(f"expected the id of a benchmark shape (e.g. {SHAPES[0].id!r}), got {shape_id!r}")
    return shape


def fwd_bwd_floor_mb(shape: ConvShape, num_kernels: int = NUM_KERNELS, dtype: str = TARGET_DTYPE) -> float:
    """MiB that any dynamic conv's fwd+bwd step holds at once: the output, grad_x, K kernels' gradient.

    The caller holds the output through backward, which returns grad_x and
    the gradient of all K kernels together: a floor on the step's peak
    memory, whatever the implementation (the static conv returns one
    kernel's gradient).
    """
    floats = (shape.batch * shape.out_channels * shape.out_size ** 2
              + shape.batch * shape.in_channels * shape.size ** 2
              + num_kernels * shape.out_channels * shape.in_channels // shape.groups * shape.kernel ** 2)
    return floats * DTYPES[dtype].itemsize / 2**20


@dataclass
class Inputs:
    x: torch.Tensor
    weight: torch.Tensor         # (K, C_out, C_in / groups, k, k)
    attn: torch.Tensor           # (B, K)
    static_weight: torch.Tensor  # (C_out, C_in / groups, k, k) for the static conv
    grad_out: torch.Tensor

    def leaves(self):
        return (self.x, self.weight, self.attn, self.static_weight)


def make_inputs(shape: ConvShape, num_kernels: int = NUM_KERNELS, dtype=torch.float32,
                requires_grad: bool = False, seed: int = 0, device: str = "cpu") -> Inputs:
    """Random inputs for one shape on ``device``; leaves require grad when ``requires_grad``."""
    gen = torch.Generator().manual_seed(seed)
    k = shape.kernel
    w_shape = (shape.out_channels, shape.in_channels // shape.groups, k, k)
    x = torch.randn(shape.batch, shape.in_channels, shape.size, shape.size, generator=gen, dtype=dtype)
    weight = torch.randn(num_kernels, *w_shape, generator=gen, dtype=dtype) * 0.05
    attn = torch.softmax(torch.randn(shape.batch, num_kernels, generator=gen, dtype=dtype), dim=1)
    static_weight = weight[0].clone()
    grad_out = torch.randn(shape.batch, shape.out_channels, shape.out_size, shape.out_size, generator=gen,
                           dtype=dtype)
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

    def __init__(self, provider: str, shape: ConvShape, mode: str, num_kernels: int = NUM_KERNELS,
                 dtype: str = TARGET_DTYPE):
        if mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, got {mode!r}")
        if provider not in PROVIDERS:
            raise ValueError(f"expected provider in {tuple(PROVIDERS)}, got {provider!r}")
        if dtype not in DTYPES:
            raise ValueError(f"expected dtype in {tuple(DTYPES)}, got {dtype!r}")
        self.fn = PROVIDERS[provider]
        self.mode = mode
        self.conv = shape.conv_args
        self.inputs = make_inputs(shape, num_kernels, DTYPES[dtype], requires_grad=(mode == "fwd+bwd"))

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


def _measure_peak_here(provider: str, shape: ConvShape, mode: str, dtype: str = TARGET_DTYPE) -> int:
    """Peak resident bytes one step adds on top of its inputs (run in a fresh process)."""
    step = Step(provider, shape, mode, dtype=dtype)
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


def peak_memory_bytes(provider: str, shape: ConvShape, mode: str, dtype: str = TARGET_DTYPE) -> Optional[int]:
    """Peak memory of one step in a subprocess; None where /proc is unavailable."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-m", "chanflex_kernels.bench", "--peak-memory-of",
                           provider, shape.id, mode, dtype], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak memory of {provider} on {shape.id} ({mode}) failed:\n{done.stderr}")
    return int(done.stdout.strip().splitlines()[-1])


# Peaks are read from the resident set, in pages, and malloc reuses freed pages: a static conv whose step
# needs less than this (batch-1 inference on small planes) can read as 0 MB, and a ratio to it means nothing.
MEMORY_RESOLUTION_MB = 0.5


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
    dtype: str = TARGET_DTYPE  # every provider's tensors (runs saved before --dtype were float32)

    @property
    def ours_over_static(self) -> float:
        return self.chanflex_ms / self.static_ms

    @property
    def peer_over_ours(self) -> float:
        return self.best_peer_ms / self.chanflex_ms

    @property
    def memory_ratio(self) -> Optional[float]:
        """chanflex's peak over the static conv's; None unmeasured or where the static peak is below resolution."""
        if self.static_peak_mb is None or self.chanflex_peak_mb is None:
            return None
        if self.static_peak_mb < MEMORY_RESOLUTION_MB:
            return None
        return self.chanflex_peak_mb / self.static_peak_mb


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
            repeats: int = 5, memory: bool = True, progress: Optional[Callable[[str], None]] = None,
            dtype: str = TARGET_DTYPE) -> List[Row]:
    """Time static, chanflex and peers (and peak memory of static and chanflex) per shape and mode."""
    rows = []
    for shape in shapes:
        for mode in modes:
            steps = {p: Step(p, shape, mode, dtype=dtype) for p in ("static", "chanflex", *peers)}
            before = cpu_round_trip_ns()
            ms = time_interleaved(steps, repeats=repeats)
            after = cpu_round_trip_ns()
            del steps
            best = min(peers, key=ms.get) if peers else "static"
            row = Row(shape.id, mode, ms["static"], ms["chanflex"], best, ms[best], round_trip_ns=(before, after),
                      dtype=dtype)
            if memory:
                mb = {p: peak_memory_bytes(p, shape, mode, dtype) for p in ("static", "chanflex")}
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
        mem = (["-", "-", "-"] if r.static_peak_mb is None or r.chanflex_peak_mb is None else
               [f"{r.static_peak_mb:.1f}", f"{r.chanflex_peak_mb:.1f}",
                "-" if r.memory_ratio is None else f"{r.memory_ratio:.2f}"])
        trip = "-" if r.round_trip_ns is None else "/".join(f"{ns:.0f}" for ns in r.round_trip_ns)
        lines.append("| " + " | ".join([r.shape, r.mode, f"{r.static_ms:.1f}", f"{r.chanflex_ms:.1f}",
                                        f"{r.ours_over_static:.2f}", r.best_peer, f"{r.best_peer_ms:.1f}",
                                        f"{r.peer_over_ours:.2f}", *mem, trip]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The acceptance targets (SPEC section 8, CPU) and the check of a run's rows.

TARGET_BATCH = 32  # the CPU targets are set at batch 32 (in TARGET_DTYPE, K = 4)
FULL_REPEATS, QUICK_REPEATS = 5, 3  # timed runs per provider (median) of the full and the --quick run


@dataclass(frozen=True)
class Target:
    """One CPU target: a Row measure (a property of Row) held to a bound on some rows."""

    label: str
    measure: str                       # "ours_over_static", "peer_over_ours" or "memory_ratio"
    bound: float
    at_most: bool                      # True: value <= bound; False: value >= bound
    modes: Tuple[str, ...] = MODES
    layers: Optional[Tuple[str, ...]] = None  # shape names it applies to; None: every shape
    # The least value any implementation can reach on a row (None where unknown), shown beside misses.
    floor: Optional[Callable[["Row"], Optional[float]]] = None

    def applies_to(self, row: "Row") -> bool:
        name, batch = shape_name_and_batch(row.shape)
        return (batch == TARGET_BATCH and row.dtype == TARGET_DTYPE and row.mode in self.modes
                and name in TARGET_LAYERS and (self.layers is None or name in self.layers))

    def met(self, value: float) -> bool:
        return value <= self.bound if self.at_most else value >= self.bound


def memory_floor_ratio(row: "Row") -> Optional[float]:
    """fwd_bwd_floor_mb over the static conv's peak, for rows of the benchmark's shapes."""
    try:
        shape = shape_by_id(row.shape)
    except ValueError:
        return None
    if row.static_peak_mb is None:
        return None
    return fwd_bwd_floor_mb(shape, dtype=row.dtype) / max(row.static_peak_mb, 1e-9)


TARGET_LAYERS = frozenset(s.name for s in SHAPES)  # the layers the targets are set on (not DEPTHWISE_SHAPES)
CPU_TARGETS = (
    Target("fwd+bwd chanflex/static <= 1.5", "ours_over_static", 1.5, True, modes=("fwd+bwd",)),
    Target("fwd chanflex/static <= 1.3", "ours_over_static", 1.3, True, modes=("fwd",)),
    Target("best peer/chanflex >= 2 at 256@14 and 512@7 (fwd, fwd+bwd)", "peer_over_ours", 2.0, False,
           layers=("resnet18.layer3", "resnet18.layer4")),
    Target("peak memory fwd+bwd chanflex/static <= 1.5", "memory_ratio", 1.5, True, modes=("fwd+bwd",),
           floor=memory_floor_ratio),
)


@dataclass
class TargetCheck:
    """How the rows of one run fared against one target."""

    target: Target
    values: List[Tuple[str, float]]  # (row label, value) of every row it applies to that has the measure
    floors: List[Optional[float]]    # target.floor of those rows (None where it has none)

    @property
    def misses(self) -> List[Tuple[str, float, Optional[float]]]:
        """(row label, value, floor) of the rows that miss."""
        return [(label, v, f) for (label, v), f in zip(self.values, self.floors) if not self.target.met(v)]

    @property
    def worst(self) -> Optional[Tuple[str, float]]:
        if not self.values:
            return None
        pick = max if self.target.at_most else min
        return pick(self.values, key=lambda lv: lv[1])


def check_targets(rows: Sequence["Row"], targets: Sequence[Target] = CPU_TARGETS) -> List[TargetCheck]:
    """Each target's values over the rows it applies to (batch-32 float32 rows; others are ignored)."""
    checks = []
    for target in targets:
        values, floors = [], []
        for row in rows:
            value = getattr(row, target.measure)
            if target.applies_to(row) and value is not None:
                name = shape_name_and_batch(row.shape)[0]
                values.append((name if len(target.modes) == 1 else f"{name} {row.mode}", value))
                floors.append(target.floor(row) if target.floor else None)
        checks.append(TargetCheck(target, values, floors))
    return checks


def targets_markdown(checks: Sequence[TargetCheck]) -> str:
    """The targets table: rows met, the worst value, the misses."""
    lines = ["| target | rows met | worst | misses (floor: the least any implementation can reach) |",
             "|---|---|---|---|"]
    for check in checks:
        if not check.values:
            lines.append(f"| {check.target.label} | no measured rows (batch {TARGET_BATCH} {TARGET_DTYPE}, its layers) "
                         f"| - | - |")
            continue
        label, value = check.worst
        misses = ", ".join(f"{name} {v:.2f}" + ("" if floor is None else f" (floor {floor:.2f})")
                           for name, v, floor in check.misses) or "-"
        met = len(check.values) - len(check.misses)
        lines.append(f"| {check.target.label} | {met} of {len(check.values)} | {value:.2f} ({label}) | {misses} |")
    return "\n".join(lines)


def load_rows(path: str) -> List["Row"]:
    """The rows a run wrote with --json."""
    with open(path) as f:
        data = json.load(f)
    names = [f.name for f in fields(Row)]
    required = [f.name for f in fields(Row) if f.default is MISSING]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of rows (written by --json), "
                         f"got {type(data).__name__}{'' if data else ' (empty)'}")
    rows = []
    for i, item in enumerate(data):
        missing = [n for n in required if not isinstance(item, dict) or n not in item]
        if missing:
            raise ValueError(f"{path}: row {i}: expected the fields {required}, missing {missing}")
        row = Row(**{k: v for k, v in item.items() if k in names})
        if row.round_trip_ns is not None:
            row.round_trip_ns = tuple(row.round_trip_ns)
        if row.dtype not in DTYPES:
            raise ValueError(f"{path}: row {i}: expected dtype in {tuple(DTYPES)}, got {row.dtype!r}")
        shape_name_and_batch(row.shape)  # raises on ids the targets and the plot cannot read
        rows.append(row)
    return rows


def dtypes_of(rows: Sequence["Row"]) -> str:
    """The rows' dtypes, in order of appearance: "float32", "bfloat16", ..."""
    return ", ".join(dict.fromkeys(r.dtype for r in rows))


def _short(name: str) -> str:
    return name.replace("resnet18.", "r18.").replace("vgg19.", "vgg.")


def plot(rows: Sequence["Row"], path: str) -> List[str]:
    """Draw the run's ratios with the targets as lines: chanflex/static, best peer/chanflex, peak memory.

    One column per shape of the run's main batch; batch-1 inference rows, if
    any, appear in the first panel as a third bar (no target there); no
    memory panel for runs without peak memory. Returns the panels' y labels.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)") from e
    batches = sorted({shape_name_and_batch(r.shape)[1] for r in rows})
    main_batch = max(batches)
    by_key = {(*shape_name_and_batch(r.shape), r.mode): r for r in rows}
    names = list(dict.fromkeys(shape_name_and_batch(r.shape)[0] for r in rows
                               if shape_name_and_batch(r.shape)[1] == main_batch))
    series = [(f"fwd, batch {main_batch}", main_batch, "fwd", "tab:blue"),
              (f"fwd+bwd, batch {main_batch}", main_batch, "fwd+bwd", "tab:orange")]
    if main_batch != 1 and 1 in batches:
        series.append(("fwd, batch 1 (no target)", 1, "fwd", "tab:gray"))
    x = list(range(len(names)))
    targeted = main_batch == TARGET_BATCH and any(n in TARGET_LAYERS for n in names)  # not --depthwise's layers
    memory = any(r.memory_ratio is not None for r in rows)  # no panel for runs with --no-memory
    fig, axes = plt.subplots(3 if memory else 2, 1, figsize=(max(8.0, 0.55 * len(names) + 2), 11 if memory else 7.5),
                             sharex=True)

    def bars(ax, measure, series_used):
        width = 0.8 / len(series_used)
        for i, (label, batch, mode, color) in enumerate(series_used):
            values = [getattr(by_key[(n, batch, mode)], measure) if (n, batch, mode) in by_key else None
                      for n in names]
            xs = [xi + (i - (len(series_used) - 1) / 2) * width for xi, v in zip(x, values) if v is not None]
            ax.bar(xs, [v for v in values if v is not None], width, label=label, color=color)

    bars(axes[0], "ours_over_static", series)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    if targeted:
        axes[0].axhline(1.3, color="tab:blue", linestyle="--", linewidth=1, label="target fwd <= 1.3")
        axes[0].axhline(1.5, color="tab:orange", linestyle="--", linewidth=1, label="target fwd+bwd <= 1.5")
    axes[0].set_ylabel("chanflex / static conv\n(lower is better)")
    bars(axes[1], "peer_over_ours", series[:2])
    axes[1].set_yscale("log")
    low, high = axes[1].get_ylim()  # plain ticks within the data's range
    axes[1].set_yticks([t for t in (0.25, 0.5, 1, 2, 3, 5, 10, 20, 50) if low <= t <= high])
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[1].set_ylim(low, high)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    if targeted:
        axes[1].axhline(2.0, color="tab:red", linestyle="--", linewidth=1,
                        label="target >= 2 at r18.layer3 (256@14), r18.layer4 (512@7)")
    axes[1].set_ylabel("best peer / chanflex\n(higher is better, log)")
    if memory:
        bars(axes[2], "memory_ratio", series[1:2])
        floors = [(xi, memory_floor_ratio(by_key[(n, main_batch, "fwd+bwd")])) for xi, n in zip(x, names)
                  if (n, main_batch, "fwd+bwd") in by_key]
        floors = [(xi, f) for xi, f in floors if f is not None]
        if floors:
            axes[2].scatter([xi for xi, _ in floors], [f for _, f in floors], marker="_", s=300, color="black",
                            zorder=3, label="floor: output + grad_x + the K kernels' gradient")
        axes[2].axhline(1.0, color="black", linewidth=0.8)
        if targeted:
            axes[2].axhline(1.5, color="tab:red", linestyle="--", linewidth=1, label="target <= 1.5")
        axes[2].set_ylabel("peak memory fwd+bwd\nchanflex / static")
    axes[-1].set_xticks(x, [_short(n) for n in names], rotation=60, ha="right")
    for ax in axes:
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"dynamic_conv2d (K={NUM_KERNELS}, {dtypes_of(rows)}) on the CPU against a static conv and the peers")
    fig.tight_layout()
    image_format = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, format=image_format, dpi=110), binary=True)
    plt.close(fig)
    return [ax.get_ylabel() for ax in axes]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def report(rows: Sequence[Row], header: str, plot_path: Optional[str] = None, caveat: str = "") -> None:
    """Print the ratio table and the targets check (beside a caveat on how the rows were measured, if
    any); draw the plot if asked."""
    print(header)
    print(markdown(rows))
    print(f"\nTargets (SPEC section 8; CPU, batch {TARGET_BATCH} {TARGET_DTYPE}; the rows above{caveat}):")
    print(targets_markdown(check_targets(rows)))
    if plot_path:
        plot(rows, plot_path)
        print(f"\nplot: {plot_path}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"ResNet18's four 3x3 stage convs, the batch_as_groups peer, {QUICK_REPEATS} repeats")
    parser.add_argument("--shapes", metavar="NAMES",
                        help="only these layers, comma-separated (e.g. resnet18.layer3,resnet18.layer4)")
    parser.add_argument("--depthwise", action="store_true",
                        help="MobileNetV2's depthwise convs instead (groups = channels; no targets apply)")
    parser.add_argument("--batch", type=_positive_int, default=TARGET_BATCH,
                        help=f"batch size of every shape (default {TARGET_BATCH}, where the targets are set)")
    parser.add_argument("--batch1", action="store_true", help="also batch-1 inference (fwd) of every shape")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=TARGET_DTYPE,
                        help=f"every provider's tensors (default {TARGET_DTYPE}, where the targets are set; "
                             f"bfloat16 and float16 are what torch.autocast runs)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--repeats", type=_positive_int, default=None, help="timed runs per provider (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the ratios and the targets (PNG, needs matplotlib)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="report the rows a run wrote with --json (table, targets, --plot) without measuring")
    parser.add_argument("--peak-memory-of", nargs=4, metavar=("PROVIDER", "SHAPE_ID", "MODE", "DTYPE"),
                        help=argparse.SUPPRESS)  # internal: one measurement, in its own process
    args = parser.parse_args(argv)
    if args.peak_memory_of:
        provider, shape_id, mode, dtype = args.peak_memory_of
        print(_measure_peak_here(provider, shape_by_id(shape_id), mode, dtype))
        return
    if args.from_json:
        options = ("quick", "shapes", "depthwise", "batch1", "no_memory", "repeats", "json")
        measuring = [f"--{n.replace('_', '-')}" for n in options if getattr(args, n) not in (False, None)]
        measuring += ["--batch"] if args.batch != TARGET_BATCH else []
        measuring += ["--dtype"] if args.dtype != TARGET_DTYPE else []
        if measuring:
            parser.error(f"--from-json reports a saved run; it takes only --plot, got {' '.join(measuring)}")
        try:
            rows = load_rows(args.from_json)
        except (OSError, ValueError) as e:
            parser.error(str(e))
        report(rows, f"rows of {args.from_json} ({dtypes_of(rows)})", args.plot)
        return
    if sum((args.quick, args.shapes is not None, args.depthwise)) > 1:
        parser.error("--quick, --shapes and --depthwise each pick the layers: pass one of them")
    try:
        chosen = (select_shapes(args.shapes) if args.shapes is not None else QUICK_SHAPES if args.quick
                  else DEPTHWISE_SHAPES if args.depthwise else SHAPES)
    except ValueError as e:
        parser.error(f"--shapes: {e}")
    shapes = [s.at_batch(args.batch) for s in chosen]
    peers = ("batch_as_groups",) if args.quick else PEERS
    repeats = args.repeats or (QUICK_REPEATS if args.quick else FULL_REPEATS)
    jobs = [(shapes, MODES)] + ([([s.at_batch(1) for s in shapes], ("fwd",))] if args.batch1 else [])
    rows = []
    with tqdm(total=sum(len(s) * len(m) for s, m in jobs), desc="benchmark", leave=False) as bar:
        def progress(what):
            bar.set_postfix_str(what)
            bar.update()
        for job_shapes, modes in jobs:
            rows += measure(job_shapes, modes, peers, repeats, memory=not args.no_memory, progress=progress,
                            dtype=args.dtype)
    if args.json:  # written first, whole or not at all: a failed plot must not lose the measurements
        atomic_write(args.json, lambda f: json.dump([asdict(r) for r in rows], f, indent=1))
    # --quick's check reads fewer repeats and one peer: say so beside it.
    caveat = (f"; --quick: {repeats} repeat{'s' * (repeats != 1)} and one peer, the full run "
              f"{FULL_REPEATS} and {len(PEERS)}")
    report(rows, f"{machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
                 f"K={NUM_KERNELS}, median of {repeats} interleaved runs; chanflex/static: lower is better, "
                 f"peer/chanflex: higher is better; CPU round trip: a cache line between the first two CPUs "
                 f"before/after the row's timing (ns; on the development VM 60-90 near, 330-600 far apart)",
           args.plot, caveat=caveat if args.quick else "")


if __name__ == "__main__":
    main()
