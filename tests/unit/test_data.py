"""Unit tests of hpc_asgd.data: file formats, failure messages, augmentation and sharding.

Every file is written here in the official format (IDX, CIFAR's Python 2 pickles, JPEG
folders) with a handful of samples, so the tests need neither the real data nor a network.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpc_asgd.data import DATASETS, Dataset, ShardSampler, Split, load_dataset
from hpc_asgd.data.cifar import crop_flip
from hpc_asgd.errors import ConfigError, DataError

# ---------------------------------------------------------------- writers of official formats


def write_idx(path: Path, array: np.ndarray) -> Path:
    """IDX: 0x00 0x00, type 0x08 (uint8), ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles as the Python 2 cPickle that made CIFAR's files did.

    Strings become py2 ``str`` opcodes and numpy's globals get their numpy-1 module name,
    so the loader sees what it will see in the real ``data_batch_1``.
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        qual = getattr(obj, "__name__", "")
        module = "numpy.core.multiarray" if qual == "_reconstruct" else "numpy"
        self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode())


def write_py2_pickle(path: Path, obj: object) -> None:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, n: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        rows = cifar_rows(n, i)
        labels = [(i + j) % 10 for j in range(n)]
        write_py2_pickle(folder / f"data_batch_{i}", {"data": rows, "labels": labels})
    write_py2_pickle(folder / "test_batch", {"data": cifar_rows(4, 0), "labels": [0, 1, 2, 9]})
    write_py2_pickle(folder / "batches.meta", {"label_names": [f"c{k}" for k in range(10)]})
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    fine = [0, 50, 99, 7, 8]
    write_py2_pickle(folder / "train", {"data": cifar_rows(5, 1), "fine_labels": fine})
    write_py2_pickle(folder / "test", {"data": cifar_rows(2, 2), "fine_labels": [3, 4]})
    write_py2_pickle(folder / "meta", {"fine_label_names": [f"f{k}" for k in range(100)]})
    return folder


