"""The model zoo: exact parameter counts, shapes, channel protocol, reference-backend agreement, cost report."""
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import chanflex_kernels
import models
from comparison import assert_close_scaled
from models.blocks import SelfAttention
from models.profile import parse_input, profile_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = models.list_models()
COUNTED = [n for n in ALL if models.model_info(n).params is not None]
FIXED = [n for n in ALL if models.model_info(n).input_size is not None]
FREE = [n for n in ALL if n not in FIXED]
FLEXIBLE = [n for n in ALL if models.model_info(n).channel_flexible]
DYNAMIC = [n for n in ALL if models.model_info(n).dynamic]


def count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", COUNTED)
def test_exact_parameter_count(name):
    assert count(models.create(name)) == models.model_info(name).params


def test_counts_of_options_and_ablations():
    assert count(models.create("dy_vgg19", num_kernels=6)) == 121_925_986
    assert len(COUNTED) >= 15
    # The ablations remove exactly one branch each: RRDB 359,808 and attention 5,201 parameters.
    full, plain = count(models.create("advanced_two_layer_cnn")), count(models.create("advanced_two_layer_cnn_plain"))
    rrdb, attention = (count(models.create(f"advanced_two_layer_cnn_{b}")) for b in ("rrdb", "attention"))
    assert rrdb - plain == 359_808 and attention - plain == 5_201 and full == plain + 359_808 + 5_201


@pytest.mark.parametrize("name", ALL)
def test_forward_shapes(name):
    """A real forward at the smallest supported size; 128 and 224 on the meta device (shapes only)."""
    info = models.model_info(name)
    torch.manual_seed(0)
    model = models.create(name, num_classes=7).eval()
    real = 128 if info.input_size else 84
    with torch.no_grad():
        y = model(torch.randn(2, 3, real, real))
    assert y.shape == (2, 1000 if name == "resnet34_tv_1000" else 7)
    assert torch.isfinite(y).all()
    with torch.device("meta"):
        meta_model = models.create(name, num_classes=7).eval()
        for size in (84, 128, 224):
            x = torch.empty(2, 3, size, size)
            if info.input_size and (size, size) != info.input_size:
                with pytest.raises(ValueError, match=rf"expected inputs of 128x128 .*got shape \(2, 3, {size}, {size}\)"):
                    meta_model(x)
            else:
                assert meta_model(x).shape == y.shape


@pytest.mark.parametrize("name", FLEXIBLE)
def test_flexible_models_take_any_channel_subset(name):
    size = models.model_info(name).input_size or (40, 40)
    torch.manual_seed(0)
    model = models.create(name, num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        for combo in ("RGB", "RG", "RB", "GB", "R", "G", "B"):
            index = ["RGB".index(c) for c in combo]
            y = model(x[:, index], channels=combo)
            assert y.shape == (2, 5) and torch.isfinite(y).all(), combo
        with pytest.raises(ValueError, match=r"expected x of shape \(B, 2, H, W\)|expected x to hold|got \(2, 3"):
            model(x, channels="RG")


def test_static_models_take_subsets_through_a_fill():
    model = models.create("resnet18", num_classes=5, fill="mean").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x[:, [0, 2]], channels="RB").shape == (2, 5)
        filled = chanflex_kernels.fill_channels(x[:, [0, 2]], "RB", "mean", names="RGB")
        assert torch.equal(model(x[:, [0, 2]], channels="RB"), model.model(filled))
    with pytest.raises(ValueError, match=r"Conv2d stem is not channel-flexible: got \['channels'\]"):
        models.create("resnet18")(x[:, :1], channels="R")
    with pytest.raises(ValueError, match=r"expected strategy in .*got 'copy'"):
        models.create("resnet18", fill="copy")


@pytest.mark.parametrize("name", DYNAMIC)
def test_dynamic_models_match_the_reference_backend(name):
    info = models.model_info(name)
    size = info.input_size or (32, 32)
    torch.manual_seed(0)
    model = models.create(name, num_classes=6).double().eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    calls = [dict()] + ([dict(channels="GB")] if info.channel_flexible else [])
    for kwargs in calls:
        inp = x[:, [1, 2]] if kwargs else x
        ours = model(inp, **kwargs)
        grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()), allow_unused=True)
        with chanflex_kernels.use_backend("reference"):
            ref = model(inp, **kwargs)
            ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)
        assert_close_scaled(ours, ref, torch.float64, f"{name} output {kwargs}")
        # One absolute scale for all parameters: some attention grads are ~1e-21, pure rounding noise.
        scale = max(rg.abs().max().item() for rg in ref_grads if rg is not None)
        for (pname, _), g, rg in zip(model.named_parameters(), grads, ref_grads):
            assert (g is None) == (rg is None), pname
            if g is not None:
                torch.testing.assert_close(g, rg, rtol=1e-7, atol=1e-10 * scale,
                                           msg=lambda m: f"{name}: grad of {pname}: {m}")


