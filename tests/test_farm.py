"""End to end over real Redis and three real Celery worker processes on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

import pytest
import redis
from click.testing import CliRunner

from config.settings import TrainingSettings
from model.network import initial_state_dict
from model.numerics import class_id
from model.weights import encode, state_dict_digest
from orchestrator.cli import main
from orchestrator.local import PROJECT_ROOT
from orchestrator.staffing import environment_for
from protocol.heartbeat import read_heartbeats
from protocol.messages import Job
from protocol.store import base_weights_key
from tests.farmrun import send_signed_job, train


@pytest.fixture(scope="module")
def honest_run(farm, client, data_root, tmp_path_factory):
    return train(farm, client, tmp_path_factory.mktemp("run") / "first", data_root)


def test_every_segment_accepted(honest_run):
    for record in honest_run.metrics:
        assert record["accepted"] == record["segments"] == 2
        assert record["rejected"] == []


def test_replicas_ran_on_distinct_workers(honest_run):
    for record in honest_run.metrics:
        for segment in record["accepted_segments"]:
            workers = [replica["worker"] for replica in segment["replicas"]]
            assert len(workers) == 2
            assert len(set(workers)) == len(workers)
            assert sorted(segment["voters"]) == sorted(workers)


def test_test_loss_fell(honest_run):
    first, second = honest_run.metrics
    assert second["test_loss"] < first["test_loss"]


def test_run_directory_complete(honest_run):
    for name in ("run.json", "metrics.jsonl", "state.json", "final.safetensors", "loss.png",
                 "reconstructions.png", "weights/epoch-0000.safetensors", "weights/epoch-0002.safetensors"):
        assert (honest_run.run_dir / name).is_file(), name
    state = json.loads((honest_run.run_dir / "state.json").read_text())
    assert state["state"] == "finished"
    assert state["final_digest"] == honest_run.final_digest


def test_identical_runs_same_final_digest(honest_run, farm, client, data_root, tmp_path):
    again = train(farm, client, tmp_path / "second", data_root)
    assert again.final_digest == honest_run.final_digest
    assert again.run_id != honest_run.run_id


def test_workers_command_lists_live_workers(farm, honest_run):
    result = CliRunner().invoke(main, ["workers", "list", "--broker-url", farm.broker_url,
                                       "--state-dir", str(farm.state_dir)])
    assert result.exit_code == 0
    for node in farm.workers:
        assert node in result.output
    assert result.output.count(" enrolled ") == 3


def test_workers_json_lists_heartbeats(farm, honest_run):
    result = CliRunner().invoke(main, ["workers", "--json", "--broker-url", farm.broker_url,
                                       "--state-dir", str(farm.state_dir)])
    assert result.exit_code == 0
    assert sorted(json.loads(result.output)) == sorted(farm.workers)


def test_too_few_workers_stops_run(farm, client, data_root, tmp_path):
    from orchestrator.errors import StaffingError

    with pytest.raises(StaffingError) as caught:
        train(farm, client, tmp_path / "short", data_root, replicas=4, quorum=2, worker_wait=1.0)
    message = caught.value.message
    assert "no numerical class holds live workers of 4 distinct owners with mnist" in message
    # The three workers share one class; the message lists it with its counts.
    klass = class_id(environment_for(next(iter(client.live_workers().values())), TrainingSettings()))
    assert f"class {klass} (cpu " in message
    assert "3 worker(s) of 3 owner(s)" in message
    assert not (tmp_path / "short").exists()  # refused before anything was written


def test_status_command_shows_run(farm, honest_run):
    result = CliRunner().invoke(main, ["status", "--broker-url", farm.broker_url, "--run-dir", str(honest_run.run_dir)])
    assert result.exit_code == 0
    assert f"Run {honest_run.run_id} (finished): epoch 2 of 2" in result.output
    assert "segment 0: accepted" in result.output
    assert "segment 1: accepted" in result.output
    assert "(class " in result.output


def test_heartbeats_report_health(client, farm):
    records = read_heartbeats(client.redis)
    assert sorted(records) == sorted(farm.workers)
    for record in records.values():
        assert record["health"] == "ok"
        assert record["datasets"]["mnist"] is True
    assert sum(record["processed"] for record in records.values()) >= 8  # 2 epochs x 2 segments x 2 replicas


def test_worker_refuses_dataset_mismatch(client, farm):
    node = sorted(farm.workers)[0]
    state = initial_state_dict(0)
    digest = state_dict_digest(state)
    client.store.put(base_weights_key(digest), encode(state))
    result = send_signed_job(farm, client, run_id="mismatch", epoch=1, segment=0, assignment_id="ab" * 16,
                             worker=node, base_digest=digest, data_digest="0" * 64,
                             training=TrainingSettings(subset=2000).to_dict())
    assert result is not None
    assert result.status == "error"
    assert result.error.startswith("dataset mismatch: mnist segment 0/2 hashes to")
    assert result.weights_digest == ""

    # The worker now reports itself unhealthy, with the reason, until the problem expires.
    deadline = time.monotonic() + 10
    while read_heartbeats(client.redis)[node]["health"] == "ok" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert read_heartbeats(client.redis)[node]["health"].startswith("unhealthy: dataset mismatch")
    client.redis.delete(f"farm:worker-health:{node}")


def test_pickle_message_never_reaches_task(client, farm):
    """A pickle-serialized task on a worker's queue is refused by the JSON-only consumer."""
    node = sorted(farm.workers)[1]
    client.app.send_task("farm.train_segment", args=[{"pickled": True}], queue=f"farm.worker.{node}",
                         serializer="pickle", task_id="cd" * 16)
    time.sleep(3)
    meta = client.app.backend.get_task_meta("cd" * 16)
    assert meta["status"] == "PENDING"  # never executed, so no result was ever stored
    log = (farm.log_dir / f"{node.split('@')[0]}.log").read_text()
    assert "application/x-python-serialize" in log


