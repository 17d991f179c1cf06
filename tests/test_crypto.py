"""Signatures over canonical JSON, sealed boxes, key files, the worker registry and result binding."""

import dataclasses
import re
import os
import stat

import pytest

from orchestrator.identity import OrchestratorIdentity
from orchestrator.quorum import Replica
from orchestrator.registry import Registry, RegistryError
from orchestrator.verify import EpochContext, Rejection, check_binding
from protocol.crypto import (
    JOB_DOMAIN,
    CryptoError,
    generate_key,
    load_private_key,
    parse_public_key,
    public_key_text,
    seal,
    sealing_key,
    sign,
    unseal,
    verify,
)
from protocol.envelope import open_result, seal_result, sign_result, verify_result
from protocol.messages import Result, loss_bits


@pytest.fixture
def key(tmp_path):
    return generate_key(tmp_path / "worker.key")


@pytest.fixture
def result():
    return Result(run_id="run1", epoch=1, segment=0, assignment_id="cd" * 16, worker="w1@host",
                  base_digest="ab" * 32, status="ok", weights_digest="ef" * 32, loss=0.25, loss_bits=loss_bits(0.25),
                  weights_key="farm:replica-weights:" + "12" * 16, environment={"threads": 1})


def test_key_file_mode_0600(tmp_path, key):
    assert stat.S_IMODE((tmp_path / "worker.key").stat().st_mode) == 0o600


def test_key_file_readable_by_others_rejected(tmp_path, key):
    os.chmod(tmp_path / "worker.key", 0o644)
    with pytest.raises(CryptoError, match="permissions 0644; restrict it with: chmod 600"):
        load_private_key(tmp_path / "worker.key")


def test_key_generation_never_overwrites(tmp_path, key):
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "worker.key")


def test_signature_verifies(key):
    signature = sign(key, JOB_DOMAIN, {"a": 1, "b": [2, 3]})
    verify(key.public_key(), JOB_DOMAIN, {"b": [2, 3], "a": 1}, signature)  # key order does not matter


def test_signature_rejects_changed_payload(key):
    signature = sign(key, JOB_DOMAIN, {"epoch": 1})
    with pytest.raises(CryptoError, match="signature does not match"):
        verify(key.public_key(), JOB_DOMAIN, {"epoch": 2}, signature)


def test_signature_rejects_other_domain(key):
    signature = sign(key, JOB_DOMAIN, {"epoch": 1})
    with pytest.raises(CryptoError):
        verify(key.public_key(), "farm.result.v1", {"epoch": 1}, signature)


def test_signature_rejects_other_key(key, tmp_path):
    other = generate_key(tmp_path / "other.key")
    signature = sign(other, JOB_DOMAIN, {"epoch": 1})
    with pytest.raises(CryptoError):
        verify(key.public_key(), JOB_DOMAIN, {"epoch": 1}, signature)


def test_result_signature_covers_loss(key, result):
    signed = sign_result(result, key)
    verify_result(signed, key.public_key())
    with pytest.raises(CryptoError):
        verify_result(dataclasses.replace(signed, loss=0.5, loss_bits=loss_bits(0.5)), key.public_key())


def test_sealed_box_round_trip(key):
    recipient = sealing_key(key)
    assert unseal(recipient, seal(recipient.public_key(), b"weights", b"ctx"), b"ctx") == b"weights"


def test_sealed_box_rejects_tampering(key):
    recipient = sealing_key(key)
    box = bytearray(seal(recipient.public_key(), b"weights", b"ctx"))
    box[-1] ^= 1
    with pytest.raises(CryptoError, match="does not open"):
        unseal(recipient, bytes(box), b"ctx")


def test_sealed_box_rejects_other_recipient(key, tmp_path):
    other = sealing_key(generate_key(tmp_path / "other.key"))
    with pytest.raises(CryptoError):
        unseal(other, seal(sealing_key(key).public_key(), b"weights", b"ctx"), b"ctx")


def test_sealed_result_round_trip(key, result):
    recipient = sealing_key(key)
    message = seal_result(sign_result(result, key), recipient.public_key())
    assert "ef" * 32 not in str(message)  # the digest is not readable on the wire
    assert open_result(message, recipient).weights_digest == "ef" * 32


