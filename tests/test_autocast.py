"""Inside torch.autocast the op and the modules run as F.conv2d / nn.Conv2d do.

Autocast lists conv2d as a lower-precision op: its float32 (and half) inputs
are cast to autocast's dtype and so is its output; float64 is left alone. A
DynamicConv2d under autocast gets float32 x and weight but attention logits
from an autocast nn.Linear, so without the same casts it mixes dtypes.
"""
import pytest
import torch
from torch import nn

import chanflex_kernels
from chanflex_kernels import ChannelFlexConv2d, DynamicConv2d, dynamic_conv2d, use_backend
from chanflex_kernels import triton as triton_backend
from chanflex_kernels.reference import dynamic_conv2d_reference
from comparison import Case, assert_close_scaled, make_inputs

HALF_TYPES = [torch.bfloat16, torch.float16]
BACKENDS = ["auto", "reference"] + (["triton"] if triton_backend.AVAILABLE and triton_backend.launch.interpreting()
                                    else [])
CASE = Case(3, 6, 8, 9, 7, stride=(2, 1), padding=(1, 1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_op_runs_in_the_autocast_dtype(backend, dtype):
    """float32 leaves in, autocast's dtype out; gradients reach the leaves as float32."""
    inputs = make_inputs(CASE)
    leaves = [t.float().requires_grad_() for t in inputs]
    with use_backend(backend), torch.autocast("cpu", dtype=dtype):
        actual = dynamic_conv2d(*leaves, **CASE.conv_args)
    assert actual.dtype == dtype, f"output dtype: expected {dtype} (autocast's), got {actual.dtype}"
    # The reference on the inputs rounded to dtype, as autocast rounds them.
    ref_in = [t.to(dtype).double().requires_grad_() for t in inputs]
    expected = dynamic_conv2d_reference(*ref_in, **CASE.conv_args)
    assert_close_scaled(actual, expected, dtype, "output")
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with use_backend(backend):
        grads = torch.autograd.grad(actual, leaves, grad_out)
    ref_grads = torch.autograd.grad(expected, ref_in, grad_out.double())
    for name, leaf, grad, ref in zip(("x", "weight", "attn", "bias"), leaves, grads, ref_grads):
        assert grad.dtype == torch.float32, f"grad of {name}: expected the leaf's float32, got {grad.dtype}"
        assert_close_scaled(grad, ref, dtype, f"grad of {name}")


def test_float64_is_not_cast():
    """As for F.conv2d, autocast leaves float64 alone: same dtype, same values as outside it."""
    x, weight, attn, bias = make_inputs(CASE)
    expected = dynamic_conv2d(x, weight, attn, bias, **CASE.conv_args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = dynamic_conv2d(x, weight, attn, bias, **CASE.conv_args)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_mixed_dtypes_outside_autocast_still_fail():
    x, weight, attn, bias = (t.float() for t in make_inputs(CASE))
    with pytest.raises(ValueError, match=r"expected attn to have the dtype of x \(torch.float32\), got torch.bfloat16"):
        dynamic_conv2d(x, weight, attn.bfloat16(), bias, **CASE.conv_args)


def _modules():
    torch.manual_seed(0)
    return [
        (DynamicConv2d(6, 8, 3, stride=2, padding=1, groups=2), {}),
        (ChannelFlexConv2d(6, 8, 3, padding=1), {"channel_mask": torch.tensor([[1, 1, 0, 1, 0, 1]] * 3).bool()}),
    ]


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("index", [0, 1], ids=["DynamicConv2d", "ChannelFlexConv2d"])
def test_module_trains_under_autocast(index, dtype):
    """The modules' forward under autocast: autocast's dtype out, close to float32; float32 parameter grads."""
    module, kwargs = _modules()[index]
    x = torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(2))
    expected = module(x, **kwargs)
    expected.square().sum().backward()
    float_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    with torch.autocast("cpu", dtype=dtype):
        actual = module(x, **kwargs)
    assert actual.dtype == dtype, f"output dtype: expected {dtype} (autocast's), got {actual.dtype}"
    # Attention, mixing and conv all round to dtype: a few of its ulps, measured on the largest value.
    assert_close_scaled(actual, expected.detach(), dtype, "output")
    actual.float().square().sum().backward()
    for (name, p), ref in zip(module.named_parameters(), float_grads):
        assert p.grad is not None and p.grad.dtype == torch.float32, f"grad of {name}: {p.grad}"
        # The attention's gradients are cancelling sums through the softmax: up to 4% in bfloat16.
        scale = ref.abs().max().item()
        err = (p.grad - ref).abs().max().item()
        assert err <= 0.1 * scale, f"grad of {name}: max error {err:.3g} vs largest value {scale:.3g}"


@pytest.mark.slow
def test_compile_under_autocast_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(DynamicConv2d(3, 8, 3, padding=1), nn.ReLU(), DynamicConv2d(8, 4, 3, stride=2))
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(net, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = net(x)
        actual = compiled(x)
    assert actual.dtype == torch.bfloat16
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-2)


def test_inference_under_autocast_in_a_converted_model():
    torchvision = pytest.importorskip("torchvision")
    model = chanflex_kernels.convert(torchvision.models.resnet18(weights=None, num_classes=10), num_kernels=2).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA autocast)")
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_module_under_cuda_autocast(dtype):
    """On CUDA tensors autocast casts the same way; the op runs its CUDA backend (Triton) in dtype."""
    torch.manual_seed(0)
    module = DynamicConv2d(6, 8, 3, stride=2, padding=1, groups=2).cuda()
    x = torch.randn(3, 6, 9, 9, device="cuda")
    expected = module(x)
    with torch.autocast("cuda", dtype=dtype):
        actual = module(x)
    assert actual.dtype == dtype, f"output dtype: expected {dtype} (autocast's), got {actual.dtype}"
    assert_close_scaled(actual.float().cpu(), expected.detach().cpu(), dtype, "output")
    actual.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in module.parameters())
