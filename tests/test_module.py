"""DynamicConv2d: nn.Conv2d's argument forms, attention, from_conv2d/convert, state_dict, compile."""
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
import torchvision

import chanflex_kernels
from chanflex_kernels import DynamicConv2d, anneal_temperature, convert
from comparison import assert_close_scaled

CONV_FORMS = [
    dict(kernel_size=3),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=(4, 2), padding="same"),           # asymmetric 'same'
    dict(kernel_size=3, padding="valid", stride=2),
    dict(kernel_size=3, padding=1, groups=2, bias=False),
    dict(kernel_size=3, padding=1, groups=6),            # depthwise
    dict(kernel_size=3, padding=2, padding_mode="reflect"),
    dict(kernel_size=3, padding=(1, 2), padding_mode="replicate", stride=2),
    dict(kernel_size=(2, 3), padding="same", padding_mode="circular"),
]


def _form_id(form):
    return "-".join(f"{k}={v}" for k, v in form.items())


@pytest.mark.parametrize("form", CONV_FORMS, ids=_form_id)
def test_single_kernel_equals_conv2d(form):
    # With K=1 the attention is exactly 1, so the layer is nn.Conv2d with the same weights.
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, **form).double()
    layer = DynamicConv2d.from_conv2d(conv, num_kernels=1)
    x = torch.randn(3, 6, 9, 10, dtype=torch.float64)
    assert_close_scaled(layer(x), conv(x), torch.float64, _form_id(form))


@pytest.mark.parametrize("form", CONV_FORMS, ids=_form_id)
def test_module_matches_reference_backend(form):
    torch.manual_seed(0)
    layer = DynamicConv2d(6, 12, **form, num_kernels=3, temperature=1.0).double()
    x = torch.randn(3, 6, 9, 10, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    with chanflex_kernels.use_backend("reference"):
        y_ref = layer(x)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    assert_close_scaled(y, y_ref, torch.float64, "output")
    assert_close_scaled(gx, gx_ref, torch.float64, "grad of x")


def test_attention_layout_and_parameter_count():
    layer = DynamicConv2d(3, 64, 3, padding=1, bias=False, num_kernels=4)
    assert layer.hidden_channels == 4  # in_channels == 3: hidden = K
    assert sum(p.numel() for p in layer.parameters()) == 4 * 64 * 3 * 9 + 3 * 4 + 4 * 4 + 4
    layer = DynamicConv2d(64, 128, 3, num_kernels=6)
    assert layer.hidden_channels == int(64 * 0.25) + 1
    assert layer.weight.shape == (6, 128, 64, 3, 3) and layer.bias.shape == (6, 128)
    assert DynamicConv2d(64, 64, 1, hidden_channels=7).hidden_channels == 7
    a = layer.attention(torch.randn(5, 64, 8, 8))
    assert a.shape == (5, 6)
    torch.testing.assert_close(a.sum(1), torch.ones(5))


def test_init_matches_conv2d_statistics():
    torch.manual_seed(0)
    layer = DynamicConv2d(64, 256, 3, num_kernels=4).requires_grad_(False)
    bound = 1 / math.sqrt(64 * 9)  # kaiming_uniform(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for k in range(4):
        assert layer.weight[k].abs().max() <= bound
        assert layer.weight[k].std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert not torch.equal(layer.weight[0], layer.weight[1])
    assert layer.bias.abs().max() <= bound


def test_temperature_sharpens_attention_and_anneals():
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(8, 8, 3), nn.ReLU(), DynamicConv2d(8, 8, 3))
    x = torch.randn(4, 8, 10, 10)
    flat = model[0].attention(x)
    assert anneal_temperature(model, 0) == 30.0
    assert anneal_temperature(model, 5) == pytest.approx(15.5)
    assert anneal_temperature(model, 10) == 1.0
    assert anneal_temperature(model, 25) == 1.0
    assert float(model[2].temperature) == 1.0
    sharp = model[0].attention(x)
    assert sharp.max(1).values.min() > flat.max(1).values.max() - 1e-6
    with pytest.raises(ValueError, match="expected epoch >= 0, got -1"):
        anneal_temperature(model, -1)


def test_unbatched_input_and_channels_last():
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    y = layer(x)
    assert_close_scaled(layer(x[1]), y[1], torch.float64, "unbatched")
    assert_close_scaled(layer(x.contiguous(memory_format=torch.channels_last)), y, torch.float64, "channels_last")


def test_state_dict_round_trip():
    torch.manual_seed(0)
    layer = DynamicConv2d(4, 6, 3, padding=1)
    layer.set_temperature(2.5)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = DynamicConv2d(4, 6, 3, padding=1)
    fresh.load_state_dict(torch.load(buffer))
    assert float(fresh.temperature) == 2.5
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    assert set(layer.state_dict()) == {"weight", "bias", "attn_reduce.weight", "attn_expand.weight",
                                       "attn_expand.bias", "temperature"}