def test_flower_lists_tasks_by_readable_name(farm, honest_run):
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"{farm.flower_url}api/tasks", timeout=10) as response:
            tasks = json.load(response)
        names = sorted(task["name"] for task in tasks.values() if task.get("state") == "SUCCESS")
        if len(names) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(1)
    # Two epochs x two segments x two replicas, each named after its epoch and segment.
    for epoch in (1, 2):
        for segment in (0, 1):
            assert names.count(f"train epoch {epoch} segment {segment}") >= 2


def test_local_command_trains_and_stops(data_root, tmp_path):
    result = CliRunner().invoke(main, [
        "local", "--epochs", "1", "--subset", "2000", "--workers", "2", "--no-flower",
        "--data-root", str(data_root), "--run-dir", str(tmp_path / "local"),
    ])
    assert result.exit_code == 0, result.output
    assert "Final weights digest: " in result.output
    assert "Stopped Redis and the workers." in result.output
    assert (tmp_path / "local" / "final.safetensors").is_file()


def test_duplicate_worker_name_refused(farm):
    taken = sorted(farm.workers)[0]
    second = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", taken, "--without-mingle"],
        cwd=PROJECT_ROOT, env=farm.environment(farm.worker_key("impostor")), capture_output=True, text=True,
        timeout=90,
    )
    assert second.returncode != 0
    assert f"another live worker is named '{taken}'" in second.stdout + second.stderr
    assert sorted(read_heartbeats(redis.Redis.from_url(farm.broker_url))) == sorted(farm.workers)


def test_evaluate_command_by_digest_and_file(farm, honest_run, data_root):
    last = honest_run.metrics[-1]
    by_digest = CliRunner().invoke(main, ["evaluate", honest_run.final_digest, "--broker-url", farm.broker_url,
                                          "--data-root", str(data_root)])
    assert by_digest.exit_code == 0, by_digest.output
    assert f"test loss {last['test_loss']:.6f} on mnist (10,000 images)" in by_digest.output
    by_file = CliRunner().invoke(main, ["evaluate", str(honest_run.run_dir / "final.safetensors"),
                                        "--data-root", str(data_root)])
    assert by_file.exit_code == 0, by_file.output
    assert f"weights {honest_run.final_digest}" in by_file.output


def test_evaluate_command_rejects_bad_weights(tmp_path, data_root):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    result = CliRunner().invoke(main, ["evaluate", str(bad), "--data-root", str(data_root)])
    assert result.exit_code == 1
    assert "weights blob is not valid safetensors" in result.output


