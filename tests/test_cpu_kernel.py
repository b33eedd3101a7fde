"""The fused CPU kernel's own paths: weight tiles, sample blocks, chunking, thread
counts, the 1x1 and batch-1 special cases, and its memory bound.

float32 layers with at most 256 output pixels (on AVX-512: 441 for the
forward and grad_x; 512 for the weight side there; on AVX2 kernels of
several taps take the weight side, and strided ones grad_x, on any plane
whose unfolded sample fits 16 MiB) take the packed micro-kernel paths on AVX2 and AVX-512 machines (CHANFLEX_CPU_ISA caps the instruction
set, so one AVX-512 machine tests the AVX2 and generic variants too): the forward, grad_x, and the weight side (dW and
dattn) when its 48x192 weight blocks number at least 4 per thread; larger
planes at most 256 deep (C_in/groups * kh * kw) stream their forward
through the same micro-kernel a block of output rows at a time; other
larger planes and float64 take the BLAS path; output planes of at least 441 pixels
(forward, and grad_x at stride 1; above the packed limit in float32) or 784
(weight side; float32 on AVX2 only where the packed weight side does not
run: kernels of several taps stay on it while one sample's unfolded panels
fit 16 MiB) with 16+ input channels per group run the library's conv on
chunks of samples. 3x3 stride-1 float32 convs on AVX2 and AVX-512 may take
Winograd F(2x2, 3x3) instead (forward and grad_x; by default on planes of 10x10
to 42x42, in batches of at least 4 samples and 768 output pixels,
1536 on AVX2, whose scratch fits in their activations): the direct-path tests here
switch it off (CHANFLEX_CPU_WINOGRAD=0), the Winograd ones at the end force it
on. On AVX-512 the weight side of one-group Winograd convs may run in the
transform domain too (CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD; by default on 14x14
to 21x21 planes in batches of at least 16); its tests force it on. The
packed forward skips the products of padding taps by default where
they are at least 4% of all (and grad_x of stride-1 convs runs as the
transposed conv's forward where they are 15%), which several cases here
take; the padding-skip tests force it on for both ISAs. On AVX-512, 3x3
stride-1 pad-1 convs on 5x5 and 7x7 planes take the plane kernels instead
(forward and transposed grad_x; no unfold, one call a band of output rows),
and so do the stride-2 forwards from 14x14 to 7x7, 28x28 to 14x14 and 56x56
to 28x28; on AVX2 the stride-1 ones (calls of 5 pixels),
which the padding-skip tests switch off (CHANFLEX_CPU_DIRECT_PLANES=0) and
their own tests keep on. The packed weight
side runs direct (one call per tap over the pixels whose tap reads inside
the image) by default where 4% of its products are padding; the tests at
the very end force that on for both ISAs. Depthwise convs (one input
channel per group) run on whole planes instead (depthwise.h), except
where CHANFLEX_CPU_DEPTHWISE=0, which two tests set. The cases below cover
all."""
import os
import random

import pytest
import torch

from chanflex_kernels import dynamic_conv2d
from chanflex_kernels.bench import ConvShape, peak_memory_bytes
from chanflex_kernels.reference import dynamic_conv2d_reference
from comparison import Case, assert_close_scaled, assert_matches_reference


@pytest.fixture(autouse=True)
def direct_paths(monkeypatch):
    # These tests target the direct paths, some of whose cases Winograd
    # would take by default; its own tests below set the switch themselves.
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD", "0")

# Row tiles (C_out/groups) and column tiles (C_in/groups * kh * kw) are ~64
# wide, so these cross tile boundaries at ragged offsets; batches are not
# multiples of the sample block (4).
RAGGED_COLUMN_PANEL = Case(5, 37, 40, 6, 5, padding=(1, 1), dilation=(1, 2))  # 333 cols: a ragged last column panel
PIXEL_TAIL_14 = Case(5, 24, 40, 2, 13, padding=(1, 1))  # 26 pixels: a 14-pixel AVX-512 call, 3 row panels
# 12 input channels per group: unfold blocks of 8 channels cross groups and
# start off the 8-column grid, so the weight side's transposed unfold takes
# its element-wise path (16 channels per group take the 8x8-block one).
GROUP_CROSSING_BLOCK = Case(10, 48, 400, 6, 6, padding=(1, 1), groups=4)  # 10 samples: folds of 8 and 2
TILED_CASES = [
    Case(5, 16, 130, 6, 6, padding=(1, 1)),                         # 144 cols, 130 rows
    Case(7, 32, 132, 5, 7, padding=(1, 1), groups=2, bias=False),   # per group: 144 cols, 66 rows
    Case(9, 20, 70, 5, 5, kernel=(3, 2), stride=(2, 1), padding=(1, 1), num_kernels=5),
    Case(3, 256, 256, 7, 7, padding=(1, 1), num_kernels=4),         # a ResNet18 layer4-sized weight
    Case(6, 2, 5, 9, 9, padding=(1, 1)),                            # 18 cols: samples split across threads
    Case(5, 70, 66, 6, 6, kernel=(1, 1), bias=False),               # 1x1 stride 1: unfold is the identity
    Case(5, 70, 66, 7, 7, kernel=(1, 1), stride=(2, 2)),            # 1x1 strided: packed straight from x
    Case(3, 36, 20, 9, 11, kernel=(1, 1), stride=(2, 2), groups=2),  # 5x6 pixels: a short last panel, 2 groups
    Case(3, 12, 18, 30, 30, kernel=(1, 1), stride=(2, 2), padding=(1, 1)),  # 1x1 padded, 256 pixels: not the direct pack
    Case(4, 3, 64, 23, 23, kernel=(7, 7), stride=(2, 2), padding=(3, 3)),  # a ResNet stem
    Case(3, 20, 70, 19, 18, padding=(1, 1)),                        # > 256 pixels, 180 deep: the streamed forward
    Case(3, 24, 40, 16, 16, padding=(1, 1), num_kernels=3),          # 256 pixels: the packed paths' widest planes
    RAGGED_COLUMN_PANEL,
    PIXEL_TAIL_14,
    GROUP_CROSSING_BLOCK,
    Case(3, 32, 200, 20, 20, padding=(1, 1)),                       # 400 pixels: BLAS forward, packed weight side
    # 1080-deep forward: partial sums carried over 3 (AVX-512) or 5 (AVX2)
    # reduction blocks, for 2-panel and ragged 8-row calls of 12 and 13 pixels
    # (AVX2: 6, 6, 6 and a 7-pixel last call, as on 7x7 planes).
    Case(4, 120, 40, 5, 5, padding=(1, 1)),
    # AVX-512 micro-kernels mix A themselves for 1 to 8 kernels (one
    # instantiation per count); more take the separate mixing pass.
    Case(5, 40, 70, 6, 6, padding=(1, 1), num_kernels=1),
    Case(6, 36, 72, 7, 5, padding=(1, 1), num_kernels=8),
    Case(5, 36, 50, 6, 5, padding=(1, 1), num_kernels=9),
    # Wide, shallow layers (above the packed paths' pixels, at most 256
    # deep): the streamed forward, in blocks of whole output rows.
    Case(3, 3, 64, 45, 45, kernel=(7, 7), stride=(2, 2), padding=(3, 3)),  # a stem: 23x23, blocks of 8, 8, 7 rows
    Case(5, 6, 40, 25, 23, padding=(2, 1), dilation=(2, 1), groups=2, bias=False),
    Case(4, 64, 70, 40, 40, kernel=(1, 1), stride=(2, 2), num_kernels=9),  # 5 row panels, the last 6 rows
    Case(2, 3, 20, 3, 203, padding=(1, 1), stride=(1, 2)),           # 102-pixel rows: a ragged last pixel panel
    # The BLAS grad_x folds each sample's tile of whole channels into grad_x
    # right after its GEMM where such tiles split evenly across threads
    # (the stem above at 2 threads does not: 3 channels, one a tile):
    Case(3, 64, 16, 17, 17, stride=(2, 2), padding=(1, 1)),          # 4 tiles of 16 channels (144 rows)
    Case(3, 30, 12, 15, 15, stride=(2, 2), padding=(1, 1), groups=3),  # 10 channels a group: 5 a tile at 2 threads
]


# Large output planes: the library's conv (and conv backward) on chunks of up
# to 4 samples as one grouped conv, each sample with its mixed kernel: the
# forward from 441 output pixels, grad_x from 441 at stride 1 (both from 442
# in float32 on AVX-512), the weight side from 784; the other parts of the
# same call take the kernel's own paths.
LIBRARY_CASES = [
    Case(3, 16, 8, 32, 32, padding=(1, 1)),                                 # 1024 pixels: all three, one chunk
    Case(9, 16, 8, 28, 28, padding=(1, 1), num_kernels=3),                   # 784: chunks of 4, 4 and 1
    Case(6, 32, 12, 28, 28, padding=(1, 1), groups=2, num_kernels=3),        # 784 with groups: 4 and 2
    Case(5, 16, 6, 57, 56, stride=(2, 2), padding=(1, 1), layout="channels_last"),  # strided 784: grad_x by the kernel
    Case(2, 17, 5, 33, 35, kernel=(3, 1), dilation=(2, 1), padding=(2, 0), bias=False, layout="sliced"),
    Case(5, 16, 10, 21, 21, padding=(1, 1)),  # 441: weight side by the kernel, and all parts in float32 on AVX-512
]


