"""MNIST and Fashion-MNIST from the official IDX files (optionally gzipped).

Looked for in ``data_dir`` and in ``data_dir/MNIST/raw`` / ``data_dir/FashionMNIST/raw``, the
layout torchvision uses, so an existing torchvision download is found as is.

With ``verify`` (the default; ``--no-verify`` for your own files in this format) the files
the loader reads are checked like CIFAR's: a ``.gz`` against the official MD5 (torchvision's
``resources`` list). The official lists give no MD5 of the unpacked files, and the originals
could not be fetched here to compute them, so an unpacked file is checked by its header only:
it must hold the official number of samples (60,000 train, 10,000 test). Its content is not.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpc_asgd.errors import DataError

from .base import Dataset, TensorSplit
from .fileio import NO_VERIFY_HINT, verify_md5
from .fileio import download as fetch

IDX_UINT8 = 0x08  # the only element type MNIST uses
NUM_CLASSES = 10


@dataclass(frozen=True)
class _Source:
    subdir: str  # torchvision's folder name
    mirrors: tuple[str, ...]
    md5: dict[str, str]  # of the .gz files, as torchvision lists them
    mean: float
    std: float


SOURCES = {
    "mnist": _Source(
        subdir="MNIST",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mean=0.1307,
        std=0.3081,
    ),
    "fashion-mnist": _Source(
        subdir="FashionMNIST",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mean=0.2860,
        std=0.3530,
    ),
}
FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SAMPLES = {"train": 60_000, "test": 10_000}  # in the official files of both datasets


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (uint8 only) and check its payload against the header's dims."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    # Magic number: two zero bytes, the element type, the number of dimensions.
    if raw[0] != 0 or raw[1] != 0 or raw[2] != IDX_UINT8 or raw[3] == 0:
        magic = int.from_bytes(raw[:4], "big")
        raise DataError(f"{path}: not a uint8 IDX file (magic number 0x{magic:08x})")
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    expected, got = int(np.prod(dims)), len(raw) - start
    if got != expected:
        what = "truncated" if got < expected else "trailing bytes in"
        raise DataError(
            f"{path}: {what} IDX file (header says {dims} = {expected} bytes, found {got})"
        )
    return np.frombuffer(raw, np.uint8, offset=start).reshape(dims)


def _find(root: Path, source: _Source, base: str) -> Path | None:
    for folder in (root, root / source.subdir / "raw"):
        for name in (base, base + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_verified(path: Path, source: _Source, split: str, verify: bool) -> np.ndarray:
    """``read_idx`` plus, with ``verify``, a .gz's MD5 first or an unpacked file's count after."""
    if verify and path.suffix == ".gz":
        verify_md5(path, source.md5[path.name])
    array = read_idx(path)
    if verify and path.suffix != ".gz" and array.shape[0] != SAMPLES[split]:
        raise DataError(
            f"{path}: {array.shape[0]} samples, the official file has {SAMPLES[split]} "
            f"({NO_VERIFY_HINT})"
        )
    return array


def _load_split(
    root: Path, source: _Source, split: str, do_download: bool, verify: bool
) -> TensorSplit:
    paths = []
    for base in FILES[split]:
        path = _find(root, source, base)
        if path is None and do_download:
            gz = base + ".gz"
            urls = [mirror + gz for mirror in source.mirrors]
            path = fetch(urls, root / source.subdir / "raw" / gz, source.md5[gz])
        if path is None:
            raise DataError(
                f"{root / base}: not found (nor .gz, nor under {source.subdir}/raw); "
                "copy the official IDX files there or pass --download"
            )
        paths.append(path)
    images = _read_verified(paths[0], source, split, verify)
    labels = _read_verified(paths[1], source, split, verify)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{paths[0]}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"{paths[1]}: expected {images.shape[0]} labels to match {paths[0].name}, "
            f"got shape {labels.shape}"
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{paths[1]}: label {labels.max()} out of range 0..{NUM_CLASSES - 1}")
    return TensorSplit(
        torch.from_numpy(images.copy()).unsqueeze(1),  # uint8 (N, 1, 28, 28)
        torch.from_numpy(labels.astype(np.int64)),
        scale=1 / 255,
        mean=(source.mean,),
        std=(source.std,),
    )


def load_mnist(name: str, root: Path, *, download: bool = False, verify: bool = True) -> Dataset:
    """Load ``mnist`` or ``fashion-mnist``; ``download=True`` fetches missing files and
    ``verify`` checks the official files (module docstring: what is checked for which)."""
    source = SOURCES[name]
    return Dataset(
        name=name,
        train=_load_split(root, source, "train", download, verify),
        test=_load_split(root, source, "test", download, verify),
        input_shape=(1, 28, 28),
        num_classes=NUM_CLASSES,
    )
