"""The content-addressed weights store: messages carry digests, blobs live here.

Redis is the default backend. Anything with `put` and `get` over bytes can replace it
(an S3-compatible bucket, for example) without touching either side's logic.
"""

from __future__ import annotations

from typing import Protocol

import redis

# Blobs outlive any epoch that reads them; the run directory keeps the weights for good.
DEFAULT_TTL_SECONDS = 7 * 24 * 3600


class StoreError(RuntimeError):
    """A blob is missing from the store or the store cannot be reached."""


class WeightStore(Protocol):
    def put(self, digest: str, blob: bytes) -> None: ...

    def get(self, digest: str) -> bytes: ...


class RedisWeightStore:
    """Weight blobs under `farm:weights:<digest>` in Redis, each with a time-to-live."""

    def __init__(self, url: str, *, ttl: int = DEFAULT_TTL_SECONDS) -> None:
        self._redis = redis.Redis.from_url(url)
        self._ttl = ttl

    @staticmethod
    def key(digest: str) -> str:
        return f"farm:weights:{digest}"

    def put(self, digest: str, blob: bytes) -> None:
        """Store `blob` under `digest`; the caller has computed the digest from the blob's tensors."""
        try:
            self._redis.set(self.key(digest), blob, ex=self._ttl)
        except redis.RedisError as error:
            raise StoreError(f"cannot store weights {digest[:16]}: {error}") from error

    def get(self, digest: str) -> bytes:
        """Return the blob stored under `digest`; the caller must re-hash it before use."""
        try:
            blob = self._redis.get(self.key(digest))
        except redis.RedisError as error:
            raise StoreError(f"cannot read weights {digest[:16]}: {error}") from error
        if blob is None:
            raise StoreError(f"weights {digest[:16]} not found in the store (expired or never stored)")
        return blob
