"""Your own model and dataset in the CLI (and so in the SLURM templates), as ``module:function``:

    PYTHONPATH=examples mpirun -n 2 hpc-asgd train --model own_factories:build \\
        --dataset own_factories:load --optimizer adamw --lr 3e-3 --algo lasgd --period 8
    PYTHONPATH=$PWD/examples MODEL=own_factories:build DATASET=own_factories:load \\
        sbatch slurm/cifar100_lasgd.sh

The model and the data are those of ``own_loop.py``; every CLI feature (W workers with each
update rule, each synchroniser and engine, checkpoints, report, predict) runs on them.
"""

from __future__ import annotations

from own_loop import WaveNet, waveforms
from torch import nn


def build(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``--model own_factories:build``: called with one sample's shape, ``(1, 64)`` here."""
    if len(input_shape) != 2 or input_shape[0] != 1:
        raise ValueError(f"WaveNet takes (1, length) waveforms, not {input_shape}")
    return WaveNet(num_classes)


def load(data_dir: str | None, seed: int):
    """``--dataset own_factories:load``: the training split as tensors, the test split as a
    map-style dataset (either form does); the classes are counted from the labels."""
    return waveforms(4096, 8, seed).tensors, waveforms(1024, 8, seed + 1)
