"""Datasets through torchvision, segments by index modulo S, and segment data digests."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

from config.settings import DATASETS


class DatasetError(RuntimeError):
    """The dataset is missing under the data root, or its bytes differ from what a job expects."""


@functools.lru_cache(maxsize=4)
def load_images(root: str, dataset: str, *, train: bool, download: bool = False) -> torch.Tensor:
    """Return the dataset's images as a uint8 tensor of shape (N, 28, 28), cached per process.

    With `download`, torchvision fetches a missing dataset into `root`.
    """
    import torchvision.datasets

    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}: choose one of {', '.join(sorted(DATASETS))}")
    raw = Path(root) / DATASETS[dataset] / "raw"
    expected = raw / f"{'train' if train else 't10k'}-images-idx3-ubyte"
    if not expected.is_file() and not download:
        raise DatasetError(
            f"{dataset} not found: {expected} is missing. Point FARM_DATA_ROOT or --data-root at a "
            f"folder in torchvision's layout ({DATASETS[dataset]}/raw/...), or pass --download to fetch it"
        )
    dataset_class = getattr(torchvision.datasets, DATASETS[dataset])
    try:
        return dataset_class(root=root, train=train, download=download).data
    except (RuntimeError, OSError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DatasetError(
            f"{dataset} not found under {raw} and the download failed ({reason}). Check the network, "
            f"or point FARM_DATA_ROOT or --data-root at a copy in torchvision's layout"
        ) from None


def segment_images(images: torch.Tensor, segments: int, segment: int) -> torch.Tensor:
    """Return the images whose index i has i % segments == segment."""
    if not 0 <= segment < segments:
        raise ValueError(f"segment {segment} is out of range for {segments} segments")
    return images[segment::segments]


def segment_size(total: int, segments: int, segment: int) -> int:
    """Return how many of `total` images fall into one segment."""
    return len(range(segment, total, segments))


def data_digest(dataset: str, segments: int, segment: int, images: torch.Tensor) -> str:
    """Return the SHA-256 hex digest of one segment's image bytes and its place in the split."""
    sha = hashlib.sha256(f"{dataset}:{segments}:{segment}:{list(images.shape)}:".encode())
    sha.update(images.contiguous().numpy().tobytes())
    return sha.hexdigest()


def to_inputs(images: torch.Tensor) -> torch.Tensor:
    """Scale uint8 images to float32 in [0, 1] and flatten them to (N, 784)."""
    return images.reshape(images.shape[0], -1).to(torch.float32) / 255.0
