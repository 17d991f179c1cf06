"""Helpers to run training against a test farm with small, fast settings, and to send jobs directly."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from config.settings import FarmSettings, TrainingSettings
from orchestrator.client import FarmClient
from orchestrator.identity import OrchestratorIdentity
from orchestrator.ledger import audit
from orchestrator.local import LocalFarm
from orchestrator.training import RunResult, run_training
from protocol.envelope import open_result, sign_job
from protocol.messages import Job, Result

SUBSET = 4000  # images: enough for the loss to fall in two epochs, small enough for 2 cores


class AttackersFirst(random.Random):
    """Worst-case placement for tests: workers whose names start with `prefixes` come first among equals."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__(0)
        self.prefixes = prefixes

    def shuffle(self, items: list) -> None:
        items.sort(key=lambda worker: (not worker.startswith(self.prefixes), worker))


def train(farm: LocalFarm, client: FarmClient, run_dir: Path, data_root: Path, *, epochs: int = 2,
          run_id: str | None = None, placement_rng: random.Random | None = None, training: dict | None = None,
          **farm_options) -> RunResult:
    # Strikes would quarantine the test attacker after a few cases; tests of quarantine lower this.
    # Speculative re-issues would make replica counts depend on timing; the straggler test turns them on.
    settings = FarmSettings(**{"job_timeout": 120.0, "worker_wait": 60.0, "max_strikes": 1000,
                               "straggler_factor": 0.0, **farm_options})
    result = run_training(
        client=client,
        training=TrainingSettings(**{"subset": SUBSET, "seed": 3, **(training or {})}),
        farm=settings,
        epochs=epochs,
        run_dir=run_dir,
        data_root=data_root,
        state_dir=farm.state_dir,
        run_id=run_id,
        placement_rng=placement_rng,
    )
    # Every run's ledger must audit clean, whatever the attackers did.
    report = audit(run_dir, OrchestratorIdentity.load(farm.state_dir).signing.public_key())
    assert report.ok, f"ledger of {run_dir} failed its audit: {report.error}"
    return result


def send_signed_job(farm: LocalFarm, client: FarmClient, *, time_limit: float = 60, **fields) -> Result | None:
    """Sign a job with the farm's orchestrator key, send it, and return the opened result (None on timeout)."""
    identity = OrchestratorIdentity.load(farm.state_dir)
    now = time.time()
    job = Job(**{"issued_at": now, "expires_at": now + 60, "reply_to": f"farm:results:{fields['run_id']}", **fields})
    client.send(sign_job(job, identity.signing), time_limit=time_limit, expires_in=60)
    reply = client.redis.blpop([job.reply_to], timeout=60)
    return open_result(json.loads(reply[1]), identity.sealing) if reply else None
