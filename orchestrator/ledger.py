"""The run's append-only, hash-chained ledger, and its audit.

Each line of RUN_DIR/ledger.jsonl is one entry:

    {"seq": n, "prev": <hash of entry n-1>, "kind": ..., "time": ..., "data": {...},
     "hash": sha256(canonical entry without hash and signature), "signature": <orchestrator Ed25519>}

Changing, removing or reordering any entry breaks the chain or a signature. Accepted segments
carry every voter's signed result and public key, so the audit re-checks each vote.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.crypto import CryptoError, canonical, parse_public_key, sign, verify
from protocol.envelope import verify_result
from model.numerics import class_id
from protocol.messages import ProtocolError, Result

LEDGER_FILE = "ledger.jsonl"
LEDGER_DOMAIN = "farm.ledger.v1"
GENESIS = "0" * 64


def entry_hash(entry: dict) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k not in ("hash", "signature")})).hexdigest()


class Ledger:
    """Append signed, hash-chained entries to RUN_DIR/ledger.jsonl, each flushed to disk."""

    def __init__(self, run_dir: Path, key: Ed25519PrivateKey) -> None:
        self.path = Path(run_dir) / LEDGER_FILE
        self.key = key
        self.seq = 0
        self.prev = GENESIS

    @classmethod
    def reopen(cls, run_dir: Path, key: Ed25519PrivateKey) -> tuple[Ledger, list[dict]]:
        """Continue an existing ledger after verifying its chain; return it with its entries."""
        ledger = cls(run_dir, key)
        entries = []
        for number, line in enumerate(ledger.path.read_text().splitlines()):
            entry = json.loads(line)
            try:
                _check_chain(entry, number, ledger.prev, key.public_key())
            except _Break as error:
                raise ValueError(f"ledger {ledger.path} is broken: {error}") from None
            entries.append(entry)
            ledger.seq, ledger.prev = number + 1, entry["hash"]
        return ledger, entries

    def append(self, kind: str, data: dict) -> dict:
        entry = {"seq": self.seq, "prev": self.prev, "kind": kind, "time": time.time(), "data": data}
        entry["hash"] = entry_hash(entry)
        entry["signature"] = sign(self.key, LEDGER_DOMAIN, {"hash": entry["hash"]})
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.seq += 1
        self.prev = entry["hash"]
        return entry


@dataclass
class AuditReport:
    entries: int
    epochs: int
    final_digest: str | None
    error: str | None  # the first break, or None when the ledger is intact
    outcome: str | None = None  # "finished" or "failed", from the ledger's closing entry

    @property
    def ok(self) -> bool:
        return self.error is None


class _Break(Exception):
    pass


def audit(run_dir: Path, orchestrator_key: Ed25519PublicKey) -> AuditReport:
    """Verify the chain, the orchestrator's signature on every entry and every voter's signed result."""
    path = Path(run_dir) / LEDGER_FILE
    state = {"entries": 0, "epochs": 0, "final": None, "quorum": None, "base": None, "epoch": None, "keys": {},
             "outcome": None}
    try:
        if not path.exists():
            raise _Break(f"{run_dir} is not a run directory: it has no {LEDGER_FILE}")
        prev = GENESIS
        for number, line in enumerate(path.read_text().splitlines()):
            try:
                entry = json.loads(line)
            except ValueError:
                raise _Break(f"entry {number}: not valid JSON") from None
            if state["outcome"] == "finished" or (state["outcome"] == "failed" and entry.get("kind") != "run_resumed"):
                raise _Break(f"entry {number}: follows the run's closing entry")
            _check_chain(entry, number, prev, orchestrator_key)
            _check_entry(entry, state, Path(run_dir))
            prev = entry["hash"]
            state["entries"] += 1
        if state["outcome"] is None:
            raise _Break(f"the ledger ends after entry {state['entries'] - 1} without run_finished or run_failed: "
                         f"it was cut short, or the run has not ended")
    except _Break as error:
        return AuditReport(state["entries"], state["epochs"], state["final"], str(error), state["outcome"])
    return AuditReport(state["entries"], state["epochs"], state["final"], None, state["outcome"])


def _check_chain(entry: dict, number: int, prev: str, orchestrator_key: Ed25519PublicKey) -> None:
    if not isinstance(entry, dict) or entry.get("seq") != number:
        raise _Break(f"entry {number}: sequence number {entry.get('seq') if isinstance(entry, dict) else '?'}, "
                     f"expected {number}")
    if entry.get("prev") != prev:
        raise _Break(f"entry {number}: does not link to the previous entry's hash")
    if entry.get("hash") != entry_hash(entry):
        raise _Break(f"entry {number}: content does not match its hash")
    try:
        verify(orchestrator_key, LEDGER_DOMAIN, {"hash": entry["hash"]}, entry.get("signature", ""))
    except CryptoError as error:
        raise _Break(f"entry {number}: orchestrator signature invalid: {error}") from None


def _check_entry(entry: dict, state: dict, run_dir: Path) -> None:
    kind, data, number = entry.get("kind"), entry.get("data", {}), entry["seq"]
    if kind == "run_started":
        state["quorum"] = data["quorum"]
    elif kind == "epoch_started":
        state["epoch"], state["base"], state["keys"] = data["epoch"], data["base_digest"], data["workers"]
    elif kind == "segment_accepted":
        _check_votes(data, state, number)
    elif kind == "epoch_aggregated":
        state["epochs"] += 1
        weights = run_dir / "weights" / f"epoch-{data['epoch']:04d}.safetensors"
        if weights.exists():
            from model.weights import decode, model_spec, state_dict_digest

            if state_dict_digest(decode(weights.read_bytes(), model_spec())) != data["weights_digest"]:
                raise _Break(f"entry {number}: {weights.name} does not hash to the recorded digest")
    elif kind == "run_finished":
        state["final"], state["outcome"] = data["final_digest"], "finished"
        final = run_dir / "final.safetensors"
        if not final.exists():
            raise _Break(f"entry {number}: the run finished but final.safetensors is missing")
        from model.weights import decode, model_spec, state_dict_digest

        if state_dict_digest(decode(final.read_bytes(), model_spec())) != data["final_digest"]:
            raise _Break(f"entry {number}: final.safetensors does not hash to the recorded final digest")
    elif kind == "run_failed":
        state["outcome"] = "failed"
    elif kind == "run_resumed":
        state["outcome"] = None


def _check_votes(data: dict, state: dict, number: int) -> None:
    """Check each voter's signed result; a segment the orchestrator arbitrated needs no quorum."""
    owners = set()
    for voter in data["voters"]:
        enrolled = state["keys"].get(voter["worker"])
        if enrolled is None or enrolled["public_key"] != voter["public_key"]:
            raise _Break(f"entry {number}: voter {voter['worker']} was not enrolled with that key this epoch")
        try:
            result = Result.from_message(voter["result"])
            verify_result(result, parse_public_key(voter["public_key"]))
        except (ProtocolError, CryptoError, KeyError) as error:
            raise _Break(f"entry {number}: vote of {voter['worker']} is invalid: {error}") from None
        expected = (state["epoch"], data["segment"], state["base"], data["weights_digest"], data["loss_bits"])
        actual = (result.epoch, result.segment, result.base_digest, result.weights_digest, result.loss_bits)
        if result.worker != voter["worker"] or actual != expected:
            raise _Break(f"entry {number}: vote of {voter['worker']} is for other weights, epoch or segment")
        if "class" in data and class_id(result.environment) != data["class"]:
            raise _Break(f"entry {number}: vote of {voter['worker']} was computed in numerical class "
                         f"{class_id(result.environment)}, the segment's class is {data['class']}")
        owners.add(enrolled["owner"])
    if not data.get("arbitrated") and (state["quorum"] is None or len(owners) < state["quorum"]):
        raise _Break(f"entry {number}: {len(owners)} distinct owners voted, the quorum is {state['quorum']}")
