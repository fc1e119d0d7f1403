"""ImageNet (or any ImageFolder-style set) from ``data_dir/{train,val}/<class>/*.JPEG``.

Files are decoded lazily in ``batch()``: 1.28 M JPEGs do not fit in memory as pixels. Test
images are resized (shorter side 256) and centre-cropped to 224; training images get a
random resized crop (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip. The random numbers
come from ``gen`` either way, so a run is reproducible with or without torchvision.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image

from hpc_asgd.errors import DataError

from .base import Dataset, as_index, normaliser

EXTENSIONS = {".jpeg", ".jpg", ".png"}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE, RESIZE = 224, 256
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@functools.cache
def _tv_functional() -> ModuleType | None:
    """torchvision.transforms.v2.functional if it imports cleanly next to this torch."""
    try:
        import torchvision.transforms.v2.functional as tvf
    except Exception:  # missing, or a wheel built for another torch (fails in odd ways)
        return None
    return tvf


def _scan(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[Path], list[int]]:
    """Sorted class folders and their images; ``classes`` given means they must match."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: directory not found (expected <class>/*.JPEG inside)")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not found:
        raise DataError(f"{split_dir}: no class directories")
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise DataError(
            f"{split_dir}: class directories differ from train "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"extra {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in EXTENSIONS)
        if not files:
            raise DataError(f"{split_dir / name}: no images (.JPEG, .jpg or .png)")
        paths += files
        labels += [label] * len(files)
    return found, paths, labels


def _decode(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # convert() forces the full decode inside the try
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from None


def _crop_box(w: int, h: int, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, width, height), drawn from ``gen``."""
    area = w * h
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        u = torch.rand(4, generator=gen).tolist()
        target = area * (SCALE[0] + u[0] * (SCALE[1] - SCALE[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (w - cw + 1)), int(u[3] * (h - ch + 1)), cw, ch
    # Fallback, as torchvision: the largest centred crop with a ratio inside RATIO.
    ratio = w / h
    if ratio < RATIO[0]:
        cw, ch = w, round(w / RATIO[0])
    elif ratio > RATIO[1]:
        cw, ch = round(h * RATIO[1]), h
    else:
        cw, ch = w, h
    return (w - cw) // 2, (h - ch) // 2, cw, ch


def _train_view(img: Image.Image, gen: torch.Generator | None) -> Image.Image:
    left, top, cw, ch = _crop_box(img.width, img.height, gen)
    tvf = _tv_functional()
    if tvf is not None:
        return tvf.resized_crop(img, top, left, ch, cw, [SIZE, SIZE])
    box = (left, top, left + cw, top + ch)
    return img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)


def _test_view(img: Image.Image) -> Image.Image:
    tvf = _tv_functional()
    if tvf is not None:
        return tvf.center_crop(tvf.resize(img, [RESIZE]), [SIZE, SIZE])
    # Resize-256-then-crop-224 in one resample: crop the matching box of the original.
    side = SIZE * min(img.width, img.height) / RESIZE  # 224 px after resizing, in source px
    left, top = (img.width - side) / 2, (img.height - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)


class ImageFolderSplit:
    """Image paths and labels; pixels are decoded per batch."""

    def __init__(self, paths: list[Path], labels: list[int]) -> None:
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.int64)  # (N,)
        self.mean, self.std = normaliser(MEAN, STD)

    def __len__(self) -> int:
        return len(self.paths)

    def batch(
        self, idx: torch.Tensor, *, train: bool, gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index(idx)
        views = []
        for i in idx.tolist():
            img = _decode(self.paths[i])
            view = _train_view(img, gen) if train else _test_view(img)
            views.append(torch.from_numpy(np.array(view, dtype=np.uint8)))  # (224, 224, 3)
        if not views:
            return torch.empty(0, 3, SIZE, SIZE), self.labels[idx]
        x = torch.stack(views).permute(0, 3, 1, 2).to(torch.float32).div_(255)  # (B, 3, H, W)
        if train:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5  # (B,)
            x[flip] = x[flip].flip(-1)
        return (x - self.mean) / self.std, self.labels[idx]


def load_imagenet(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: ImageNet directory not found (expected train/ and val/)")
    classes, train_paths, train_labels = _scan(root / "train", None)
    _, val_paths, val_labels = _scan(root / "val", classes)
    return Dataset(
        name="imagenet",
        train=ImageFolderSplit(train_paths, train_labels),
        test=ImageFolderSplit(val_paths, val_labels),
        input_shape=(3, SIZE, SIZE),
        num_classes=len(classes),
    )
