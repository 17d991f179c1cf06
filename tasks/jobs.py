"""The segment training task: fetch base weights by digest, check the data, train, store, reply."""

from __future__ import annotations

import functools
import json
import secrets
import time

import redis
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_task_logger

from config.settings import (
    SettingsError,
    TrainingSettings,
    broker_url_from_env,
    data_root_from_env,
    device_from_env,
    redis_client,
    store_url_from_env,
)
from model.engine import Engine, EngineError
from protocol.crypto import CryptoError, seal
from protocol.envelope import WEIGHTS_CONTEXT, seal_result, sign_result, verify_job
from protocol.messages import TASK_NAME, Job, ProtocolError, Result, loss_bits
from protocol.store import RedisWeightStore, StoreError, base_weights_key, replica_weights_key
from tasks.app import app
from tasks.identity import IdentityError, orchestrator_keys, worker_key

logger = get_task_logger(__name__)

RESULTS_PREFIX = "farm:results:"
EXECUTED_PREFIX = "farm:executed:"  # one claim per assignment: who started it, and when
HEALTH_PREFIX = "farm:worker-health:"  # problems found while running a job, shown in the heartbeat
HEALTH_TTL = 600  # seconds a reported problem marks the worker unhealthy unless it recurs


class JobRejected(Exception):
    """The job message is malformed, expired or addressed to another worker; nothing was trained."""


class JobFailed(Exception):
    """The job could not be trained here (dataset mismatch, missing weights, time limit)."""


@functools.lru_cache(maxsize=1)
def _redis() -> redis.Redis:
    """Return a client of the broker's Redis, where replies go; weights go to the store."""
    return redis_client(broker_url_from_env())


@functools.lru_cache(maxsize=1)
def _store() -> RedisWeightStore:
    return RedisWeightStore(store_url_from_env())


_engines: dict[str, Engine] = {}


def engine(profile: str) -> Engine:
    """Return this process's training engine for `profile`, stopping any engine of another profile.

    One engine at a time keeps the worker's memory at one copy of torch and the data.
    """
    for other in [name for name in _engines if name != profile]:
        _engines.pop(other).close()
    if profile not in _engines:
        _engines[profile] = Engine(profile, device_from_env())
    return _engines[profile].start()


def _reply(job: Job, result: Result) -> None:
    """Sign `result`, seal it to the orchestrator and push it to the job's reply list."""
    sealed = seal_result(sign_result(result, worker_key()), orchestrator_keys().sealing)
    _redis().rpush(job.reply_to, json.dumps(sealed))


def _train(job: Job, worker: str, started: float) -> Result:
    settings = TrainingSettings.from_dict(job.training)
    reply, blob = engine(settings.profile).train(
        root=str(data_root_from_env()), training=job.training, epoch=job.epoch, segment=job.segment,
        base_digest=job.base_digest,
        base_blob=_store().get(base_weights_key(job.base_digest)), data_digest=job.data_digest,
    )
    # A random key and a sealed blob: no other worker can find or read these weights.
    weights_key = replica_weights_key(secrets.token_hex(16))
    _store().put(weights_key, seal(orchestrator_keys().sealing, blob, WEIGHTS_CONTEXT))
    loss = float(reply["loss"])
    return Result(
        run_id=job.run_id,
        epoch=job.epoch,
        segment=job.segment,
        assignment_id=job.assignment_id,
        worker=worker,
        base_digest=job.base_digest,
        status="ok",
        weights_digest=reply["weights_digest"],
        loss=loss,
        loss_bits=loss_bits(loss),
        seconds=time.monotonic() - started,
        weights_key=weights_key,
        environment=reply["environment"],
    )


def _claim(job: Job, worker: str) -> bool:
    """Mark the assignment as executed; return False when an earlier delivery already ran it."""
    ttl = max(60, int(job.expires_at - time.time()) + 3600)
    claim = json.dumps({"worker": worker, "started_at": time.time()})
    return bool(_redis().set(f"{EXECUTED_PREFIX}{job.assignment_id}", claim, nx=True, ex=ttl))


def _record_health(worker: str, problem: str) -> None:
    """Tell the heartbeat, which runs in the parent process, that this worker cannot serve."""
    _redis().set(f"{HEALTH_PREFIX}{worker}", problem, ex=HEALTH_TTL)


def _parse(message: object, worker: str) -> Job:
    try:
        job = Job.from_message(message)
    except ProtocolError as error:
        raise JobRejected(f"malformed job: {error}") from None
    try:
        verify_job(job, orchestrator_keys().signing)
    except CryptoError as error:
        raise JobRejected(f"invalid signature on job {job.assignment_id}: {error}") from None
    if job.worker != worker:
        raise JobRejected(f"job {job.assignment_id} is assigned to {job.worker}, not to {worker}")
    if not job.reply_to.startswith(RESULTS_PREFIX):
        raise JobRejected(f"job {job.assignment_id} has reply_to {job.reply_to!r} outside {RESULTS_PREFIX}*")
    if time.time() > job.expires_at:
        raise JobRejected(f"job {job.assignment_id} expired at {job.expires_at:.0f}")
    return job


# `throws` marks the expected failures: Celery records them without a traceback.
@app.task(name=TASK_NAME, bind=True, throws=(JobRejected, JobFailed))
def train_segment_job(self, message: dict) -> dict:
    """Train one replica of a segment job and push the result to the job's reply list."""
    started = time.monotonic()
    worker = self.request.hostname
    try:
        job = _parse(message, worker)
    except (JobRejected, IdentityError) as error:
        logger.warning("rejected job %s: %s", self.request.id, error)
        raise JobRejected(str(error)) from None
    if not _claim(job, worker):
        logger.warning("skipped assignment %s: it was delivered again (Redis redelivers unacknowledged "
                       "messages after the visibility timeout) and has already run", job.assignment_id)
        return {"assignment_id": job.assignment_id, "status": "duplicate delivery"}
    logger.info(
        "job started: run %s epoch %d segment %d assignment %s base %s",
        job.run_id, job.epoch, job.segment, job.assignment_id, job.base_digest[:12],
    )

    try:
        result = _train(job, worker, started)
    except Exception as error:  # every failure becomes an error result, so the orchestrator re-issues at once
        if isinstance(error, SoftTimeLimitExceeded):
            reason = "timed out: soft time limit reached"
        elif isinstance(error, (EngineError, StoreError, SettingsError)) and getattr(error, "kind", "") != "internal":
            reason = str(error)
            if isinstance(error, StoreError) or getattr(error, "kind", "") in ("dataset", "settings"):
                _record_health(worker, reason)
        else:
            reason = f"internal error: {type(error).__name__}: {error}"
            logger.exception("job %s raised an unexpected error", job.assignment_id)
        logger.error("job failed: assignment %s segment %d: %s", job.assignment_id, job.segment, reason)
        failure = Result(
            run_id=job.run_id, epoch=job.epoch, segment=job.segment, assignment_id=job.assignment_id,
            worker=worker, base_digest=job.base_digest, status="error", error=reason,
            seconds=time.monotonic() - started,
        )
        _reply(job, failure)
        raise JobFailed(reason) from None

    _reply(job, result)
    logger.info(
        "job done: assignment %s segment %d weights %s loss %.6f in %.2f s",
        job.assignment_id, job.segment, result.weights_digest[:12], result.loss, result.seconds,
    )
    # The digest and loss travel sealed; the task result (visible in Flower and Redis) names neither.
    return {"assignment_id": job.assignment_id, "status": "sent"}
