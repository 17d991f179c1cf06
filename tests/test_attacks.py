"""Attacks by workers that speak the real protocol over the real broker.

The farm runs two honest workers (owners honest1 and honest2), the attackers mallory and trudy
(tests/attackers/worker.py, owners mallory and trudy), mallory2 (a second identity of owner
mallory, running the production worker) and eve (live but never enrolled). Placement puts the
attackers first among equally loaded workers, the worst case. For each attack the bad result
never reaches the aggregate, the misbehaviour is recorded with its reason, the run completes,
its ledger audits clean, and the final digest equals the all-honest run's.
"""

from __future__ import annotations

import json
import secrets
import time

import pytest

from orchestrator.client import FarmClient
from orchestrator.errors import QuorumError
from orchestrator.identity import PUBLIC_FILE, OrchestratorIdentity
from orchestrator.ledger import audit
from orchestrator.local import LocalFarm
from protocol.crypto import load_private_key, parse_public_key, public_key_text
from protocol.envelope import seal_result, sign_result
from protocol.messages import Result, loss_bits
from tests.attackers.worker import ATTACK_MODE_KEY, COPIER_REPORT_KEY, STALLING_KEY, mode_key
from tests.farmrun import AttackersFirst, train

OWNERS = {"honest1": "honest1", "honest2": "honest2", "mallory": "mallory", "trudy": "trudy",
          "mallory2": "mallory"}


@pytest.fixture(scope="module")
def attacked_farm(data_root, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("attacked-farm-logs")
    with LocalFarm(workers=2, data_root=data_root, log_dir=log_dir, worker_prefix="honest") as farm:
        sybil = farm.node("mallory2")
        farm.start_worker("mallory2", owner="mallory")
        farm.start_worker("mallory", app="tests.attackers.worker",
                          env={"FARM_SYBIL_KEY": str(farm.worker_key("mallory2").resolve()), "FARM_SYBIL_NAME": sybil})
        farm.start_worker("trudy", app="tests.attackers.worker")
        farm.start_worker("eve", enroll=False)
        farm.wait_for_workers(6)
        yield farm


@pytest.fixture(scope="module")
def attacked_client(attacked_farm) -> FarmClient:
    return FarmClient(attacked_farm.broker_url, attacked_farm.broker_url)


@pytest.fixture(autouse=True)
def clean_standing(attacked_farm, attacked_client):
    """Start every test with honest attackers in good standing."""
    for key in attacked_client.redis.scan_iter(match=f"{ATTACK_MODE_KEY}*"):
        attacked_client.redis.delete(key)
    for name, owner in OWNERS.items():
        key = load_private_key(attacked_farm.worker_key(name))
        attacked_farm.registry.enroll(attacked_farm.node(name), public_key_text(key), owner, reinstate=True)


@pytest.fixture(scope="module")
def honest_run(attacked_farm, attacked_client, data_root, tmp_path_factory):
    return train(attacked_farm, attacked_client, tmp_path_factory.mktemp("honest") / "run", data_root, epochs=2,
                 placement_rng=AttackersFirst("mallory@"))


def honest_digest(honest_run, epochs: int) -> str:
    return honest_run.metrics[epochs - 1]["weights_digest"]


def attack(farm, client, run_dir, data_root, *, modes: dict[str, str], epochs: int = 1, attackers=("mallory@",),
           **options):
    for worker, mode in modes.items():
        client.redis.set(mode_key(farm.node(worker)), mode)
    return train(farm, client, run_dir, data_root, epochs=epochs, placement_rng=AttackersFirst(*attackers), **options)


def rejections(result, worker_prefix: str) -> list[str]:
    return [entry["reason"] for record in result.metrics for entry in record["rejected"]
            if entry["worker"].startswith(worker_prefix)]


def voters(result) -> list[str]:
    return [voter for record in result.metrics for segment in record["accepted_segments"] for voter in segment["voters"]]


def assert_ledger_intact(farm, run_dir) -> None:
    key = parse_public_key(json.loads((farm.state_dir / PUBLIC_FILE).read_text())["signing_key"])
    report = audit(run_dir, key)
    assert report.ok, report.error


def push_result_as(farm, client, *, run_id: str, worker: str, key) -> None:
    """Push a well-formed result signed with `key` and sealed to the orchestrator into a run's reply list."""
    identity = OrchestratorIdentity.load(farm.state_dir)
    result = Result(run_id=run_id, epoch=1, segment=0, assignment_id=secrets.token_hex(16), worker=worker,
                    base_digest="ab" * 32, status="ok", weights_digest="cd" * 32, loss=0.1, loss_bits=loss_bits(0.1),
                    weights_key="farm:replica-weights:" + secrets.token_hex(16), environment={"threads": 1})
    sealed = seal_result(sign_result(result, key), identity.sealing.public_key())
    client.redis.rpush(f"farm:results:{run_id}", json.dumps(sealed))


# --- results that must be rejected ------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("corrupt", "weights blob is not valid safetensors"),
        ("oversized", "over the limit of"),
        ("wrong-shape", "tensor encoder.0.weight is torch.float32[784, 128], expected torch.float32[128, 784]"),
        ("nan", "tensor decoder.4.weight contains NaN or infinite values"),
        ("other-class", "differs from the job's class"),
    ],
)
def test_bad_weights_rejected(mode, reason, attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / mode, data_root, modes={"mallory": mode})

    reasons = rejections(result, "mallory@")
    assert reasons, f"no rejection recorded for mode {mode}"
    assert reason in reasons[0]
    assert not any(voter.startswith("mallory@") for voter in voters(result))
    assert result.final_digest == honest_digest(honest_run, 1)
    assert attacked_farm.registry.load()[attacked_farm.node("mallory")].strikes >= 1
    assert_ledger_intact(attacked_farm, result.run_dir)


