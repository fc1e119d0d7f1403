"""scikit-learn's bundled 8x8 digits (1,797 images, values 0..16): a dataset for smoke runs.

It ships with scikit-learn, so it needs no files and no network; ``data_dir`` is ignored.
"""

from __future__ import annotations

import numpy as np
import torch

from .base import Dataset, TensorSplit

TEST_SIZE = 360  # 1,437 train / 360 test
SPLIT_SEED = 0  # fixed: the split must not move with the run seed, or test scores would


def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)  # (1797,)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    # Scale 0..16 to [0, 1], then standardise with the training pixels' statistics.
    pixels = x_tr.astype(np.float64) / 16.0
    mean, std = (float(pixels.mean()),), (float(pixels.std()),)

    def split(x: np.ndarray, y: np.ndarray) -> TensorSplit:
        images_t = torch.from_numpy(x).unsqueeze(1)  # uint8 (N, 1, 8, 8)
        return TensorSplit(images_t, torch.from_numpy(y), scale=1 / 16, mean=mean, std=std)

    return Dataset(
        name="digits",
        train=split(x_tr, y_tr),
        test=split(x_te, y_te),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
