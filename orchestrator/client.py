"""The orchestrator's connections: Celery for sending jobs, Redis for replies, heartbeats and status."""

from __future__ import annotations

import json


from config.settings import redis_client
from celery import Celery

from config.celery import celery_settings
from protocol.heartbeat import read_heartbeats
from protocol.messages import TASK_NAME, Job, worker_queue
from protocol.store import RedisWeightStore

CURRENT_RUN_KEY = "farm:runs:current"


class FarmClient:
    """Send jobs to named workers, read their replies and heartbeats, publish run status."""

    def __init__(self, broker_url: str, store_url: str) -> None:
        self.broker_url = broker_url
        self.app = Celery("farm")
        self.app.conf.update(celery_settings(broker_url))
        self.redis = redis_client(broker_url, socket_timeout=30, health_check_interval=10)
        self.store = RedisWeightStore(store_url)

    def ping(self) -> None:
        """Raise redis.RedisError at once when the broker cannot be reached (no retries)."""
        redis_client(self.broker_url, retries=0, socket_connect_timeout=5).ping()

    def live_workers(self) -> dict[str, dict]:
        return read_heartbeats(self.redis)

    def send(self, job: Job, *, time_limit: float, expires_in: float) -> None:
        """Queue one replica on its worker's private queue; the task id is the assignment id."""
        self.app.send_task(
            TASK_NAME,
            args=[job.to_message()],
            task_id=job.assignment_id,
            queue=worker_queue(job.worker),
            shadow=f"train epoch {job.epoch} segment {job.segment}",
            soft_time_limit=time_limit,
            time_limit=time_limit + 30,
            expires=expires_in,
        )

    def revoke(self, assignment_ids: list[str]) -> None:
        """Ask workers to drop replicas that are no longer needed; a running one finishes and is ignored."""
        if assignment_ids:
            self.app.control.revoke(assignment_ids)

    def pop_reply(self, key: str, timeout: float) -> bytes | None:
        """Return the next raw reply on `key`, waiting up to `timeout` seconds."""
        item = self.redis.blpop([key], timeout=max(0.01, min(timeout, 5.0)))
        return item[1] if item else None

    def pop_reply_nowait(self, key: str) -> bytes | None:
        """Return the next raw reply on `key` if one is waiting."""
        return self.redis.lpop(key)

    def started_at(self, assignment_ids: list[str]) -> dict[str, float]:
        """Return when each assignment started on its worker, for those that have started."""
        if not assignment_ids:
            return {}
        claims = self.redis.mget([f"farm:executed:{a}" for a in assignment_ids])
        started = {}
        for assignment_id, claim in zip(assignment_ids, claims):
            try:
                started[assignment_id] = float(json.loads(claim)["started_at"])
            except (TypeError, ValueError, KeyError):
                continue  # not started yet, or a claim this version cannot read
        return started

    def publish_status(self, status: dict) -> None:
        self.redis.set(CURRENT_RUN_KEY, json.dumps(status))

    def read_status(self) -> dict | None:
        raw = self.redis.get(CURRENT_RUN_KEY)
        return json.loads(raw) if raw else None
