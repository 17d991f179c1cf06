"""The run directory: configuration, per-epoch metrics and weights, live state, final outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from model.weights import StateDict, encode


class RunDirectory:
    """Files of one run, written atomically so a reader never sees half a file.

    run.json         settings and identity of the run
    metrics.jsonl    one JSON object per finished epoch
    state.json       the current epoch and each segment's replicas (for `orchestrator status`)
    weights/         epoch-NNNN.safetensors after each epoch (epoch-0000 is the initial weights)
    final.safetensors, loss.png, reconstructions.png at the end
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def create(self, config: dict) -> None:
        if (self.path / "run.json").exists():
            raise FileExistsError(
                f"run directory {self.path} already contains a run; pass a new --run-dir or remove it"
            )
        (self.path / "weights").mkdir(parents=True, exist_ok=True)
        self._write_json("run.json", config)

    def _write_json(self, name: str, data: dict) -> None:
        self._write_bytes(name, (json.dumps(data, indent=2) + "\n").encode())

    def _write_bytes(self, name: str, data: bytes) -> None:
        target = self.path / name
        temporary = target.with_name(target.name + ".tmp")
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)

    def write_state(self, state: dict) -> None:
        self._write_json("state.json", state)

    def append_metrics(self, record: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def epoch_weights_path(self, epoch: int) -> Path:
        return self.path / "weights" / f"epoch-{epoch:04d}.safetensors"

    def save_epoch_weights(self, epoch: int, state_dict: StateDict) -> Path:
        name = f"weights/epoch-{epoch:04d}.safetensors"
        self._write_bytes(name, encode(state_dict))
        return self.path / name

    def read_config(self) -> dict:
        path = self.path / "run.json"
        if not path.exists():
            raise FileNotFoundError(f"{self.path} is not a run directory: it has no run.json")
        return json.loads(path.read_text())

    def save_final(self, state_dict: StateDict) -> Path:
        self._write_bytes("final.safetensors", encode(state_dict))
        return self.path / "final.safetensors"

    def read_metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def read_state(self) -> dict | None:
        path = self.path / "state.json"
        return json.loads(path.read_text()) if path.exists() else None
