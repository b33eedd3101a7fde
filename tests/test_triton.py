"""Triton backend: each kernel's output and every gradient vs the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 before chanflex_kernels is
imported); with a GPU the same tests run the compiled kernels on CUDA tensors.
"""
import pytest
import torch

import chanflex_kernels
from chanflex_kernels import DynamicConv2d, dynamic_conv2d, per_sample_conv2d, use_backend
from chanflex_kernels import triton as triton_backend
from chanflex_kernels.reference import dynamic_conv2d_reference
from comparison import Case, assert_close_scaled, assert_matches_reference, make_inputs
from test_op import EDGE_CASES, random_cases

pytestmark = pytest.mark.skipif(not triton_backend.AVAILABLE, reason="triton does not import")

if triton_backend.AVAILABLE:
    from triton.runtime import Autotuner

    from chanflex_kernels.triton import kernels, launch

    INTERPRETING = launch.interpreting()
    DEVICE = "cpu" if INTERPRETING else "cuda"
    if not INTERPRETING and not torch.cuda.is_available():
        pytestmark = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
else:
    INTERPRETING, DEVICE = False, "cpu"

needs_gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU (the compiled kernels)")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel output buffers start as NaN: an element a kernel forgets to write fails the comparison."""
    if triton_backend.AVAILABLE:
        monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def triton_conv(*args, **kwargs):
    with use_backend("triton"):
        return dynamic_conv2d(*args, **kwargs)


CASES = EDGE_CASES + random_cases(8, seed=4321)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    assert_matches_reference(triton_conv, case, torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(3, 8, 8, 10, 10, padding=(1, 1)),
                                  Case(4, 6, 9, 9, 7, stride=(2, 2), groups=3, layout="channels_last")],
                         ids=lambda c: c.id)
def test_half_types(case, dtype):
    assert_matches_reference(triton_conv, case, dtype, device=DEVICE)


# Fixed 16-wide tiles with shapes just past them, so every kernel has partial tiles
# along each of its axes; 3 sample slices over 7 samples; K = 9 > 8 needs two kernel chunks.
SMALL_TILES = launch.Tiling(16, 16, 16, 16, 16, 16, num_slices=3) if triton_backend.AVAILABLE else None
TILE_EDGE_CASES = [
    Case(7, 6, 17, 6, 3, padding=(1, 1)),                                     # 18 pixels, 17 out channels, R=54
    Case(3, 17, 5, 5, 4, kernel=(1, 3), padding=(0, 1), num_kernels=9),       # 17 in channels (bwd-data N), K=9
    Case(4, 34, 34, 4, 5, kernel=(3, 2), stride=(2, 1), groups=2, dilation=(1, 2), padding=(1, 1)),
]


@pytest.mark.parametrize("case", TILE_EDGE_CASES, ids=lambda c: c.id)
def test_tile_boundaries(case, monkeypatch):
    monkeypatch.setattr(launch, "TILING_OVERRIDE", SMALL_TILES)
    assert_matches_reference(triton_conv, case, torch.float32, device=DEVICE)


def test_wgrad_tiles_span_several_dattn_rows(monkeypatch):
    """32x32 wgrad tiles over 16x16 dattn row blocks, with partial blocks: each row written exactly once."""
    monkeypatch.setattr(launch, "TILING_OVERRIDE", launch.Tiling(16, 16, 16, 32, 32, 16, num_slices=2))
    assert_matches_reference(triton_conv, Case(3, 20, 40, 5, 5, padding=(1, 1), num_kernels=3), torch.float32,
                             device=DEVICE)


