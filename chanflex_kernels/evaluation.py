"""Accuracy of a model on every channel combination (the seeds' evaluation protocol)."""
from __future__ import annotations

import dataclasses
import json
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .channels import FILL_STRATEGIES, fill_channels, normalize_channel_names, resolve_channels
from .files import atomic_write

__all__ = ["ComboResult", "ChannelComboReport", "evaluate_channel_combinations", "DEFAULT_COMBOS"]

DEFAULT_COMBOS = ("RGB", "RG", "RB", "GB", "R", "G", "B")
_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro",
            "precision_weighted", "recall_weighted", "f1_weighted")


@dataclasses.dataclass
class ComboResult:
    """Metrics of one channel combination; fractions in [0, 1]."""

    combo: str
    channels: List[int]
    samples: int
    accuracy: float
    precision_macro: float
    recall_macro: float
    f1_macro: float
    precision_weighted: float
    recall_weighted: float
    f1_weighted: float
    confusion: List[List[int]]


@dataclasses.dataclass
class ChannelComboReport:
    """Per-combination metrics; prints as a markdown table, serialises to JSON."""

    results: List[ComboResult]
    fill: Optional[str] = None

    def __getitem__(self, combo: str) -> ComboResult:
        for r in self.results:
            if r.combo == combo:
                return r
        raise KeyError(f"no combination {combo!r}; have {[r.combo for r in self.results]}")

    def to_markdown(self) -> str:
        header = "| channels | n | " + " | ".join(_METRICS) + " |"
        lines = [header, "|" + "---|" * (len(_METRICS) + 2)]
        for r in self.results:
            values = " | ".join(f"{100 * getattr(r, m):.2f}" for m in _METRICS)
            lines.append(f"| {r.combo} | {r.samples} | {values} |")
        return "\n".join(lines) + "\n\n(percentages; fill: " + (self.fill or "none, native channels") + ")"

    def __str__(self) -> str:
        return self.to_markdown()

    def to_dict(self) -> Dict:
        return {"fill": self.fill, "results": [dataclasses.asdict(r) for r in self.results]}

    def to_json(self, path: Optional[str] = None) -> str:
        """The report as JSON; written atomically to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            atomic_write(path, lambda f: f.write(text))
        return text

    @classmethod
    def from_dict(cls, data: Dict) -> "ChannelComboReport":
        return cls([ComboResult(**r) for r in data["results"]], data.get("fill"))


def _metrics(combo, channels, labels, predictions, num_classes) -> ComboResult:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(num_classes))
    scores = {"accuracy": float(accuracy_score(labels, predictions))}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=classes, average=average,
                                                     zero_division=0)
        scores.update({f"precision_{average}": float(p), f"recall_{average}": float(r), f"f1_{average}": float(f)})
    confusion = confusion_matrix(labels, predictions, labels=classes).tolist()
    return ComboResult(combo, channels, len(labels), confusion=confusion, **scores)


@torch.no_grad()
def evaluate_channel_combinations(model: torch.nn.Module, loader: Iterable, combos: Sequence = DEFAULT_COMBOS,
                                  fill: Optional[str] = None, channel_names="RGB", num_classes: Optional[int] = None,
                                  device=None, progress: bool = True) -> ChannelComboReport:
    """Evaluate ``model`` on each channel combination of full-channel data.

    Args:
        model: a classifier returning logits (B, num_classes).
        loader: yields (x, y) with x (B, C, H, W) holding all C channels.
        combos: channel subsets, as names ("RG") or index lists.
        fill: how the model sees a subset:
            None: ``model(x[:, S], channels=S)`` (channel-flexible models);
            'narrow': ``model(x[:, S])`` (channel-count-agnostic models);
            'replicate' / 'mean' / 'zeros': ``model(fill_channels(x[:, S], S, fill))``.
        channel_names: names of the C channels (default "RGB").
        num_classes: for the confusion matrix and the macro averages;
            default: the width of the model's output.
        device: where to run; default the model's parameters' device.
        progress: show a tqdm bar.

    Returns:
        ChannelComboReport with accuracy, macro and weighted precision,
        recall and F1 (scikit-learn, zero_division=0) and the confusion matrix.
    """
    if fill is not None and fill != "narrow" and fill not in FILL_STRATEGIES:
        raise ValueError(f"evaluate_channel_combinations: expected fill None, 'narrow' or one of "
                         f"{FILL_STRATEGIES}, got {fill!r}")
    if not combos:
        raise ValueError("evaluate_channel_combinations: expected at least one channel combination, got none")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    names = normalize_channel_names(channel_names, len(tuple(channel_names)), "evaluate_channel_combinations")
    subsets = [(combo if isinstance(combo, str) else "".join(names[i] for i in combo),
                resolve_channels(combo, len(names), names, "evaluate_channel_combinations"))
               for combo in combos]
    was_training = model.training
    model.eval()
    outputs: Dict[str, List[torch.Tensor]] = {label: [] for label, _ in subsets}
    labels: List[torch.Tensor] = []
    try:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="channel combinations", disable=not progress, leave=False)
        for x, y in batches:
            if x.dim() != 4 or x.shape[1] != len(names):
                raise ValueError(f"evaluate_channel_combinations: expected batches of shape (B, {len(names)}, H, W), "
                                 f"got {tuple(x.shape)}")
            x = x.to(device)
            labels.append(y.cpu())
            for label, index in subsets:
                narrow = x[:, index]
                if fill is None:
                    logits = model(narrow, channels=index)
                elif fill == "narrow":
                    logits = model(narrow)
                else:
                    logits = model(fill_channels(narrow, index, fill, len(names)))
                outputs[label].append(logits.argmax(dim=1).cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("evaluate_channel_combinations: the loader yielded no batches")
    y_true = torch.cat(labels).numpy()
    if num_classes is None:
        num_classes = int(logits.shape[1])
    results = [_metrics(label, index, y_true, torch.cat(outputs[label]).numpy(), num_classes)
               for label, index in subsets]
    return ChannelComboReport(results, fill)
