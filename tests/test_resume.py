"""Crashes mid-run: a killed orchestrator resumes, a restarted Redis is ridden out, and both runs end
with the uninterrupted run's digest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.local import PROJECT_ROOT
from orchestrator.training import resume_training
from tests.farmrun import SUBSET, train

EPOCHS = 3


def start_cli_run(farm, run_dir, data_root) -> subprocess.Popen:
    """Start `orchestrator run` with the test settings as its own process, as an operator would."""
    command = [sys.executable, "-m", "orchestrator", "run", "--epochs", str(EPOCHS), "--subset", str(SUBSET),
               "--seed", "3", "--max-strikes", "1000", "--job-timeout", "120", "--run-dir", str(run_dir),
               "--data-root", str(data_root), "--no-download", "--state-dir", str(farm.state_dir),
               "--broker-url", farm.broker_url]
    return subprocess.Popen(command, cwd=PROJECT_ROOT, env=farm.environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_ledger(run_dir, kind: str, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    ledger = run_dir / "ledger.jsonl"
    while time.monotonic() < deadline:
        if ledger.exists():
            for line in ledger.read_text().splitlines():
                entry = json.loads(line)
                if entry["kind"] == kind and entry["data"].get("epoch") == epoch:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no {kind} entry for epoch {epoch} in {ledger} after {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(farm, client, data_root, tmp_path_factory):
    return train(farm, client, tmp_path_factory.mktemp("uninterrupted") / "run", data_root, epochs=EPOCHS)


def interrupted_epoch(run_dir) -> tuple[int, set[int]]:
    """Return the first epoch without an aggregate and the segments its latest attempt accepted so far."""
    aggregated, current, accepted = 0, None, set()
    for line in (run_dir / "ledger.jsonl").read_text().splitlines():
        entry = json.loads(line)
        if entry["kind"] == "epoch_started":
            if entry["data"]["epoch"] != current:
                accepted = set()
            current = entry["data"]["epoch"]
            accepted &= set(entry["data"].get("restored_segments", []))
        elif entry["kind"] == "segment_accepted":
            accepted.add(entry["data"]["segment"])
        elif entry["kind"] == "epoch_aggregated":
            aggregated, accepted = entry["data"]["epoch"], set()
    return aggregated + 1, accepted


def test_killed_orchestrator_resumes_to_same_digest(farm, client, data_root, tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    process = start_cli_run(farm, run_dir, data_root)
    try:
        wait_for_ledger(run_dir, "epoch_started", 2)  # epoch 1 is aggregated, epoch 2 is out on the farm
        deadline = time.monotonic() + 30
        while not interrupted_epoch(run_dir)[1] and time.monotonic() < deadline:
            time.sleep(0.01)  # stop it once a segment of the current epoch is accepted
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    epoch, finished_before_stop = interrupted_epoch(run_dir)
    assert epoch <= EPOCHS, "the run finished before it could be stopped"

    result = resume_training(client=client, run_dir=run_dir, state_dir=farm.state_dir)

    assert result.final_digest == uninterrupted.final_digest
    # Segments accepted before the stop are kept, with their original voters, and not issued again.
    resumed = [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()
               if '"run_resumed"' in line]
    assert set(resumed[0]["data"]["restored_segments"]) == finished_before_stop
    interrupted = next(record for record in result.metrics if record["epoch"] == epoch)
    for segment in interrupted["accepted_segments"]:
        if segment["segment"] in finished_before_stop:
            assert len(segment["replicas"]) == 2
            assert all(replica["status"] == "ok" for replica in segment["replicas"])
    assert [record["epoch"] for record in result.metrics] == [1, 2, 3]
    audit = CliRunner().invoke(main, ["audit", str(run_dir), "--state-dir", str(farm.state_dir)])
    assert audit.exit_code == 0, audit.output


def test_resume_of_finished_run_refused(farm, uninterrupted):
    result = CliRunner().invoke(main, ["resume", str(uninterrupted.run_dir), "--state-dir", str(farm.state_dir),
                                       "--broker-url", farm.broker_url])
    assert result.exit_code == 1
    assert "already finished; nothing to resume" in result.output


def test_resume_after_failure_completes(farm, client, data_root, tmp_path, uninterrupted):
    from orchestrator.errors import QuorumError

    run_dir = tmp_path / "failed"
    # Jobs expire before any worker can start them, and nothing re-issues or settles them: the run fails.
    with pytest.raises(QuorumError):
        train(farm, client, run_dir, data_root, epochs=EPOCHS, job_timeout=0.05, max_reissues=0, arbitrate=False)
    config = json.loads((run_dir / "run.json").read_text())
    config["farm"]["job_timeout"] = 120.0  # the operator fixes the cause, then resumes
    # A run.json written before numerical profiles existed resumes under the default profile.
    del config["training"]["profile"], config["training"]["allow_tf32"]
    (run_dir / "run.json").write_text(json.dumps(config))

    result = resume_training(client=client, run_dir=run_dir, state_dir=farm.state_dir)
    assert result.final_digest == uninterrupted.final_digest


def test_redis_restart_mid_run(farm, client, data_root, tmp_path, uninterrupted):
    import threading

    run_dir = tmp_path / "redis-restart"
    outcome = {}
    # A job a worker held when Redis went away comes back only after the visibility timeout (hours),
    # so straggler re-issue and a short deadline recover it, as an operator would configure.
    runner = threading.Thread(target=lambda: outcome.update(result=train(
        farm, client, run_dir, data_root, epochs=EPOCHS, straggler_factor=3.0, job_timeout=15.0)))
    runner.start()
    wait_for_ledger(run_dir, "epoch_started", 2)
    farm.restart_redis()  # the append-only file brings back queues, replies, blobs and heartbeats
    runner.join(timeout=300)

    assert "result" in outcome, "the run did not complete after the Redis restart"
    assert outcome["result"].final_digest == uninterrupted.final_digest
    farm.wait_for_workers(3)  # every worker reconnected


def test_each_assignment_executed_and_accepted_once(farm, client, data_root, tmp_path):
    """Across every run this farm made, crashes included, no assignment ran or counted twice."""
    import collections
    import re

    executions = collections.Counter()
    for log in {path.resolve() for path in farm.log_dir.glob("worker*.log")}:
        executions.update(re.findall(r"job started: .* assignment ([0-9a-f]{32}) ", log.read_text()))
    assert executions, "no job ran on this farm"
    assert max(executions.values()) == 1

    acceptances = collections.Counter()
    # The runs of this module; pytest links "...current" names to its folders, so resolve each once.
    prefixes = ("uninterrupted", "test_killed_orchestrator", "test_redis_restart", "test_resume_after_failure")
    ledgers = {path.resolve() for path in tmp_path.parent.glob("*/**/ledger.jsonl")
               if path.relative_to(tmp_path.parent).parts[0].startswith(prefixes)}
    assert len(ledgers) >= 3  # the uninterrupted, killed-and-resumed and Redis-restart runs
    for ledger in ledgers:
        for line in ledger.read_text().splitlines():
            entry = json.loads(line)
            if entry["kind"] == "segment_accepted":
                acceptances.update(voter["result"]["assignment_id"] for voter in entry["data"]["voters"])
    assert acceptances, "no ledger of this farm's runs was found"
    assert max(acceptances.values()) == 1


def test_worker_without_data_is_unhealthy(farm, tmp_path):
    from protocol.heartbeat import read_heartbeats

    real_root, farm.data_root = farm.data_root, tmp_path  # an empty data root for this worker only
    node = farm.start_worker("nodata")
    farm.data_root = real_root
    try:
        farm.wait_for_workers(4)
        record = read_heartbeats(farm.client())[node]
        assert record["health"] == f"unhealthy: no dataset under data root {tmp_path}"
        result = CliRunner().invoke(main, ["workers", "--broker-url", farm.broker_url,
                                           "--state-dir", str(farm.state_dir)])
        assert f"unhealthy: no dataset under data root {tmp_path}" in result.output
    finally:
        farm.stop_worker(node)


def test_worker_without_store_is_unhealthy(farm):
    from protocol.heartbeat import read_heartbeats

    node = farm.start_worker("nostore", env={"FARM_STORE_URL": "redis://127.0.0.1:1/0"})
    try:
        farm.wait_for_workers(4)
        deadline = time.monotonic() + 20
        while read_heartbeats(farm.client())[node]["health"] == "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        health = read_heartbeats(farm.client())[node]["health"]
        assert health.startswith("unhealthy: cannot reach the weights store")
    finally:
        farm.stop_worker(node)