def write_imagenet(root: Path, classes: tuple[str, ...] = ("n01", "n02")) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, (30 + 7 * k, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{k}.JPEG")
    return root


# ---------------------------------------------------------------- registry and digits


def test_unknown_dataset_names_field_and_choices() -> None:
    with pytest.raises(ConfigError, match=r"dataset: .*'nope'.*cifar10.*synthetic"):
        load_dataset("nope")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagenet"])
def test_file_datasets_need_data_dir(name: str) -> None:
    with pytest.raises(ConfigError, match="data_dir"):
        load_dataset(name)


def test_digits_split_shapes_and_batch() -> None:
    ds = load_dataset("digits", seed=123)
    assert isinstance(ds, Dataset) and isinstance(ds.train, Split)
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    x, y = ds.train.batch(torch.arange(32), train=True)
    assert x.shape == (32, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    # The split is fixed, not tied to the run seed, and the data is roughly standardised.
    x2, _ = load_dataset("digits", seed=7).train.batch(torch.arange(32), train=False)
    assert torch.equal(x, x2)
    x_all, _ = ds.train.batch(torch.arange(len(ds.train)), train=False)
    assert abs(x_all.mean().item()) < 1e-3 and abs(x_all.std().item() - 1) < 1e-2


# ---------------------------------------------------------------- MNIST


@pytest.mark.parametrize(("layout", "suffix"), [("", ""), ("MNIST/raw", ".gz")])
def test_mnist_reads_idx(tmp_path: Path, layout: str, suffix: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    folder = tmp_path / layout
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images[:n])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels[:n])
    ds = load_dataset("mnist", tmp_path, verify=False)  # not the official files
    assert (len(ds.train), len(ds.test), ds.input_shape) == (5, 3, (1, 28, 28))
    x, y = ds.test.batch(torch.tensor([2, 0]), train=True)
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [4, 3]
    expected = (torch.from_numpy(images[2]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0, 0], expected)


def test_mnist_truncated_idx_names_file(tmp_path: Path) -> None:
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    bad = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: truncated IDX") as err:
        load_dataset("mnist", tmp_path, verify=False)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    bad.write_bytes(b"\x00\x00\x0d\x03" + bytes(12))  # float IDX, not MNIST
    with pytest.raises(DataError, match="magic number 0x00000d03"):
        load_dataset("mnist", tmp_path, verify=False)
    bad.unlink()
    gz = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), np.uint8))
    gz.write_bytes(gz.read_bytes()[:20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: cannot read"):
        load_dataset("mnist", tmp_path, verify=False)


def test_mnist_label_count_mismatch_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train-images-idx3-ubyte: not found"):
        load_dataset("fashion-mnist", tmp_path, verify=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: expected 4 labels"):
        load_dataset("fashion-mnist", tmp_path, verify=False)


def _write_mnist_files(folder: Path, suffix: str, n: int = 4) -> list[Path]:
    rng = np.random.default_rng(1)
    paths = []
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        paths.append(write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images))
        paths.append(write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10))
    return paths


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_verify_checks_official_gz_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The .gz files the loader reads are checked against the official MD5s: with those made
    the MD5s of these files, they load; one tampered byte -> one DataError line naming the
    file and --no-verify; with verify=False the tampered file loads."""
    from dataclasses import replace

    from hpc_asgd.data import mnist
    from hpc_asgd.data.fileio import md5sum

    paths = _write_mnist_files(tmp_path / mnist.SOURCES[name].subdir / "raw", ".gz")
    with pytest.raises(DataError, match="checksum mismatch"):  # not the official files
        load_dataset(name, tmp_path)
    official = replace(mnist.SOURCES[name], md5={p.name: md5sum(p) for p in paths})
    monkeypatch.setitem(mnist.SOURCES, name, official)
    assert len(load_dataset(name, tmp_path).train) == 4
    tampered = paths[2]  # t10k-images-idx3-ubyte.gz
    raw = bytearray(gzip.decompress(tampered.read_bytes()))
    raw[100] ^= 0xFF  # one pixel
    tampered.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match=r"checksum mismatch .*--no-verify") as err:
        load_dataset(name, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{tampered}: ") and "\n" not in msg
    x, _ = load_dataset(name, tmp_path, verify=False).test.batch(torch.arange(1), train=False)
    assert x.shape == (1, 1, 28, 28)


def test_mnist_verify_checks_unpacked_sample_count(tmp_path: Path) -> None:
    """No official MD5 exists for the unpacked files: verify checks the sample count in their
    header (60,000 / 10,000); files of your own load with verify=False."""
    paths = _write_mnist_files(tmp_path, "")
    with pytest.raises(
        DataError, match=r"4 samples, the official file has 60000 .*--no-verify"
    ) as err:
        load_dataset("mnist", tmp_path)
    assert str(err.value).startswith(f"{paths[0]}: ") and "\n" not in str(err.value)
    assert len(load_dataset("mnist", tmp_path, verify=False).train) == 4


def test_download_failure_is_one_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network here: urlopen is replaced, so the test never leaves the machine."""
    import urllib.error

    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: download failed .*no route"):
        load_dataset("mnist", tmp_path, download=True)
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: download failed"):
        load_dataset("cifar10", tmp_path, download=True)
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout: io.BytesIO(b"junk"))
    with pytest.raises(DataError, match=r"md5 .*, expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", tmp_path, download=True)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == []


# ---------------------------------------------------------------- CIFAR


def test_cifar10_reads_python2_pickles(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, verify=False)
    assert (len(ds.train), len(ds.test), ds.num_classes) == (30, 4, 10)
    x, y = ds.test.batch(torch.tensor([3, 1]), train=False)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == [9, 1]
    # Row layout: 1024 red values, then green, then blue, each 32x32 row-major.
    row = cifar_rows(4, 0)[3]
    green = torch.from_numpy(row[1024:2048].reshape(32, 32)).float() / 255
    assert torch.allclose(x[0, 1], (green - 0.4822) / 0.2435, atol=1e-5)


def test_cifar100_reads_fine_labels(tmp_path: Path) -> None:
    write_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path, verify=False)
    assert (len(ds.train), ds.num_classes) == (5, 100)
    assert ds.train.batch(torch.arange(5), train=True)[1].tolist() == [0, 50, 99, 7, 8]