def test_soft_time_limit_reported(client, farm, data_root):
    from model.data import data_digest, load_images, segment_images

    node = sorted(farm.workers)[2]
    state = initial_state_dict(0)
    digest = state_dict_digest(state)
    client.store.put(base_weights_key(digest), encode(state))
    segment = segment_images(load_images(str(data_root), "mnist", train=True), 2, 0)
    result = send_signed_job(farm, client, time_limit=0.2,  # one full segment pass takes over a second
                             run_id="slow", epoch=1, segment=0, assignment_id="ef" * 16, worker=node,
                             base_digest=digest, data_digest=data_digest("mnist", 2, 0, segment),
                             training=TrainingSettings().to_dict())
    assert result is not None
    assert result.status == "error"
    assert result.error == "timed out: soft time limit reached"


def test_worker_without_key_refuses_to_start(farm):
    started = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-n", "keyless@%h", "--without-mingle"],
        cwd=PROJECT_ROOT, env=farm.environment(), capture_output=True, text=True, timeout=90,
    )
    assert started.returncode != 0
    assert "FARM_WORKER_KEY is not set: create a key with `orchestrator keygen PATH`" in started.stderr


def audit_output(run_dir, state_dir):
    return CliRunner().invoke(main, ["audit", str(run_dir), "--state-dir", str(state_dir)])


def test_audit_passes_on_run_ledger(farm, honest_run):
    result = audit_output(honest_run.run_dir, farm.state_dir)
    assert result.exit_code == 0, result.output
    assert f"final digest {honest_run.final_digest}" in result.output