def test_repr():
    text = repr(DynamicConv2d(3, 8, (3, 1), stride=2, padding=1, groups=1, bias=False,
                              padding_mode="reflect", num_kernels=5))
    for part in ("3, 8, kernel_size=(3, 1)", "stride=(2, 2)", "padding=(1, 1)", "bias=False",
                 "padding_mode='reflect'", "num_kernels=5", "temperature=30", "attn_reduce", "attn_expand"):
        assert part in text, (part, text)


@pytest.mark.parametrize("form", CONV_FORMS[:6], ids=_form_id)
def test_from_conv2d_output_equals_conv_at_init(form):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, **form)
    layer = DynamicConv2d.from_conv2d(conv, num_kernels=4)
    x = torch.randn(3, 6, 11, 9)
    # Equal up to float32 rounding of the softmax sum (1 +- 1 ulp).
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-5, atol=1e-6)
    assert layer.weight.shape[0] == 4 and layer.padding_mode == conv.padding_mode


def test_convert_resnet18_identical_at_init():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    convert(model, num_kernels=4)
    assert sum(isinstance(m, DynamicConv2d) for m in model.modules()) == n_convs == 20
    assert not any(isinstance(m, nn.Conv2d) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_convert_include_filters():
    model = torchvision.models.resnet18(num_classes=10)
    convert(model, include=lambda name, conv: conv.kernel_size == (3, 3) and name.startswith("layer4"))
    dynamic = [n for n, m in model.named_modules() if isinstance(m, DynamicConv2d)]
    assert dynamic == ["layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"]
    model = torchvision.models.resnet18(num_classes=10)
    convert(model, num_kernels=2, include=["conv1", "layer1.0.conv2"])
    assert isinstance(model.conv1, DynamicConv2d) and model.conv1.num_kernels == 2
    assert isinstance(model.layer1[0].conv2, DynamicConv2d) and isinstance(model.layer1[0].conv1, nn.Conv2d)
    with pytest.raises(ValueError, match=r"unknown \['nope'\]"):
        convert(model, include=["nope"])
    with pytest.raises(ValueError, match=r"convert: expected an nn.Module, got OrderedDict"):
        convert(model.state_dict())


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    net = nn.Sequential(DynamicConv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        DynamicConv2d(8, 8, 3, stride=2, groups=2, bias=False), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 5))
    x = torch.randn(4, 3, 16, 16)
    compiled = torch.compile(net, fullgraph=True)
    expected = net(x)
    expected.sum().backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    actual = compiled(x)
    actual.sum().backward()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    for g, p in zip(eager_grads, net.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_converted_channels_last_model_keeps_the_layout_and_the_outputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 4, 3, stride=2)).double().eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    expected = model(x)
    converted = convert(model, num_kernels=3)
    y = converted(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and expected.is_contiguous(
        memory_format=torch.channels_last)
    assert_close_scaled(y, expected, torch.float64, "converted channels_last")
    # after convert too (test_channels_last_model_conversion: the 5-D kernel banks keep their layout)
    assert_close_scaled(converted.to(memory_format=torch.channels_last)(x), expected, torch.float64,
                        "converted, then channels_last")


def test_channels_last_model_conversion():
    """model.to(memory_format=torch.channels_last), the usual CNN idiom, used to raise on the 5-D kernel bank
    ("required rank 4"); now the kernels keep their shape and layout and the model computes the same."""
    torch.manual_seed(0)
    model = nn.Sequential(DynamicConv2d(3, 8, 3, padding=1, num_kernels=3), nn.BatchNorm2d(8), nn.ReLU(),
                          DynamicConv2d(8, 6, 3, stride=2, bias=False)).eval()
    x = torch.randn(2, 3, 9, 9)
    expected = model(x)
    converted = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for layer, before in ((converted[0], model[0]), (converted[3], model[3])):
        assert layer.weight.shape == before.weight.shape and layer.weight.is_contiguous()
        torch.testing.assert_close(layer.weight, before.weight, rtol=0, atol=0)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    actual = converted(x_cl)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    assert_close_scaled(actual, expected, torch.float32, "channels-last model")
    actual.square().sum().backward()
    assert converted[0].weight.grad.shape == model[0].weight.shape and x_cl.grad.shape == x.shape
    doubled = converted.double()  # a dtype conversion with gradients present goes through the same path
    assert doubled[0].weight.dtype == torch.float64 and doubled[0].weight.grad.dtype == torch.float64