def test_strided_weight_attn_and_bias():
    """Kernels read weight, attn and bias through their strides: slices and transposes, not copies."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 7, 6, generator=gen)
    weight = torch.randn(3, 6, 4, 3, 6, generator=gen)[..., ::2]       # (K, C_out, C_in, 3, 3), last stride 2
    attn = torch.randn(3, 3, generator=gen).t()                        # (B, K), column stride B
    bias = torch.randn(6, 3, generator=gen).t()                        # (K, C_out), transposed
    assert not (weight.is_contiguous() or attn.is_contiguous() or bias.is_contiguous())
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, weight, attn, bias)]
    assert not leaves[2].is_contiguous()
    y = triton_conv(*leaves, stride=(2, 1), padding=1)
    ref_leaves = [t.double().requires_grad_() for t in (x, weight, attn, bias)]
    expected = dynamic_conv2d_reference(*ref_leaves, stride=(2, 1), padding=1)
    assert_close_scaled(y.detach().cpu(), expected.detach(), torch.float32, "output")
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(y, leaves, grad.float().to(DEVICE))
    ref = torch.autograd.grad(expected, ref_leaves, grad)
    for name, o, r in zip(("x", "weight", "attn", "bias"), ours, ref):
        assert_close_scaled(o.cpu(), r, torch.float32, f"grad of {name}")


def test_int64_index_path(monkeypatch):
    """The widened-index variant (for samples spanning 2**31 elements) computes the same thing."""
    monkeypatch.setattr(launch, "_needs_int64", lambda *tensors: True)
    assert_matches_reference(triton_conv, Case(3, 4, 6, 7, 6, stride=(2, 1), padding=(1, 1), groups=2),
                             torch.float32, device=DEVICE)


def _unwrapped(kernel):
    """The jitted kernel behind an autotuner (GPU), or the kernel itself."""
    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def test_kernels_really_run(monkeypatch):
    """Forward and backward launch the four Triton kernels (interpreted on CPU), and no other path runs."""
    launched = []
    real_wrap = launch.wrap_triton

    def recording_wrap(kernel):
        launched.append(_unwrapped(kernel))
        return real_wrap(kernel)

    monkeypatch.setattr(launch, "wrap_triton", recording_wrap)
    for compiled_op in ("dynamic_conv2d", "dynamic_conv2d_backward"):  # the C++ ops must not be reached
        monkeypatch.setattr(torch.ops.chanflex, compiled_op, None)
    case = Case(2, 4, 5, 6, 6, padding=(1, 1))
    assert_matches_reference(triton_conv, case, torch.float32, device=DEVICE)
    expected = [kernels._dynconv_fwd_kernel, kernels._dynconv_bwd_data_kernel, kernels._dynconv_bwd_weight_kernel,
                kernels._dynconv_bwd_bias_kernel]
    assert launched == expected
    if INTERPRETING:
        from triton.runtime.interpreter import InterpretedFunction

        assert all(isinstance(k, InterpretedFunction) for k in launched)


def test_only_requested_gradients_are_computed(monkeypatch):
    launched = []
    real_wrap = launch.wrap_triton
    monkeypatch.setattr(launch, "wrap_triton", lambda k: launched.append(_unwrapped(k)) or real_wrap(k))
    x, weight, attn, bias = (t.float().to(DEVICE) for t in make_inputs(Case(2, 3, 4, 5, 5)))
    x.requires_grad_()
    triton_conv(x, weight, attn, bias).sum().backward()
    assert launched == [kernels._dynconv_fwd_kernel, kernels._dynconv_bwd_data_kernel]
    assert x.grad is not None


def test_backward_is_deterministic():
    inputs = [t.float().to(DEVICE).requires_grad_() for t in make_inputs(Case(5, 6, 8, 7, 7, padding=(1, 1)))]
    grads = []
    for _ in range(2):
        out = triton_conv(*inputs, padding=1)
        grads.append(torch.autograd.grad(out, inputs, torch.ones_like(out)))
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_per_sample_conv2d_matches_loop():
    """K = B = 12: the wgrad kernel needs two kernel chunks; identity attention."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 6, 6, generator=gen).to(DEVICE).requires_grad_()
    w = torch.randn(12, 4, 3, 3, 3, generator=gen).to(DEVICE).requires_grad_()
    with use_backend("triton"):
        y = per_sample_conv2d(x, w, padding=1)
    expected = torch.cat([torch.nn.functional.conv2d(x[b:b + 1], w[b], padding=1) for b in range(12)])
    assert_close_scaled(y.cpu(), expected.detach().cpu(), torch.float32, "output")
    grad = torch.randn_like(y)
    for ours, ref in zip(torch.autograd.grad(y, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)):
        assert_close_scaled(ours.cpu(), ref.cpu(), torch.float32, "gradient")


