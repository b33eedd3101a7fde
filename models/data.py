"""Datasets of the experiment runner: ImageNet-mini's list files, and a synthetic stand-in.

ImageNet-mini (shared/MODELS.md): an archive root holding ``train.txt``,
``val.txt`` (or ``validation.txt``) and ``test.txt``; each line is
``<relative image path> <integer label>``. Images are read with PIL and
converted to RGB (some are grayscale), so channel 0 is red: seed 000 sliced
channels of BGR arrays, and its "R" was blue.

``synthetic`` needs no download: small images whose class is carried both by
a grating (orientation and frequency, visible in any single channel) and by a
colour (visible only across channels), so a model learns it within a few
epochs on a CPU and the channel combinations differ. Used by ``make
experiment`` and the tests.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ["ImageListDataset", "SyntheticImages", "SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "build_datasets"]

SPLITS = ("train", "val", "test")
# The list file names each split may have (the assignment text calls val "validation").
_LIST_FILES = {"train": ("train.txt",), "val": ("val.txt", "validation.txt"), "test": ("test.txt",)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _list_file(root: str, split: str) -> str:
    if split not in _LIST_FILES:
        raise ValueError(f"ImageListDataset: expected split in {SPLITS}, got {split!r}")
    for name in _LIST_FILES[split]:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"ImageListDataset: expected the {split} list at "
                            f"{' or '.join(os.path.join(root, n) for n in _LIST_FILES[split])}; not found")


def parse_list_file(path: str) -> List[Tuple[str, int]]:
    """``(relative path, label)`` per non-empty line of ``path``; a path may hold spaces."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(" ", 1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path} line {number}: expected '<image path> <integer label>', got {line!r}")
            label = int(parts[1])
            if label < 0:
                raise ValueError(f"{path} line {number}: expected a label >= 0, got {label}")
            samples.append((parts[0], label))
    if not samples:
        raise ValueError(f"{path}: expected at least one '<image path> <integer label>' line, got none")
    return samples


class ImageListDataset(Dataset):
    """One split of an image-list dataset (ImageNet-mini's layout); items are (image tensor, label).

    Args:
        root: the directory holding the list files; image paths are relative to it.
        split: 'train', 'val' or 'test'.
        transform: applied to the RGB PIL image (default: ``transforms.ToTensor()``).
        check_files: check at construction that every image exists, so a
            broken archive fails before training rather than hours into it.
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, check_files: bool = True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageListDataset: expected a dataset directory, got {root!r} (not a directory)")
        self.root = root
        self.split = split
        self.list_file = _list_file(root, split)
        self.samples = parse_list_file(self.list_file)
        if check_files:
            missing = [p for p, _ in self.samples if not os.path.isfile(os.path.join(root, p))]
            if missing:
                raise FileNotFoundError(f"ImageListDataset: {len(missing)} of {len(self.samples)} images listed in "
                                        f"{self.list_file} are missing under {root}, e.g. {missing[:3]}")
        if transform is None:
            from torchvision import transforms
            transform = transforms.ToTensor()
        self.transform = transform

    @property
    def labels(self) -> List[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(os.path.join(self.root, path)) as image:
            image = image.convert("RGB")
        return self.transform(image), label


class SyntheticImages(Dataset):
    """Deterministic class-structured images: item i of a split is the same on every call and in every process.

    Class c has a grating (orientation and frequency) and a colour; an image is
    that grating with a random phase, tinted by the colour, plus Gaussian noise.
    ``noise`` sets the difficulty. Values are roughly standardised (mean 0,
    unit scale), like normalised photographs.
    """

    def __init__(self, split: str, num_classes: int = 10, per_class: int = 32, image_size: int = 32,
                 noise: float = 0.8, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"SyntheticImages: expected split in {SPLITS}, got {split!r}")
        for name, value in (("num_classes", num_classes), ("per_class", per_class), ("image_size", image_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticImages: expected {name} to be a positive int, got {value!r}")
        self.split = split
        self.num_classes = num_classes
        self.per_class = per_class
        self.image_size = image_size
        self.noise = noise
        self.seed = seed
        prototypes = torch.Generator().manual_seed(seed)  # the classes, shared by the splits
        self.angles = torch.rand(num_classes, generator=prototypes) * math.pi
        self.frequencies = 1.5 + 3.0 * torch.rand(num_classes, generator=prototypes)
        self.colours = torch.nn.functional.normalize(torch.rand(num_classes, 3, generator=prototypes) + 0.2, dim=1)
        coords = torch.linspace(-1.0, 1.0, image_size)
        self._y, self._x = torch.meshgrid(coords, coords, indexing="ij")

    @property
    def labels(self) -> List[int]:
        return [i % self.num_classes for i in range(len(self))]

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"SyntheticImages: index {index} out of range for {len(self)} images")
        label = index % self.num_classes
        # Not hash(): str hashes change between processes.
        g = torch.Generator().manual_seed((self.seed * len(SPLITS) + SPLITS.index(self.split)) * 10 ** 9 + index)
        angle = self.angles[label] + 0.15 * torch.randn((), generator=g)
        phase = 2 * math.pi * torch.rand((), generator=g)
        along = self._x * torch.cos(angle) + self._y * torch.sin(angle)
        grating = torch.sin(math.pi * self.frequencies[label] * along + phase)
        image = 1.7 * self.colours[label].view(3, 1, 1) * grating
        image = image + self.noise * torch.randn(3, self.image_size, self.image_size, generator=g)
        return image, label


def image_transforms(image_size: int, train: bool):
    """Resize to a square, flip at random in training, ToTensor, normalise with ImageNet's statistics."""
    from torchvision import transforms

    steps = [transforms.Resize((image_size, image_size))]
    if train:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def build_datasets(data: str, image_size: int, splits: Sequence[str] = SPLITS, synthetic_classes: int = 10,
                   synthetic_per_class: int = 32, seed: int = 0) -> dict:
    """``{split: dataset}`` for ``data``: an ImageNet-mini-style root, or 'synthetic'."""
    if data == "synthetic":
        # val and test are a quarter of train's size, as small held-out splits are in ImageNet-mini.
        return {s: SyntheticImages(s, synthetic_classes,
                                   synthetic_per_class if s == "train" else max(1, synthetic_per_class // 4),
                                   image_size, seed=seed) for s in splits}
    return {s: ImageListDataset(data, s, image_transforms(image_size, train=s == "train")) for s in splits}
