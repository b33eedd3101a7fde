"""The experiment runner (models/train.py, models/data.py): data, training, checkpoints, resume, CLI."""
import dataclasses
import json
import os
import stat

import pytest
import torch

import models
import models.train as runner
from chanflex_kernels.files import atomic_write
from models.__main__ import _option, main as cli
from models.data import ImageListDataset, SyntheticImages, build_datasets, parse_list_file
from models.train import TrainConfig, comparison_markdown, evaluate_checkpoint, load_checkpoint, run_experiment, train

SMALL = "advanced_two_layer_cnn_plain"  # 82k parameters: a few seconds per run
FLEXIBLE = "flex_channel_cnn_pooled"    # channel-flexible and dynamic


def quiet(*_):
    pass


def config(tmp_path, model=SMALL, **overrides):
    settings = dict(model=model, data="synthetic", out=str(tmp_path / "run"), epochs=2, batch_size=32,
                    image_size=16, workers=0, synthetic_per_class=16, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- data


def test_synthetic_images_are_deterministic_and_splits_differ():
    a, b = SyntheticImages("train", 5, 4, 12, seed=1), SyntheticImages("train", 5, 4, 12, seed=1)
    assert len(a) == 20 and a.labels[:6] == [0, 1, 2, 3, 4, 0]
    x, y = a[7]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y == 2
    assert torch.equal(x, b[7][0])
    assert not torch.equal(x, SyntheticImages("test", 5, 4, 12, seed=1)[7][0])
    assert not torch.equal(x, SyntheticImages("train", 5, 4, 12, seed=2)[7][0])
    with pytest.raises(IndexError, match="index 20 out of range for 20"):
        a[20]
    with pytest.raises(ValueError, match="expected split in .*got 'dev'"):
        SyntheticImages("dev")
    with pytest.raises(ValueError, match="expected num_classes to be a positive int, got 0"):
        SyntheticImages("train", num_classes=0)


def _archive(root, val_name="val.txt"):
    """A two-image ImageNet-mini-style archive: a pure-red RGB image and a grayscale one (path with a space)."""
    from PIL import Image

    os.makedirs(root / "images" / "class a")
    Image.new("RGB", (20, 10), (255, 0, 0)).save(root / "images" / "red.png")
    Image.new("L", (8, 8), 128).save(root / "images" / "class a" / "gray.png")
    lines = "images/red.png 3\nimages/class a/gray.png 0\n\n"
    for name in ("train.txt", val_name, "test.txt"):
        (root / name).write_text(lines)
    return root


def test_image_list_dataset_reads_rgb_in_order_and_grayscale_as_three_channels(tmp_path):
    root = _archive(tmp_path, val_name="validation.txt")  # the assignment text's name for val
    ds = ImageListDataset(str(root), "val")
    assert len(ds) == 2 and ds.labels == [3, 0]
    red, label = ds[0]
    assert label == 3 and red.shape == (3, 10, 20)
    assert torch.all(red[0] == 1) and torch.all(red[1:] == 0)  # channel 0 is red, not blue
    gray, _ = ds[1]
    assert gray.shape == (3, 8, 8) and torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    normalised = build_datasets(str(root), 6, splits=("test",))["test"][0][0]
    assert normalised.shape == (3, 6, 6)
    assert normalised[0].mean() > 2 and normalised[2].mean() < -1  # (1 - 0.485) / 0.229, (0 - 0.406) / 0.225


@pytest.mark.parametrize("line, message", [
    ("images/red.png", r"line 2: expected '<image path> <integer label>', got 'images/red.png'"),
    ("images/red.png cat", r"line 2: expected '<image path> <integer label>', got 'images/red.png cat'"),
    ("images/red.png -1", r"line 2: expected a label >= 0, got -1"),
])
def test_bad_list_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "train.txt"
    path.write_text(f"a.png 0\n{line}\n")
    with pytest.raises(ValueError, match=message):
        parse_list_file(str(path))


def test_bad_archives_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected a dataset directory, got .*nowhere"):
        ImageListDataset(str(tmp_path / "nowhere"), "train")
    with pytest.raises(FileNotFoundError, match=r"expected the val list at .*val.txt or .*validation.txt"):
        ImageListDataset(str(tmp_path), "val")
    (tmp_path / "test.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="expected at least one"):
        ImageListDataset(str(tmp_path), "test")
    (tmp_path / "train.txt").write_text("missing.png 1\nalso missing.png 2\n")
    with pytest.raises(FileNotFoundError, match=r"2 of 2 images listed in .*train.txt are missing"):
        ImageListDataset(str(tmp_path), "train")


# ---------------------------------------------------------------- atomic files


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    os.chmod(path, 0o640)

    def fail(f):
        f.write("half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(path), fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["result.json"]
    atomic_write(str(path), lambda f: f.write("new"))
    assert path.read_text() == "new" and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    atomic_write(str(tmp_path / "fresh.bin"), lambda f: f.write(b"\x00"), binary=True)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.bin").st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_an_interrupted_checkpoint_save_leaves_the_previous_one(tmp_path, monkeypatch):
    cfg = config(tmp_path, epochs=2)
    real_save = torch.save

    def crash_on_the_second_epochs_last_pt(obj, f):
        if "optimizer" in obj and obj["state"]["epoch"] == 2:
            real_save({"truncated": True}, f)  # some bytes reach the temporary file
            raise KeyboardInterrupt
        real_save(obj, f)

    monkeypatch.setattr(runner.torch, "save", crash_on_the_second_epochs_last_pt)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False, log=quiet)
    monkeypatch.setattr(runner.torch, "save", real_save)
    last = load_checkpoint(os.path.join(cfg.out, "last.pt"))
    assert last["state"]["epoch"] == 1
    assert not [n for n in os.listdir(cfg.out) if n.endswith(".tmp")]
    summary = train(cfg, resume=True, progress=False, log=quiet)  # and the run goes on from there
    assert summary["epochs_run"] == 2


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("model", [SMALL, FLEXIBLE])
def test_training_learns_and_writes_every_result(tmp_path, model):
    cfg = config(tmp_path, model=model, epochs=5, image_size=24, synthetic_per_class=48)
    summary = train(cfg, progress=False, log=quiet)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # 10 classes: chance is 10%. The small model reaches ~100%; the channel-flexible one learns slower and
    # its trajectory follows the host's floating-point libraries even with the reference backend: over
    # seeds 1-5 on an AMD Zen 3 host, best validation 0.73-0.86, test 0.64-0.84 (three epochs of 32 images
    # a class there gave 0.39-0.68, below the 0.6 this test once asked for).
    assert summary["best_val_accuracy"] > 0.45 and summary["test_accuracy"]["RGB"] > 0.45
    assert list(summary["test_accuracy"]) == ["RGB", "RG", "RB", "GB", "R", "G", "B"]
    assert summary["fill"] == (None if models.model_info(model).channel_flexible else "mean")
    for name in ("last.pt", "best.pt", "curves.png", "test_channels.json", "test_channels.md", "summary.json"):
        assert os.path.getsize(tmp_path / "run" / name) > 0
    report = json.loads((tmp_path / "run" / "test_channels.json").read_text())
    assert report["results"][0]["samples"] == 120 and len(report["results"]) == 7  # a quarter of 10 x 48
    best = load_checkpoint(str(tmp_path / "run" / "best.pt"))
    assert best["epoch"] == summary["best_epoch"] and best["val_accuracy"] == summary["best_val_accuracy"]
    # The stored test report is what evaluating best.pt again gives.
    again = evaluate_checkpoint(str(tmp_path / "run" / "best.pt"), progress=False)
    assert {r.combo: r.accuracy for r in again.results} == summary["test_accuracy"]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_an_image_list_archive(tmp_path, workers):
    from PIL import Image

    root = tmp_path / "mini"
    os.makedirs(root / "img")
    colours = [(220, 30, 30), (30, 200, 40), (20, 40, 230)]
    for split, count in (("train", 12), ("val", 6), ("test", 6)):
        lines = []
        for i in range(count):
            Image.new("RGB" if i % 4 else "L", (30, 20), colours[i % 3] if i % 4 else 90).save(
                root / "img" / f"{split}{i}.png")
            lines.append(f"img/{split}{i}.png {i % 3}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    cfg = config(tmp_path, data=str(root), epochs=2, batch_size=4, workers=workers)
    summary = train(cfg, progress=False, log=quiet)
    assert summary["epochs_run"] == 2 and load_checkpoint(os.path.join(cfg.out, "best.pt"))["config"]["num_classes"] == 3
    assert json.loads((tmp_path / "run" / "test_channels.json").read_text())["results"][0]["samples"] == 6


def test_bf16_training_runs_the_model_in_bfloat16_and_learns(tmp_path, monkeypatch):
    loss_inputs, outputs = [], []
    real_loss = torch.nn.functional.cross_entropy
    monkeypatch.setattr(runner.F, "cross_entropy",
                        lambda logits, y: loss_inputs.append(logits.dtype) or real_loss(logits, y))
    model_class = type(models.create(FLEXIBLE))
    real_forward = model_class.forward

    def forward(self, x, *args, **kwargs):
        out = real_forward(self, x, *args, **kwargs)
        outputs.append(out.dtype)
        return out

    monkeypatch.setattr(model_class, "forward", forward)
    cfg = config(tmp_path, model=FLEXIBLE, image_size=24, epochs=3, synthetic_per_class=32, precision="bf16")
    summary = train(cfg, progress=False, log=quiet)
    # The first forward is the input-size check (float32); training, validation and test run in bfloat16.
    assert outputs[0] == torch.float32 and set(outputs[1:]) == {torch.bfloat16} and len(outputs) > 20
    assert set(loss_inputs) == {torch.float32}  # logits cast up for the loss
    best = load_checkpoint(os.path.join(cfg.out, "best.pt"))
    assert all(v.dtype == torch.float32 for v in best["model"].values() if v.is_floating_point())
    assert summary["best_val_accuracy"] > 0.4  # chance 0.1; fp32 reaches 0.6-0.9 here, bfloat16 0.5-0.6


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="expected an available device, got 'cuda'; torch sees no CUDA device"):
        train(config(tmp_path, device="cuda"), progress=False, log=quiet)


def _scripted_validation(monkeypatch, accuracies, snapshots):
    """Validation passes report ``accuracies`` in turn; the weights each one saw go to ``snapshots``."""
    real = runner.run_epoch
    script = iter(accuracies)

    def run_epoch(model, loader, optimizer=None, **kwargs):
        loss, accuracy = real(model, loader, optimizer, **kwargs)
        if optimizer is None and kwargs.get("desc", "").endswith("val"):
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
            return loss, next(script)
        return loss, accuracy

    monkeypatch.setattr(runner, "run_epoch", run_epoch)


def test_best_checkpoint_holds_the_best_epochs_weights_not_the_last(tmp_path, monkeypatch):
    snapshots = []
    _scripted_validation(monkeypatch, [0.3, 0.8, 0.5], snapshots)
    cfg = config(tmp_path, epochs=3)
    summary = train(cfg, progress=False, log=quiet)
    assert summary["best_epoch"] == 2 and summary["best_val_accuracy"] == 0.8
    best, last = load_checkpoint(os.path.join(cfg.out, "best.pt")), load_checkpoint(os.path.join(cfg.out, "last.pt"))
    assert best["epoch"] == 2
    assert states_equal(best["model"], snapshots[1])
    assert states_equal(last["model"], snapshots[2]) and not states_equal(best["model"], last["model"])


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [0.5, 0.6, 0.6, 0.55, 0.9], [])
    messages = []
    cfg = config(tmp_path, epochs=5, patience=2)
    summary = train(cfg, progress=False, log=messages.append)
    assert summary["epochs_run"] == 4 and summary["best_epoch"] == 2
    assert any("early stop" in m for m in messages)
    assert load_checkpoint(os.path.join(cfg.out, "last.pt"))["state"]["finished"]
    # Resuming a finished run trains nothing more and tests its best checkpoint again.
    again = train(cfg, resume=True, progress=False, log=messages.append)
    assert again["epochs_run"] == 4 and any("finished after epoch 4" in m for m in messages)


# resnet18_v4 drops channels at random with Python's `random`, flexdy_resnet18 with torch's generator.
@pytest.mark.parametrize("model", [SMALL, "resnet18_v4", pytest.param("flexdy_resnet18", marks=pytest.mark.slow)])
def test_resume_gives_the_uninterrupted_runs_weights(tmp_path, model):
    options = dict(image_size=16, synthetic_classes=4, synthetic_per_class=8, batch_size=8, epochs=2)
    straight = config(tmp_path / "a", model=model, **options)
    train(straight, progress=False, log=quiet)

    interrupted = config(tmp_path / "b", model=model, **options)

    def stop_after_epoch_1(message):
        if message.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(interrupted, progress=False, log=stop_after_epoch_1)
    assert load_checkpoint(os.path.join(interrupted.out, "last.pt"))["state"]["epoch"] == 1
    train(interrupted, resume=True, progress=False, log=quiet)
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(os.path.join(straight.out, name)), load_checkpoint(os.path.join(interrupted.out, name))
        assert states_equal(a["model"], b["model"]), name
    assert (json.loads((tmp_path / "a" / "run" / "history.json").read_text())[-1]["val_loss"]
            == json.loads((tmp_path / "b" / "run" / "history.json").read_text())[-1]["val_loss"])


def test_runs_refuse_to_overwrite_or_to_resume_something_else(tmp_path):
    cfg = config(tmp_path, epochs=1)
    with pytest.raises(FileNotFoundError, match="expected a run to continue at .*last.pt"):
        train(cfg, resume=True, progress=False, log=quiet)
    train(cfg, progress=False, log=quiet)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(cfg, progress=False, log=quiet)
    changed = config(tmp_path, epochs=1, lr=0.01)
    with pytest.raises(ValueError, match=r"these differ: lr: saved 0.001, now 0.01"):
        train(changed, resume=True, progress=False, log=quiet)


@pytest.mark.parametrize("overrides, message", [
    (dict(model="resnet99"), "unknown model 'resnet99'"),
    (dict(epochs=0), "expected epochs to be a positive int, got 0"),
    (dict(patience=0), "expected patience to be a positive int, got 0"),
    (dict(lr=float("nan")), "expected lr to be a finite number > 0, got nan"),
    (dict(optimizer="adam"), r"expected optimizer in \('adamw', 'sgd'\), got 'adam'"),
    (dict(fill="copy"), "expected fill in .*got 'copy'"),
    (dict(model="layer_3_cnn", image_size=84), "accepts only 128x128 input; expected image_size 128, got 84"),
    (dict(num_classes=5), "expected labels below num_classes=5, got label 9"),
    (dict(precision="fp16"), r"expected precision in \('fp32', 'bf16'\), got 'fp16'"),
    (dict(device="tpu"), "expected device like 'cpu', 'cuda' or 'cuda:1', got 'tpu'"),
    (dict(device="meta"), "expected device 'cpu' or 'cuda\\[:index\\]', got 'meta'"),
    (dict(model=FLEXIBLE, image_size=8),
     r"model 'flex_channel_cnn_pooled' cannot take 3x8x8 input \(image_size 8\): .*size"),
])
def test_bad_settings_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(config(tmp_path, **overrides), progress=False, log=quiet)
    assert not os.path.exists(tmp_path / "run")


def test_a_diverging_loss_stops_the_run_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(runner.F, "cross_entropy", lambda logits, y: logits.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="the loss became nan at batch 0"):
        train(config(tmp_path), progress=False, log=quiet)


def test_load_checkpoint_rejects_other_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"with keys 'model' and 'config', got \['state_dict'\]"):
        load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(str(tmp_path / "absent.pt"))


