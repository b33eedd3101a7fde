"""Host side of the Triton backend: tile choices, workspaces and kernel launches.

On a GPU the GEMM kernels are autotuned over the configs below (tiles for
Ampere's 164 KB and Hopper's 228 KB of shared memory; the autotuner keeps the
fastest per shape and dtype). Under ``TRITON_INTERPRET=1`` (CPU tensors) one
small fixed tiling runs instead, since autotuning an interpreter only costs
time. ``TILING_OVERRIDE`` forces a tiling on any device: tests set it to put
tile boundaries where they want them.

Every launch goes through ``torch.library.wrap_triton`` so that
``torch.compile`` sees the kernels inside the ``chanflex::*_triton`` ops.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
from torch.library import wrap_triton

from .kernels import (_dynconv_bwd_bias_kernel, _dynconv_bwd_data_kernel, _dynconv_bwd_weight_kernel,
                      _dynconv_fwd_kernel)

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Fixed tile sizes, used instead of autotuning (interpreter and tests).

    gemm_*: the forward and backward-data implicit GEMMs (pixels x channels x reduction channels).
    wgrad_*: backward-weight (output channels x input channels x pixels).
    num_slices: how many sample slices backward-weight splits the batch into
    (None: choose from the machine); each slice writes its own partial dW.
    """

    gemm_m: int = 16
    gemm_n: int = 16
    gemm_k: int = 16
    wgrad_o: int = 16
    wgrad_c: int = 16
    wgrad_p: int = 16
    num_slices: Optional[int] = None

    def __post_init__(self):
        if self.wgrad_o % 16 or self.wgrad_c % 16:
            raise ValueError(f"Tiling: expected wgrad_o and wgrad_c to be multiples of 16 (the dattn row "
                             f"granule), got {self.wgrad_o} and {self.wgrad_c}")


# Big enough that the interpreter runs few programs, small enough that test shapes cross tile edges.
INTERPRETER_TILING = Tiling(gemm_m=64, gemm_n=32, gemm_k=32, wgrad_o=32, wgrad_c=32, wgrad_p=64)
TILING_OVERRIDE: Optional[Tiling] = None


# Tests set this: every buffer a kernel must fill starts as NaN, so a missed element shows.
POISON_OUTPUTS = False


def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer for a kernel to fill completely (NaN-filled under POISON_OUTPUTS)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _tiling() -> Optional[Tiling]:
    """The fixed tiling to launch with, or None to autotune."""
    if TILING_OVERRIDE is not None:
        return TILING_OVERRIDE
    return INTERPRETER_TILING if interpreting() else None