def test_cifar_verify_reports_checksum_mismatch(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"checksum mismatch .*--no-verify") as err:
        load_dataset("cifar10", tmp_path, verify=True)
    assert str(folder / "batches.meta") in str(err.value)


def test_cifar_refuses_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {marker}",)

    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataError, match=r"data_batch_3: unsafe pickle, refused global"):
        load_dataset("cifar10", tmp_path, verify=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"data": np.zeros((2, 3071), np.uint8), "labels": [0, 1]}, r"shape \(N, 3072\)"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "must be a uint8"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "must hold 2 integers"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, "out of range 0..9"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "no 'labels' entry"),
    ],
)
def test_cifar_bad_contents_name_file(tmp_path: Path, entry: dict, message: str) -> None:
    folder = write_cifar10(tmp_path)
    write_py2_pickle(folder / "test_batch", entry)
    with pytest.raises(DataError, match=f"test_batch: .*{message}"):
        load_dataset("cifar10", tmp_path, verify=False)


def test_cifar_truncated_pickle_and_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar-10-batches-py: not found"):
        load_dataset("cifar10", tmp_path / "nowhere", verify=False)
    folder = write_cifar10(tmp_path)
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_2: corrupt or truncated pickle"):
        load_dataset("cifar10", tmp_path, verify=False)