# ---------------------------------------------------------------- experiments


def test_experiment_trains_each_model_then_compares_them(tmp_path):
    out = str(tmp_path / "exp")
    configs = [config(tmp_path, model=m, image_size=24, epochs=2) for m in (SMALL, FLEXIBLE)]
    messages = []
    summaries = run_experiment(configs, out, progress=False, log=messages.append)
    assert [s["model"] for s in summaries] == [SMALL, FLEXIBLE]
    for m in (SMALL, FLEXIBLE):
        assert os.path.isfile(os.path.join(out, m, "best.pt"))
    assert json.loads(open(os.path.join(out, "comparison.json")).read()) == summaries
    table = open(os.path.join(out, "comparison.md")).read()
    assert f"| {SMALL} |" in table and "filled (mean)" in table and "its channels only" in table
    assert os.path.getsize(os.path.join(out, "comparison.png")) > 0
    # Rerunning finds both runs finished: nothing is trained again, the results are the same.
    again = run_experiment(configs, out, progress=False, log=messages.append)
    assert [s["test_accuracy"] for s in again] == [s["test_accuracy"] for s in summaries]
    assert sum("finished after epoch 2" in m for m in messages) == 2
    # Rerunning with other settings names them instead of mixing two runs.
    longer = [dataclasses.replace(c, epochs=3) for c in configs]
    with pytest.raises(ValueError, match=r"these differ: epochs: saved 2, now 3; .*choose another output directory"):
        run_experiment(longer, out, progress=False, log=quiet)


