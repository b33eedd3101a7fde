"""The experiment runner: train a registered model, keep its best checkpoint, test it on every channel combination.

``python -m models train --model NAME --data ROOT`` (or ``--data synthetic``)
writes into its output directory:

- ``last.pt``: model, optimizer, schedule and history after the last complete
  epoch; ``--resume`` continues from it exactly (per-epoch seeds).
- ``best.pt``: the model at the epoch of the best validation accuracy (a
  serialised copy made at that epoch, not a reference to live weights: seed
  000's best model silently became its last).
- ``history.json`` and ``curves.png``: loss and accuracy per epoch.
- ``test_channels.json`` / ``.md``: ``best.pt`` on the test split for each
  channel combination (RGB, RG, ..., B), and ``summary.json``.

Every file is written atomically (``chanflex_kernels.files.atomic_write``): an
interrupted run leaves the previous complete version, never half a file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from chanflex_kernels import anneal_temperature
from chanflex_kernels.channels import FILL_STRATEGIES
from chanflex_kernels.evaluation import DEFAULT_COMBOS, evaluate_channel_combinations
from chanflex_kernels.files import atomic_write

from .data import SPLITS, build_datasets
from .registry import create, list_models, model_info

__all__ = ["TrainConfig", "train", "run_experiment", "evaluate_checkpoint", "load_checkpoint"]

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
# Settings a resumed run must share with the run it continues (the rest may change: workers, progress, ...).
_RESUME_FIXED = ("model", "model_options", "data", "image_size", "num_classes", "epochs", "batch_size", "lr",
                 "weight_decay", "optimizer", "temperature_epochs", "seed", "max_batches", "synthetic_classes",
                 "synthetic_per_class")


@dataclasses.dataclass
class TrainConfig:
    """One training run.

    model / model_options: a registry name and its options (``models.create``).
    data: an ImageNet-mini-style root (train.txt, val.txt, test.txt) or 'synthetic'.
    out: the run's directory (created; must not hold another run unless resuming).
    epochs: at most this many; patience: stop after this many epochs without a
        better validation accuracy (None: never).
    optimizer: 'adamw' (default) or 'sgd' (momentum 0.9, Nesterov); the learning
        rate follows a cosine from ``lr`` to 0 over ``epochs``.
    temperature_epochs: DynamicConv2d softmax temperature 30 -> 1 over this many
        epochs, per step (DY-CNN's schedule; models without DynamicConv2d ignore it).
    num_classes: the head's width; default: the largest label in the data + 1.
    max_batches: train on at most this many batches per epoch (smoke runs).
    fill: how a model that is not channel-flexible sees fewer channels at test
        ('mean': seed 000's protocol, one channel x3 or two plus their mean).
    combos: the channel combinations of the test report.
    device: where to train ('cpu', 'cuda', 'cuda:1'; default cuda when
        available); a run may resume on another device.
    precision: 'fp32', or 'bf16' (``torch.autocast`` to bfloat16: the chanflex
        ops and convs run in bfloat16, the weights and optimizer stay float32).
    """

    model: str
    data: str = "synthetic"
    out: str = "runs/run"
    model_options: Dict = dataclasses.field(default_factory=dict)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    optimizer: str = "adamw"
    image_size: int = 84
    num_classes: Optional[int] = None
    patience: Optional[int] = None
    temperature_epochs: float = 10.0
    max_batches: Optional[int] = None
    workers: int = 2
    seed: int = 0
    fill: str = "mean"
    combos: Tuple[str, ...] = DEFAULT_COMBOS
    synthetic_classes: int = 10
    synthetic_per_class: int = 64
    device: Optional[str] = None
    precision: str = "fp32"

    def validate(self) -> None:
        if self.model not in list_models():
            raise ValueError(f"train: unknown model {self.model!r}; expected one of {list_models()}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "image_size": self.image_size,
                    "synthetic_classes": self.synthetic_classes, "synthetic_per_class": self.synthetic_per_class}
        optional = {"num_classes": self.num_classes, "patience": self.patience, "max_batches": self.max_batches}
        for name, value in list(positive.items()) + [(n, v) for n, v in optional.items() if v is not None]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"train: expected {name} to be a positive int, got {value!r}")
        for name, value in (("lr", self.lr), ("temperature_epochs", self.temperature_epochs)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"train: expected {name} to be a finite number > 0, got {value!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"train: expected weight_decay >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train: expected optimizer in {OPTIMIZERS}, got {self.optimizer!r}")
        if self.fill not in FILL_STRATEGIES:
            raise ValueError(f"train: expected fill in {FILL_STRATEGIES}, got {self.fill!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train: expected precision in {PRECISIONS}, got {self.precision!r}")
        resolve_device(self.device)
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"train: expected workers to be an int >= 0, got {self.workers!r}")
        size = model_info(self.model).input_size
        if size is not None and size != (self.image_size, self.image_size):
            raise ValueError(f"train: model {self.model!r} accepts only {size[0]}x{size[1]} input; "
                             f"expected image_size {size[0]}, got {self.image_size}")

    def to_dict(self) -> Dict:
        d = dataclasses.asdict(self)
        d["combos"] = list(self.combos)
        return d

    @classmethod
    def from_dict(cls, d: Dict) -> "TrainConfig":
        d = dict(d)
        d["combos"] = tuple(d.get("combos", DEFAULT_COMBOS))
        return cls(**d)


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` as a torch.device (None: cuda when available, else cpu), checked to exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"train: expected device like 'cpu', 'cuda' or 'cuda:1', got {device!r}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"train: expected an available device, got {device!r}; torch sees no CUDA device")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"train: expected a CUDA device index below {torch.cuda.device_count()}, "
                             f"got {device!r}")
    elif resolved.type != "cpu":
        raise ValueError(f"train: expected device 'cpu' or 'cuda[:index]', got {device!r}")
    return resolved


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffling, augmentation and model randomness, so a resumed run repeats it."""
    return seed * 100_003 + epoch


def _seed_everything(seed: int) -> None:
    """torch's, Python's and NumPy's generators (models draw from all three: v4's channel drop uses ``random``)."""
    import random

    import numpy

    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed % 2 ** 32)


def _save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def _save_json(obj, path: str) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def load_checkpoint(path: str) -> Dict:
    """A checkpoint of this runner (``best.pt`` or ``last.pt``), with a clear error for anything else."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: expected a checkpoint file, got {path!r} (not found)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"load_checkpoint: expected a checkpoint of `python -m models train` with keys 'model' "
                         f"and 'config', got {keys} in {path}")
    return checkpoint


def _datasets(config: TrainConfig, splits: Sequence[str] = SPLITS) -> Dict:
    return build_datasets(config.data, config.image_size, splits, synthetic_classes=config.synthetic_classes,
                          synthetic_per_class=config.synthetic_per_class, seed=config.seed)


def _num_classes(config: TrainConfig, datasets) -> int:
    largest = max(max(ds.labels) for ds in datasets.values())
    if config.num_classes is None:
        return largest + 1
    if largest >= config.num_classes:
        raise ValueError(f"train: expected labels below num_classes={config.num_classes}, got label {largest}")
    return config.num_classes


def _loader(dataset, config: TrainConfig, train: bool, epoch: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
    # Dropping a short last batch keeps BatchNorm from seeing a batch of one.
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=train, generator=generator,
                      drop_last=train and len(dataset) > config.batch_size, num_workers=config.workers,
                      pin_memory=resolve_device(config.device).type == "cuda")


def run_epoch(model, loader, optimizer=None, max_batches: Optional[int] = None, progress: bool = True,
              desc: str = "", on_step=None, device=torch.device("cpu"), precision: str = "fp32"
              ) -> Tuple[float, float]:
    """One pass over ``loader``: training when ``optimizer`` is given, else evaluation. Returns (mean loss, accuracy).

    ``precision`` 'bf16' runs the forward under ``torch.autocast`` in bfloat16
    (the loss in float32; bfloat16 needs no loss scaling).
    """
    from tqdm.auto import tqdm

    training = optimizer is not None
    model.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    steps = len(loader) if max_batches is None else min(len(loader), max_batches)
    with torch.set_grad_enabled(training), tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        for step, (x, y) in enumerate(loader):
            if step == steps:
                break
            if on_step is not None:
                on_step(step / steps)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()} at batch {step}; lower the "
                                         f"learning rate or check the data")
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total_loss += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            bar.update()
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
    if seen == 0:
        raise ValueError(f"{desc}: the data loader yielded no batches")
    return total_loss / seen, correct / seen


def plot_history(history: List[Dict], path: str, title: str) -> None:
    """Loss and accuracy per epoch, train against validation, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    best = max(history, key=lambda h: h["val_accuracy"])["epoch"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((left, "loss", "cross-entropy loss"), (right, "accuracy", "accuracy")):
        axis.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        axis.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        axis.axvline(best, color="gray", linestyle=":", label=f"best checkpoint (epoch {best})")
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)


def _build(config: TrainConfig, num_classes: int, device: torch.device):
    model = create(config.model, num_classes=num_classes, **config.model_options).to(device)
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                                    weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return model, optimizer, scheduler


def _check_input(model, example: torch.Tensor, config: TrainConfig) -> None:
    """One forward pass before training, so an input the model cannot take fails now, by name."""
    model.eval()
    try:
        with torch.no_grad():
            model(example[None])
    except RuntimeError as err:
        raise ValueError(f"train: model {config.model!r} cannot take {'x'.join(map(str, example.shape))} input "
                         f"(image_size {config.image_size}): {err}") from err


def _check_resumable(config: TrainConfig, saved: Dict, path: str) -> None:
    differ = [f"{k}: saved {saved.get(k)!r}, now {getattr(config, k)!r}" for k in _RESUME_FIXED
              if saved.get(k) != getattr(config, k)]
    if differ:
        raise ValueError(f"train: resuming the run in {path} needs its settings; these differ: " + "; ".join(differ)
                         + "; for a new run with these settings, choose another output directory")


def train(config: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> Dict:
    """Train ``config.model``, then test its best checkpoint on every channel combination; returns the summary.

    ``resume``: continue the run in ``config.out`` from its ``last.pt`` (its
    settings must match); without it, ``config.out`` must not hold a run.
    """
    config.validate()
    last_path, best_path = os.path.join(config.out, "last.pt"), os.path.join(config.out, "best.pt")
    if resume and not os.path.isfile(last_path):
        raise FileNotFoundError(f"train --resume: expected a run to continue at {last_path}; not found")
    if not resume and os.path.exists(last_path):
        raise FileExistsError(f"train: {config.out} already holds a run ({last_path}); pass --resume to continue "
                              f"it or choose another output directory")

    datasets = _datasets(config)
    num_classes = _num_classes(config, datasets)
    config = dataclasses.replace(config, num_classes=num_classes)
    _seed_everything(config.seed)
    device = resolve_device(config.device)
    model, optimizer, scheduler = _build(config, num_classes, device)
    _check_input(model, datasets["train"][0][0].to(device), config)
    os.makedirs(config.out, exist_ok=True)  # only now: a run that cannot start leaves no directory behind
    state = {"epoch": 0, "history": [], "best_accuracy": -1.0, "best_epoch": 0, "stale_epochs": 0,
             "finished": False}
    if resume:
        last = load_checkpoint(last_path)
        _check_resumable(config, last["config"], last_path)
        model.load_state_dict(last["model"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
        log(f"{config.out}: the run finished after epoch {state['epoch']}; testing its best checkpoint again"
            if state["finished"] else f"resuming {config.out} after epoch {state['epoch']} of {config.epochs}")

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{config.model}: {params:,} parameters, {num_classes} classes; data {config.data} "
        f"({', '.join(f'{s} {len(d)}' for s, d in datasets.items())}), {config.image_size}x{config.image_size}; "
        f"{device}, {config.precision}")
    started = time.time()
    while not state["finished"] and state["epoch"] < config.epochs:
        epoch = state["epoch"] + 1
        _seed_everything(_epoch_seed(config.seed, epoch))  # dropout, channel drops: the same after a resume
        train_loader = _loader(datasets["train"], config, train=True, epoch=epoch)
        tic = time.time()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = run_epoch(
            model, train_loader, optimizer, max_batches=config.max_batches, progress=progress,
            desc=f"epoch {epoch}/{config.epochs} train", device=device, precision=config.precision,
            on_step=lambda fraction: anneal_temperature(model, epoch - 1 + fraction, epochs=config.temperature_epochs))
        scheduler.step()
        val_loss, val_acc = run_epoch(model, _loader(datasets["val"], config, train=False), progress=progress,
                                      desc=f"epoch {epoch}/{config.epochs} val", device=device,
                                      precision=config.precision)
        state["history"].append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_accuracy": train_acc,
                                 "val_loss": val_loss, "val_accuracy": val_acc, "seconds": time.time() - tic})
        state["epoch"] = epoch
        improved = val_acc > state["best_accuracy"]
        if improved:
            state.update(best_accuracy=val_acc, best_epoch=epoch, stale_epochs=0)
            _save({"model": model.state_dict(), "config": config.to_dict(), "epoch": epoch,
                   "val_accuracy": val_acc}, best_path)
        else:
            state["stale_epochs"] += 1
        if config.patience is not None and state["stale_epochs"] >= config.patience:
            state["finished"] = True
            log(f"early stop: no better validation accuracy in {config.patience} epochs")
        state["finished"] = state["finished"] or epoch == config.epochs
        _save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "config": config.to_dict(), "state": state}, last_path)
        _save_json(state["history"], os.path.join(config.out, "history.json"))
        plot_history(state["history"], os.path.join(config.out, "curves.png"), f"{config.model} on {config.data}")
        log(f"epoch {epoch}/{config.epochs}: train loss {train_loss:.4f} acc {100 * train_acc:.2f}% | "
            f"val loss {val_loss:.4f} acc {100 * val_acc:.2f}%{' (best)' if improved else ''} | "
            f"{time.time() - tic:.1f} s")

    report = evaluate_checkpoint(best_path, datasets["test"], config, progress=progress)
    report.to_json(os.path.join(config.out, "test_channels.json"))
    atomic_write(os.path.join(config.out, "test_channels.md"), lambda f: f.write(report.to_markdown() + "\n"))
    summary = {"model": config.model, "params": params, "data": config.data, "seed": config.seed,
               "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
               "best_val_accuracy": state["best_accuracy"],
               "test_accuracy": {r.combo: r.accuracy for r in report.results}, "fill": report.fill,
               "train_seconds_this_call": time.time() - started}
    _save_json(summary, os.path.join(config.out, "summary.json"))
    log(f"test split, best checkpoint (epoch {state['best_epoch']}):\n{report.to_markdown()}")
    return summary


