"""Datasets as batch-indexable splits, and the sampler that shards them over ranks."""

from .base import Dataset, Split
from .registry import DATASETS, load_dataset
from .sampler import ShardSampler

__all__ = ["DATASETS", "Dataset", "ShardSampler", "Split", "load_dataset"]
