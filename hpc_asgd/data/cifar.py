"""CIFAR-10 and CIFAR-100 from the official python-pickle release.

Read from ``data_dir/cifar-10-batches-py`` or ``data_dir/cifar-100-python``; if the folder is
missing, the official .tar.gz in ``data_dir`` is extracted (or downloaded first when asked).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hpc_asgd.errors import DataError

from .base import Dataset, TensorSplit
from .fileio import download as fetch
from .fileio import safe_extract, verify_md5
from .pickles import load_pickle

ROW = 3 * 32 * 32  # one image per row: 1024 red, then green, then blue values


@dataclass(frozen=True)
class _Spec:
    folder: str
    archive: str
    archive_md5: str
    train: tuple[tuple[str, str], ...]  # (file, md5)
    test: tuple[tuple[str, str], ...]
    meta: tuple[str, str, str]  # (file, md5, key of the class names)
    label_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def url(self) -> str:
        return "https://www.cs.toronto.edu/~kriz/" + self.archive


SPECS = {
    "cifar10": _Spec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888", "label_names"),
        label_key="labels",
        num_classes=10,
        # Per-channel statistics of the training images (true std, not the 0.2023... folklore).
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _Spec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        meta=("meta", "7973b15100ade9c7d40fb424638fde48", "fine_label_names"),
        label_key="fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


def crop_flip(x: torch.Tensor, gen: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-padded crop plus horizontal flip, for a whole batch in one gather.

    x: float (B, C, H, W) -> float (B, C, H, W). Each sample gets its own offsets and flip.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # (B, H+2p, W+2p, C)
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)  # (B, 1) crop offsets
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
    flip = torch.rand(b, 1, generator=gen) < 0.5  # (B, 1)
    cols = torch.arange(w)
    rows = oy + torch.arange(h)  # (B, H)
    cols = ox + torch.where(flip, cols.flip(0), cols)  # (B, W); flipping = reading right to left
    out = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _read_batch(path: Path, spec: _Spec) -> tuple[np.ndarray, np.ndarray]:
    """One official batch file -> uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    entry = load_pickle(path)
    data, labels = entry.get("data"), entry.get(spec.label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {ROW}), got {got}")
    if data.shape[1] != ROW:
        raise DataError(f"{path}: 'data' must have shape (N, {ROW}), got {data.shape}")
    if labels is None:
        raise DataError(f"{path}: no {spec.label_key!r} entry")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{path}: {spec.label_key!r} must hold {data.shape[0]} integers, "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{path}: labels out of range 0..{spec.num_classes - 1} "
            f"(found {labels.min()}..{labels.max()})"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _locate(root: Path, spec: _Spec, do_download: bool, verify: bool) -> Path:
    folder = root / spec.folder
    if folder.is_dir():
        return folder
    archive = root / spec.archive
    if not archive.is_file() and do_download:
        fetch([spec.url], archive, spec.archive_md5)
    if not archive.is_file():
        raise DataError(
            f"{folder}: not found (nor {archive.name} next to it); "
            "copy the official python version there or pass --download"
        )
    if verify:
        verify_md5(archive, spec.archive_md5)
    return safe_extract(archive, root, spec.folder)


def _load_split(
    folder: Path, spec: _Spec, files: tuple[tuple[str, str], ...], verify: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    parts = []
    for name, md5 in files:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path}: not found")
        if verify:
            verify_md5(path, md5)
        parts.append(_read_batch(path, spec))
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))  # uint8 (N, 3, 32, 32)
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))  # int64 (N,)
    return images, labels


def load_cifar(name: str, root: Path, *, download: bool = False, verify: bool = True) -> Dataset:
    """Load ``cifar10`` or ``cifar100``; ``verify`` checks the official MD5 of every file."""
    spec = SPECS[name]
    folder = _locate(root, spec, download, verify)

    meta_name, meta_md5, names_key = spec.meta
    meta_path = folder / meta_name
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: not found")
    if verify:
        verify_md5(meta_path, meta_md5)
    names = load_pickle(meta_path).get(names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DataError(f"{meta_path}: {names_key!r} must list {spec.num_classes} class names")

    def split(files: tuple[tuple[str, str], ...], augment: bool) -> TensorSplit:
        images, labels = _load_split(folder, spec, files, verify)
        return TensorSplit(
            images,
            labels,
            scale=1 / 255,
            mean=spec.mean,
            std=spec.std,
            augment=crop_flip if augment else None,
        )

    return Dataset(
        name=name,
        train=split(spec.train, augment=True),
        test=split(spec.test, augment=False),
        input_shape=(3, 32, 32),
        num_classes=spec.num_classes,
    )
