"""CUDA C++ kernels (csrc/cuda/): output and every gradient vs the float64 reference.

Without a GPU, chanflex::dynamic_conv2d_cuda on CPU tensors runs the kernels'
block programs in their host emulation (csrc/cuda/host_emulation.cpp): the
same source, block by block, each phase's threads one after another. Each
case runs with the threads in both orders, so a phase that reads what another
thread of the same phase writes (a missing __syncthreads) shows, and with the
outputs poisoned (NaN), so an element no block writes shows. With a GPU and a
CUDA build the GPU tests run the compiled kernels through backend 'cuda'.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

import chanflex_kernels
from chanflex_kernels import backends, dynamic_conv2d, per_sample_conv2d, use_backend
from comparison import Case, assert_close_scaled, assert_matches_reference, make_inputs
from test_op import EDGE_CASES, random_cases

GPU = torch.cuda.is_available() and backends.cuda_kernels_built()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU and the CUDA C++ kernels built")
TILE = 64  # block_programs.h: BM = BN = 64, BK = 16; weight program: 4 kernels a pass


@pytest.fixture(autouse=True)
def emulation():
    """Poisoned outputs, threads in order, a device of 4 resident blocks; tests change these."""
    torch.ops.chanflex.set_cuda_emulation(False, 4, True)
    yield
    torch.ops.chanflex.set_cuda_emulation(False, 4, False)


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def cuda_kernels(x, weight, attn, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """dynamic_conv2d through the CUDA C++ kernels: compiled on CUDA tensors, emulated on CPU ones."""
    if x.is_cuda:
        with use_backend("cuda"):
            return dynamic_conv2d(x, weight, attn, bias, stride, padding, dilation, groups)
    return torch.ops.chanflex.dynamic_conv2d_cuda(x, weight, attn, bias, _pair(stride), _pair(padding),
                                                  _pair(dilation), groups)


CASES = EDGE_CASES + random_cases(8, seed=2026)


@pytest.mark.parametrize("reverse_threads", [False, True], ids=["threads-forward", "threads-reversed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_emulated_kernels_match_reference(case, reverse_threads):
    torch.ops.chanflex.set_cuda_emulation(reverse_threads, 4, True)
    assert_matches_reference(cuda_kernels, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(3, 8, 8, 10, 10, padding=(1, 1)),
                                  Case(4, 6, 9, 9, 7, stride=(2, 2), groups=3, layout="channels_last")],
                         ids=lambda c: c.id)
def test_emulated_dtypes(case, dtype):
    assert_matches_reference(cuda_kernels, case, dtype)


# Each crosses a tile edge: output channels (M of the forward and weight programs), input channels
# (M of grad_x), the reduction C_in/groups * kh * kw, output and input pixels, and the weight
# program's kernel passes (K > 4) and batch splits (resident_blocks).
TILE_EDGE_CASES = [
    (Case(2, 3, TILE + 1, 5, 5, padding=(1, 1)), {}),
    (Case(2, TILE + 3, 2, 4, 4, kernel=(1, 1)), {}),
    (Case(2, 8, 3, 9, 8, padding=(1, 1), num_kernels=9), {}),                # (8*9 = 72 > 64 columns, 72 > 64 pixels)
    (Case(3, 2, 5, 11, 12, padding=(1, 1), stride=(2, 1), num_kernels=5), {}),
    (Case(9, 4, 6, 5, 5, padding=(1, 1)), {"resident_blocks": 1}),           # one split
    (Case(9, 4, 6, 5, 5, padding=(1, 1)), {"resident_blocks": 3}),           # splits of 3, 3, 3
    (Case(10, 4, 6, 5, 5, padding=(1, 1)), {"resident_blocks": 100}),        # most splits: 4, 4, 2 samples
    (Case(25, 4, 6, 5, 5, padding=(1, 1)), {"resident_blocks": 6}),          # 6 splits asked: slices of 5 samples
    (Case(2, 2 * TILE + 2, 2 * TILE + 2, 3, 3, groups=2, padding=(1, 1), num_kernels=2), {}),
]


@pytest.mark.parametrize("case,settings", TILE_EDGE_CASES, ids=lambda v: v.id if isinstance(v, Case) else
                         "-".join(f"{k}{v}" for k, v in v.items()) or "default")
def test_emulated_tile_boundaries(case, settings):
    torch.ops.chanflex.set_cuda_emulation(False, settings.get("resident_blocks", 4), True)
    assert_matches_reference(cuda_kernels, case, torch.float32)


def test_per_sample_kernels_take_several_passes():
    """per_sample_conv2d's K = B = 11 kernels: the weight program runs 3 passes of 4 kernels."""
    case = Case(11, 3, 5, 6, 6, padding=(1, 1), num_kernels=11)
    x, weight, _, bias = make_inputs(case)
    identity = torch.eye(11, dtype=torch.float64)
    assert_matches_reference(cuda_kernels, case, torch.float32, inputs=(x, weight, identity, bias))


