"""Worker heartbeats: a JSON record per worker under a Redis key that expires unless refreshed.

Celery's `inspect ping` cannot reach a worker whose pool is busy, so liveness is tracked
with these keys instead: a worker is live while its key exists.
"""

from __future__ import annotations

import json

import redis

HEARTBEAT_PREFIX = "farm:workers:"
HEARTBEAT_INTERVAL = 2.0  # seconds between refreshes
HEARTBEAT_TTL = 10  # seconds a record outlives its last refresh


def heartbeat_key(worker: str) -> str:
    return f"{HEARTBEAT_PREFIX}{worker}"


def read_heartbeats(client: redis.Redis) -> dict[str, dict]:
    """Return worker name -> heartbeat record for every live worker."""
    keys = sorted(client.scan_iter(match=f"{HEARTBEAT_PREFIX}*", count=500))
    records: dict[str, dict] = {}
    if not keys:
        return records
    for key, raw in zip(keys, client.mget(keys)):
        if raw is None:
            continue  # expired between SCAN and MGET
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        name = key.decode()[len(HEARTBEAT_PREFIX) :]
        if isinstance(record, dict) and record.get("worker") == name:
            records[name] = record
    return records