@pytest.mark.parametrize("chunk", [None, 1, 2], ids=lambda n: f"chunk{n or 'default'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", LIBRARY_CASES, ids=lambda c: c.id)
def test_library_chunked_path(monkeypatch, case, dtype, chunk):
    if chunk is not None:
        # Samples per library call = budget / (one sample's input and output bytes).
        out_h = (case.height + 2 * case.padding[0] - case.dilation[0] * (case.kernel[0] - 1) - 1) // case.stride[0] + 1
        out_w = (case.width + 2 * case.padding[1] - case.dilation[1] * (case.kernel[1] - 1) - 1) // case.stride[1] + 1
        sample = case.in_channels * case.height * case.width + case.out_channels * out_h * out_w
        monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", str(chunk * sample * dtype.itemsize))
    assert_matches_reference(dynamic_conv2d, case, dtype)


# On AVX2, float32 weight sides of kernels with several taps stay on the
# packed path past 512 pixels, where the library's conv backward took them
# from 784, while one sample's unfolded panels fit 16 MiB; AVX-512 keeps the
# library from 784 pixels. 192 rows x 576 columns: weight blocks for every
# thread at 2 threads. 40x40 and 58->29 at stride 2 (unfolded 3.7 and 1.9
# MiB a sample), and 86x86 (17.0 MiB: the library on both).
LARGE_WEIGHT_SIDE_CASES = [
    (Case(2, 64, 192, 40, 40, padding=(1, 1)), False),
    (Case(2, 64, 192, 58, 58, stride=(2, 2), padding=(1, 1), num_kernels=3), False),
    (Case(1, 64, 192, 86, 86, padding=(1, 1), bias=False), True),
]


def _runs_library_weight_side(case) -> bool:
    """Whether the float32 weight side (dW and dattn) of `case` runs the library's conv backward."""
    from comparison import make_inputs
    x, weight, attn, _ = (None if t is None else t.float() for t in make_inputs(case))
    conv = case.conv_args
    grad_out = torch.ones_like(dynamic_conv2d(x, weight, attn, **conv))
    with torch.profiler.profile() as prof:
        torch.ops.chanflex.dynamic_conv2d_backward(
            grad_out, x, weight, attn, None, list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]),
            conv["groups"], [False, True, True, False])
    return any(e.name == "aten::convolution_backward" for e in prof.events())


@pytest.mark.parametrize("packed_isa", ["avx2", "avx512"])
@pytest.mark.parametrize("case, library_on_avx2", LARGE_WEIGHT_SIDE_CASES,
                         ids=lambda v: v.id if isinstance(v, Case) else f"avx2-{'library' if v else 'packed'}")
def test_large_plane_weight_side_path(monkeypatch, case, library_on_avx2, packed_isa):
    monkeypatch.setenv("CHANFLEX_CPU_ISA", packed_isa)
    if torch.ops.chanflex.cpu_packed_isa() != packed_isa:
        pytest.skip(f"this CPU has no {packed_isa}")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _runs_library_weight_side(case) == (library_on_avx2 or packed_isa == "avx512")
        if not library_on_avx2:
            # Every gradient: at stride 2 grad_x runs packed beside the packed weight side on AVX2.
            assert_matches_reference(dynamic_conv2d, case, torch.float32)
    finally:
        torch.set_num_threads(before)


# On AVX2, grad_x of strided float32 convs with kernels of several taps runs
# packed (dcols = W_b^T dy_b, folded per chunk) past 256 output pixels too,
# where BLAS took it, unless BLAS runs the weight side in the same call (as
# in these cases' full backward: too few weight blocks; the masked one asks
# for grad_x alone): 841 pixels at 3x3/2, a 7x7/2 stem on 529, strides
# (2, 1) with a 3x5 kernel on 680; 1x1 strided convs keep BLAS there.
LARGE_STRIDED_GRAD_X_CASES = [
    Case(3, 16, 24, 58, 58, stride=(2, 2), padding=(1, 1)),
    Case(2, 3, 16, 45, 45, kernel=(7, 7), stride=(2, 2), padding=(3, 3), num_kernels=3),
    Case(2, 8, 12, 33, 40, kernel=(3, 5), stride=(2, 1), padding=(1, 2), groups=2, layout="channels_last"),
    Case(3, 12, 16, 60, 60, kernel=(1, 1), stride=(2, 2), bias=False),
]


@pytest.mark.parametrize("chunk_bytes", [None, "20000"], ids=lambda v: f"chunk-{v or 'default'}")
@pytest.mark.parametrize("case", LARGE_STRIDED_GRAD_X_CASES, ids=lambda c: c.id)
def test_large_plane_strided_grad_x(monkeypatch, case, chunk_bytes, threads):
    monkeypatch.setenv("CHANFLEX_CPU_ISA", "avx2")
    if torch.ops.chanflex.cpu_packed_isa() != "avx2":
        pytest.skip("this CPU has no AVX2")
    if chunk_bytes is not None:
        monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)  # a sample or two per chunk
    assert_masked_backward_matches(case, (True, False, False))
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request):
    # Tiling, sample splitting and serial-vs-parallel choices depend on the thread count.
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=["avx512", "avx2", "generic"], ids=lambda isa: f"isa-{isa}")
def isa(request, monkeypatch):
    # The packed paths' micro-kernels differ per instruction set (register
    # blocking, pixels per call, samples per weight-gradient fold); "generic"
    # forces the BLAS paths. A cap above the CPU's own set runs its best one.
    monkeypatch.setenv("CHANFLEX_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("variable", ["CHANFLEX_CPU_GRAD_BLOCKS", "CHANFLEX_CPU_DIRECT_WEIGHT_GRAD"])
def test_weight_side_switches_reject_other_values(monkeypatch, variable):
    from comparison import make_inputs
    if torch.ops.chanflex.cpu_packed_isa() == "generic":
        pytest.skip("the switches belong to the packed weight side (AVX2 or AVX-512)")
    x, weight, attn = (t.float().requires_grad_() for t in make_inputs(BLOCK_LAYOUT_CASES[1])[:3])
    monkeypatch.setenv(variable, "yes")
    y = dynamic_conv2d(x, weight, attn, padding=1)
    with pytest.raises(RuntimeError, match=f"{variable}: expected '0' or '1', got 'yes'"):
        y.sum().backward()


def test_isa_cap_rejects_unknown_names(monkeypatch):
    from comparison import make_inputs
    x, weight, attn, _ = make_inputs(TILED_CASES[0])
    monkeypatch.setenv("CHANFLEX_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="CHANFLEX_CPU_ISA: expected one of 'avx512', 'avx2', 'generic', got 'sse9'"):
        dynamic_conv2d(x.float(), weight.float(), attn.float(), padding=1)


def test_isa_report_follows_the_cpu_and_the_cap(monkeypatch):
    monkeypatch.delenv("CHANFLEX_CPU_ISA", raising=False)
    best = torch.ops.chanflex.cpu_packed_isa()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
        expected = ("avx512" if "avx512f" in flags else "avx2") if {"avx2", "fma"} <= flags else "generic"
        assert best == expected, (best, expected)
    order = ["generic", "avx2", "avx512"]
    for cap in order:
        monkeypatch.setenv("CHANFLEX_CPU_ISA", cap)
        assert torch.ops.chanflex.cpu_packed_isa() == order[min(order.index(cap), order.index(best))]


@pytest.mark.parametrize("case", TILED_CASES, ids=lambda c: c.id)
def test_tiles_and_blocks_match_reference(case, threads, isa):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


def assert_masked_backward_matches(case, mask):
    """The float32 backward op with output mask (x, weight, attn) equals the float64 reference's gradients."""
    from comparison import make_inputs
    x, weight, attn, bias = make_inputs(case)
    args = [t.clone().requires_grad_() for t in (x, weight, attn)]
    reference_output = dynamic_conv2d_reference(*args, bias, **case.conv_args)
    grad_out = torch.randn(reference_output.shape, dtype=reference_output.dtype)
    expected = torch.autograd.grad(reference_output, args, grad_out)
    conv = case.conv_args
    got = torch.ops.chanflex.dynamic_conv2d_backward(
        grad_out.float(), x.float(), weight.float(), attn.float(), None if bias is None else bias.float(),
        list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]), conv["groups"], [*mask, False])
    for name, wanted, want, have in zip(("x", "weight", "attn"), mask, expected, got[:3]):
        if wanted:
            assert_close_scaled(have, want, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (True, False, True)], ids=str)
@pytest.mark.parametrize("case", [TILED_CASES[0], TILED_CASES[3], RAGGED_COLUMN_PANEL, PIXEL_TAIL_14,
                                  GROUP_CROSSING_BLOCK, LIBRARY_CASES[3], LIBRARY_CASES[5]], ids=lambda c: c.id)