def test_module_on_triton_backend_matches_cpp():
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 8, 3, padding=1, stride=2, num_kernels=3).to(DEVICE)
    x = torch.randn(4, 6, 9, 9, device=DEVICE)
    with use_backend("triton"):
        y = layer(x)
        y.square().mean().backward()
    triton_grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    with use_backend("reference"):
        expected = layer(x)
        expected.square().mean().backward()
    assert_close_scaled(y.detach().cpu(), expected.detach().cpu(), torch.float32, "output")
    for (name, p), g in zip(layer.named_parameters(), triton_grads):
        assert_close_scaled(g.cpu(), p.grad.cpu(), torch.float32, f"grad of {name}")


def _op_args(device=DEVICE):
    x, weight, attn, bias = (t.float().to(device) for t in make_inputs(Case(2, 4, 6, 5, 5, padding=(1, 1))))
    return x, weight, attn, bias, [1, 1], [1, 1], [1, 1], 1


def test_opcheck():
    """Schema, autograd registration and fake kernels. The AOT-dispatch checks run on a GPU only:
    the interpreter cannot run under AOT tracing (it reads data pointers; pytorch/pytorch#152868)."""
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if not INTERPRETING:
        utils += ("test_aot_dispatch_dynamic",)
    args = _op_args()
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d_triton.default, args, test_utils=utils)
    x, weight, attn, bias = args[:4]
    grad_out = torch.randn(2, 6, 5, 5, device=DEVICE)
    torch.library.opcheck(torch.ops.chanflex.dynamic_conv2d_backward_triton.default,
                          (grad_out, *args, [True, True, True, True]), test_utils=utils)


def test_compile_fullgraph():
    """torch.compile traces the Triton op without graph breaks (inductor on a GPU; dynamo only in the interpreter)."""
    args = _op_args()

    def fn(x, weight, attn, bias):
        return triton_conv(x, weight, attn, bias, padding=1).relu()

    compiled = torch.compile(fn, fullgraph=True, backend="eager" if INTERPRETING else "inductor")
    torch.testing.assert_close(compiled(*args[:4]), fn(*args[:4]))


def test_cuda_implementation_registered():
    """CUDA tensors of chanflex::dynamic_conv2d go to Triton (the CUDA C++ kernels have their own op)."""
    for name in ("chanflex::dynamic_conv2d", "chanflex::dynamic_conv2d_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")


@needs_gpu
def test_auto_backend_on_cuda_tensors():
    assert_matches_reference(dynamic_conv2d, Case(4, 8, 8, 9, 9, padding=(1, 1)), torch.float32, device="cuda")


def test_rejects_float64():
    x, weight, attn, bias = (t.to(DEVICE) for t in make_inputs(Case(1, 2, 2, 4, 4)))
    with pytest.raises(ValueError, match="expected float32, float16 or bfloat16, got torch.float64"):
        triton_conv(x, weight, attn, bias)


def test_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight, attn, bias = (t.float() for t in make_inputs(Case(1, 2, 2, 4, 4)))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_conv(x, weight, attn, bias)


def test_rejects_weights_past_int32_indexing():
    huge = torch.zeros((), device=DEVICE).expand(4, 2**14, 2**13, 3, 3)  # 4.8e9 elements, no memory
    x = torch.zeros(1, 2**13, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 weight elements"):
        launch.forward(x, huge, torch.zeros(1, 4, device=DEVICE), None, [1, 1], [0, 0], [1, 1], 1)


def test_backend_listed():
    assert "triton" in chanflex_kernels.BACKENDS


def test_gpu_benchmark_machinery():
    """The GPU benchmark's steps and table, exercised on a tiny shape on this test's device."""
    from chanflex_kernels.bench import ConvShape
    from chanflex_kernels.bench_gpu import GpuRow, gpu_step, markdown, providers

    tiny = ConvShape("tiny", 2, 4, 4, 6)
    for provider in providers():
        if provider == "cuda" and DEVICE == "cpu":
            continue  # backend 'cuda' runs CUDA tensors (test_cuda_kernels.py runs its kernels on the host)
        for mode in ("fwd", "fwd+bwd"):
            gpu_step(provider, tiny, torch.float32, mode, device=DEVICE)()
    table = markdown([GpuRow(tiny.id, "bf16", "fwd", {"static": 1.0, "triton": 1.1, "batch_as_groups": 3.3}),
                      GpuRow(tiny.id, "bf16", "fwd+bwd", {"static": 1.0, "triton": 1.6, "batch_as_groups": 3.2})])
    assert "| 1.10 | 3.30 | 3.00 | yes |" in table and "| 1.60 | 3.20 | 2.00 | no (> 1.5) |" in table