def _gemm_config(m, n, k, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


def _wgrad_config(o, c, p, warps, stages):
    return triton.Config({"BLOCK_O": o, "BLOCK_C": c, "BLOCK_P": p}, num_warps=warps, num_stages=stages)


# Configs for Ampere (sm_80, 164 KB shared memory) and Hopper (sm_90, 228 KB),
# chosen from `python -m chanflex_kernels.triton.compile_report`: bf16/fp16
# spill at most 32 bytes, fp32 at most 216 (sm_80, 128x128); bigger tiles
# spilled kilobytes. A config that needs more shared memory than the GPU has
# is skipped by the autotuner.
GEMM_CONFIGS = [
    _gemm_config(128, 128, 32, 8, 2),
    _gemm_config(128, 64, 32, 8, 3),
    _gemm_config(64, 128, 32, 8, 3),
    _gemm_config(64, 64, 32, 4, 3),
    _gemm_config(64, 32, 32, 4, 3),  # small layers: more programs
]
# The wgrad kernel holds (BLOCK_KMIX, BLOCK_O, BLOCK_C) fp32 accumulators, so its tiles stay smaller.
WGRAD_CONFIGS = [
    _wgrad_config(64, 32, 32, 8, 3),
    _wgrad_config(32, 32, 64, 8, 3),
    _wgrad_config(32, 64, 32, 8, 3),
    _wgrad_config(16, 32, 64, 4, 3),
    _wgrad_config(32, 16, 64, 4, 3),  # stems: few input channels per group
]
_GEMM_KEY = ["H", "W", "OH", "OW", "K", "GI", "GO", "KH", "KW"]
_fwd_tuned = triton.autotune(GEMM_CONFIGS, key=_GEMM_KEY)(_dynconv_fwd_kernel)
_bwd_data_tuned = triton.autotune(GEMM_CONFIGS, key=_GEMM_KEY)(_dynconv_bwd_data_kernel)
_bwd_weight_tuned = triton.autotune(WGRAD_CONFIGS, key=_GEMM_KEY + ["B"])(_dynconv_bwd_weight_kernel)


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """TF32 for fp32 exactly when torch lets cuDNN convs use it (on by default), as F.conv2d does."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_meta(dtype: torch.dtype, device: torch.device) -> dict:
    """DOT_PRECISION and UPCAST_DOT for the GEMM kernels (see kernels.py)."""
    return dict(DOT_PRECISION=_dot_precision(dtype, device),
                UPCAST_DOT=interpreting() and dtype == torch.bfloat16)


def _static_k(weight: torch.Tensor) -> int:
    """K when the mixing loop should be unrolled (K <= 8, the usual 2-8 kernels), else 0 (a runtime loop)."""
    return weight.shape[0] if weight.shape[0] <= 8 else 0


def _sample_span(t: torch.Tensor) -> int:
    """Largest element offset inside one sample of a (B, ...) tensor."""
    return sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def _needs_int64(*per_sample: torch.Tensor) -> bool:
    return any(_sample_span(t) >= _INT32_LIMIT for t in per_sample)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dynamic_conv2d (triton backend): expected float32, float16 or bfloat16, got {x.dtype}; "
                         f"the cpp and reference backends run float64")
    if x.device.type == "cpu" and not interpreting():
        raise ValueError("dynamic_conv2d (triton backend): got CPU tensors, which Triton runs only in its "
                         "interpreter; set TRITON_INTERPRET=1 before importing chanflex_kernels, or use a GPU")
    if weight.numel() >= _INT32_LIMIT:
        raise ValueError(f"dynamic_conv2d (triton backend): expected fewer than 2**31 weight elements, "
                         f"got {weight.numel()} ({tuple(weight.shape)})")


def _geometry(x, weight, stride, padding, dilation, groups):
    batch, in_channels, height, width = x.shape
    num_kernels, out_channels, group_in, kh, kw = weight.shape
    out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return dict(H=height, W=width, OH=out_h, OW=out_w, K=num_kernels, GROUPS=groups,
                GI=group_in, GO=out_channels // groups)


def _conv_scalars(stride, padding, dilation):
    return dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def _launch_gemm(tuned, kernel, args, meta, pixels: int, channels: int, samples_groups: int,
                 tiling: Optional[Tiling]) -> None:
    """Launch an implicit-GEMM kernel on grid (pixel tiles, channel tiles, samples x groups):
    autotuned when ``tiling`` is None, else with its fixed blocks."""
    if tiling is None:
        grid = lambda m: (triton.cdiv(pixels, m["BLOCK_M"]), triton.cdiv(channels, m["BLOCK_N"]), samples_groups)
        wrap_triton(tuned)[grid](*args, **meta)
    else:
        grid = (triton.cdiv(pixels, tiling.gemm_m), triton.cdiv(channels, tiling.gemm_n), samples_groups)
        wrap_triton(kernel)[grid](*args, **meta, BLOCK_M=tiling.gemm_m, BLOCK_N=tiling.gemm_n, BLOCK_K=tiling.gemm_k)


def forward(x: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor, bias: Optional[torch.Tensor],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """y (B, C_out, OH, OW) in x's dtype; arguments as chanflex::dynamic_conv2d (already validated)."""
    _check(x, weight)
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    batch, out_channels = x.shape[0], weight.shape[1]
    y = _new((batch, out_channels, geo["OH"], geo["OW"]), x.dtype, x.device)
    if y.numel() == 0:
        return y
    args = (x, weight, attn, bias if bias is not None else attn, y,
            *geo.values(), *x.stride(), *weight.stride(), *attn.stride(),
            *(bias.stride() if bias is not None else (0, 0)), *y.stride(),
            *_conv_scalars(stride, padding, dilation).values())
    meta = dict(KH=weight.shape[3], KW=weight.shape[4], STATIC_K=_static_k(weight), HAS_BIAS=bias is not None,
                INDEX_64=_needs_int64(x, y), **_dot_meta(x.dtype, x.device))
    _launch_gemm(_fwd_tuned, _dynconv_fwd_kernel, args, meta, geo["OH"] * geo["OW"], geo["GO"], batch * groups,
                 _tiling())
    return y


def _grad_x(grad_out, x, weight, attn, stride, padding, dilation, groups, tiling):
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    grad_x = _new(x.shape, x.dtype, x.device)
    args = (grad_out, weight, attn, grad_x, *geo.values(), *grad_out.stride(), *weight.stride(), *attn.stride(),
            *grad_x.stride(), *_conv_scalars(stride, padding, dilation).values())
    meta = dict(KH=weight.shape[3], KW=weight.shape[4], STATIC_K=_static_k(weight),
                INDEX_64=_needs_int64(grad_out, grad_x),
                **_dot_meta(x.dtype, x.device))
    _launch_gemm(_bwd_data_tuned, _dynconv_bwd_data_kernel, args, meta, geo["H"] * geo["W"], geo["GI"],
                 x.shape[0] * groups, tiling)
    return grad_x


def _kernel_block(num_kernels: int) -> int:
    """Kernels per wgrad program: all K up to 8 (one pass over x and dy), else chunks of 8."""
    return min(max(2, triton.next_power_of_2(num_kernels)), 8)


def _num_slices(batch, groups, tiles, kernel_chunks, weight_bytes, device, requested):
    """Sample slices for backward-weight: enough programs to fill the GPU, bounded workspace."""
    if requested is not None:
        return max(1, min(requested, batch))
    if device.type != "cuda":
        return 1  # the interpreter: fewer programs; tests force several slices through TILING_OVERRIDE
    programs = groups * tiles * kernel_chunks
    wanted = math.ceil(2 * torch.cuda.get_device_properties(device).multi_processor_count / programs)
    by_memory = max(1, (256 << 20) // max(weight_bytes, 1))  # partial dW workspace <= 256 MB
    by_grid = max(1, 65535 // (groups * kernel_chunks))
    return max(1, min(batch, wanted, by_memory, by_grid))


def _grad_weight_attn(grad_out, x, weight, attn, stride, padding, dilation, groups, need_w, need_attn, tiling):
    geo = _geometry(x, weight, stride, padding, dilation, groups)
    batch = x.shape[0]
    num_kernels, out_channels = weight.shape[:2]
    reduction = geo["GI"] * weight.shape[3] * weight.shape[4]
    block_kmix = _kernel_block(num_kernels)
    kernel_chunks = triton.cdiv(num_kernels, block_kmix)
    taps = weight.shape[3] * weight.shape[4]
    dattn_rows = groups * triton.cdiv(geo["GO"], 16) * triton.cdiv(geo["GI"], 16) * taps  # 16x16 blocks per tap
    slices = _num_slices(batch, groups, dattn_rows // groups, kernel_chunks,
                         4 * num_kernels * out_channels * reduction, x.device,
                         None if tiling is None else tiling.num_slices)
    per_slice = triton.cdiv(batch, slices)
    slices = triton.cdiv(batch, per_slice)
    # Every element of both is written by the kernel (see its docstring); unrequested ones get a dummy.
    dw_parts = _new((slices, num_kernels, out_channels, reduction) if need_w else (1,), torch.float32, x.device)
    dattn_parts = _new((dattn_rows, batch, num_kernels) if need_attn else (1,), torch.float32, x.device)
    args = (x, grad_out, weight, attn, dw_parts, dattn_parts, batch, *geo.values(), per_slice, slices,
            *x.stride(), *grad_out.stride(), *weight.stride(), *attn.stride(),
            *_conv_scalars(stride, padding, dilation).values())
    meta = dict(KH=weight.shape[3], KW=weight.shape[4], NEED_DW=need_w, NEED_DATTN=need_attn,
                INDEX_64=_needs_int64(x, grad_out), **_dot_meta(x.dtype, x.device),
                BLOCK_KMIX=block_kmix)
    z = groups * slices * kernel_chunks
    if tiling is None:
        grid = lambda m: (triton.cdiv(geo["GO"], m["BLOCK_O"]), triton.cdiv(geo["GI"], m["BLOCK_C"]) * taps, z)
        wrap_triton(_bwd_weight_tuned)[grid](*args, **meta)
    else:
        grid = (triton.cdiv(geo["GO"], tiling.wgrad_o), triton.cdiv(geo["GI"], tiling.wgrad_c) * taps, z)
        wrap_triton(_dynconv_bwd_weight_kernel)[grid](*args, **meta, BLOCK_O=tiling.wgrad_o,
                                                     BLOCK_C=tiling.wgrad_c, BLOCK_P=tiling.wgrad_p)
    grad_weight = dw_parts.sum(0).view(weight.shape) if need_w else None
    grad_attn = dattn_parts.sum(0) if need_attn else None
    return grad_weight, grad_attn


def _per_sample_bias_grad(grad_out: torch.Tensor, tiling) -> torch.Tensor:
    """(B, C_out) fp32: sum of grad_out over pixels."""
    batch, out_channels, out_h, out_w = grad_out.shape
    sums = _new((batch, out_channels), torch.float32, grad_out.device)
    block_c, block_p = (16, 16) if tiling is not None else (32, 128)
    wrap_triton(_dynconv_bwd_bias_kernel)[(batch, triton.cdiv(out_channels, block_c))](
        grad_out, sums, out_channels, out_h, out_w, *grad_out.stride(), BLOCK_C=block_c, BLOCK_P=block_p)
    return sums


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, attn: torch.Tensor,
             bias: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             groups: int, output_mask: Sequence[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_attn, grad_bias); an unrequested gradient is an empty tensor.

    Extra memory: the partial dW of each sample slice (slices x K x |W| fp32,
    at most 256 MB), the per-tile dattn shares (tiles x B x K fp32) and a
    (B, C_out) fp32 bias-gradient buffer. Never B x |W|.
    """
    _check(x, weight)
    need_x, need_w, need_attn, need_bias = output_mask
    need_bias = need_bias and bias is not None
    tiling = _tiling()
    if x.shape[0] == 0 or grad_out.numel() == 0:
        zeros = (torch.zeros_like(x), torch.zeros_like(weight), torch.zeros_like(attn),
                 torch.zeros_like(bias) if bias is not None else None)
        return tuple(z if n else x.new_empty(0) for z, n in zip(zeros, (need_x, need_w, need_attn, need_bias)))
    conv = (stride, padding, dilation, groups)
    grad_x = _grad_x(grad_out, x, weight, attn, *conv, tiling) if need_x else None
    grad_weight, grad_attn = None, None
    if need_w or need_attn:
        grad_weight, grad_attn = _grad_weight_attn(grad_out, x, weight, attn, *conv, need_w, need_attn, tiling)
    grad_bias = None
    if bias is not None and (need_bias or need_attn):
        per_sample = _per_sample_bias_grad(grad_out, tiling)  # (B, C_out) fp32
        if need_bias:
            grad_bias = attn.float().t() @ per_sample
        if need_attn:
            grad_attn = grad_attn + per_sample @ bias.float().t()
    # Unrequested gradients are distinct empty tensors: a custom op's outputs must not alias.
    return (grad_x if need_x else x.new_empty(0),
            grad_weight.to(weight.dtype) if need_w else x.new_empty(0),
            grad_attn.to(attn.dtype) if need_attn else x.new_empty(0),
            grad_bias.to(bias.dtype) if need_bias else x.new_empty(0))