def test_backward_output_masks(case, mask, threads, isa):
    # Each gradient alone and in pairs: the packed grad_x, the packed weight
    # side with and without dattn, the BLAS fallbacks (3 threads leave too
    # few weight blocks), and the library for one part with the kernel for
    # the other must not depend on what else was requested.
    assert_masked_backward_matches(case, mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", TILED_CASES[:4], ids=lambda c: c.id)
def test_tiles_across_chunks(monkeypatch, case, dtype, isa):
    # float32 runs the packed paths (the weight gradient's first chunk stores,
    # later chunks add), float64 the BLAS ones.
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", "20000")  # 1-2 samples per chunk
    assert_matches_reference(dynamic_conv2d, case, dtype)


# Chunks of 16+ samples copy each weight block's W_k and dW_k tiles into a
# contiguous layout and write dW back (with streaming stores on the last
# chunk where dW rows are vector-aligned); shorter chunks fold in place.
# 74 -> 200 channels in 2 groups: 100 rows (a 4-row last call) and 333
# columns (an 8-column last call) per group, so rows start off the vector
# grid; 32 -> 288 channels: 288 columns, every dW row aligned.
BLOCK_LAYOUT_CASES = [Case(34, 74, 200, 6, 6, padding=(1, 1), groups=2),
                      Case(33, 32, 288, 7, 7, padding=(1, 1), num_kernels=3)]


@pytest.mark.parametrize("blocks", ["", "1", "0"], ids=lambda v: f"blocks-{v or 'default'}")
@pytest.mark.parametrize("chunk", [34, 16, 17], ids=lambda n: f"chunk{n}")
@pytest.mark.parametrize("case", BLOCK_LAYOUT_CASES, ids=lambda c: c.id)
def test_weight_blocks_across_chunks(monkeypatch, case, chunk, blocks, threads, isa):
    # chunk 34: one chunk; 16: at 34 samples, two block chunks (the second
    # adds to the first's dW) and an in-place one of 2; 17: a block chunk adding
    # to an earlier one ends the batch. The layout is the default on AVX-512
    # only; CHANFLEX_CPU_GRAD_BLOCKS forces it on or off for either ISA.
    # These cases would take the direct weight gradient by default on
    # AVX-512 (its own tests are below), which always uses a block layout.
    monkeypatch.setenv("CHANFLEX_CPU_DIRECT_WEIGHT_GRAD", "0")
    monkeypatch.setenv("CHANFLEX_CPU_GRAD_BLOCKS", blocks)
    taps = case.kernel[0] * case.kernel[1]
    unfolded_bytes = case.in_channels * taps * case.height * case.width * 4  # stride 1, padding 1: same plane
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", str(chunk * unfolded_bytes))
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_through_tiles(dtype):
    assert_matches_reference(dynamic_conv2d, TILED_CASES[1], dtype)


# Batch 1's forward: float32 on AVX2 and AVX-512 takes the packed, plane or
# (3x3 and smaller kernels) streamed paths with one sample; float64, the
# generic ISA, larger streamed kernels and planes above both run
# mix-then-conv through the library. The backward is the fused one.
BATCH_ONE_CASES = [
    Case(1, 6, 8, 9, 9, padding=(1, 1), groups=2, dilation=(2, 1)),  # packed (81 pixels)
    Case(1, 4, 6, 8, 8, kernel=(1, 1), stride=(2, 2)),               # packed 1x1 strided
    Case(1, 24, 40, 7, 7, padding=(1, 1)),                           # AVX-512: the 7x7 plane kernels
    Case(1, 20, 36, 14, 14, stride=(2, 2), padding=(1, 1)),          # AVX-512: stride-2 plane kernels, 14 -> 7
    Case(1, 20, 70, 19, 18, padding=(1, 1)),                         # 342 pixels, 180 deep: streamed
    Case(1, 3, 16, 48, 48, kernel=(7, 7), stride=(2, 2), padding=(3, 3)),  # a 7x7 stem, 576 pixels: the library
    Case(1, 32, 40, 24, 24, padding=(1, 1)),                         # 576 pixels, 288 deep: the library
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", BATCH_ONE_CASES, ids=lambda c: c.id)
def test_batch_one_path(case, dtype, isa):
    assert_matches_reference(dynamic_conv2d, case, dtype)


def test_backward_accepts_strided_grad_out():
    # y.sum() hands backward an expanded (stride-0) gradient; channels_last input too.
    case = TILED_CASES[0]
    torch.manual_seed(0)
    x = torch.randn(5, 16, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, 130, 16, 3, 3, requires_grad=True)
    a = torch.randn(5, 4, requires_grad=True)
    dynamic_conv2d(x, w, a, padding=1).sum().backward()
    ours = [t.grad.clone() for t in (x, w, a)]
    for t in (x, w, a):
        t.grad = None
    from chanflex_kernels.reference import dynamic_conv2d_reference
    dynamic_conv2d_reference(x, w, a, padding=1).sum().backward()
    for mine, ref in zip(ours, (x.grad, w.grad, a.grad)):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_peak_memory_stays_below_per_sample_weights():
    # Materialising the per-sample weights alone would cost B x |W| (75.5 MB
    # here), before their gradients; the whole fwd+bwd step, including the
    # output, grad_x and the K-fold weight gradient it returns, stays below that.
    shape = ConvShape("resnet18.layer3", 32, 256, 256, 14)
    peak = peak_memory_bytes("chanflex", shape, "fwd+bwd")
    if peak is None:
        pytest.skip("peak memory needs Linux /proc")
    per_sample_weights = shape.batch * 256 * 256 * 9 * 4
    assert peak < 0.7 * per_sample_weights, (peak, per_sample_weights)


@pytest.mark.parametrize("case", [TILED_CASES[4], TILED_CASES[7], TILED_CASES[0]], ids=lambda c: c.id)
def test_backward_is_deterministic(case, threads):
    # Split-sample layers (tiny weights) sum their per-slice dW in a fixed order:
    # repeated runs give bit-identical gradients whatever the thread timing.
    from comparison import make_inputs
    x, weight, attn, bias = (t.float().requires_grad_() for t in make_inputs(case))
    grad_out = torch.randn(dynamic_conv2d(x, weight, attn, bias, **case.conv_args).shape)
    runs = [torch.autograd.grad(dynamic_conv2d(x, weight, attn, bias, **case.conv_args), (x, weight, attn, bias),
                                grad_out) for _ in range(8)]
    for run in runs[1:]:
        for name, first, again in zip(("x", "weight", "attn", "bias"), runs[0], run):
            assert torch.equal(first, again), f"grad of {name} differs between identical runs"


def _backward(case, x, weight, attn, grad_out):
    conv = case.conv_args
    return torch.ops.chanflex.dynamic_conv2d_backward(
        grad_out, x, weight, attn, None, list(conv["stride"]), list(conv["padding"]), list(conv["dilation"]),
        conv["groups"], [True, True, True, False])


def test_scratch_buffers_reused_across_shapes(isa):
    # The packed paths keep their scratch buffers between calls. Fill every
    # one with NaN (a larger call on NaN inputs), then run smaller layers that
    # reuse them as they are, and a larger one that grows them: any read of
    # a scratch element before it is written shows up as NaN.
    from comparison import make_inputs
    big = Case(6, 64, 160, 12, 12, padding=(1, 1))
    x, weight, attn = (t.float() for t in make_inputs(big)[:3])
    nan = float("nan")
    y = torch.ops.chanflex.dynamic_conv2d(x.fill_(nan), weight.fill_(nan), attn.fill_(nan), None,
                                          [1, 1], [1, 1], [1, 1], 1)
    _backward(big, x, weight, attn, torch.full_like(y, nan))
    for case in (TILED_CASES[0], RAGGED_COLUMN_PANEL, GROUP_CROSSING_BLOCK, Case(7, 72, 200, 13, 13, padding=(1, 1)),
                 Case(3, 3, 20, 30, 31, padding=(1, 1))):  # the last: the streamed forward
        assert_matches_reference(dynamic_conv2d, case, torch.float32)
    torch.ops.chanflex.cpu_release_scratch()
    assert_matches_reference(dynamic_conv2d, TILED_CASES[0], torch.float32)


def test_large_weight_gradients_come_from_a_pool():
    # K |W| >= 32 MiB (here 37.7 MB): grad_weight's memory is reused once the
    # previous gradient is freed, never while it is alive.
    case = Case(2, 512, 512, 3, 3, padding=(1, 1), num_kernels=4, bias=False)
    from comparison import make_inputs
    x, weight, attn = (t.float() for t in make_inputs(case)[:3])
    grad_out = torch.randn(2, 512, 3, 3)
    torch.ops.chanflex.cpu_release_scratch()
    first = _backward(case, x, weight, attn, grad_out)[1]
    kept = first.clone()
    second = _backward(case, x, weight, attn, grad_out)[1]
    assert second.data_ptr() != first.data_ptr(), "a live gradient's memory was handed out again"
    assert torch.equal(first, kept), "the second backward wrote into the first one's gradient"
    assert torch.equal(second, kept)
    address = first.data_ptr()
    del first
    third = _backward(case, x, weight, attn, grad_out)[1]
    assert third.data_ptr() == address, "a freed large gradient was not reused"
    assert torch.equal(third, kept)
    xr, wr, ar = (t.double().requires_grad_() for t in (x, weight, attn))
    expected = torch.autograd.grad(dynamic_conv2d_reference(xr, wr, ar, None, padding=(1, 1)), wr, grad_out.double())[0]
    assert_close_scaled(third, expected, torch.float32, "grad of weight")
    del second, third
    torch.ops.chanflex.cpu_release_scratch()


def test_half_weights_float32_copy_comes_from_the_pool():
    # A bfloat16 call's float32 copy of the K kernels (37.7 MB here) comes from the same pool: a block a
    # previous call filled (here with the copy of other kernels) is overwritten whole, and the result matches.
    case = Case(2, 512, 512, 7, 7, padding=(1, 1), num_kernels=4, bias=False)
    from comparison import make_inputs
    torch.ops.chanflex.cpu_release_scratch()
    x, weight, attn = (t.bfloat16() for t in make_inputs(case)[:3])
    dynamic_conv2d(x, -weight, attn, padding=1)  # its copy goes back to the pool
    assert_matches_reference(dynamic_conv2d, case, torch.bfloat16)
    torch.ops.chanflex.cpu_release_scratch()


# Winograd F(2x2, 3x3): 2x2 output tiles from 4x4 input patches, 16 GEMMs
# (one per transform position) through the packed micro-kernels, for the
# forward and grad_x (the transposed, flipped kernels; pad 2 - padding, which
# crops where padding > 2). Odd planes end in half-used tiles; 130 rows end
# in a ragged row panel; 520 deep carries partial sums over two reduction
# blocks (the forward of the first, grad_x of the second). From 36 tiles a
# sample (13x13, 12x12, 5x37 here) the GEMMs mix A in a pass of their own,
# below it in the micro-kernels (AVX-512 up to 8 kernels).
WINOGRAD_CASES = [
    Case(3, 16, 16, 7, 7, padding=(1, 1)),                             # 16 tiles, the last row and column half-used
    Case(4, 20, 18, 5, 6, padding=(1, 1), num_kernels=3),
    Case(3, 12, 10, 9, 11, padding=(0, 0), num_kernels=1, bias=False),  # 7x9 output; grad_x pads 2
    Case(3, 8, 12, 4, 4, padding=(2, 2), groups=2, num_kernels=8),      # 6x6 output; grad_x pads 0
    Case(5, 6, 10, 2, 2, padding=(3, 3), num_kernels=9),                # grad_x crops a pixel each side
    Case(2, 6, 8, 1, 3, padding=(1, 1)),                                # a 1x3 plane
    Case(3, 64, 130, 13, 13, padding=(1, 1), num_kernels=3),
    Case(2, 520, 24, 6, 6, padding=(1, 1), bias=False),
    Case(2, 24, 520, 5, 5, padding=(1, 1)),
    Case(4, 16, 32, 12, 12, padding=(1, 1), layout="channels_last"),
    Case(2, 8, 8, 5, 37, padding=(1, 1)),                               # output rows of 16 + 16 + 5 pixels
    Case(1, 16, 24, 10, 10, padding=(1, 1)),                            # one sample (forced; never by default)
]


@pytest.fixture(params=["avx512", "avx2"], ids=lambda isa: f"isa-{isa}")
def winograd_isa(request, monkeypatch):
    # Winograd runs on the packed ISAs only (their micro-kernels and
    # transforms differ); a cap above the CPU's own set runs its best one.
    monkeypatch.setenv("CHANFLEX_CPU_ISA", request.param)
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD", "1")
    if torch.ops.chanflex.cpu_packed_isa() == "generic":
        pytest.skip("Winograd needs the packed paths (AVX2 or AVX-512)")
    return request.param


@pytest.fixture(params=["1", "2", "4"], ids=lambda n: f"passes{n}")
def winograd_passes(request, monkeypatch, winograd_isa):
    # All 16 transform positions in one pass over the batch, or 8 or 4 per
    # pass (less scratch; later passes add to the output).
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD", request.param)
    return request.param


@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=lambda c: c.id)
def test_winograd_matches_reference(case, threads, winograd_passes):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("chunk_bytes", ["1", "300000"], ids=["chunk-threads", "chunk-300k"])
@pytest.mark.parametrize("case", [Case(9, 24, 40, 8, 9, padding=(1, 1)), WINOGRAD_CASES[6]], ids=lambda c: c.id)
def test_winograd_across_chunks(monkeypatch, case, chunk_bytes, threads, winograd_passes):
    # A tiny budget: one sample per thread per chunk, the last chunk short;
    # 300 kB: a few samples (an even number where more than 2) per chunk.
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (True, False, True)], ids=str)
@pytest.mark.parametrize("case", [WINOGRAD_CASES[3], WINOGRAD_CASES[4]], ids=lambda c: c.id)
def test_winograd_backward_output_masks(case, mask, winograd_passes):
    # grad_x by Winograd, the weight side by the direct paths, in any combination.
    assert_masked_backward_matches(case, mask)


