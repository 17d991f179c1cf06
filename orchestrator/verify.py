"""Checks every result must pass before its vote counts: binding to an assignment, then the weights."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from model.weights import DEFAULT_MAX_BLOB_BYTES, Spec, StateDict, WeightsError, decode_verified
from orchestrator.quorum import PENDING, Replica
from protocol.messages import Result
from protocol.crypto import CryptoError, unseal
from protocol.envelope import WEIGHTS_CONTEXT
from protocol.store import StoreError, WeightStore


class Rejection(Exception):
    """A result that does not count; `reason` is the explanation written to the log and the metrics."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class EpochContext:
    """The run, epoch and base weights that every result of the current epoch must name."""

    run_id: str
    epoch: int
    base_digest: str


def check_binding(result: Result, replica: Replica | None, context: EpochContext) -> Replica:
    """Return the outstanding replica that `result` is bound to, or raise Rejection."""
    if result.run_id != context.run_id:
        raise Rejection(f"result for another run {result.run_id!r}")
    if result.epoch != context.epoch:
        raise Rejection(f"stale result from epoch {result.epoch}, current epoch is {context.epoch}")
    if replica is None:
        raise Rejection(f"unknown assignment {result.assignment_id}: no such job was issued this epoch")
    if result.worker != replica.worker:
        raise Rejection(f"assignment {result.assignment_id} belongs to {replica.worker}, result claims {result.worker}")
    if result.segment != replica.segment:
        raise Rejection(f"assignment {result.assignment_id} is for segment {replica.segment}, result claims {result.segment}")
    if result.base_digest != context.base_digest:
        raise Rejection(f"result trained from base {result.base_digest[:16]}, epoch base is {context.base_digest[:16]}")
    if replica.status != PENDING:
        raise Rejection(f"assignment {result.assignment_id} was already counted ({replica.status})")
    return replica


class WeightsVerifier:
    """Fetch result weights, re-hash and validate them, and keep each verified digest's state_dict."""

    def __init__(self, store: WeightStore, spec: Spec, *, sealing: X25519PrivateKey,
                 max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self._store = store
        self._sealing = sealing
        self._spec = spec
        self._max_bytes = max_bytes
        self._verified: dict[str, StateDict] = {}

    def verify(self, key: str, digest: str) -> StateDict:
        """Return the state_dict stored under `key` if it hashes to `digest`, or raise Rejection."""
        try:
            box = self._store.get(key)
            if len(box) > self._max_bytes + 64:
                raise WeightsError(f"sealed weights are {len(box)} bytes, over the limit of {self._max_bytes} bytes")
            blob = unseal(self._sealing, box, WEIGHTS_CONTEXT)
            state_dict = decode_verified(blob, digest, self._spec, max_bytes=self._max_bytes)
        except (StoreError, WeightsError, CryptoError) as error:
            raise Rejection(str(error)) from None
        return self._verified.setdefault(digest, state_dict)

    def remember(self, digest: str, state_dict: StateDict) -> None:
        """Keep weights the orchestrator computed itself, which need no verification."""
        self._verified[digest] = state_dict

    def state_dict(self, digest: str) -> StateDict:
        """Return weights verified earlier under `digest`."""
        return self._verified[digest]

    def clear(self) -> None:
        """Drop every verified state_dict, so memory stays flat across epochs."""
        self._verified.clear()