@pytest.mark.parametrize("mask", [(True, False, False, False), (False, True, False, False),
                                  (False, False, True, False), (False, False, False, True),
                                  (False, True, True, True)], ids=str)
def test_only_requested_gradients(mask):
    """Each gradient alone equals the one computed with all four; the others come back empty."""
    x, weight, attn, bias = (t.float() for t in make_inputs(Case(3, 4, 5, 7, 7)))
    args = ([1, 1], [1, 1], [1, 1], 1)
    grad_out = torch.randn(3, 5, 7, 7)
    full = torch.ops.chanflex.dynamic_conv2d_backward_cuda(grad_out, x, weight, attn, bias, *args, [True] * 4)
    some = torch.ops.chanflex.dynamic_conv2d_backward_cuda(grad_out, x, weight, attn, bias, *args, list(mask))
    for name, want, f, s in zip(("x", "weight", "attn", "bias"), mask, full, some):
        if want:
            torch.testing.assert_close(s, f, msg=lambda m: f"grad of {name}: {m}")
        else:
            assert s.numel() == 0, f"grad of {name} was not requested, got shape {tuple(s.shape)}"


def test_gradcheck_and_double_backward():
    """Tiny float64 gradcheck and gradgradcheck through the op's registered autograd."""
    x, weight, attn, bias = (t.requires_grad_() for t in make_inputs(Case(2, 2, 3, 4, 4, num_kernels=2)))

    def fn(*tensors):
        return cuda_kernels(*tensors, stride=1, padding=1)

    assert torch.autograd.gradcheck(fn, (x, weight, attn, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, attn, bias))


def test_opcheck():
    """Schema, autograd registration, fake kernels and AOT dispatch of both ops (on the host emulation)."""
    x, weight, attn, bias = (t.float() for t in make_inputs(Case(2, 4, 6, 5, 5, padding=(1, 1))))
    conv_args = ([1, 1], [1, 1], [1, 1], 1)
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d_cuda.default, (x, weight, attn, bias, *conv_args))
    grad_out = torch.randn(2, 6, 5, 5)
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d_backward_cuda.default,
                          (grad_out, x, weight, attn, bias, *conv_args, [True, True, True, True]))


def test_backward_checks_grad_out():
    x, weight, attn, bias = (t.float() for t in make_inputs(Case(2, 4, 6, 5, 5)))
    with pytest.raises(RuntimeError, match=r"expected grad_out of shape \(2, 6, 3, 3\), got \[2, 6, 5, 5\]"):
        torch.ops.chanflex.dynamic_conv2d_backward_cuda(torch.zeros(2, 6, 5, 5), x, weight, attn, bias, [1, 1],
                                                        [0, 0], [1, 1], 1, [True] * 4)
    with pytest.raises(RuntimeError, match="expected grad_out with dtype Float on cpu, got Double on cpu"):
        torch.ops.chanflex.dynamic_conv2d_backward_cuda(torch.zeros(2, 6, 3, 3, dtype=torch.float64), x, weight,
                                                        attn, bias, [1, 1], [0, 0], [1, 1], 1, [True] * 4)


