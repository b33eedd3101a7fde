"""Cost report: parameters and per-image FLOPs of every registered model.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` on one image
(batch 1), so they are per image, and every matmul is counted: convolutions,
Linear layers, the attention matmuls (scaled_dot_product_attention runs its
math path, two bmm, under the counter) and the chanflex ops through the FLOP
formula registered in ``chanflex_kernels.ops`` (conv plus kernel mixing).
The model runs on the meta device: only shapes flow, so the report is instant
and needs no memory for the large ones. 1 multiply-add = 2 FLOPs.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from .registry import create, list_models, model_info


@dataclasses.dataclass
class CostRow:
    model: str
    task: int
    seed: str
    params: int
    expected_params: Optional[int]
    input: Tuple[int, int, int]
    gflops: float          # per image, all operations counted
    conv_gflops: float     # aten convolutions
    dynamic_gflops: float  # chanflex ops (dynamic / per-sample convs, mixing included)
    attention_gflops: float  # attention matmuls (bmm)
    linear_gflops: float   # Linear layers (addmm / mm)


def parse_input(text: str) -> Tuple[int, int, int]:
    """'3x84x84' -> (3, 84, 84)."""
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"expected an input shape like 3x84x84 (C x H x W), got {text!r}")
    return shape  # type: ignore[return-value]


def _gflops(counts: Dict, names: Sequence[str]) -> float:
    return sum(v for k, v in counts.items() if str(k).split(".")[-1] in names or str(k) in names) / 1e9


def profile_model(name: str, input_shape: Tuple[int, int, int] = (3, 84, 84), num_classes: int = 50,
                  **options) -> CostRow:
    """Parameters and per-image FLOPs of one model; fixed-size models use their own input size."""
    info = model_info(name)
    channels, height, width = input_shape
    if info.input_size is not None:
        height, width = info.input_size
    params = sum(p.numel() for p in create(name, num_classes, **options).parameters() if p.requires_grad)
    with torch.device("meta"):
        model = create(name, num_classes, **options).eval()
        x = torch.empty(1, channels, height, width)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return CostRow(
        model=name, task=info.task, seed=info.seed, params=params, expected_params=info.params,
        input=(channels, height, width), gflops=counter.get_total_flops() / 1e9,
        conv_gflops=_gflops(counts, ["aten.convolution", "aten._convolution"]),
        dynamic_gflops=_gflops(counts, ["chanflex.dynamic_conv2d"]),
        attention_gflops=_gflops(counts, ["aten.bmm"]),
        linear_gflops=_gflops(counts, ["aten.addmm", "aten.mm"]),
    )


def profile_models(names: Optional[Sequence[str]] = None, input_shape=(3, 84, 84), progress: bool = True
                   ) -> List[CostRow]:
    names = list(names) if names else list_models()
    from tqdm.auto import tqdm

    return [profile_model(n, input_shape) for n in tqdm(names, desc="profiling", disable=not progress, leave=False)]


def to_markdown(rows: Sequence[CostRow]) -> str:
    lines = ["| model | task | seed | params | MODELS.md | input | GFLOPs/image | conv | dynamic conv | "
             "attention matmuls | linear |",
             "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        expected = "—" if r.expected_params is None else ("✓" if r.expected_params == r.params
                                                          else f"✗ {r.expected_params:,}")
        lines.append(f"| {r.model} | {r.task} | {r.seed} | {r.params:,} | {expected} | {'x'.join(map(str, r.input))} "
                     f"| {r.gflops:.3f} | {r.conv_gflops:.3f} | {r.dynamic_gflops:.3f} | {r.attention_gflops:.3f} "
                     f"| {r.linear_gflops:.3f} |")
    return "\n".join(lines) + ("\n\nPer image (batch 1), 1 multiply-add = 2 FLOPs; columns after GFLOPs/image are "
                               "its parts (BN, pooling and activations make up the rest).")
