"""GPU benchmark: the Triton backend vs cuDNN's static conv (the floor) vs the peers.

    python -m chanflex_kernels.bench_gpu            # ResNet18 convs, batch 64, bf16 and fp32, fwd and fwd+bwd
    python -m chanflex_kernels.bench_gpu --quick    # the four 3x3 stage convs, bf16
    make bench-gpu                                  # the same as the first line, after set-up

Times are medians of ``triton.testing.do_bench`` (CUDA events, after warm-up;
the first call of each shape autotunes the Triton kernels). Providers: static
(cuDNN ``F.conv2d`` with one kernel), triton, cuda (the CUDA C++ kernels, when
the extension was built with them) and batch_as_groups (the trick public
DY-CNN code uses). Shapes and inputs come from ``chanflex_kernels.bench``.
Targets (SPEC section 8, bf16): triton/static <= 1.2 fwd, <= 1.5 fwd+bwd.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .backends import cuda_kernels_built, use_backend
from .bench import MODES, NUM_KERNELS, QUICK_SHAPES, RESNET18_SHAPES, ConvShape, dynamic_provider, make_inputs, \
    static_provider
from .files import atomic_write
from .ops import dynamic_conv2d
from .reference import dynamic_conv2d_grouped

BATCH = 64
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGETS = {"fwd": 1.2, "fwd+bwd": 1.5}  # triton/static, bf16


def _triton_conv(*args, **kwargs):
    with use_backend("triton"):
        return dynamic_conv2d(*args, **kwargs)


def _compiled_cuda_conv(*args, **kwargs):
    with use_backend("cuda"):
        return dynamic_conv2d(*args, **kwargs)


def providers() -> Dict[str, Callable]:
    """provider name -> f(inputs, conv_args); 'cuda' only when CUDA C++ kernels are compiled in."""
    table = {"static": static_provider, "triton": dynamic_provider(_triton_conv),
             "batch_as_groups": dynamic_provider(dynamic_conv2d_grouped)}
    if cuda_kernels_built():
        table["cuda"] = dynamic_provider(_compiled_cuda_conv)
    return table


def gpu_step(provider: str, shape: ConvShape, dtype: torch.dtype, mode: str,
             device: str = "cuda") -> Callable[[], None]:
    """One forward (or forward+backward) of ``provider`` on ``device`` inputs, as a callable."""
    fn = providers()[provider]
    inputs = make_inputs(shape, NUM_KERNELS, dtype, requires_grad=(mode == "fwd+bwd"), device=device)
    conv = shape.conv_args

    def step():
        if mode == "fwd":
            with torch.no_grad():
                fn(inputs, conv)
            return
        for t in inputs.leaves():
            t.grad = None
        fn(inputs, conv).backward(inputs.grad_out)

    return step


@dataclass
class GpuRow:
    shape: str
    dtype: str
    mode: str
    ms: Dict[str, float]

    def ratio(self, provider: str) -> float:
        return self.ms[provider] / self.ms["static"]


def measure(shapes: Sequence[ConvShape], dtypes: Sequence[str], modes: Sequence[str] = MODES,
            progress: Optional[Callable[[str], None]] = None) -> List[GpuRow]:
    import triton.testing

    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for mode in modes:
                ms = {}
                for provider in providers():
                    step = gpu_step(provider, shape, DTYPES[dtype], mode)
                    step()  # autotunes the Triton kernels for this shape
                    ms[provider] = triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
                rows.append(GpuRow(shape.id, dtype, mode, ms))
                if progress:
                    progress(f"{shape.id} {dtype} {mode}")
    return rows


def markdown(rows: Sequence[GpuRow]) -> str:
    names = [p for p in rows[0].ms if p != "static"] if rows else []
    header = ["shape", "dtype", "mode", "static ms"] + [f"{p} ms" for p in names] + \
             [f"{p}/static" for p in names] + ["batch_as_groups/triton", "target met"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        target = TARGETS[r.mode] if r.dtype == "bf16" else None
        met = "-" if target is None else ("yes" if r.ratio("triton") <= target else f"no (> {target})")
        cells = [r.shape, r.dtype, r.mode, f"{r.ms['static']:.3f}"] + [f"{r.ms[p]:.3f}" for p in names] + \
                [f"{r.ratio(p):.2f}" for p in names] + [f"{r.ms['batch_as_groups'] / r.ms['triton']:.2f}", met]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the four 3x3 stage convs, bf16 only")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device; the CPU benchmark is python -m chanflex_kernels.bench")
    from .triton import launch

    if launch.interpreting():
        raise SystemExit("bench_gpu: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels")
    shapes = [s.at_batch(BATCH) for s in (QUICK_SHAPES if args.quick else RESNET18_SHAPES)]
    dtypes = ["bf16"] if args.quick else list(DTYPES)
    rows = measure(shapes, dtypes, progress=lambda what: print(f"  measured {what}", flush=True))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, K={NUM_KERNELS}, batch {BATCH}, "
          f"do_bench medians; x/static: lower is better; TF32 for fp32 convs: {torch.backends.cudnn.allow_tf32}")
    print(markdown(rows))
    if args.json:
        atomic_write(args.json, lambda f: json.dump([asdict(r) for r in rows], f, indent=1))


if __name__ == "__main__":
    main()