def _run(case, inputs):
    x, weight, attn, bias = (None if t is None else t.float().requires_grad_() for t in inputs)
    y = dynamic_conv2d(x, weight, attn, bias, **case.conv_args)
    grads = torch.autograd.grad(y, (x, weight, attn), torch.ones_like(y))
    return (y, *grads)


@pytest.mark.parametrize("cap", ["avx512", "avx2"])
def test_winograd_default_range(monkeypatch, cap):
    # By default: 3x3 stride-1 planes of 10x10 to 42x42 output pixels,
    # batches of at least 4 samples and 768 output pixels (1536 on
    # AVX2), whose Winograd scratch fits in the activations plus the K
    # kernels' size, in the fewest passes (1 or 2) for which it does, with
    # chunks of one sample per thread (of at least 32 K tiles where a pass's
    # transformed kernels exceed 16 MiB). Each kind of result differs from
    # the others in rounding, so the default's must equal bit for bit the
    # one forced for the expected path ("0": the direct one).
    monkeypatch.setenv("CHANFLEX_CPU_ISA", cap)
    if torch.ops.chanflex.cpu_packed_isa() != cap:
        pytest.skip(f"this CPU has no {cap}")
    from comparison import make_inputs
    torch.set_num_threads(2)  # the chunks, hence the scratch, follow the thread count
    avx512 = cap == "avx512"
    cases = {Case(16, 64, 64, 10, 10, padding=(1, 1)): "2",  # 100 pixels; chunks of 2 fit in 2 passes only
             Case(24, 8, 8, 10, 10, padding=(1, 1)): "1",  # chunks of 2 fit in 1 pass
             Case(24, 8, 8, 9, 9, padding=(1, 1)): "0",                                 # 81 pixels: below the range
             Case(12, 8, 8, 22, 22, padding=(1, 1)): "1",                               # 484
             Case(12, 8, 8, 42, 42, padding=(1, 1)): "1",                               # 1764: the range's top
             Case(24, 8, 8, 43, 43, padding=(1, 1)): "0",                               # 1849: above the range
             Case(24, 8, 8, 12, 12, stride=(2, 2), padding=(1, 1)): "0",                # stride 2: not eligible
             Case(4, 32, 32, 14, 14, padding=(1, 1)): "0",    # 784 pixels in the batch, but 2 passes' scratch is
                                                              # above the activations plus the kernels
             # Batches too small to pay for the kernel transforms (each of
             # these takes Winograd, in 2 passes, without the batch rule).
             Case(3, 128, 128, 10, 10, padding=(1, 1)): "0",                            # 3 samples
             Case(7, 8, 8, 10, 10, padding=(1, 1)): "0",                                # 700 pixels in the batch
             Case(8, 8, 8, 10, 10, padding=(1, 1)): "2" if avx512 else "0",             # 800
             Case(12, 8, 8, 10, 10, padding=(1, 1)): "2" if avx512 else "0",            # 1200
             Case(32, 256, 256, 14, 14, padding=(1, 1), bias=False): "1",  # ResNet18's layer3: 16 MiB of kernels
             # VGG19's conv4_x: 64 MiB of transformed kernels in one pass, so
             # chunks of 6 (32 K tiles): fits only in 2 passes
             Case(32, 512, 512, 10, 10, padding=(1, 1), bias=False): "2"}
    before = torch.get_num_threads()
    try:
        for case, expected in cases.items():
            inputs = make_inputs(case)
            monkeypatch.delenv("CHANFLEX_CPU_WINOGRAD")
            default = _run(case, inputs)
            forced = {}
            for value in ("0", "1", "2", "4"):
                monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD", value)
                forced[value] = _run(case, inputs)
            if expected != "0":
                assert any(not torch.equal(a, b) for a, b in zip(forced[expected], forced["0"])), \
                    f"{case.id}: Winograd and the direct path agreed bit for bit; the test cannot tell them apart"
            taken = [v for v, run in forced.items() if all(torch.equal(a, b) for a, b in zip(default, run))]
            # Ineligible convs (stride 2) take the direct path whatever the switch says.
            assert expected in taken and (expected == "0" or len(taken) == 1), \
                f"{case.id}: expected the default to take {expected!r}, it matches {taken}"
    finally:
        torch.set_num_threads(before)


@pytest.fixture(params=["1", "2", "16"], ids=lambda n: f"wgrad-passes{n}")
def winograd_weight_grad(request, monkeypatch):
    # The Winograd weight side (AVX-512, one group) in 1, 2 or 16 passes over
    # the 16 transform positions (each pass adds its positions' share to dW).
    monkeypatch.setenv("CHANFLEX_CPU_ISA", "avx512")
    if torch.ops.chanflex.cpu_packed_isa() != "avx512":
        pytest.skip("the Winograd weight side runs on AVX-512 only")
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD", request.param)
    return request.param


