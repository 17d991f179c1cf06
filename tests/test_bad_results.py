"""Bad results from a worker that speaks the real protocol are rejected and never change the run.

Each case runs the same small training on two honest workers and one attacker. The attacker's
result must be rejected with a clear reason, its replica re-issued to the free honest worker,
and the final weights must equal those of the all-honest run.
"""

from __future__ import annotations

import pytest

from orchestrator.client import FarmClient
from orchestrator.errors import QuorumError
from orchestrator.local import LocalFarm
from orchestrator.identity import PUBLIC_FILE
from orchestrator.ledger import audit
from protocol.crypto import parse_public_key
from tests.attackers.worker import ATTACK_MODE_KEY
from tests.farmrun import train


@pytest.fixture(scope="module")
def attacked_farm(data_root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("attacked-farm-logs")
    with LocalFarm(workers=2, data_root=data_root, log_dir=log_dir, worker_prefix="honest") as farm:
        farm.start_worker("mallory", app="tests.attackers.worker")
        farm.wait_for_workers(3)
        yield farm


@pytest.fixture(scope="module")
def attacked_client(attacked_farm) -> FarmClient:
    return FarmClient(attacked_farm.broker_url, attacked_farm.broker_url)


@pytest.fixture(scope="module")
def honest_digest(attacked_farm, attacked_client, data_root, tmp_path_factory):
    attacked_client.redis.set(ATTACK_MODE_KEY, "honest")
    result = train(attacked_farm, attacked_client, tmp_path_factory.mktemp("honest") / "run", data_root, epochs=1)
    return result.final_digest


def assert_ledger_intact(farm, run_dir) -> None:
    import json

    key = parse_public_key(json.loads((farm.state_dir / PUBLIC_FILE).read_text())["signing_key"])
    report = audit(run_dir, key)
    assert report.ok, report.error


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("corrupt", "weights blob is not valid safetensors"),
        ("wrong-shape", "tensor encoder.0.weight is torch.float32[784, 128], expected torch.float32[128, 784]"),
        ("nan", "tensor decoder.4.weight contains NaN or infinite values"),
    ],
)
def test_bad_result_rejected(mode, reason, attacked_farm, attacked_client, data_root, tmp_path, honest_digest):
    attacked_client.redis.set(ATTACK_MODE_KEY, mode)
    result = train(attacked_farm, attacked_client, tmp_path / mode, data_root, epochs=1)
    assert_ledger_intact(attacked_farm, result.run_dir)
    ledger = (result.run_dir / "ledger.jsonl").read_text()
    assert '"result_rejected"' in ledger
    assert reason.split(",")[0] in ledger

    record = result.metrics[0]
    rejected = [entry for entry in record["rejected"] if entry["worker"].startswith("mallory@")]
    assert rejected, f"no rejection recorded for mode {mode}"
    assert reason in rejected[0]["reason"]
    assert record["accepted"] == 2
    for segment in record["accepted_segments"]:
        assert not any(voter.startswith("mallory@") for voter in segment["voters"])
    assert result.final_digest == honest_digest


def test_unknown_job_result_rejected(attacked_farm, attacked_client, data_root, tmp_path, honest_digest):
    attacked_client.redis.set(ATTACK_MODE_KEY, "unknown-job")
    result = train(attacked_farm, attacked_client, tmp_path / "unknown-job", data_root, epochs=1)

    record = result.metrics[0]
    reasons = [entry["reason"] for entry in record["rejected"] if entry["worker"].startswith("mallory@")]
    assert reasons
    assert all("no such job was issued this epoch" in reason for reason in reasons)
    assert record["accepted"] == 2
    assert result.final_digest == honest_digest


def test_wrong_loss_outvoted(attacked_farm, attacked_client, data_root, tmp_path, honest_digest):
    attacked_client.redis.set(ATTACK_MODE_KEY, "wrong-loss")
    result = train(attacked_farm, attacked_client, tmp_path / "wrong-loss", data_root, epochs=1)

    record = result.metrics[0]
    assert record["disagreements"] >= 1
    assert record["reissues"] >= 1
    for segment in record["accepted_segments"]:
        assert not any(voter.startswith("mallory@") for voter in segment["voters"])
    assert result.final_digest == honest_digest


def test_silent_replica_times_out_and_is_reissued(attacked_farm, attacked_client, data_root, tmp_path, honest_digest):
    attacked_client.redis.set(ATTACK_MODE_KEY, "silent")
    result = train(attacked_farm, attacked_client, tmp_path / "silent", data_root, epochs=1, job_timeout=4.0)

    record = result.metrics[0]
    timed_out = [entry for entry in record["failed"] if entry["worker"].startswith("mallory@")]
    assert timed_out
    assert timed_out[0]["reason"] == "no result before the job deadline"
    assert record["reissues"] >= 1
    assert result.final_digest == honest_digest


def test_no_quorum_names_segment_and_digests(attacked_farm, attacked_client, data_root, tmp_path, honest_digest):
    attacked_client.redis.set(ATTACK_MODE_KEY, "wrong-loss")
    with pytest.raises(QuorumError) as caught:
        train(attacked_farm, attacked_client, tmp_path / "no-quorum", data_root, epochs=1, max_reissues=0)

    message = caught.value.message
    assert "cannot reach a quorum of 2: the re-issue limit (0) is reached" in message
    assert "mallory@" in message
    assert message.count("weights ") >= 2  # both replicas' digests are listed
    assert "raise --max-reissues" in message
