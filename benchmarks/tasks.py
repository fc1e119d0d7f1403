"""Generated data sets for the accuracy study (``accuracy.py``), as ``--dataset tasks:clusters``.

``clusters``: scikit-learn's ``make_classification`` (Guyon's Madelon generator): 10 balanced
classes, each 2 Gaussian clusters on the vertices of a hypercube (side ``2 * CLASS_SEP``) in a
16-dimensional informative subspace, among 64 features (48 of pure noise), standardised with the
training set's statistics and shaped (1, 8, 8) for the zoo's models. The 20 clusters overlap and
8,192 training samples leave 48 noise features to overfit, so no model reaches 1.0 and
generalisation, not only the optimiser, sets the final accuracy. Why it is hard enough: on the
zoo's ``mlp`` (3 x 128) with plain SGD (lr 0.1, global batch 128; lr 0.05 at batch 64 gives the
same curve) sync's test accuracy sits in the initial loss plateau (training loss ~ln 10) for
about 2 epochs, then climbs for about 10 more (0.50 after 3 epochs, 0.81 after 8, 0.85 after
11) and comes within 1 point of its 16-epoch value (~0.87) only at epoch 13.

The data do not depend on the run's ``--seed`` (``load`` ignores it): every seed and every
algorithm sees the same training and test sets, so the spread over seeds is that of the
initialisation and the data order alone. ``cache(folder)`` writes them once (``accuracy.py``
does, for ``--data-dir``), so the ranks load a tensor file instead of importing scikit-learn
(1.4 s of CPU per rank on this machine); without it every rank generates them itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

TRAIN, TEST = 8192, 4096
FEATURES, INFORMATIVE, CLASSES, CLUSTERS_PER_CLASS = 64, 16, 10, 2
CLASS_SEP = 2.0
DATA_SEED = 1
CACHE = "clusters.pt"


def generate() -> tuple[torch.Tensor, torch.Tensor]:
    """x float32 (TRAIN + TEST, 1, 8, 8), standardised; y int64; the first TRAIN for training."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=TRAIN + TEST, n_features=FEATURES, n_informative=INFORMATIVE, n_redundant=0,
        n_classes=CLASSES, n_clusters_per_class=CLUSTERS_PER_CLASS, class_sep=CLASS_SEP,
        flip_y=0.0, random_state=DATA_SEED,
    )  # fmt: skip
    x = torch.tensor(x, dtype=torch.float32)
    mean, std = x[:TRAIN].mean(0), x[:TRAIN].std(0)
    return ((x - mean) / std).view(-1, 1, 8, 8), torch.tensor(y, dtype=torch.int64)


def cache(folder: str | Path) -> Path:
    """Write the data set into ``folder`` (pass it as ``--data-dir``); returns the file."""
    path = Path(folder) / CACHE
    x, y = generate()
    torch.save({"x": x, "y": y}, path)
    return path


def clusters(data_dir: str | None = None, seed: int = 0):
    """``((x_train, y_train), (x_test, y_test), 10)``: x float32 (N, 1, 8, 8) (the zoo's
    models take (C, H, W) inputs of at least 8 x 8; ``mlp`` flattens them), y int64 (N,)."""
    del seed  # the same data for every run seed (see the module's text)
    path = Path(data_dir) / CACHE if data_dir else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        x, y = saved["x"], saved["y"]
    else:
        x, y = generate()
    return (x[:TRAIN], y[:TRAIN]), (x[TRAIN:], y[TRAIN:]), CLASSES
