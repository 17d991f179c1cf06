"""The orchestrator's own key pair, kept in its state directory.

    STATE_DIR/orchestrator.key        Ed25519 private key, mode 0600; signs jobs, derives the sealing key
    STATE_DIR/orchestrator.pub.json   public signing and sealing keys; every worker needs a copy
    STATE_DIR/registry.json           enrolled workers (see registry.py)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.crypto import (
    CryptoError,
    generate_key,
    load_private_key,
    public_key_text,
    sealing_key,
    sealing_public_text,
)

KEY_FILE = "orchestrator.key"
PUBLIC_FILE = "orchestrator.pub.json"


def state_dir_from_env() -> Path:
    """Return the orchestrator's state directory from FARM_STATE_DIR, default ./farm-state."""
    return Path(os.environ.get("FARM_STATE_DIR", "farm-state"))


@dataclass(frozen=True)
class OrchestratorIdentity:
    signing: Ed25519PrivateKey
    sealing: X25519PrivateKey
    public_file: Path

    @classmethod
    def create(cls, state_dir: Path) -> OrchestratorIdentity:
        """Create the key pair and its public file; refuse to replace an existing key."""
        key_path = state_dir / KEY_FILE
        if key_path.exists():
            raise CryptoError(f"{key_path} already exists; the orchestrator already has a key")
        state_dir.mkdir(parents=True, exist_ok=True)
        key = generate_key(key_path)
        public = {"signing_key": public_key_text(key), "sealing_key": sealing_public_text(sealing_key(key))}
        (state_dir / PUBLIC_FILE).write_text(json.dumps(public, indent=2) + "\n")
        return cls.load(state_dir)

    @classmethod
    def load(cls, state_dir: Path) -> OrchestratorIdentity:
        key_path = state_dir / KEY_FILE
        if not key_path.exists():
            raise CryptoError(
                f"no orchestrator key in {state_dir}; create one with: orchestrator init --state-dir {state_dir}"
            )
        key = load_private_key(key_path)
        return cls(signing=key, sealing=sealing_key(key), public_file=state_dir / PUBLIC_FILE)