# 9 samples: chunks of 4, 4 and 1; 40 in channels: a full and a partial
# 32-channel tile; 30 out channels: a task of 24 and one of 6 (12 padded).
WINOGRAD_WEIGHT_GRAD_CASES = WINOGRAD_CASES + [Case(9, 40, 30, 8, 9, padding=(1, 1), num_kernels=5)]


@pytest.mark.parametrize("case", WINOGRAD_WEIGHT_GRAD_CASES, ids=lambda c: c.id)
def test_winograd_weight_grad_matches_reference(case, threads, winograd_weight_grad):
    # The forward and grad_x by the direct paths (the autouse switch), dW and
    # dattn by Winograd (groups > 1 fall back to the direct weight side).
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("mask", [(False, True, False), (False, False, True)], ids=str)
def test_winograd_weight_grad_output_masks(mask, winograd_weight_grad):
    # dW alone (no kernels transformed for dattn) and dattn alone.
    assert_masked_backward_matches(WINOGRAD_WEIGHT_GRAD_CASES[-1], mask)


@pytest.mark.parametrize("batch, size, winograd", [(16, 14, True), (16, 21, True), (15, 14, False), (16, 13, False),
                                                  (16, 22, False), (16, 10, False)])
def test_winograd_weight_grad_default_rule(monkeypatch, batch, size, winograd):
    # By default the Winograd weight side takes 14x14 to 21x21 output planes
    # in batches of 16 or more (see plan_winograd_weight_grad). It differs
    # from the direct side in rounding, so the default's dW must equal,
    # bit for bit, the forced one's (4 passes) inside the rule and the
    # direct one's outside it.
    monkeypatch.setenv("CHANFLEX_CPU_ISA", "avx512")
    if torch.ops.chanflex.cpu_packed_isa() != "avx512":
        pytest.skip("the Winograd weight side runs on AVX-512 only")
    from comparison import make_inputs
    case = Case(batch, 32, 24, size, size, padding=(1, 1), bias=False)
    x, weight, attn, _ = (None if t is None else t.float() for t in make_inputs(case))
    grad_out = torch.randn(case.batch, case.out_channels, case.height, case.width)  # 3x3, pad 1, stride 1
    grads = {}
    for value in (None, "0", "4"):
        if value is None:
            monkeypatch.delenv("CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD", raising=False)
        else:
            monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD", value)
        grads[value] = _backward(case, x, weight, attn, grad_out)[1]
    assert not torch.equal(grads["4"], grads["0"]), "forced and direct agreed bit for bit; the test cannot tell them apart"
    expected = "4" if winograd else "0"
    assert torch.equal(grads[None], grads[expected]), \
        f"the default did not match CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD={expected}"


def test_winograd_scratch_reuse(monkeypatch):
    # Tiles past a plane's last one and the padding between groups' panels
    # are never written: NaN left there by a larger call must not leak in.
    if torch.ops.chanflex.cpu_packed_isa() == "generic":
        pytest.skip("Winograd needs the packed paths (AVX2 or AVX-512)")
    from comparison import make_inputs
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD", "1")
    big = Case(6, 64, 160, 12, 12, padding=(1, 1))
    x, weight, attn = (t.float() for t in make_inputs(big)[:3])
    nan = float("nan")
    y = torch.ops.chanflex.dynamic_conv2d(x.fill_(nan), weight.fill_(nan), attn.fill_(nan), None,
                                          [1, 1], [1, 1], [1, 1], 1)
    _backward(big, x, weight, attn, torch.full_like(y, nan))
    for case in WINOGRAD_CASES[:3]:
        assert_matches_reference(dynamic_conv2d, case, torch.float32)


# Padding taps skipped (forward, AVX2 and AVX-512): the output pixels go class by
# class (the interior with every tap, then each edge row with its rows'
# taps, then each edge column of the interior rows), each class's packed B
# holding its own taps only, its calls stepping over the others in A.
# grad_x of stride-1 convs then runs as the forward of the transposed conv
# (kernels transposed and flipped, padded d (k - 1) - p), with its classes.
# Odd planes give classes of 1 to 14 pixels; stride 2 has one edge row and
# column; pad 2 with dilation 2 two edge rows a side sharing one class; a
# 5x3 kernel two row classes a side; 1 to 9 kernels mix in the micro-kernel
# or in the separate pass; 1080 and 5400 deep carry partial sums over
# reduction blocks of whole channels; 18 deep splits samples across threads.
# On AVX-512, planes of up to 64 floats are unfolded from registers (8x8 the
# largest, 7x7 and 7x6 read all four registers), larger ones (9x8 up) from
# windows of 64 floats, partly past the plane's end near it, and by gathers
# where a group of 16 entries spans more (some at stride 2, most in 5x70).
SKIP_CASES = [
    Case(3, 16, 16, 7, 7, padding=(1, 1)),
    Case(4, 24, 40, 5, 5, padding=(1, 1), num_kernels=1),
    Case(3, 8, 34, 10, 9, padding=(1, 1), num_kernels=8, bias=False),
    Case(5, 16, 32, 14, 13, stride=(2, 2), padding=(1, 1), num_kernels=3),
    Case(3, 8, 20, 9, 9, padding=(2, 2), dilation=(2, 2)),
    Case(3, 8, 20, 9, 8, kernel=(5, 3), padding=(2, 1), num_kernels=9),
    Case(4, 32, 48, 7, 6, padding=(1, 1), groups=2),
    Case(2, 120, 40, 5, 5, padding=(1, 1)),
    Case(2, 600, 24, 4, 4, padding=(1, 1), bias=False),
    Case(6, 2, 5, 9, 9, padding=(1, 1)),
    Case(4, 16, 32, 8, 8, padding=(1, 1), layout="channels_last"),
    Case(3, 8, 16, 3, 3, padding=(1, 1)),  # a 1-pixel interior
    Case(2, 8, 16, 5, 70, padding=(1, 1)),  # rows too long for most windows: gathered
    Case(2, 20, 70, 5, 5, padding=(1, 1)),  # grad_x: 630 reduction steps, two blocks of 35 rows
    Case(3, 24, 20, 7, 7, padding=(1, 1), groups=2),  # 8-channel unfold blocks across a group boundary
]


def _force_on_packed_isa(monkeypatch, isa, switch):
    """Caps the packed paths at `isa` with the env `switch` set to 1; skips where the CPU lacks `isa`."""
    monkeypatch.setenv("CHANFLEX_CPU_ISA", isa)
    monkeypatch.setenv(switch, "1")
    if torch.ops.chanflex.cpu_packed_isa() != isa:
        pytest.skip(f"this CPU has no {isa}")
    return isa


@pytest.fixture(params=["avx512", "avx2"], ids=lambda isa: f"isa-{isa}")
def skip_padding(request, monkeypatch):
    # Forced on for both packed ISAs (their skipping micro-kernels differ),
    # grad_x through the transposed conv on both; the plane kernels, which
    # would take the 5x5 and 7x7 cases on AVX-512, off.
    monkeypatch.setenv("CHANFLEX_CPU_DIRECT_PLANES", "0")
    return _force_on_packed_isa(monkeypatch, request.param, "CHANFLEX_CPU_SKIP_PADDING")


@pytest.mark.parametrize("case", SKIP_CASES, ids=lambda c: c.id)
def test_skipped_padding_matches_reference(case, threads, skip_padding):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("chunk_bytes", ["1", "20000"], ids=["chunk-threads", "chunk-20k"])
@pytest.mark.parametrize("case", [SKIP_CASES[0], SKIP_CASES[3], SKIP_CASES[7]], ids=lambda c: c.id)
def test_skipped_padding_across_chunks(monkeypatch, case, chunk_bytes, skip_padding):
    # Chunks of one sample per thread or a few (prepacked kernels from 3 chunks on).
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True), (True, False, True)], ids=str)
@pytest.mark.parametrize("case", [SKIP_CASES[4], SKIP_CASES[5], SKIP_CASES[6]], ids=lambda c: c.id)
def test_skipped_padding_backward_output_masks(case, mask, skip_padding):
    # grad_x by the transposed conv's forward, the weight side by its own path.
    assert_masked_backward_matches(case, mask)


def test_skipped_padding_scratch_reuse(monkeypatch, skip_padding):
    # Pixels past a class's last one in its B panels are zeroed, not left
    # as a larger call wrote them: NaN there must not leak in.
    from comparison import make_inputs
    big = Case(6, 64, 160, 12, 12, padding=(1, 1))
    x, weight, attn = (t.float() for t in make_inputs(big)[:3])
    nan = float("nan")
    torch.ops.chanflex.dynamic_conv2d(x.fill_(nan), weight.fill_(nan), attn.fill_(nan), None,
                                      [1, 1], [1, 1], [1, 1], 1)
    for case in SKIP_CASES[:3]:
        assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("variable, expected", [("CHANFLEX_CPU_WINOGRAD", "'0', '1', '2' or '4'"),
                                                  ("CHANFLEX_CPU_SKIP_PADDING", "'0' or '1'"),
                                                  ("CHANFLEX_CPU_DIRECT_PLANES", "'0' or '1'")])
