"""The content-addressed weights store: messages carry digests, blobs live here.

Redis is the default backend. Anything with `put` and `get` over bytes can replace it
(an S3-compatible bucket, for example) without touching either side's logic.
"""

from __future__ import annotations

from typing import Protocol

import redis

from config.settings import redis_client

# Blobs outlive any epoch that reads them; the run directory keeps the weights for good.
DEFAULT_TTL_SECONDS = 7 * 24 * 3600


def base_weights_key(digest: str) -> str:
    """Key of epoch weights, written by the orchestrator only and verified by digest on every read."""
    return f"farm:weights:{digest}"


def replica_weights_key(assignment_id: str) -> str:
    """Key of one replica's result weights.

    Each replica writes its own key, so no worker can overwrite the blob that another
    replica of the same job returned, even when both claim the same digest.
    """
    return f"farm:replica-weights:{assignment_id}"


class StoreError(RuntimeError):
    """A blob is missing from the store or the store cannot be reached."""


class WeightStore(Protocol):
    def put(self, key: str, blob: bytes) -> None: ...

    def get(self, key: str) -> bytes: ...

    def delete(self, keys: list[str]) -> None: ...


class RedisWeightStore:
    """Weight blobs in Redis, each with a time-to-live."""

    def __init__(self, url: str, *, ttl: int = DEFAULT_TTL_SECONDS) -> None:
        self._redis = redis_client(url)
        self._ttl = ttl

    def put(self, key: str, blob: bytes) -> None:
        try:
            self._redis.set(key, blob, ex=self._ttl)
        except redis.RedisError as error:
            raise StoreError(f"cannot store weights under {key}: {error}") from error

    def get(self, key: str) -> bytes:
        """Return the blob under `key`; the caller must re-hash it before use."""
        try:
            blob = self._redis.get(key)
        except redis.RedisError as error:
            raise StoreError(f"cannot read weights {key}: {error}") from error
        if blob is None:
            raise StoreError(f"weights {key} not found in the store (expired or never stored)")
        return blob

    def delete(self, keys: list[str]) -> None:
        if keys:
            try:
                self._redis.delete(*keys)
            except redis.RedisError as error:
                raise StoreError(f"cannot delete {len(keys)} weight blobs: {error}") from error