def test_cifar_extracts_archive_and_refuses_traversal(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_cifar100(src)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-100-python", arcname="cifar-100-python")
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz: checksum mismatch"):
        load_dataset("cifar100", root, verify=True)
    assert len(load_dataset("cifar100", root, verify=False).train) == 5
    assert not [p for p in root.iterdir() if p.name.startswith(".extract-")]

    evil_root = tmp_path / "evil"
    evil_root.mkdir()
    with tarfile.open(evil_root / "cifar-10-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match=r"unsafe path in archive: '\.\./escaped'"):
        load_dataset("cifar10", evil_root, verify=False)
    assert not (tmp_path / "escaped").exists()


def test_cifar_augmentation_is_batched_crop_and_flip(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, verify=False)
    idx = torch.arange(16)
    plain, _ = ds.train.batch(idx, train=False)
    aug1, _ = ds.train.batch(idx, train=True, gen=torch.Generator().manual_seed(5))
    aug2, _ = ds.train.batch(idx, train=True, gen=torch.Generator().manual_seed(5))
    assert aug1.shape == plain.shape == (16, 3, 32, 32)
    assert torch.equal(aug1, aug2) and not torch.equal(aug1, plain)
    assert (aug1 != plain).flatten(1).any(1).sum() >= 8  # most samples moved


def test_crop_flip_matches_per_sample_reference() -> None:
    x = torch.rand(6, 3, 32, 32)
    out = crop_flip(x, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)  # replay the draws: offsets y, offsets x, flips
    oy = torch.randint(0, 9, (6, 1), generator=g)
    ox = torch.randint(0, 9, (6, 1), generator=g)
    flip = torch.rand(6, 1, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(6):
        ref = padded[i, :, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        ref = ref.flip(-1) if flip[i] else ref
        assert torch.equal(out[i], ref)


# ---------------------------------------------------------------- ImageNet


def test_imagenet_layout_train_and_test_views(tmp_path: Path) -> None:
    ds = load_dataset("imagenet", write_imagenet(tmp_path))
    assert (len(ds.train), len(ds.test), ds.num_classes) == (6, 4, 2)
    assert ds.input_shape == (3, 224, 224)
    x, y = ds.test.batch(torch.tensor([0, 3]), train=False)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == [0, 1]
    xa, _ = ds.train.batch(torch.arange(6), train=True, gen=torch.Generator().manual_seed(0))
    xb, _ = ds.train.batch(torch.arange(6), train=True, gen=torch.Generator().manual_seed(0))
    xc, _ = ds.train.batch(torch.arange(6), train=False)
    assert xa.shape == (6, 3, 224, 224) and torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_imagenet_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ImageNet directory not found"):
        load_dataset("imagenet", tmp_path / "missing")
    root = write_imagenet(tmp_path / "a")
    (root / "val" / "n03").mkdir()
    with pytest.raises(DataError, match=r"val: class directories differ .*extra \['n03'\]"):
        load_dataset("imagenet", root)
    (root / "val" / "n03").rmdir()
    broken = root / "val" / "n02" / "n02_0.JPEG"
    broken.write_bytes(b"not a jpeg")
    ds = load_dataset("imagenet", root)
    with pytest.raises(DataError, match="cannot decode image") as err:
        ds.test.batch(torch.arange(4), train=False)
    assert str(broken) in str(err.value)
    (tmp_path / "b" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="train: no class directories"):
        load_dataset("imagenet", tmp_path / "b")


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_cheap() -> None:
    ds = load_dataset("synthetic", synthetic_shape=(1, 4, 4), synthetic_classes=3, seed=1)
    assert len(ds.train) == 50_000 and ds.input_shape == (1, 4, 4) and ds.num_classes == 3
    idx = torch.tensor([0, 4096, 49_999])
    x, y = ds.train.batch(idx, train=True)
    assert x.shape == (3, 1, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[0], x[1])  # pool of 4,096 indexed modulo its size
    again = load_dataset("synthetic", synthetic_shape=(1, 4, 4), synthetic_classes=3, seed=1)
    other = load_dataset("synthetic", synthetic_shape=(1, 4, 4), synthetic_classes=3, seed=2)
    assert torch.equal(again.train.batch(idx, train=True)[0], x)
    assert not torch.equal(other.train.batch(idx, train=True)[0], x)
    _, labels = ds.train.batch(torch.arange(4096), train=False)
    assert labels.bincount(minlength=3).min() > 500  # the teacher uses every class


# ---------------------------------------------------------------- ShardSampler


def test_sampler_shards_are_disjoint_equal_and_reshuffled() -> None:
    n, shards, bs = 103, 4, 5
    samplers = [ShardSampler(n, r, shards, bs, seed=3) for r in range(shards)]
    batches = [s.epoch(0) for s in samplers]
    assert all(s.steps_per_epoch == 5 == len(b) for s, b in zip(samplers, batches, strict=True))
    seen = torch.cat([torch.cat(b) for b in batches])
    assert seen.dtype == torch.int64 and all(len(x) == bs for b in batches for x in b)
    assert len(set(seen.tolist())) == len(seen) == 100  # disjoint, 25 per shard, 3 dropped
    s0 = samplers[0]
    assert torch.equal(torch.cat(s0.epoch(1)), torch.cat(ShardSampler(n, 0, 4, bs, 3).epoch(1)))
    assert not torch.equal(torch.cat(s0.epoch(0)), torch.cat(s0.epoch(1)))
    assert not torch.equal(torch.cat(s0.epoch(1)), torch.cat(ShardSampler(n, 0, 4, bs, 4).epoch(1)))
    # seed + epoch must not collide: (0, 1) and (1, 0) give different orders.
    a, b = ShardSampler(n, 0, 1, bs, 0).epoch(1), ShardSampler(n, 0, 1, bs, 1).epoch(0)
    assert not torch.equal(torch.cat(a), torch.cat(b))


def test_sampler_no_shuffle_partial_batch_and_bad_config() -> None:
    s = ShardSampler(10, 1, 2, 2, seed=0, shuffle=False, drop_last=False)
    assert s.steps_per_epoch == 3
    assert [b.tolist() for b in s.epoch(0)] == [[1, 3], [5, 7], [9]]
    with pytest.raises(ConfigError, match="batch_size"):
        ShardSampler(10, 0, 2, 6, seed=0)
    with pytest.raises(ConfigError, match="shard"):
        ShardSampler(10, 2, 2, 1, seed=0)


def test_registry_lists_every_dataset() -> None:
    assert DATASETS == (
        "digits",
        "mnist",
        "fashion-mnist",
        "cifar10",
        "cifar100",
        "imagenet",
        "synthetic",
    )