def test_forward_switches_reject_other_values(monkeypatch, variable, expected):
    # A 3x3 pad-1 forward on a 7x7 plane reads all three (Winograd's, the
    # plane kernels' and, with those off, the padding classes') switches on
    # the packed paths.
    from comparison import make_inputs
    if torch.ops.chanflex.cpu_packed_isa() == "generic":
        pytest.skip("the switches belong to the packed paths (AVX2 or AVX-512)")
    x, weight, attn, _ = (None if t is None else t.float() for t in make_inputs(SKIP_CASES[0]))
    if variable == "CHANFLEX_CPU_SKIP_PADDING":
        monkeypatch.setenv("CHANFLEX_CPU_DIRECT_PLANES", "0")
    monkeypatch.setenv(variable, "yes")
    with pytest.raises(RuntimeError, match=f"{variable}: expected {expected}, got 'yes'"):
        dynamic_conv2d(x, weight, attn, padding=1)


def test_winograd_weight_grad_switch_rejects_other_values(monkeypatch):
    # The backward's weight side reads it on every float32 layer it runs.
    from comparison import make_inputs
    x, weight, attn, _ = (None if t is None else t.float() for t in make_inputs(SKIP_CASES[0]))
    grad_out = torch.ones_like(dynamic_conv2d(x, weight, attn, padding=1))
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD", "yes")
    expected = "CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD: expected '0', '1', '2', '4', '8' or '16', got 'yes'"
    with pytest.raises(RuntimeError, match=expected):
        torch.ops.chanflex.dynamic_conv2d_backward(grad_out, x, weight, attn, None, [1, 1], [1, 1], [1, 1], 1,
                                                   [False, True, True, False])


# Plane kernels (AVX-512 float32; 3x3, pad 1: stride 1 on 5x5 and 7x7
# planes, stride 2 from 14x14 to 7x7, 28x28 to 14x14 and 56x56 to 28x28):
# one call a band of whole output rows (5x5 whole, 7x7 as rows 0-2 and 3-6,
# 14x14 two rows a call, 28x28 one), one accumulator a pixel, the input
# broadcast from its own plane; grad_x of the stride-1 ones through the
# transposed conv takes them too (13x13 at stride 2 does not). 1 to 8
# kernels mix in the first band's calls (9 fall back to the padding
# classes); 17 rows a
# group leave a short row panel; 600 and 130 channels carry partial sums
# over reduction blocks; odd batches leave a sample without a pair.
PLANE_CASES = [
    Case(3, 16, 16, 5, 5, padding=(1, 1)),
    Case(5, 130, 40, 7, 7, padding=(1, 1), num_kernels=8),
    Case(4, 64, 34, 5, 5, padding=(1, 1), groups=2, num_kernels=3),
    Case(3, 24, 20, 7, 7, padding=(1, 1), groups=2, num_kernels=1, bias=False),
    Case(2, 600, 24, 5, 5, padding=(1, 1)),
    Case(3, 16, 48, 7, 7, padding=(1, 1), num_kernels=9),
    Case(4, 16, 32, 7, 7, padding=(1, 1), layout="channels_last"),
    Case(3, 16, 16, 14, 14, stride=(2, 2), padding=(1, 1)),
    Case(5, 70, 40, 14, 14, stride=(2, 2), padding=(1, 1), num_kernels=8, groups=2),
    Case(3, 24, 20, 13, 13, stride=(2, 2), padding=(1, 1)),
    Case(3, 20, 18, 28, 28, stride=(2, 2), padding=(1, 1)),
    Case(2, 70, 36, 28, 28, stride=(2, 2), padding=(1, 1), num_kernels=3, groups=2),
    Case(3, 18, 20, 56, 56, stride=(2, 2), padding=(1, 1)),
    Case(2, 40, 17, 56, 56, stride=(2, 2), padding=(1, 1), num_kernels=2, bias=False),
]


@pytest.fixture
def plane_kernels(monkeypatch):
    monkeypatch.setenv("CHANFLEX_CPU_ISA", "avx512")
    if torch.ops.chanflex.cpu_packed_isa() != "avx512":
        pytest.skip("the plane kernels are AVX-512 only")


@pytest.mark.parametrize("case", PLANE_CASES, ids=lambda c: c.id)
def test_plane_kernels_match_reference(case, threads, plane_kernels):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("chunk_bytes", ["1", "20000"], ids=["chunk-threads", "chunk-20k"])
@pytest.mark.parametrize("case", [PLANE_CASES[1], PLANE_CASES[2]], ids=lambda c: c.id)
def test_plane_kernels_across_chunks(monkeypatch, case, chunk_bytes, plane_kernels):
    # Chunks of one sample per thread or a few (prepacked kernels from 3 chunks on).
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("first", [0.0, 1e-30, 1e-41], ids=["zero", "tiny", "subnormal"])
def test_plane_kernels_pivot_fallback(first, plane_kernels):
    # The plane kernels mix with the attention pivoted on kernel 0 (ratios
    # a_k / a_0, the sums scaled by a_0) only where every a_0 is a normal
    # float and no ratio exceeds 2^24: one sample whose a_0 is 0, tiny or
    # subnormal sends its chunk to the plain mixing. (The other cases have
    # attention of either sign, pivoted.)
    from comparison import make_inputs
    case = PLANE_CASES[1]
    x, weight, attn, bias = make_inputs(case)
    attn = attn.clone()
    attn[1, 0] = first
    assert_matches_reference(dynamic_conv2d, case, torch.float32, inputs=(x, weight, attn, bias))


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True)], ids=str)
def test_plane_kernels_backward_output_masks(mask, plane_kernels):
    assert_masked_backward_matches(PLANE_CASES[2], mask)


def corner_on_plane_kernels(monkeypatch, width, stride):
    """Whether a 3x3 pad-1 forward on a width x width plane takes the plane kernels by default.

    Their sums differ from the padding classes' only in rounding, which a
    default run cannot be told apart by; where the classes multiply padding
    (an edge row's corners) they differ for sure. An infinite weight on tap
    (1, 0), which reads the padding left of the top-left pixel, leaves that
    pixel finite on the plane kernels and makes it NaN (0 * inf) on the
    classes (CHANFLEX_CPU_DIRECT_PLANES=0, checked here too).
    """
    torch.manual_seed(0)
    x = torch.randn(3, 16, width, width)
    weight = torch.randn(4, 16, 16, 3, 3)
    weight[:, 0, 0, 1, 0] = float("inf")
    attn = torch.softmax(torch.randn(3, 4), dim=1)
    corner = {}
    for value in (None, "0"):
        if value is not None:
            monkeypatch.setenv("CHANFLEX_CPU_DIRECT_PLANES", value)
        with torch.no_grad():
            corner[value] = dynamic_conv2d(x, weight, attn, stride=stride, padding=1)[:, 0, 0, 0]
    monkeypatch.delenv("CHANFLEX_CPU_DIRECT_PLANES")
    assert corner["0"].isnan().all(), corner["0"]
    assert corner[None].isfinite().all() or corner[None].isnan().all(), corner[None]
    return bool(corner[None].isfinite().all())


@pytest.mark.parametrize("width, stride", [(5, 1), (7, 1), (14, 2), (28, 2)])
def test_plane_kernels_taken_by_default(monkeypatch, width, stride, plane_kernels):
    assert corner_on_plane_kernels(monkeypatch, width, stride)


def test_plane_kernels_taken_past_packed_pixels(monkeypatch, plane_kernels):
    # 56x56 -> 28x28 at stride 2 (784 output pixels) takes the plane kernels
    # where it took the library's grouped conv, which skips the padding as
    # they do: told apart by the rounding (each sums in its own order), on
    # outputs that both match the reference (PLANE_CASES).
    torch.manual_seed(0)
    x = torch.randn(3, 16, 56, 56)
    weight = torch.randn(4, 16, 16, 3, 3)
    attn = torch.softmax(torch.randn(3, 4), dim=1)
    outputs = {}
    for value in ("1", "0"):
        monkeypatch.setenv("CHANFLEX_CPU_DIRECT_PLANES", value)
        with torch.no_grad():
            outputs[value] = dynamic_conv2d(x, weight, attn, stride=2, padding=1)
    monkeypatch.delenv("CHANFLEX_CPU_DIRECT_PLANES")
    with torch.no_grad():
        default = dynamic_conv2d(x, weight, attn, stride=2, padding=1)
    torch.testing.assert_close(outputs["1"], outputs["0"], rtol=1e-4, atol=1e-4)
    assert torch.equal(default, outputs["1"])
    assert not torch.equal(default, outputs["0"])


# AVX2's plane kernels: stride 1 only, 5x5 and 7x7 (calls of 5 pixels in
# raster order, the last of 7x7 4, some across two rows; A mixed by its own
# pass, so any K, 9 included); its stride-2 planes keep the padding classes.
# 600 and 130 channels carry partial sums over reduction blocks.
PLANE_CASES_AVX2 = [case for case in PLANE_CASES if case.stride == (1, 1)] + [
    Case(3, 16, 48, 5, 5, padding=(1, 1), num_kernels=9),
    Case(4, 16, 32, 5, 5, padding=(1, 1), layout="channels_last"),
    Case(3, 24, 20, 5, 5, padding=(1, 1), groups=2, num_kernels=1, bias=False),
    Case(2, 8, 17, 5, 5, padding=(1, 1), num_kernels=2),
    Case(2, 8, 17, 7, 7, padding=(1, 1), num_kernels=2, layout="sliced"),
]


