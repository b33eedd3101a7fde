"""chanflex::dynamic_conv2d (compiled CPU kernels): output and every gradient vs the float64 reference."""
import random

import pytest
import torch

import chanflex_kernels
from chanflex_kernels import dynamic_conv2d
from chanflex_kernels.reference import dynamic_conv2d_concat_k, dynamic_conv2d_grouped, dynamic_conv2d_reference
from comparison import Case, assert_close_scaled, assert_matches_reference, make_inputs

EDGE_CASES = [
    Case(0, 4, 6, 7, 7, padding=(1, 1)),                                  # empty batch
    Case(1, 3, 5, 8, 8),                                                  # single sample
    Case(7, 5, 6, 13, 11, kernel=(3, 1), stride=(2, 1), padding=(1, 0)),  # odd batch, non-square kernel, prime sizes
    Case(3, 6, 6, 9, 9, groups=6, padding=(1, 1)),                        # depthwise
    Case(2, 6, 9, 10, 12, groups=3, dilation=(2, 2), padding=(2, 1)),     # groups, dilation
    Case(5, 4, 8, 9, 9, kernel=(1, 1), bias=False),                       # 1x1, no bias
    Case(3, 4, 4, 11, 10, kernel=(2, 2), stride=(3, 3), num_kernels=1),   # stride > kernel, K=1
    Case(2, 3, 4, 5, 6, kernel=(5, 3), padding=(2, 0), num_kernels=6),    # kernel as large as the input, K=6
    Case(4, 6, 8, 9, 7, padding=(1, 1), layout="channels_last"),
    Case(4, 6, 8, 9, 7, stride=(2, 2), padding=(1, 1), groups=2, layout="sliced"),
    Case(3, 2, 3, 1, 1, kernel=(1, 1)),                                   # 1x1 image
    Case(2, 2, 3, 4, 4, kernel=(3, 3), padding=(3, 3), dilation=(3, 3)),  # padding larger than the image
]


def random_cases(count, seed=1234):
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        groups = rng.choice([1, 1, 2, 3])
        kernel = (rng.randint(1, 5), rng.randint(1, 5))
        dilation = (rng.randint(1, 2), rng.randint(1, 2))
        padding = (rng.randint(0, 2), rng.randint(0, 2))
        height, width = rng.randint(1, 12), rng.randint(1, 12)
        if any(d * (k - 1) + 1 > s + 2 * p for d, k, s, p in zip(dilation, kernel, (height, width), padding)):
            continue  # kernel would not fit: that is the bad-input test's job
        cases.append(Case(
            batch=rng.choice([1, 2, 3, 5, 8]), in_channels=groups * rng.randint(1, 4),
            out_channels=groups * rng.randint(1, 4), height=height, width=width, kernel=kernel,
            stride=(rng.randint(1, 3), rng.randint(1, 3)), padding=padding, dilation=dilation, groups=groups,
            num_kernels=rng.randint(1, 6), bias=rng.random() < 0.5,
            layout=rng.choice(["contiguous", "contiguous", "channels_last", "sliced"])))
    return cases


CASES = EDGE_CASES + random_cases(16)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_reference(case, dtype):
    assert_matches_reference(dynamic_conv2d, case, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(3, 8, 8, 10, 10, padding=(1, 1)),
                                  Case(4, 6, 9, 9, 7, stride=(2, 2), groups=3, layout="channels_last")],
                         ids=lambda c: c.id)
def test_half_precision_matches_reference(case, dtype):
    # Half types accumulate in float32 and round once; stated tolerance: TOLERANCES in comparison.py.
    assert_matches_reference(dynamic_conv2d, case, dtype)


