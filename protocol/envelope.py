"""Signed jobs, and signed results sealed to the orchestrator.

A job travels in the clear, signed by the orchestrator. A result is signed by its worker and
then sealed to the orchestrator's key, so that no other worker can read its digest or loss
before the job is decided. Result weights are sealed the same way before they are stored.
"""

from __future__ import annotations

import dataclasses
import json

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from protocol.crypto import JOB_DOMAIN, RESULT_DOMAIN, b64, seal, sign, unb64, unseal, verify
from protocol.messages import PROTOCOL_VERSION, Job, ProtocolError, Result, signed_payload

SEALED_TYPE = "farm.sealed"
MAX_SEALED_CHARS = 64 * 1024  # a sealed result is about 1 KB; anything far larger is rejected unread
RESULT_CONTEXT = b"result"
WEIGHTS_CONTEXT = b"weights"


def sign_job(job: Job, key: Ed25519PrivateKey) -> Job:
    return dataclasses.replace(job, signature=sign(key, JOB_DOMAIN, signed_payload(job.to_message())))


def verify_job(job: Job, public_key: Ed25519PublicKey) -> None:
    """Raise CryptoError unless the orchestrator signed exactly this job."""
    verify(public_key, JOB_DOMAIN, signed_payload(job.to_message()), job.signature)


def sign_result(result: Result, key: Ed25519PrivateKey) -> Result:
    return dataclasses.replace(result, signature=sign(key, RESULT_DOMAIN, signed_payload(result.to_message())))


def verify_result(result: Result, public_key: Ed25519PublicKey) -> None:
    """Raise CryptoError unless the holder of `public_key` signed exactly this result."""
    verify(public_key, RESULT_DOMAIN, signed_payload(result.to_message()), result.signature)


def seal_result(result: Result, recipient: X25519PublicKey) -> dict:
    """Return the wire message carrying `result` sealed to the orchestrator."""
    box = seal(recipient, json.dumps(result.to_message()).encode(), RESULT_CONTEXT)
    return {"type": SEALED_TYPE, "version": PROTOCOL_VERSION, "box": b64(box)}


def open_result(message: object, recipient: X25519PrivateKey) -> Result:
    """Open a sealed result message and parse it; raise ProtocolError or CryptoError."""
    if not isinstance(message, dict) or message.get("type") != SEALED_TYPE:
        raise ProtocolError("result is not sealed to the orchestrator")
    if message.get("version") != PROTOCOL_VERSION or set(message) != {"type", "version", "box"}:
        raise ProtocolError("sealed result has unexpected fields or version")
    box = message["box"]
    if not isinstance(box, str) or len(box) > MAX_SEALED_CHARS:
        raise ProtocolError("sealed result box is missing or oversized")
    plaintext = unseal(recipient, unb64(box, "sealed result"), RESULT_CONTEXT)
    try:
        return Result.from_message(json.loads(plaintext))
    except ValueError as error:
        raise ProtocolError(f"sealed result does not contain a result: {error}") from None