def test_malformed_reply_rejected(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    attacked_client.redis.rpush("farm:results:malformed-run", b"\x80\x04not json", json.dumps({"type": "farm.result"}))
    result = train(attacked_farm, attacked_client, tmp_path / "malformed", data_root, epochs=1, run_id="malformed-run")

    reasons = [entry["reason"] for entry in result.metrics[0]["rejected"]]
    assert len([reason for reason in reasons if reason.startswith("malformed result")]) == 2
    assert result.final_digest == honest_digest(honest_run, 1)


def test_unknown_job_result_rejected(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "unknown", data_root, modes={"mallory": "unknown-job"})

    reasons = rejections(result, "mallory@")
    assert reasons
    assert all("no such job was issued this epoch" in reason for reason in reasons)
    assert result.final_digest == honest_digest(honest_run, 1)


def test_same_result_twice_counts_once(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "duplicate", data_root, modes={"mallory": "duplicate"})

    reasons = rejections(result, "mallory@")
    assert reasons
    assert all("was already counted" in reason for reason in reasons)
    assert result.final_digest == honest_digest(honest_run, 1)
    assert_ledger_intact(attacked_farm, result.run_dir)


def test_second_identity_of_owner_gets_no_vote(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "sybil", data_root, modes={"mallory": "sybil"},
                    attackers=("mallory",))

    reasons = rejections(result, "mallory2@")
    assert reasons
    assert all(f"belongs to {attacked_farm.node('mallory')}" in reason for reason in reasons)
    for record in result.metrics:
        for segment in record["accepted_segments"]:
            owners = [replica["owner"] for replica in segment["replicas"]]
            assert len(owners) == len(set(owners))
    assert result.final_digest == honest_digest(honest_run, 1)


def test_replay_from_previous_epoch_rejected(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "replay", data_root, modes={"mallory": "replay"},
                    epochs=2)

    reasons = rejections(result, "mallory@")
    assert any("stale result from epoch 1, current epoch is 2" in reason for reason in reasons)
    assert result.final_digest == honest_digest(honest_run, 2)
    assert_ledger_intact(attacked_farm, result.run_dir)


def test_forged_signature_rejected(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "forge", data_root, modes={"mallory": "forge"})

    reasons = rejections(result, "mallory@")
    assert reasons
    assert all("invalid signature: signature does not match the signer's key" in reason for reason in reasons)
    assert result.final_digest == honest_digest(honest_run, 1)


def test_unenrolled_worker_ignored(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    eve = attacked_farm.node("eve")
    push_result_as(attacked_farm, attacked_client, run_id="eve-run", worker=eve,
                   key=load_private_key(attacked_farm.worker_key("eve")))
    result = train(attacked_farm, attacked_client, tmp_path / "eve", data_root, epochs=1, run_id="eve-run",
                   placement_rng=AttackersFirst("eve@"))

    assert rejections(result, "eve@") == [f"worker {eve} is not enrolled"]
    assert all(replica["worker"] != eve for record in result.metrics
               for segment in record["accepted_segments"] for replica in segment["replicas"])
    assert result.final_digest == honest_digest(honest_run, 1)


def test_revoked_worker_ignored(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    trudy = attacked_farm.node("trudy")
    attacked_farm.registry.revoke(trudy)
    push_result_as(attacked_farm, attacked_client, run_id="revoked-run", worker=trudy,
                   key=load_private_key(attacked_farm.worker_key("trudy")))
    result = train(attacked_farm, attacked_client, tmp_path / "revoked", data_root, epochs=1, run_id="revoked-run",
                   placement_rng=AttackersFirst("trudy@"))

    assert rejections(result, "trudy@") == [f"worker {trudy} is revoked"]
    assert all(replica["worker"] != trudy for record in result.metrics
               for segment in record["accepted_segments"] for replica in segment["replicas"])
    assert result.final_digest == honest_digest(honest_run, 1)


def test_copier_learns_nothing(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    attacked_client.redis.delete(COPIER_REPORT_KEY)
    result = attack(attacked_farm, attacked_client, tmp_path / "copier", data_root, modes={"mallory": "copier"})

    reports = [json.loads(raw) for raw in attacked_client.redis.lrange(COPIER_REPORT_KEY, 0, -1)]
    assert reports, "the copier never ran"
    assert any(report["peer_blobs"] > 0 for report in reports)  # a peer's result existed when it looked
    for report in reports:
        assert report["keys"] > 10
        assert report["found"] == []
    assert result.final_digest == honest_digest(honest_run, 1)


# --- lies that must be outvoted ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["wrong-loss", "poison"])
def test_lie_outvoted_and_struck(mode, attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / mode, data_root, modes={"mallory": mode})

    record = result.metrics[0]
    assert record["disagreements"] >= 1
    assert record["reissues"] >= 1
    assert not any(voter.startswith("mallory@") for voter in voters(result))
    assert result.final_digest == honest_digest(honest_run, 1)
    standing = attacked_farm.registry.load()[attacked_farm.node("mallory")]
    assert standing.strikes >= 1
    assert "outvoted" in standing.strike_reasons[-1]


def test_colluders_caught_by_spot_check(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "collusion", data_root,
                    modes={"mallory": "poison", "trudy": "poison"}, attackers=("mallory@", "trudy@"), spot_check=1.0)

    registry = attacked_farm.registry.load()
    assert registry[attacked_farm.node("mallory")].quarantined
    assert registry[attacked_farm.node("trudy")].quarantined
    ledger = (result.run_dir / "ledger.jsonl").read_text()
    assert '"kind": "epoch_restarted"' in ledger
    assert not any(voter.startswith(("mallory@", "trudy@")) for voter in voters(result))
    assert result.final_digest == honest_digest(honest_run, 1)
    assert_ledger_intact(attacked_farm, result.run_dir)


def test_quarantined_worker_gets_no_jobs(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "quarantine", data_root, modes={"mallory": "poison"},
                    epochs=2, max_strikes=1)

    assert attacked_farm.registry.load()[attacked_farm.node("mallory")].quarantined
    second_epoch = [replica["worker"] for segment in result.metrics[1]["accepted_segments"]
                    for replica in segment["replicas"]]
    assert attacked_farm.node("mallory") not in second_epoch
    assert result.final_digest == honest_digest(honest_run, 2)


# --- timeouts and disputes --------------------------------------------------------------


def test_silent_replica_times_out_and_is_reissued(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "silent", data_root, modes={"mallory": "silent"},
                    job_timeout=4.0)

    timed_out = [entry for entry in result.metrics[0]["failed"] if entry["worker"].startswith("mallory@")]
    assert timed_out
    assert timed_out[0]["reason"] == "no result before the job deadline"
    assert result.final_digest == honest_digest(honest_run, 1)


def test_no_quorum_names_segment_and_digests(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    with pytest.raises(QuorumError) as caught:
        attack(attacked_farm, attacked_client, tmp_path / "no-quorum", data_root, modes={"mallory": "wrong-loss"},
               max_reissues=0, arbitrate=False)

    message = caught.value.message
    assert "cannot reach a quorum of 2: the re-issue limit (0) is reached" in message
    assert "mallory@" in message
    assert message.count("weights ") >= 2  # both replicas' digests are listed
    assert "raise --max-reissues" in message


def test_dispute_settled_by_orchestrator(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    result = attack(attacked_farm, attacked_client, tmp_path / "dispute", data_root, modes={"mallory": "wrong-loss"},
                    max_reissues=0)

    assert result.metrics[0]["arbitrated"], "no segment was decided by re-execution"
    assert result.final_digest == honest_digest(honest_run, 1)
    standing = attacked_farm.registry.load()[attacked_farm.node("mallory")]
    assert "outvoted" in standing.strike_reasons[-1]
    assert_ledger_intact(attacked_farm, result.run_dir)



# --- stragglers and crashes (last: these keep mallory busy, then kill and restart it) ------


def test_straggler_speculatively_reissued(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    mallory = attacked_farm.node("mallory")
    result = attack(attacked_farm, attacked_client, tmp_path / "straggler", data_root, modes={"mallory": "slow"},
                    straggler_factor=3.0)

    record = result.metrics[0]
    assert record["speculative"] >= 1
    assert mallory not in voters(result)
    assert result.final_digest == honest_digest(honest_run, 1)
    ledger = (result.run_dir / "ledger.jsonl").read_text()
    assert '"kind": "speculative_reissue"' in ledger


def test_killed_worker_replica_reissued(attacked_farm, attacked_client, data_root, tmp_path, honest_run):
    import threading

    mallory = attacked_farm.node("mallory")
    attacked_client.redis.set(mode_key(mallory), "stall")
    attacked_client.redis.delete(STALLING_KEY + mallory)
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=train(
        attacked_farm, attacked_client, tmp_path / "killed", data_root, epochs=1,
        placement_rng=AttackersFirst("mallory@"))))
    runner.start()
    deadline = time.monotonic() + 60
    while attacked_client.redis.get(STALLING_KEY + mallory) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    attacked_farm.stop_worker(mallory, kill=True)  # mid-job: mallory is asleep inside its task
    runner.join(timeout=120)
    attacked_farm.start_worker("mallory", app="tests.attackers.worker")
    attacked_farm.wait_for_workers(6)

    result = outcome["result"]
    lost = [entry for entry in result.metrics[0]["failed"] if entry["worker"] == mallory]
    assert lost
    assert all(entry["reason"] == "worker lost: its heartbeat expired" for entry in lost)
    assert result.final_digest == honest_digest(honest_run, 1)
    accepted = [replica["assignment_id"] for segment in result.metrics[0]["accepted_segments"]
                for replica in segment["replicas"] if replica["status"] == "ok"]
    assert len(accepted) == len(set(accepted))  # each assignment counted at most once
