"""The worker's identity: its Ed25519 key and the orchestrator's public keys.

    FARM_WORKER_KEY           path of this worker's private key (created with `orchestrator keygen`)
    FARM_WORKER_KEY_CREATE    "1": create the key at FARM_WORKER_KEY on first start if it is missing
    FARM_ORCHESTRATOR_KEY     path of the orchestrator's public key file (orchestrator.pub.json)
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol.crypto import CryptoError, generate_key, load_private_key, parse_public_key, parse_sealing_public_key, public_key_text


class IdentityError(RuntimeError):
    """The worker's key or the orchestrator's public key is missing or invalid."""


@dataclass(frozen=True)
class OrchestratorKeys:
    """The orchestrator's public keys: one verifies jobs, the other seals results to it."""

    signing: Ed25519PublicKey
    sealing: X25519PublicKey


@functools.lru_cache(maxsize=1)
def worker_key() -> Ed25519PrivateKey:
    """Load this worker's private key from FARM_WORKER_KEY."""
    path = os.environ.get("FARM_WORKER_KEY")
    if not path:
        raise IdentityError(
            "FARM_WORKER_KEY is not set: create a key with `orchestrator keygen PATH`, have the operator "
            "enroll its public key, and set FARM_WORKER_KEY=PATH"
        )
    try:
        if os.environ.get("FARM_WORKER_KEY_CREATE") == "1" and not Path(path).exists():
            return generate_key(Path(path))
        return load_private_key(Path(path))
    except CryptoError as error:
        raise IdentityError(str(error)) from None


def worker_public_key() -> str:
    return public_key_text(worker_key())


@functools.lru_cache(maxsize=1)
def orchestrator_keys() -> OrchestratorKeys:
    """Load the orchestrator's public keys from the file named by FARM_ORCHESTRATOR_KEY."""
    path = os.environ.get("FARM_ORCHESTRATOR_KEY")
    if not path:
        raise IdentityError(
            "FARM_ORCHESTRATOR_KEY is not set: copy the orchestrator's orchestrator.pub.json "
            "(written by `orchestrator init`) to this machine and set FARM_ORCHESTRATOR_KEY to its path"
        )
    try:
        data = json.loads(Path(path).read_text())
        return OrchestratorKeys(parse_public_key(data["signing_key"]), parse_sealing_public_key(data["sealing_key"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise IdentityError(f"cannot load the orchestrator's public keys from {path}: {error}") from None