def test_orchestrator_identity_created_once(tmp_path):
    identity = OrchestratorIdentity.create(tmp_path)
    assert identity.public_file.is_file()
    with pytest.raises(CryptoError, match="already exists"):
        OrchestratorIdentity.create(tmp_path)


def test_registry_enroll_and_revoke(tmp_path, key):
    registry = Registry(tmp_path)
    registry.enroll("w1@host", public_key_text(key), "alice")
    registry.revoke("w1@host")
    entry = registry.load()["w1@host"]
    assert entry.owner == "alice"
    assert entry.revoked
    assert not entry.eligible


def test_registry_rejects_shared_key(tmp_path, key):
    registry = Registry(tmp_path)
    registry.enroll("w1@host", public_key_text(key), "alice")
    with pytest.raises(RegistryError, match="already enrolled as w1@host"):
        registry.enroll("w2@host", public_key_text(key), "bob")


def test_registry_rejects_name_without_host(tmp_path, key):
    with pytest.raises(RegistryError, match="use the full node name NAME@HOST"):
        Registry(tmp_path).enroll("carol", public_key_text(key), "alice")


def test_registry_reinstates_only_when_asked(tmp_path, key):
    registry = Registry(tmp_path)
    registry.enroll("w1@host", public_key_text(key), "alice")
    registry.revoke("w1@host")
    with pytest.raises(RegistryError, match="worker w1@host is revoked; pass --reinstate"):
        registry.enroll("w1@host", public_key_text(key), "alice")
    registry.enroll("w1@host", public_key_text(key), "alice", reinstate=True)
    assert registry.load()["w1@host"].eligible


def test_registry_keeps_record_on_owner_change(tmp_path, key):
    registry = Registry(tmp_path)
    registry.enroll("w1@host", public_key_text(key), "alice")
    registry.record_valid(["w1@host"])
    registry.enroll("w1@host", public_key_text(key), "team-a")
    entry = registry.load()["w1@host"]
    assert entry.owner == "team-a"
    assert entry.valid_results == 1


def test_registry_rejects_bad_key(tmp_path):
    with pytest.raises(CryptoError, match="not valid base64"):
        Registry(tmp_path).enroll("w1@host", "not a key!", "alice")


def test_registry_revoke_unknown_named(tmp_path):
    with pytest.raises(RegistryError, match="worker 'ghost@host' is not enrolled"):
        Registry(tmp_path).revoke("ghost@host")


def test_strikes_quarantine_at_limit(tmp_path, key):
    registry = Registry(tmp_path, max_strikes=2)
    registry.enroll("w1@host", public_key_text(key), "alice")
    assert registry.add_strike("w1@host", "outvoted") is False
    assert registry.add_strike("w1@host", "outvoted") is True
    assert registry.load()["w1@host"].quarantined


def test_public_key_length_checked():
    with pytest.raises(CryptoError, match="expected 32"):
        parse_public_key("AAAA")


# --- binding of results to assignments ---------------------------------------------------

BASE = "ab" * 32


def bound_pair(**changes):
    replica = Replica("cd" * 16, "w1@host", "alice", 0, issued_at=0.0, deadline=1.0)
    result = Result(run_id="run1", epoch=3, segment=0, assignment_id="cd" * 16, worker="w1@host", base_digest=BASE,
                    status="ok", weights_digest="ef" * 32, loss=0.25, loss_bits=loss_bits(0.25))
    return dataclasses.replace(result, **changes), replica


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"run_id": "run2"}, "result for another run 'run2'"),
        ({"epoch": 2}, "stale result from epoch 2, current epoch is 3"),
        ({"worker": "w2@host"}, "belongs to w1@host, result claims w2@host"),
        ({"segment": 1}, "is for segment 0, result claims 1"),
        ({"base_digest": "99" * 32}, "result trained from base 9999999999999999, epoch base is abababababababab"),
    ],
)
def test_binding_rejects_mismatch(changes, reason):
    result, replica = bound_pair(**changes)
    with pytest.raises(Rejection, match=re.escape(reason)):
        check_binding(result, replica, EpochContext("run1", 3, BASE))


def test_binding_rejects_unknown_assignment():
    result, _ = bound_pair()
    with pytest.raises(Rejection, match="no such job was issued this epoch"):
        check_binding(result, None, EpochContext("run1", 3, BASE))


def test_binding_accepts_matching_result():
    result, replica = bound_pair()
    assert check_binding(result, replica, EpochContext("run1", 3, BASE)) is replica
