"""Bad input: clear errors naming the expected and the actual value, before any kernel runs."""
import math

import pytest
import torch

from chanflex_kernels import ChannelFlexConv2d, DynamicConv2d, FlexChannelConv2d, dynamic_conv2d


def good():
    return dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(3, 6, 2, 3, 3), attn=torch.randn(2, 3),
                bias=torch.randn(3, 6), groups=2)


BAD = {
    "x-ndim": (dict(x=torch.randn(4, 8, 8)), r"expected x of shape \(B, C_in, H, W\), got 3-D tensor of shape \(4, 8, 8\)"),
    "weight-ndim": (dict(weight=torch.randn(6, 2, 3, 3)), r"expected weight of shape \(K, C_out, C_in/groups, kh, kw\), got 4-D"),
    "attn-ndim": (dict(attn=torch.randn(6)), r"expected attn of shape \(B, K\), got 1-D"),
    "channels": (dict(x=torch.randn(2, 6, 8, 8)), r"expected weight.shape\[2\] == C_in/groups = 3 .*got 2"),
    "attn-batch": (dict(attn=torch.randn(3, 3)), r"expected attn of shape \(B, K\) = \(2, 3\), got \(3, 3\)"),
    "attn-K": (dict(attn=torch.randn(2, 4)), r"expected attn of shape \(B, K\) = \(2, 3\), got \(2, 4\)"),
    "bias-shape": (dict(bias=torch.randn(6)), r"expected bias of shape \(K, C_out\) = \(3, 6\), got \(6,\)"),
    "dtype": (dict(attn=torch.randn(2, 3, dtype=torch.float64)), r"expected attn to have the dtype of x \(torch.float32\), got torch.float64"),
    "device": (dict(bias=torch.randn(3, 6, device="meta")), r"expected bias on the device of x \(cpu\), got meta"),
    "integer": (dict(x=torch.ones(2, 4, 8, 8, dtype=torch.int64), weight=torch.ones(3, 6, 2, 3, 3, dtype=torch.int64),
                     attn=torch.ones(2, 3, dtype=torch.int64), bias=None), r"expected a floating-point dtype, got torch.int64"),
    "groups-divide-in": (dict(x=torch.randn(2, 3, 8, 8), weight=torch.randn(3, 6, 1, 3, 3)), r"expected C_in divisible by groups, got C_in=3, groups=2"),
    "groups-divide-out": (dict(weight=torch.randn(3, 5, 2, 3, 3), bias=None), r"expected C_out divisible by groups, got C_out=5, groups=2"),
    "no-channels": (dict(x=torch.randn(2, 0, 8, 8), weight=torch.randn(3, 6, 0, 3, 3), groups=1),
                    r"expected x with at least one input channel, got shape \(2, 0, 8, 8\)"),
    "groups-zero": (dict(groups=0), r"expected groups to be a positive int, got 0"),
    "kernel-too-big": (dict(weight=torch.randn(3, 6, 2, 9, 3)), r"expected the dilated kernel \(9x3\) to fit in the padded input, got a padded input of 8x8"),
    "dilated-too-big": (dict(dilation=4), r"expected the dilated kernel \(9x9\) to fit in the padded input, got a padded input of 8x8"),
    "stride-zero": (dict(stride=0), r"expected stride >= 1, got \(0, 0\)"),
    "padding-negative": (dict(padding=(-1, 0)), r"expected padding >= 0, got \(-1, 0\)"),
    "padding-word": (dict(padding="full"), r"expected padding to be 'same', 'valid', an int or a pair, got 'full'"),
    "same-strided": (dict(padding="same", stride=2), r"padding='same' needs stride 1 \(as F.conv2d\), got stride=\(2, 2\)"),
    "stride-triple": (dict(stride=(1, 1, 1)), r"expected stride to be an int or a pair of ints, got \(1, 1, 1\)"),
    "not-a-tensor": (dict(attn=[[0.5, 0.5, 0.0]] * 2), r"expected attn to be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_op_rejects_bad_input(name):
    change, message = BAD[name]
    args = {**good(), **change}
    with pytest.raises(ValueError, match=message):
        dynamic_conv2d(**args)


@pytest.mark.parametrize("name", ["x-ndim", "channels", "attn-K", "bias-shape", "dtype", "groups-divide-out", "kernel-too-big",
                                  "no-channels"])
def test_compiled_op_checks_its_arguments_too(name):
    # Direct callers of torch.ops.chanflex get the C++ checks (RuntimeError), not a crash.
    change, _ = BAD[name]
    a = {**good(), **change}
    with pytest.raises(RuntimeError, match="dynamic_conv2d: expected .*got"):
        torch.ops.chanflex.dynamic_conv2d(a["x"], a["weight"], a["attn"], a["bias"], [1, 1], [0, 0], [1, 1], a["groups"])


def test_backward_op_checks_grad_out_shape():
    a = good()
    with pytest.raises(RuntimeError, match=r"expected grad_out of shape \(2, 6, 6, 6\), got \[2, 6, 5, 5\]"):
        torch.ops.chanflex.dynamic_conv2d_backward(torch.randn(2, 6, 5, 5), a["x"], a["weight"], a["attn"], a["bias"],
                                                   [1, 1], [0, 0], [1, 1], 2, [True, True, True, True])


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.inf, math.nan])
def test_module_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="expected a finite temperature > 0, got"):
        DynamicConv2d(4, 4, 3, temperature=temperature)
    layer = DynamicConv2d(4, 4, 3)
    with pytest.raises(ValueError, match="expected a finite temperature > 0, got"):
        layer.set_temperature(temperature)
    assert float(layer.temperature) == 30.0  # unchanged after the refused update


