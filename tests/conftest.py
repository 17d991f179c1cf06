"""Shared fixtures: the dataset root and farms of real Redis and Celery worker processes on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.client import FarmClient
from orchestrator.local import LocalFarm

REPO_ROOT = Path(__file__).resolve().parent.parent


def dataset_root() -> Path:
    """Return FARM_DATA_ROOT, or the datasets folder shipped beside the checkout."""
    root = Path(os.environ.get("FARM_DATA_ROOT", REPO_ROOT.parent / "shared" / "datasets"))
    if not (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.exit(f"MNIST not found under {root}; set FARM_DATA_ROOT to a folder in torchvision's layout", 2)
    return root


@pytest.fixture(scope="session")
def data_root() -> Path:
    return dataset_root()


@pytest.fixture(scope="module")
def farm(data_root: Path, tmp_path_factory) -> LocalFarm:
    """Redis, three honest workers and Flower (its API open on loopback for the tests)."""
    with LocalFarm(
        workers=3, data_root=data_root, log_dir=tmp_path_factory.mktemp("farm-logs"), flower=True,
        extra_env={"FLOWER_UNAUTHENTICATED_API": "true"},
    ) as local_farm:
        yield local_farm


@pytest.fixture(scope="module")
def client(farm: LocalFarm) -> FarmClient:
    return FarmClient(farm.broker_url, farm.broker_url)