def evaluate_checkpoint(path: str, dataset=None, config: Optional[TrainConfig] = None, combos: Sequence = None,
                        fill: Optional[str] = None, device: Optional[str] = None, split: str = "test",
                        data: Optional[str] = None, progress: bool = True):
    """Test a checkpoint of this runner on each channel combination; returns a ``ChannelComboReport``.

    dataset: default ``split`` of the checkpoint's data (or of ``data``);
    config: default the checkpoint's; combos / fill / device override the
    config's. A channel-flexible model sees only the channels of each
    combination; any other model sees them filled to three by ``fill``.
    """
    checkpoint = load_checkpoint(path)
    config = config or TrainConfig.from_dict(checkpoint["config"])
    if data is not None:
        config = dataclasses.replace(config, data=data)
    if dataset is None:
        dataset = _datasets(config, (split,))[split]
    where = resolve_device(device if device is not None else config.device)
    model = create(config.model, num_classes=config.num_classes, **config.model_options)
    model.load_state_dict(checkpoint["model"])
    model.to(where)
    flexible = model_info(config.model).channel_flexible
    with torch.autocast(where.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
        return evaluate_channel_combinations(model, _loader(dataset, config, train=False), combos or config.combos,
                                             fill=None if flexible else (fill or config.fill),
                                             num_classes=config.num_classes, progress=progress)


def run_experiment(configs: Sequence[TrainConfig], out: str, baseline: Optional[str] = None, progress: bool = True,
                   log=print) -> List[Dict]:
    """Train and test several models, then compare them on every channel combination.

    Each config runs in ``out/<model>`` (its ``out`` is replaced); a run that
    already has a ``last.pt`` there is resumed (or, if finished, only tested
    again), so rerunning an interrupted experiment continues it. Writes
    ``comparison.md``, ``comparison.json`` and ``comparison.png`` into ``out``
    and returns the runs' summaries. ``baseline``: one of the models; the table
    then gives each model's RGB test accuracy as a fraction of the baseline's
    (task 2: a small network against ResNet34).
    """
    if not configs:
        raise ValueError("run_experiment: expected at least one model, got none")
    names = [c.model for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"run_experiment: expected distinct models (one directory each), got {names}")
    if baseline is not None and baseline not in names:
        raise ValueError(f"run_experiment: expected the baseline to be one of the models {names}, got {baseline!r}")
    for c in configs:
        c.validate()  # all of them before the first hour of training
    os.makedirs(out, exist_ok=True)
    summaries = []
    for i, c in enumerate(configs, 1):
        c = dataclasses.replace(c, out=os.path.join(out, c.model))
        log(f"[{i}/{len(configs)}] {c.model} -> {c.out}")
        summaries.append(train(c, resume=os.path.isfile(os.path.join(c.out, "last.pt")), progress=progress,
                               log=log))
    _save_json(summaries, os.path.join(out, "comparison.json"))
    table = comparison_markdown(summaries, baseline)
    atomic_write(os.path.join(out, "comparison.md"), lambda f: f.write(table + "\n"))
    plot_comparison(summaries, os.path.join(out, "comparison.png"))
    log(f"test accuracy (%) of each model's best checkpoint:\n{table}")
    return summaries


def comparison_markdown(summaries: Sequence[Dict], baseline: Optional[str] = None) -> str:
    """Test accuracy per channel combination, one row per model; the best of each column in bold.

    With ``baseline`` (a model of the table), a last column gives each model's
    accuracy on the first combination (RGB) as a fraction of the baseline's.
    """
    combos = list(summaries[0]["test_accuracy"])
    best = {c: max(s["test_accuracy"][c] for s in summaries) for c in combos}
    reference = None
    if baseline is not None:
        matches = [s["test_accuracy"][combos[0]] for s in summaries if s["model"] == baseline]
        if not matches:
            raise ValueError(f"comparison_markdown: expected the baseline among {[s['model'] for s in summaries]}, "
                             f"got {baseline!r}")
        reference = matches[0]
    extra = [f"{combos[0]} / {baseline}"] if baseline is not None else []
    lines = ["| model | params | epochs (best) | val | " + " | ".join(combos + ["seen as"] + extra) + " |",
             "|---|---:|---|---:|" + "---:|" * len(combos) + "---|" + "---:|" * len(extra)]
    for s in summaries:
        cells = [f"**{100 * a:.2f}**" if a == best[c] and len(summaries) > 1 else f"{100 * a:.2f}"
                 for c, a in s["test_accuracy"].items()]
        seen = "its channels only" if s["fill"] is None else f"filled ({s['fill']})"
        ratio = []
        if reference is not None:
            ratio = [f"{s['test_accuracy'][combos[0]] / reference:.3f}" if reference > 0 else "n/a"]
        lines.append(f"| {s['model']} | {s['params']:,} | {s['epochs_run']} ({s['best_epoch']}) | "
                     f"{100 * s['best_val_accuracy']:.2f} | " + " | ".join(cells + [seen] + ratio) + " |")
    return "\n".join(lines)


def plot_comparison(summaries: Sequence[Dict], path: str) -> None:
    """Grouped bars: test accuracy per channel combination, one colour per model (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = list(summaries[0]["test_accuracy"])
    width = 0.8 / len(summaries)
    fig, axis = plt.subplots(figsize=(min(14.0, 3.0 + 0.3 * len(combos) * len(summaries)), 4.8))
    for i, s in enumerate(summaries):
        positions = [j + (i - (len(summaries) - 1) / 2) * width for j in range(len(combos))]
        axis.bar(positions, [100 * s["test_accuracy"][c] for c in combos], width, label=s["model"])
    axis.set_xticks(range(len(combos)), combos)
    axis.set_xlabel("channels present at test")
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(3, len(summaries)))
    axis.set_title(f"best checkpoints on {summaries[0]['data']}")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100), binary=True)
    plt.close(fig)