def test_comparison_table_marks_each_columns_best():
    rows = [dict(model=name, params=10, epochs_run=2, best_epoch=1, best_val_accuracy=0.5, fill=fill,
                 test_accuracy={"RGB": rgb, "R": r}) for name, fill, rgb, r in
            (("a", "mean", 0.9, 0.2), ("b", None, 0.8, 0.7))]
    table = comparison_markdown(rows)
    assert "| a | 10 | 2 (1) | 50.00 | **90.00** | 20.00 | filled (mean) |" in table
    assert "| b | 10 | 2 (1) | 50.00 | 80.00 | **70.00** | its channels only |" in table
    against_a = comparison_markdown(rows, baseline="a")
    assert "| seen as | RGB / a |" in against_a and "| its channels only | 0.889 |" in against_a
    with pytest.raises(ValueError, match="expected the baseline among \\['a', 'b'\\], got 'c'"):
        comparison_markdown(rows, baseline="c")


def test_experiment_checks_every_setting_before_training(tmp_path):
    with pytest.raises(ValueError, match="expected distinct models"):
        run_experiment([config(tmp_path), config(tmp_path)], str(tmp_path / "exp"), progress=False, log=quiet)
    with pytest.raises(ValueError, match="expected the baseline to be one of the models"):
        run_experiment([config(tmp_path)], str(tmp_path / "exp"), baseline="resnet34", progress=False, log=quiet)
    with pytest.raises(ValueError, match="accepts only 128x128 input"):
        run_experiment([config(tmp_path), config(tmp_path, model="layer_3_cnn")], str(tmp_path / "exp"),
                       progress=False, log=quiet)
    assert not os.path.exists(tmp_path / "exp" / SMALL)