def tampered_copy(run_dir, tmp_path, change):
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(run_dir, copy)
    lines = (copy / "ledger.jsonl").read_text().splitlines()
    change(lines)
    (copy / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    return copy


def test_audit_detects_changed_entry(farm, honest_run, tmp_path):
    def change(lines):
        index = next(i for i, line in enumerate(lines) if '"segment_accepted"' in line)
        entry = json.loads(lines[index])
        entry["data"]["loss"] = 0.001
        lines[index] = json.dumps(entry, sort_keys=True)

    result = audit_output(tampered_copy(honest_run.run_dir, tmp_path, change), farm.state_dir)
    assert result.exit_code == 1
    assert "content does not match its hash" in result.output


def test_audit_detects_removed_entry(farm, honest_run, tmp_path):
    result = audit_output(tampered_copy(honest_run.run_dir, tmp_path, lambda lines: lines.pop(2)), farm.state_dir)
    assert result.exit_code == 1
    assert "entry 2: sequence number 3, expected 2" in result.output


def test_audit_detects_rehashed_forgery(farm, honest_run, tmp_path):
    from orchestrator.ledger import entry_hash

    def change(lines):
        # Rewrite the last entry and fix its hash: only the orchestrator's signature can tell.
        entry = json.loads(lines[-1])
        entry["data"]["final_digest"] = "0" * 64
        entry["hash"] = entry_hash(entry)
        lines[-1] = json.dumps(entry, sort_keys=True)

    result = audit_output(tampered_copy(honest_run.run_dir, tmp_path, change), farm.state_dir)
    assert result.exit_code == 1
    assert "orchestrator signature invalid" in result.output


def test_audit_detects_swapped_weights_file(farm, honest_run, tmp_path):
    import shutil

    copy = tmp_path / "swapped"
    shutil.copytree(honest_run.run_dir, copy)
    shutil.copy(copy / "weights" / "epoch-0001.safetensors", copy / "weights" / "epoch-0002.safetensors")
    result = audit_output(copy, farm.state_dir)
    assert result.exit_code == 1
    assert "epoch-0002.safetensors does not hash to the recorded digest" in result.output


def worker_log(farm, node: str) -> str:
    return (farm.log_dir / f"{node.split('@')[0]}.log").read_text()


def test_worker_rejects_badly_signed_job(client, farm):
    import dataclasses

    from orchestrator.identity import OrchestratorIdentity
    from protocol.envelope import sign_job

    node = sorted(farm.workers)[1]
    now = time.time()
    job = sign_job(Job(run_id="forged", epoch=1, segment=0, assignment_id="aa" * 16, worker=node,
                       base_digest="ab" * 32, data_digest="cd" * 32, training=TrainingSettings().to_dict(),
                       reply_to="farm:results:forged", issued_at=now, expires_at=now + 60),
                   OrchestratorIdentity.load(farm.state_dir).signing)
    client.send(dataclasses.replace(job, epoch=2), time_limit=60, expires_in=60)  # changed after signing

    assert client.redis.blpop(["farm:results:forged"], timeout=5) is None
    assert f"invalid signature on job {'aa' * 16}: signature does not match" in worker_log(farm, node)


def test_worker_rejects_expired_job(client, farm):
    from orchestrator.identity import OrchestratorIdentity
    from protocol.envelope import sign_job

    node = sorted(farm.workers)[2]
    now = time.time()
    job = sign_job(Job(run_id="late", epoch=1, segment=0, assignment_id="bb" * 16, worker=node,
                       base_digest="ab" * 32, data_digest="cd" * 32, training=TrainingSettings().to_dict(),
                       reply_to="farm:results:late", issued_at=now - 120, expires_at=now - 60),
                   OrchestratorIdentity.load(farm.state_dir).signing)
    client.send(job, time_limit=60, expires_in=60)

    assert client.redis.blpop(["farm:results:late"], timeout=5) is None
    assert f"job {'bb' * 16} expired at" in worker_log(farm, node)


def test_export_writes_epoch_weights(honest_run, tmp_path):
    out = tmp_path / "epoch1.safetensors"
    result = CliRunner().invoke(main, ["export", str(honest_run.run_dir), "--epoch", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from model.weights import decode, model_spec

    assert state_dict_digest(decode(out.read_bytes(), model_spec())) == honest_run.metrics[0]["weights_digest"]


def test_export_rejects_missing_epoch(honest_run, tmp_path):
    result = CliRunner().invoke(main, ["export", str(honest_run.run_dir), "--epoch", "9", "--out",
                                       str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1
    assert "epoch 9 did not finish in this run" in result.output


def test_audit_detects_truncated_ledger(farm, honest_run, tmp_path):
    result = audit_output(tampered_copy(honest_run.run_dir, tmp_path, lambda lines: lines.pop()), farm.state_dir)
    assert result.exit_code == 1
    assert "without run_finished or run_failed: it was cut short" in result.output


def test_audit_detects_swapped_final_weights(farm, honest_run, tmp_path):
    import shutil

    copy = tmp_path / "swapped-final"
    shutil.copytree(honest_run.run_dir, copy)
    shutil.copy(copy / "weights" / "epoch-0001.safetensors", copy / "final.safetensors")
    result = audit_output(copy, farm.state_dir)
    assert result.exit_code == 1
    assert "final.safetensors does not hash to the recorded final digest" in result.output


def test_audit_accepts_failed_run(farm, client, data_root, tmp_path):
    from orchestrator.errors import QuorumError

    # Jobs that expire before any worker can start them, and no re-issue or arbitration: the run fails.
    with pytest.raises(QuorumError):
        train(farm, client, tmp_path / "failed", data_root, job_timeout=0.05, max_reissues=0, arbitrate=False)
    result = audit_output(tmp_path / "failed", farm.state_dir)
    assert result.exit_code == 0, result.output
    assert "the run failed" in result.output


def test_status_shows_enrollment(farm, honest_run):
    result = CliRunner().invoke(main, ["status", "--broker-url", farm.broker_url, "--state-dir", str(farm.state_dir)])
    assert result.exit_code == 0
    assert result.output.count(" enrolled ") == 3
    assert "unenrolled" not in result.output


def test_redelivered_job_runs_once(client, farm):
    """A job delivered twice, as Redis does after the visibility timeout, trains and replies once."""
    from orchestrator.identity import OrchestratorIdentity
    from protocol.envelope import sign_job

    node = sorted(farm.workers)[0]
    state = initial_state_dict(0)
    digest = state_dict_digest(state)
    client.store.put(base_weights_key(digest), encode(state))
    now = time.time()
    job = sign_job(Job(run_id="twice", epoch=1, segment=0, assignment_id="dd" * 16, worker=node,
                       base_digest=digest, data_digest="0" * 64, training=TrainingSettings(subset=2000).to_dict(),
                       reply_to="farm:results:twice", issued_at=now, expires_at=now + 60),
                   OrchestratorIdentity.load(farm.state_dir).signing)
    client.send(job, time_limit=60, expires_in=60)
    assert client.redis.blpop(["farm:results:twice"], timeout=30) is not None
    client.send(job, time_limit=60, expires_in=60)

    assert client.redis.blpop(["farm:results:twice"], timeout=5) is None
    log = worker_log(farm, node)
    assert log.count(f"assignment {'dd' * 16} base") == 1  # one "job started" line
    assert f"skipped assignment {'dd' * 16}: it was delivered again" in log
    client.redis.delete(f"farm:worker-health:{node}")