def test_emulation_settings_are_checked():
    with pytest.raises(RuntimeError, match="expected resident_blocks >= 1, got 0"):
        torch.ops.chanflex.set_cuda_emulation(False, 0, False)


def test_backend_cuda_refuses_cpu_tensors():
    x, weight, attn, bias = (t.float() for t in make_inputs(Case(1, 2, 2, 4, 4)))
    with use_backend("cuda"), pytest.raises(ValueError, match="backend 'cuda' runs CUDA tensors, got x on cpu"):
        dynamic_conv2d(x, weight, attn, bias)
    assert "cuda" in chanflex_kernels.BACKENDS


def test_built_where_the_toolchain_allows():
    """setup.py compiles the CUDA kernels when torch has CUDA and an nvcc of its major version is found."""
    nvcc = shutil.which("nvcc")
    if torch.version.cuda is None or nvcc is None or os.environ.get("CHANFLEX_SKIP_CUDA") == "1":
        pytest.skip("torch without CUDA, no nvcc on PATH or CHANFLEX_SKIP_CUDA=1: a CPU-only build is expected")
    release = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    if release is None or release.group(1) != torch.version.cuda.split(".")[0]:
        pytest.skip(f"nvcc is not CUDA {torch.version.cuda.split('.')[0]}.x as torch: a CPU-only build is expected")
    assert backends.cuda_kernels_built(), "torch has CUDA and a matching nvcc is on PATH, yet the CUDA kernels were not built"


@needs_gpu
@pytest.mark.parametrize("case", EDGE_CASES + random_cases(4, seed=7), ids=lambda c: c.id)
def test_gpu_matches_reference(case):
    assert_matches_reference(cuda_kernels, case, torch.float32, device="cuda")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_gpu_dtypes(dtype):
    assert_matches_reference(cuda_kernels, Case(4, 6, 9, 9, 7, stride=(2, 2), padding=(1, 1), groups=3), dtype,
                             device="cuda")


@needs_gpu
def test_gpu_matches_emulation_on_a_resnet_layer():
    """A ResNet18 layer2 conv at batch 8: the GPU's result equals the host emulation's."""
    case = Case(8, 128, 128, 28, 28, padding=(1, 1))
    x, weight, attn, bias = (t.float() for t in make_inputs(case))
    on_gpu = cuda_kernels(*(t.cuda() for t in (x, weight, attn, bias)), padding=1).cpu()
    on_host = cuda_kernels(x, weight, attn, bias, padding=1)
    assert_close_scaled(on_gpu, on_host.double(), torch.float32, "output")


@needs_gpu
def test_gpu_per_sample_conv2d():
    x = torch.randn(5, 3, 8, 8, device="cuda")
    w = torch.randn(5, 4, 3, 3, 3, device="cuda")
    with use_backend("cuda"):
        y = per_sample_conv2d(x, w, padding=1)
    expected = torch.cat([torch.nn.functional.conv2d(x[i:i + 1], w[i], padding=1) for i in range(5)])
    assert_close_scaled(y.cpu(), expected.cpu().double(), torch.float32, "output")


@needs_gpu
def test_gpu_weight_gradient_is_deterministic():
    """A ResNet18 layer1 conv at batch 32 has 9 weight tiles, so its samples split over several blocks
    (launch.h); the slabs are summed in a fixed order, so two backward passes give the same bits."""
    case = Case(32, 64, 64, 56, 56, padding=(1, 1))
    x, weight, attn, bias = (t.detach().float().cuda().requires_grad_() for t in make_inputs(case))
    grads = []
    for _ in range(2):
        y = cuda_kernels(x, weight, attn, bias, padding=1)
        grads.append(torch.autograd.grad(y, (weight, attn), torch.ones_like(y)))
    assert all(torch.equal(a, b) for a, b in zip(*grads))