# Large planes (>= 441 output pixels; the weight side from 784) with >= 16 input channels a group: where the
# CPU has native instructions for a half type, the library path runs its convs in that type
# (CHANFLEX_CPU_HALF_LIBRARY forces it on or off), and then also for stems and strided convs from
# 784-pixel inputs. Batch 5 crosses the library's 4-sample chunks.
LARGE_PLANE_CASES = [
    Case(3, 16, 8, 21, 21, padding=(1, 1)),
    Case(2, 32, 8, 58, 44, stride=(2, 1), padding=(1, 1), groups=2),                 # strided: the weight side
    Case(5, 16, 4, 28, 28, padding=(1, 1), layout="channels_last", bias=False),
    # Half types only: few input channels (a stem), and strided convs from 784-pixel input planes
    Case(2, 3, 8, 44, 44, kernel=(7, 7), stride=(2, 2), padding=(3, 3)),
    Case(5, 8, 6, 28, 28, stride=(2, 2), padding=(1, 1), num_kernels=3),
]


@pytest.mark.parametrize("half_library", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", LARGE_PLANE_CASES, ids=lambda c: c.id)
def test_half_precision_on_large_planes(monkeypatch, case, dtype, half_library):
    monkeypatch.setenv("CHANFLEX_CPU_HALF_LIBRARY", half_library)
    assert_matches_reference(dynamic_conv2d, case, dtype)


def _library_conv_dtypes(fn) -> set:
    """The input dtypes of the library convolutions (aten::conv2d, convolution_backward) fn runs."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return {e.input_dtypes[0] for e in prof.events()
            if e.name in ("aten::conv2d", "aten::convolution_backward") and e.input_dtypes}


@pytest.mark.parametrize("half_library, expected", [("1", {"c10::BFloat16"}), ("0", {"float"})])
def test_half_library_switch_picks_the_convs_type(monkeypatch, half_library, expected):
    monkeypatch.setenv("CHANFLEX_CPU_HALF_LIBRARY", half_library)
    monkeypatch.setenv("CHANFLEX_CPU_WINOGRAD", "0")  # float32 then takes 28x28 through the library too
    x, w, a, _ = make_inputs(LARGE_PLANE_CASES[2])  # no bias
    x, w, a = (t.bfloat16().requires_grad_() for t in (x, w, a))
    y = dynamic_conv2d(x, w, a, padding=1)
    assert _library_conv_dtypes(lambda: dynamic_conv2d(x, w, a, padding=1)) == expected
    assert _library_conv_dtypes(lambda: y.sum().backward()) == expected


@pytest.mark.parametrize("case", LARGE_PLANE_CASES[3:], ids=lambda c: c.id)
def test_half_library_takes_stems_and_strided_convs_from_large_inputs(monkeypatch, case):
    monkeypatch.setenv("CHANFLEX_CPU_HALF_LIBRARY", "1")
    x, w, a, b = (t.bfloat16().requires_grad_() for t in make_inputs(case))
    y = dynamic_conv2d(x, w, a, b, **case.conv_args)
    assert _library_conv_dtypes(lambda: dynamic_conv2d(x, w, a, b, **case.conv_args)) == {"c10::BFloat16"}
    assert _library_conv_dtypes(lambda: y.sum().backward()) == {"c10::BFloat16"}  # the weight side


def test_half_library_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("CHANFLEX_CPU_HALF_LIBRARY", "yes")
    x, w, a, b = (t.bfloat16() for t in make_inputs(LARGE_PLANE_CASES[0]))
    with pytest.raises(RuntimeError, match="CHANFLEX_CPU_HALF_LIBRARY: expected '0' or '1', got 'yes'"):
        dynamic_conv2d(x, w, a, b, padding=1)


@pytest.mark.parametrize("chunk_bytes", ["1", "6000"])
def test_chunk_boundaries(monkeypatch, chunk_bytes):
    # A tiny working-set budget forces one sample (or a few) per chunk, so the
    # kernels' batch loop crosses chunk boundaries at odd offsets.
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", chunk_bytes)
    assert_matches_reference(dynamic_conv2d, Case(7, 4, 6, 8, 8, padding=(1, 1), groups=2), torch.float64)


def test_chunk_budget_env_var_is_validated(monkeypatch):
    monkeypatch.setenv("CHANFLEX_CPU_CHUNK_BYTES", "lots")
    x, w, a, b = make_inputs(Case(2, 3, 4, 5, 5))
    with pytest.raises(RuntimeError, match="CHANFLEX_CPU_CHUNK_BYTES: expected a positive integer, got 'lots'"):
        dynamic_conv2d(x, w, a, b)


@pytest.mark.parametrize("needs", ["x", "weight", "attn", "bias", "weight+bias", "x+attn"])
def test_partial_gradients(needs):
    # The backward computes only what is asked and saves only what that reads.
    case = Case(3, 4, 6, 7, 7, padding=(1, 1), groups=2)
    inputs = make_inputs(case)
    wanted = needs.split("+")
    ours = [t.clone().requires_grad_(n in wanted) for n, t in zip(("x", "weight", "attn", "bias"), inputs)]
    refs = [t.clone().requires_grad_(n in wanted) for n, t in zip(("x", "weight", "attn", "bias"), inputs)]
    grad_out = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    dynamic_conv2d(*ours, **case.conv_args).backward(grad_out)
    dynamic_conv2d_reference(*refs, **case.conv_args).backward(grad_out)
    for name, o, r in zip(("x", "weight", "attn", "bias"), ours, refs):
        if name in wanted:
            assert_close_scaled(o.grad, r.grad, torch.float64, f"grad of {name}")
        else:
            assert o.grad is None


@pytest.mark.parametrize("kernel,dilation", [((3, 3), (1, 1)), ((4, 2), (1, 1)), ((2, 3), (2, 1))])
def test_padding_same_and_valid(kernel, dilation):
    # 'same' with an even dilated kernel pads one extra row/column at the far side, like F.conv2d.
    case = Case(2, 3, 4, 7, 6, kernel=kernel, dilation=dilation)
    x, w, a, b = make_inputs(case)
    for padding in ("same", "valid"):
        expected = dynamic_conv2d_reference(x, w, a, b, padding=padding, dilation=dilation)
        actual = dynamic_conv2d(x, w, a, b, padding=padding, dilation=dilation)
        assert actual.shape == expected.shape
        assert_close_scaled(actual, expected, torch.float64, f"padding={padding}")


def test_gradcheck():
    case = Case(2, 4, 4, 5, 6, kernel=(3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2, num_kernels=3)
    inputs = tuple(t.requires_grad_() for t in make_inputs(case))
    assert torch.autograd.gradcheck(lambda *t: dynamic_conv2d(*t, **case.conv_args), inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    case = Case(3, 4, 6, 6, 5, stride=(2, 1), padding=(1, 1), groups=2, bias=bias)
    x, w, a, b = (None if t is None else t.float().requires_grad_() for t in make_inputs(case))
    args = (x, w, a, b, [2, 1], [1, 1], [1, 1], 2)
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d.default, args)
    grad_out = torch.randn(3, 6, 3, 5)
    bwd_args = (grad_out, x.detach(), w.detach(), a.detach(), None if b is None else b.detach(),
                [2, 1], [1, 1], [1, 1], 2, [True, True, True, bias])
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d_backward.default, bwd_args)


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, False, False],
                                  [False, False, True, True], [False, False, False, False]], ids=str)
def test_backward_outputs_do_not_alias(mask):
    """Unrequested gradients are empty tensors, each its own: torch.library forbids outputs that alias
    (they shared one tensor, and AOTAutograd's runtime check failed under torch.compile)."""
    x, w, a, b = (t.float() for t in make_inputs(Case(2, 3, 4, 5, 5)))
    grad_out = torch.randn(2, 4, 3, 3)
    args = (grad_out, x, w, a, b, [1, 1], [0, 0], [1, 1], 1, mask)
    outputs = torch.ops.chanflex.dynamic_conv2d_backward(*args)
    storages = [t.untyped_storage()._cdata for t in outputs]
    assert len(set(storages)) == len(outputs), f"outputs share storage: {storages}"
    assert not set(storages) & {t.untyped_storage()._cdata for t in args[:5]}, "an output aliases an input"
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d_backward.default, args)


def test_cpu_kernels_come_from_the_compiled_extension(monkeypatch):
    for op in ("chanflex::dynamic_conv2d", "chanflex::dynamic_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op
    # The default backend must not fall back to the Python reference.
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the compiled kernel")
    monkeypatch.setattr(chanflex_kernels.ops, "dynamic_conv2d_reference", fail)
    x, w, a, b = (t.requires_grad_() for t in make_inputs(Case(2, 3, 4, 5, 5)))
    with torch.profiler.profile() as prof:
        dynamic_conv2d(x, w, a, b).sum().backward()
    names = {e.name for e in prof.events()}
    assert {"chanflex::dynamic_conv2d", "chanflex::dynamic_conv2d_backward"} <= names


@pytest.mark.parametrize("peer", [dynamic_conv2d_grouped, dynamic_conv2d_concat_k], ids=lambda f: f.__name__)
@pytest.mark.parametrize("case", [Case(3, 4, 6, 7, 7, padding=(1, 1)),
                                  Case(2, 6, 9, 8, 9, stride=(2, 1), groups=3, num_kernels=3)], ids=lambda c: c.id)
def test_peers_match_reference(peer, case):
    # The benchmark peers compute the same function as the op.
    assert_matches_reference(peer, case, torch.float64)


def _wrong_attn_order(x, w, a, b, **kw):
    return dynamic_conv2d(x, w, a.flip(1), b, **kw)


def _wrong_stride(x, w, a, b, stride, **kw):
    y = dynamic_conv2d(x, w, a, b, stride=(1, 1), **kw)
    return y[..., ::stride[0], ::stride[1]][..., :-1, :]  # shape now off by one row


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.001


def _wrong_weight_grad(x, w, a, b, **kw):
    return dynamic_conv2d(x, _ScaleGrad.apply(w), a, b, **kw)


@pytest.mark.parametrize("broken", [_wrong_attn_order, _wrong_stride, _wrong_weight_grad], ids=lambda f: f.__name__)
def test_comparison_catches_a_wrong_kernel(broken):
    # The comparison used by every test above fails on a deliberately wrong kernel.
    with pytest.raises(AssertionError):
        assert_matches_reference(broken, Case(3, 4, 6, 8, 8, stride=(2, 2), padding=(1, 1)), torch.float32)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_output_layout_follows_the_input_as_nn_conv2d(backend, layout):
    dtype = torch.float32 if backend == "triton" else torch.float64  # the interpreted Triton kernels: no float64
    x = torch.randn(3, 6, 7, 9, dtype=dtype)
    x = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
         "sliced": torch.randn(3, 12, 7, 9, dtype=dtype)[:, ::2]}[layout].requires_grad_()
    weight = torch.randn(2, 5, 6, 3, 3, dtype=dtype, requires_grad=True)
    attn = torch.randn(3, 2, dtype=dtype)
    with chanflex_kernels.use_backend(backend):
        y = dynamic_conv2d(x, weight, attn, padding=1)
    static = torch.nn.functional.conv2d(x, weight[0], padding=1)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        assert y.is_contiguous(memory_format=memory_format) == static.is_contiguous(memory_format=memory_format)
    expected = dynamic_conv2d_reference(x.detach().double().contiguous(), weight.detach().double(), attn.double(),
                                        padding=(1, 1))
    assert_close_scaled(y, expected, dtype, f"{backend} {layout}")
    y.backward(torch.randn_like(y))  # a channels-last gradient reaches the kernels' NCHW backward
    grad_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format  # as nn.Conv2d's
    assert x.grad.is_contiguous(memory_format=grad_format) and weight.grad.shape == weight.shape
