"""Helpers to run training against a test farm with small, fast settings."""

from __future__ import annotations

from pathlib import Path

from config.settings import FarmSettings, TrainingSettings
from orchestrator.client import FarmClient
from orchestrator.training import RunResult, run_training

SUBSET = 4000  # images: enough for the loss to fall in two epochs, small enough for 2 cores


def train(client: FarmClient, run_dir: Path, data_root: Path, *, epochs: int = 2, **farm_options) -> RunResult:
    farm = FarmSettings(**{"job_timeout": 120.0, "worker_wait": 60.0, **farm_options})
    return run_training(
        client=client,
        training=TrainingSettings(subset=SUBSET, seed=3),
        farm=farm,
        epochs=epochs,
        run_dir=run_dir,
        data_root=data_root,
    )
