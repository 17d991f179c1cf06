"""Enrolled workers: public key, owner, valid results, strikes and quarantine, in one JSON file.

The file lives in the orchestrator's state directory, out of the workers' reach (unlike
Redis). Every change is a locked read-modify-write, so `orchestrator workers enroll` in one
shell and a running orchestrator in another never lose each other's updates.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from protocol.crypto import parse_public_key

REGISTRY_FILE = "registry.json"
DEFAULT_MAX_STRIKES = 3


class RegistryError(ValueError):
    """An enrollment request is invalid, or names a worker that is not enrolled."""


@dataclass
class Enrollment:
    """One enrolled worker identity and its standing."""

    public_key: str
    owner: str
    enrolled_at: float
    revoked: bool = False
    valid_results: int = 0
    strikes: int = 0
    quarantined: bool = False
    strike_reasons: list[str] = field(default_factory=list)

    @property
    def eligible(self) -> bool:
        return not self.revoked and not self.quarantined


class Registry:
    """Read and update the enrolled workers in STATE_DIR/registry.json."""

    def __init__(self, state_dir: Path, *, max_strikes: int = DEFAULT_MAX_STRIKES) -> None:
        self.path = Path(state_dir) / REGISTRY_FILE
        self.max_strikes = max_strikes

    def load(self) -> dict[str, Enrollment]:
        if not self.path.exists():
            return {}
        data = json.loads(self.path.read_text())
        return {name: Enrollment(**entry) for name, entry in data.get("workers", {}).items()}

    @contextlib.contextmanager
    def _update(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self.load()
            yield entries
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"workers": {n: asdict(e) for n, e in sorted(entries.items())}}, indent=2))
            os.replace(temporary, self.path)

    def enroll(self, name: str, public_key: str, owner: str) -> Enrollment:
        """Enroll a worker name with its public key and owner label; re-enrolling replaces the key."""
        parse_public_key(public_key)  # raises CryptoError on a malformed key
        if not owner or len(owner) > 100:
            raise RegistryError(f"invalid owner {owner!r}: use a short non-empty label such as a team or host")
        with self._update() as entries:
            entries[name] = Enrollment(public_key=public_key, owner=owner, enrolled_at=time.time())
            return entries[name]

    def revoke(self, name: str) -> None:
        with self._update() as entries:
            if name not in entries:
                raise RegistryError(f"worker {name!r} is not enrolled; see: orchestrator workers list")
            entries[name].revoked = True

    def record_valid(self, names: list[str]) -> None:
        """Count one valid, accepted result for each worker in `names`."""
        with self._update() as entries:
            for name in names:
                if name in entries:
                    entries[name].valid_results += 1

    def add_strike(self, name: str, reason: str) -> bool:
        """Record a strike with its reason; return True when it quarantines the worker."""
        with self._update() as entries:
            entry = entries.get(name)
            if entry is None:
                return False
            entry.strikes += 1
            entry.strike_reasons = (entry.strike_reasons + [reason])[-10:]
            newly = not entry.quarantined and entry.strikes >= self.max_strikes
            entry.quarantined = entry.quarantined or newly
            return newly

    def quarantine(self, name: str, reason: str) -> None:
        with self._update() as entries:
            if name in entries:
                entries[name].quarantined = True
                entries[name].strike_reasons = (entries[name].strike_reasons + [reason])[-10:]
