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

    def enroll(self, name: str, public_key: str, owner: str, *, reinstate: bool = False) -> Enrollment:
        """Enroll a worker's node name with its public key and owner label.

        Enrolling a name again updates its owner and keeps its record, or starts a new record
        when the key changes. A revoked or quarantined worker comes back only with `reinstate`,
        which also clears its strikes. One key may belong to one name only, or a keyholder
        could vote under several owners.
        """
        parse_public_key(public_key)  # raises CryptoError on a malformed key
        if "@" not in name:
            raise RegistryError(f"invalid worker name {name!r}: use the full node name NAME@HOST that the "
                                f"worker logs at start (celery -A tasks worker -n NAME@%h)")
        if not owner or len(owner) > 100:
            raise RegistryError(f"invalid owner {owner!r}: use a short non-empty label such as a team or host")
        with self._update() as entries:
            holder = next((other for other, e in entries.items() if e.public_key == public_key and other != name), None)
            if holder is not None:
                raise RegistryError(f"this public key is already enrolled as {holder} (owner "
                                    f"{entries[holder].owner}); each worker needs its own key")
            entry = entries.get(name)
            if entry is not None and (entry.revoked or entry.quarantined) and not reinstate:
                state = "revoked" if entry.revoked else "quarantined"
                raise RegistryError(f"worker {name} is {state}; pass --reinstate to enroll it again")
            if entry is None or entry.public_key != public_key:
                entries[name] = Enrollment(public_key=public_key, owner=owner, enrolled_at=time.time())
            else:
                entry.owner = owner
                if reinstate:
                    entry.revoked, entry.quarantined, entry.strikes = False, False, 0
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