@pytest.mark.parametrize("kwargs,message", [
    (dict(in_channels=4, out_channels=6, kernel_size=3, groups=4), "expected groups to divide in_channels and out_channels, got in_channels=4, out_channels=6, groups=4"),
    (dict(in_channels=0, out_channels=6, kernel_size=3), "expected in_channels to be a positive int, got 0"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, num_kernels=0), "expected num_kernels to be a positive int, got 0"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding_mode="mirror"), r"expected padding_mode in \('zeros', 'reflect', 'replicate', 'circular'\), got 'mirror'"),
    (dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", stride=2), r"padding='same' needs stride 1, got stride=\(2, 2\)"),
    (dict(in_channels=4, out_channels=6, kernel_size=0), r"expected kernel_size, stride, dilation >= 1 and padding >= 0, got kernel_size=\(0, 0\)"),
])
def test_module_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicConv2d(**kwargs)


def test_module_rejects_wrong_channel_count():
    layer = DynamicConv2d(3, 8, 3)
    with pytest.raises(ValueError, match=r"expected input of shape \(B, 3, H, W\) or \(3, H, W\), got \(2, 4, 8, 8\)"):
        layer(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got \(8, 8\)"):
        layer(torch.randn(8, 8))


def test_module_rejects_input_smaller_than_kernel():
    layer = DynamicConv2d(3, 8, 5)
    with pytest.raises(ValueError, match=r"expected the dilated kernel \(5x5\) to fit in the padded input, got a padded input of 4x4"):
        layer(torch.randn(2, 3, 4, 4))


LAYERS = {
    "DynamicConv2d": lambda: DynamicConv2d(3, 8, 3, padding=1),
    "ChannelFlexConv2d": lambda: ChannelFlexConv2d(3, 8, 3, padding=1),
    "FlexChannelConv2d": lambda: FlexChannelConv2d(8, 3),
}


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
@pytest.mark.parametrize("dtype,message", [
    (torch.int64, r"expected a floating-point input, got torch.int64"),
    (torch.bool, r"expected a floating-point input, got torch.bool"),
    (torch.float64, r"expected input of dtype torch.float32 \(the layer's parameters'\), got torch.float64"),
    (torch.bfloat16, r"expected input of dtype torch.float32 \(the layer's parameters'\), got torch.bfloat16"),
])
def test_layers_reject_input_of_another_type(layer_name, dtype, message):
    layer = LAYERS[layer_name]()
    x = torch.randn(2, 3, 8, 8).to(dtype)
    with pytest.raises(ValueError, match=f"{layer_name}: {message}"):
        layer(x)


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_layers_reject_input_on_another_device(layer_name):
    layer = LAYERS[layer_name]()
    with pytest.raises(ValueError, match=f"{layer_name}: expected input on cpu \\(the layer's device\\), got meta"):
        layer(torch.randn(2, 3, 8, 8, device="meta"))


@pytest.mark.parametrize("layer_name", sorted(LAYERS))
def test_layers_take_half_input_under_autocast(layer_name):
    # autocast casts inside, as it does for nn.Conv2d: a float32 layer runs on a bfloat16 input.
    layer = LAYERS[layer_name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 3, 8, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 8, 8, 8)