@pytest.fixture
def plane_kernels_avx2(monkeypatch):
    monkeypatch.setenv("CHANFLEX_CPU_ISA", "avx2")
    if torch.ops.chanflex.cpu_packed_isa() != "avx2":
        pytest.skip("this CPU has no AVX2")


@pytest.mark.parametrize("case", PLANE_CASES_AVX2, ids=lambda c: c.id)
def test_plane_kernels_avx2_match_reference(case, threads, plane_kernels_avx2):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("chunk_bytes", ["1", "20000"], ids=["chunk-threads", "chunk-20k"])
@pytest.mark.parametrize("case", PLANE_CASES_AVX2[1:3], ids=lambda c: c.id)
def test_plane_kernels_avx2_across_chunks(monkeypatch, case, chunk_bytes, plane_kernels_avx2):
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, True)], ids=str)
def test_plane_kernels_avx2_backward_output_masks(mask, plane_kernels_avx2):
    assert_masked_backward_matches(PLANE_CASES_AVX2[1], mask)


@pytest.mark.parametrize("width, stride, taken", [(5, 1, True), (7, 1, True), (14, 2, False), (28, 2, False)])
def test_plane_kernels_avx2_taken_by_default(monkeypatch, width, stride, taken, plane_kernels_avx2):
    assert corner_on_plane_kernels(monkeypatch, width, stride) == taken


# The direct weight gradient: dW and dattn from the channels-last input, one
# call per tap over the rectangle of output pixels whose tap reads inside
# the image, the W and dW tiles gathered into and out of a tap-major block
# layout. Default where >= 4% of the products are padding; forced
# on here for both ISAs. Each case takes the packed weight side (4+ blocks a
# thread): 40 channels leave a short last call (32 + 8; 16 + 16 + 8 on
# AVX2), stride 2 on an odd plane, pad 2 with dilation 2, a 5x3 kernel, 12
# channels per group (packed channel by channel, not 8 at a time), and a
# 5x5 kernel on a 2x2 plane whose corner taps read nothing.
DIRECT_CASES = [
    Case(5, 40, 250, 7, 7, padding=(1, 1)),
    Case(4, 64, 150, 13, 11, stride=(2, 2), padding=(1, 1), num_kernels=3),
    Case(3, 32, 300, 9, 9, padding=(2, 2), dilation=(2, 2), bias=False),
    Case(3, 24, 300, 9, 8, kernel=(5, 3), padding=(2, 1), num_kernels=9),
    Case(4, 48, 400, 6, 6, padding=(1, 1), groups=4),
    Case(3, 32, 144, 2, 2, kernel=(5, 5), padding=(2, 2), num_kernels=1),
    Case(2, 64, 192, 18, 18, padding=(1, 1)),  # 324 pixels: past AVX2's packed forward, not its weight side
]


@pytest.fixture(params=["avx512", "avx2"], ids=lambda isa: f"isa-{isa}")
def direct_weight_grad(request, monkeypatch):
    return _force_on_packed_isa(monkeypatch, request.param, "CHANFLEX_CPU_DIRECT_WEIGHT_GRAD")


@pytest.mark.parametrize("case", DIRECT_CASES, ids=lambda c: c.id)
def test_direct_weight_grad_matches_reference(case, threads, direct_weight_grad):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("chunk_bytes", ["1", "60000"], ids=["chunk-threads", "chunk-60k"])
@pytest.mark.parametrize("case", DIRECT_CASES[:2], ids=lambda c: c.id)
def test_direct_weight_grad_across_chunks(monkeypatch, case, chunk_bytes, direct_weight_grad):
    # Later chunks transpose the dW the earlier ones wrote back into the
    # block layout and add to it; only the last writes with streaming stores.
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


# Where the batch's input panels exceed the budget, they are packed a slab
# of column blocks (input channels) at a time, each slab with at least 8
# weight blocks a thread. 96 channels in each of 2 groups: 3 column blocks
# on AVX-512 (6 on AVX2) and 9 row blocks a group (18 blocks a column).
# 30000 bytes: slabs of 1 block (2 at 3 threads) for the whole batch; 20000:
# chunks of samples as well (one block of the batch does not fit).
SLAB_CASE = Case(3, 192, 800, 6, 6, padding=(1, 1), groups=2, num_kernels=3)


@pytest.mark.parametrize("chunk_bytes", ["30000", "20000"])
def test_direct_weight_grad_in_slabs(monkeypatch, chunk_bytes, threads, direct_weight_grad):
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, SLAB_CASE, torch.float32)


@pytest.mark.parametrize("mask", [(False, True, False), (False, False, True)], ids=str)
@pytest.mark.parametrize("case", DIRECT_CASES[:2], ids=lambda c: c.id)
def test_direct_weight_grad_output_masks(case, mask, direct_weight_grad):
    # dW without dattn (no W tiles copied in), dattn without dW.
    assert_masked_backward_matches(case, mask)


def test_direct_weight_grad_scratch_reuse(direct_weight_grad):
    # The lanes past a group's last channel in the input panels are left as
    # a larger call wrote them (they reach only G columns the fold never
    # reads): NaN there must not leak in.
    from comparison import make_inputs
    big = Case(6, 64, 256, 12, 12, padding=(1, 1))
    x, weight, attn = (t.float() for t in make_inputs(big)[:3])
    nan = float("nan")
    y = torch.ops.chanflex.dynamic_conv2d(x.fill_(nan), weight.fill_(nan), attn.fill_(nan), None,
                                          [1, 1], [1, 1], [1, 1], 1)
    _backward(big, x, weight, attn, torch.full_like(y, nan))
    for case in (DIRECT_CASES[0], DIRECT_CASES[4]):
        assert_matches_reference(dynamic_conv2d, case, torch.float32)


# Task scheduling (parallel_tasks, every parallel phase of the kernel): each
# thread starts on its even share of the phase's tasks and, once done, takes
# runs of what is left of the others' (CHANFLEX_CPU_SCHEDULE: "balanced" by
# default; "static" for one range a thread; "steal" for every thread
# starting on the others' shares, so that the stealing runs whatever the
# timing).
SCHEDULES = ["static", "balanced", "steal"]


def _share_owners(tasks, threads):
    # The thread whose even share holds each task: [t * tasks / threads, (t + 1) * tasks / threads).
    used = min(threads, tasks)
    return [next(t for t in reversed(range(used)) if t * tasks // used <= task) for task in range(tasks)]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("tasks", [0, 1, 2, 3, 7, 64, 1001])
def test_parallel_tasks_run_each_task_once(monkeypatch, schedule, tasks, threads):
    monkeypatch.setenv("CHANFLEX_CPU_SCHEDULE", schedule)
    counts, ran_on = torch.ops.chanflex.cpu_parallel_tasks_trace(tasks)
    assert counts.tolist() == [1] * tasks
    used = min(threads, tasks)
    assert set(ran_on.tolist()) <= set(range(max(used, 1)))
    if schedule == "static":  # at::parallel_for's split: ranges of ceil(tasks / threads)
        assert ran_on.tolist() == [task // -(-tasks // used) for task in range(tasks)]
    if schedule == "steal" and used > 1:
        # Every thread starts on another's share: some task runs off its owner.
        assert ran_on.tolist() != _share_owners(tasks, threads)


def test_schedule_switch_rejects_other_values(monkeypatch):
    monkeypatch.setenv("CHANFLEX_CPU_SCHEDULE", "dynamic")
    with pytest.raises(RuntimeError, match="CHANFLEX_CPU_SCHEDULE: expected 'balanced', 'static' or 'steal', "
                                           "got 'dynamic'"):
        torch.ops.chanflex.cpu_parallel_tasks_trace(16)


# --- Depthwise convs (depthwise.h): one input channel per group ---------------
# Planes inside their padding, split by the stride into phases; the weight
# side takes blocks of 4 output channels.
DEPTHWISE_CASES = [
    Case(3, 6, 6, 7, 9, padding=(1, 1), groups=6),                                     # stride 1: one phase
    Case(2, 4, 12, 8, 9, padding=(2, 1), dilation=(2, 2), groups=4, kernel=(3, 5)),    # channel multiplier 3, dilated
    Case(2, 4, 12, 8, 7, stride=(2, 3), padding=(2, 1), dilation=(2, 1), groups=4, kernel=(3, 5)),  # 2 x 3 phases, dilated
    Case(2, 5, 5, 9, 8, stride=(2, 1), padding=(1, 1), groups=5),                      # phases of rows only
    Case(2, 5, 5, 9, 8, stride=(1, 2), padding=(1, 1), groups=5),                      # phases of columns only
    Case(3, 4, 4, 9, 9, stride=(2, 2), padding=(1, 1), groups=4, num_kernels=2),       # MobileNet's stride 2
    Case(2, 3, 6, 11, 10, kernel=(5, 5), stride=(2, 2), padding=(2, 2), groups=3),     # 5x5 stride 2, multiplier 2
    Case(2, 4, 4, 13, 12, stride=(3, 2), dilation=(2, 3), padding=(0, 1), groups=4),   # taps across 3 x 2 phases
    Case(4, 5, 10, 6, 6, kernel=(1, 1), groups=5),                                     # 1x1
    Case(2, 3, 3, 5, 5, kernel=(5, 5), groups=3, num_kernels=1, bias=False),           # one output pixel, K = 1
    Case(1, 8, 8, 4, 4, stride=(2, 2), padding=(3, 3), groups=8),                      # rows and columns all padding
    Case(1, 8, 8, 4, 4, padding=(3, 2), groups=8),                                     # output wider than the input
    Case(2, 4, 8, 9, 9, padding=(1, 1), groups=4, layout="channels_last"),
    Case(2, 4, 8, 9, 9, padding=(1, 1), groups=4, layout="sliced"),
    Case(5, 9, 9, 14, 14, padding=(1, 1), groups=9, num_kernels=9),                    # blocks of 4, 4 and 1 channels
    Case(0, 4, 4, 5, 5, padding=(1, 1), groups=4),                                     # no samples
]


@pytest.fixture
def depthwise(monkeypatch):
    monkeypatch.setenv("CHANFLEX_CPU_DEPTHWISE", "1")


@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: c.id)
def test_depthwise_matches_reference(case, threads, depthwise):
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [DEPTHWISE_CASES[1], DEPTHWISE_CASES[2]], ids=lambda c: c.id)
def test_depthwise_dtypes(case, dtype, depthwise):
    assert_matches_reference(dynamic_conv2d, case, dtype)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True)], ids=str)