# ---------------------------------------------------------------- command line


def test_cli_trains_then_evaluates(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert cli(["train", "--model", FLEXIBLE, "--out", out, "--epochs", "1", "--image-size", "24",
                "--synthetic-per-class", "8", "--workers", "0", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1" in printed and "| RGB | 20 |" in printed and f"run directory: {out}" in printed
    json_path = str(tmp_path / "eval.json")
    assert cli(["evaluate", "--checkpoint", os.path.join(out, "best.pt"), "--combos", "RGB,B", "--json", json_path,
                "--no-progress"]) == 0
    assert "| B | 20 |" in capsys.readouterr().out
    assert [r["combo"] for r in json.loads(open(json_path).read())["results"]] == ["RGB", "B"]
    assert cli(["evaluate", "--checkpoint", os.path.join(out, "last.pt"), "--split", "train", "--device", "cpu",
                "--fill", "zeros", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| RGB | 80 |" in printed and "fill: none, native channels" in printed  # flexible: no fill applies


def test_cli_model_options_parse_as_python_literals():
    assert _option("num_kernels=6") == ("num_kernels", 6)
    assert _option("channel_drop=0.25") == ("channel_drop", 0.25)
    assert _option("strategy=mean") == ("strategy", "mean")


def test_cli_experiment(tmp_path, capsys):
    out = str(tmp_path / "exp")
    assert cli(["experiment", "--model", SMALL, "--model", FLEXIBLE, "--out", out, "--epochs", "1", "--image-size",
                "24", "--synthetic-per-class", "8", "--workers", "0", "--no-progress", "--baseline", SMALL]) == 0
    printed = capsys.readouterr().out
    assert f"| {FLEXIBLE} |" in printed and f"experiment directory: {out}" in printed
    assert f"RGB / {SMALL} |" in printed and "| filled (mean) | 1.000 |" in printed


@pytest.mark.parametrize("command", ["train", "experiment"])
def test_cli_interrupted_says_how_to_continue(tmp_path, capsys, monkeypatch, command):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_epoch", interrupt)
    out = str(tmp_path / "x")
    assert cli([command, "--model", SMALL, "--out", out, "--workers", "0", "--no-progress"]) == 130
    hint = "the same command with --resume" if command == "train" else "the same command"
    assert f"interrupted: {out} keeps every complete epoch; to continue, run {hint}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", SMALL, "--option", "num_kernels"], "expected KEY=VALUE"),
    (["train", "--model", SMALL, "--option", "num_kernels=2"], "bad options ['num_kernels']"),
    (["train", "--model", SMALL, "--epochs", "-1"], "expected epochs to be a positive int, got -1"),
    (["train", "--model", SMALL, "--data", "/nonexistent/imagenet-mini"], "expected a dataset directory"),
    (["evaluate", "--checkpoint", "/nonexistent/best.pt"], "expected a checkpoint file"),
])
def test_cli_reports_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli(argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else []))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