def test_self_attention_equals_the_sagan_formulation():
    torch.manual_seed(0)
    layer = SelfAttention(16).double()
    with torch.no_grad():
        layer.gamma.fill_(0.7)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    b, c, h, w = x.shape
    query = layer.query(x).view(b, -1, h * w).permute(0, 2, 1)
    key = layer.key(x).view(b, -1, h * w)
    attention = torch.softmax(torch.bmm(query, key), dim=-1)
    value = layer.value(x).view(b, -1, h * w)
    sagan = torch.bmm(value, attention.permute(0, 2, 1)).view(b, c, h, w)
    assert_close_scaled(layer(x), 0.7 * sagan + x, torch.float64, "SDPA vs SAGAN")


def test_v4_drops_channels_only_in_training():
    model = models.create("resnet18_v4", num_classes=4)
    stem = model.conv1
    used = []
    for n, generator in stem.generators.items():
        generator.register_forward_hook(lambda m, i, o, n=n: used.append(int(n)))
    x = torch.randn(2, 3, 32, 32)
    random.seed(0)  # the seed's per-batch drop uses Python's random
    for _ in range(30):
        model(x)
    assert set(used) == {1, 2, 3}, f"training batches should use every subset size, used {sorted(set(used))}"
    used.clear()
    model.eval()
    for _ in range(5):
        model(x)
    assert used == [3] * 5


def test_flexdy_resnet18_stem_and_body():
    model = models.create("flexdy_resnet18", num_kernels=3)
    assert isinstance(model.conv1.conv, chanflex_kernels.ChannelFlexConv2d)
    dynamic = [m for m in model.modules() if type(m) is chanflex_kernels.DynamicConv2d]
    assert len(dynamic) == 19 and all(m.num_kernels == 3 for m in dynamic)  # 16 3x3 + 3 shortcuts
    x = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    poisoned = x.clone()
    poisoned[~mask[:, :, None, None].expand_as(x)] = float("nan")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(poisoned, channel_mask=mask), model(x, channel_mask=mask), atol=1e-5)


def test_bad_model_requests():
    with pytest.raises(ValueError, match=r"unknown model 'vgg99'; expected one of \['raw_vgg19'"):
        models.create("vgg99")
    with pytest.raises(ValueError, match=r"create\('resnet18'\): bad options \['num_kernels'\]"):
        models.create("resnet18", num_kernels=4)
    with pytest.raises(ValueError, match=r"expected num_classes to be a positive int, got 0"):
        models.create("resnet18", num_classes=0)
    with pytest.raises(ValueError, match=r"expected an input shape like 3x84x84 \(C x H x W\), got '84x84'"):
        parse_input("84x84")


def test_profile_counts_per_image_and_every_matmul():
    row = profile_model("advanced_two_layer_cnn", (3, 84, 84))
    positions = 42 * 42  # attention after the first 2x2 max-pool
    assert row.attention_gflops * 1e9 == 2 * positions * positions * (8 + 64)
    assert row.params == 447_491 and row.input == (3, 84, 84)
    static, dynamic = profile_model("raw_vgg19"), profile_model("dy_vgg19")
    # Same convs (FLOP formulas count multiply-adds, not bias adds) plus the K=4 kernel mixing of one image.
    mixing = 2 * 4 * sum(m.weight[0].numel() for m in models.create("dy_vgg19").modules()
                         if isinstance(m, chanflex_kernels.DynamicConv2d))
    assert dynamic.dynamic_gflops * 1e9 == pytest.approx(static.conv_gflops * 1e9 + mixing, rel=1e-12)
    assert profile_model("flex_channel_cnn", (3, 84, 84)).input == (3, 128, 128), "fixed-size models use 128"


def test_profile_command_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "models", "profile", "--model", "resnet18", "--model", "densenet4"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| resnet18 | 1 | 004 | 11,194,482 | ✓ | 3x84x84 |" in out.stdout
    assert "| densenet4 | 2 | 002 | 5,375,538 | ✓ |" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "models", "profile", "--input", "3x0x84"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "expected an input shape like 3x84x84" in bad.stderr


@pytest.mark.parametrize("module", ["models.task1", "models.task2"])
def test_zoo_modules_run_as_commands_point_to_the_cli(module):
    """`python -m models.task1` used to die registering every model twice; it names the command instead."""
    out = subprocess.run([sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "run `python -m models --help`" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_channel_combination_evaluation_on_zoo_models():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    flexible = chanflex_kernels.evaluate_channel_combinations(
        models.create("flex_channel_cnn_pooled", num_classes=4), loader, progress=False)
    filled = chanflex_kernels.evaluate_channel_combinations(
        models.create("resnet18", num_classes=4, fill="replicate"), loader, progress=False)
    for report in (flexible, filled):
        assert [r.samples for r in report.results] == [8] * 7