@pytest.mark.parametrize("case", [DEPTHWISE_CASES[1], DEPTHWISE_CASES[2]], ids=lambda c: c.id)
def test_depthwise_backward_output_masks(case, mask, depthwise):
    assert_masked_backward_matches(case, mask)


@pytest.mark.parametrize("case", [DEPTHWISE_CASES[0], DEPTHWISE_CASES[2]], ids=lambda c: c.id)
def test_depthwise_switched_off_matches_reference(monkeypatch, case):
    # CHANFLEX_CPU_DEPTHWISE=0: the other paths take depthwise convs (GEMMs of one row of taps).
    monkeypatch.setenv("CHANFLEX_CPU_DEPTHWISE", "0")
    assert_matches_reference(dynamic_conv2d, case, torch.float32)


def test_depthwise_taken_by_default(monkeypatch):
    # Told apart by the rounding: the default's output and gradients are the
    # depthwise path's bit for bit, and not the other paths' (each sums in its own order).
    from comparison import make_inputs
    case = Case(4, 32, 32, 14, 14, padding=(1, 1), groups=32)
    inputs = [t.float().requires_grad_() for t in make_inputs(case)]
    grad_out = torch.randn(4, 32, 14, 14, generator=torch.Generator().manual_seed(1))
    results = {}
    for value in (None, "1", "0"):
        if value is None:
            monkeypatch.delenv("CHANFLEX_CPU_DEPTHWISE", raising=False)
        else:
            monkeypatch.setenv("CHANFLEX_CPU_DEPTHWISE", value)
        y = dynamic_conv2d(*inputs, **case.conv_args)
        results[value] = [y.detach()] + list(torch.autograd.grad(y, inputs, grad_out))
    assert all(torch.equal(a, b) for a, b in zip(results[None], results["1"]))
    assert not all(torch.equal(a, b) for a, b in zip(results[None], results["0"]))


def test_depthwise_switch_rejects_other_values(monkeypatch):
    from comparison import make_inputs
    x, weight, attn, _ = (t.float() for t in make_inputs(DEPTHWISE_CASES[0]))
    monkeypatch.setenv("CHANFLEX_CPU_DEPTHWISE", "yes")
    with pytest.raises(RuntimeError, match="CHANFLEX_CPU_DEPTHWISE: expected '0' or '1', got 'yes'"):
        dynamic_conv2d(x, weight, attn, padding=1, groups=6)


# One case per path whose phases run on parallel_tasks, with the switches
# that send it there.
SCHEDULE_CASES = {
    "winograd": (WINOGRAD_WEIGHT_GRAD_CASES[-1], {"CHANFLEX_CPU_WINOGRAD": "1",
                                                  "CHANFLEX_CPU_WINOGRAD_WEIGHT_GRAD": "1"}),
    "packed": (TILED_CASES[0], {}),
    "grad-blocks": (BLOCK_LAYOUT_CASES[1], {"CHANFLEX_CPU_GRAD_BLOCKS": "1"}),
    "direct-weight-grad": (DIRECT_CASES[0], {"CHANFLEX_CPU_DIRECT_WEIGHT_GRAD": "1"}),
    "plane-kernels": (PLANE_CASES[1], {}),
    "streamed": (TILED_CASES[8], {}),
    "blas": (TILED_CASES[0], {"CHANFLEX_CPU_ISA": "generic"}),
    "blas-split-samples": (TILED_CASES[4], {"CHANFLEX_CPU_ISA": "generic"}),
    "depthwise": (DEPTHWISE_CASES[-2], {}),
    "depthwise-strided": (DEPTHWISE_CASES[2], {}),
}


@pytest.mark.parametrize("workers", [2, 3], ids=lambda n: f"threads{n}")
@pytest.mark.parametrize("path", list(SCHEDULE_CASES))
def test_schedules_give_identical_results(monkeypatch, path, workers):
    # No task depends on which thread runs it or on the runs it comes in: the
    # output and every gradient are bitwise equal under every schedule, and
    # match the reference.
    from comparison import make_inputs
    case, switches = SCHEDULE_CASES[path]
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    before = torch.get_num_threads()
    torch.set_num_threads(workers)
    try:
        inputs = [None if t is None else t.float().requires_grad_() for t in make_inputs(case)]
        grad_out = None
        results = {}
        for schedule in SCHEDULES:
            monkeypatch.setenv("CHANFLEX_CPU_SCHEDULE", schedule)
            y = dynamic_conv2d(*inputs, **case.conv_args)
            if grad_out is None:
                grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            leaves = [t for t in inputs if t is not None]
            results[schedule] = [y.detach()] + list(torch.autograd.grad(y, leaves, grad_out))
        for schedule in SCHEDULES[1:]:
            for what, first, again in zip(("output", "x", "weight", "attn", "bias"), results["static"],
                                          results[schedule]):
                assert torch.equal(first, again), f"{what} differs between the static and {schedule} schedules"
        assert_matches_reference(dynamic_conv2d, case, torch.float32)  # under "steal"
    finally:
        torch.set_num_threads(before)


def random_medium_cases(count, seed):
    """Random float32 layers of the sizes the paths above choose between, with a thread count each.

    Up to 64 channels a group and 63x63 planes, kernels up to 7x7, strides
    up to 3, a fifth dilated, under the default path rules: the cases above
    pin each path on purpose; these draw the shapes and block and chunk
    edges nobody picked (which path each takes is not asserted). At least 4 attention entries a case, so
    that grad_attn's tolerance (a fraction of its largest entry) is not
    that of a single, possibly cancelling, sum.
    """
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        kernel = rng.choice([1, 1, 3, 3, 3, 3, 5, 7])
        kernel = (kernel, kernel if rng.random() < 0.85 else rng.choice([1, 3, 5]))
        stride = rng.choice([1, 1, 1, 2, 2, 3])
        dilation = 2 if rng.random() < 0.2 else 1
        padding = rng.choice([0, 1, kernel[0] // 2, kernel[0] // 2])
        groups = rng.choice([1, 1, 1, 2, 4])
        size = rng.choice([5, 7, 10, 13, 14, 17, 21, 28, 29, 42, 56, 63])
        height, width = size, size if rng.random() < 0.8 else rng.choice([9, 14, 20])
        if any(dilation * (k - 1) + 1 > s + 2 * padding for k, s in zip(kernel, (height, width))):
            continue
        case = Case(batch=rng.choice([1, 2, 3, 4, 5, 8]), in_channels=groups * rng.choice([1, 3, 8, 16, 17, 32, 64]),
                    out_channels=groups * rng.choice([2, 7, 16, 24, 33, 64]), height=height, width=width,
                    kernel=kernel, stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation),
                    groups=groups, num_kernels=rng.choice([1, 2, 4, 4, 5, 9]), bias=rng.random() < 0.6,
                    layout=rng.choice(["contiguous", "contiguous", "channels_last", "sliced"]))
        macs = case.batch * case.in_channels // groups * case.out_channels * kernel[0] * kernel[1] * height * width
        if case.batch * case.num_kernels < 4 or macs > 2e8 / stride ** 2:
            continue
        cases.append((case, rng.choice([1, 2, 3])))
    return cases


RANDOM_MEDIUM_CASES = random_medium_cases(16, seed=48)


@pytest.mark.parametrize("case, workers", RANDOM_MEDIUM_CASES, ids=lambda v: v.id if isinstance(v, Case) else f"threads{v}")
def test_random_medium_shapes_match_reference(monkeypatch, isa, case, workers):
    monkeypatch.delenv("CHANFLEX_CPU_WINOGRAD")  # the default rules, Winograd included
    before = torch.get_num_threads()
    torch.set_num_threads(workers)
    try:
        assert_matches_reference(dynamic_conv2d, case, torch.float32)
    finally:
        torch.set_num_threads(before)
