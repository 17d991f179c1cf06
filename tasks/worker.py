"""Worker lifecycle: a private queue per worker, heartbeats, and torch set up in the pool child."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

import redis
from celery import bootsteps
from celery.signals import celeryd_after_setup, worker_process_init
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from config.settings import (
    DATASETS,
    broker_url_from_env,
    data_root_from_env,
    device_from_env,
    redis_client,
    store_url_from_env,
)
from model.engine import Engine, EngineError
from model.numerics import PROFILES, class_id, describe, job_environment
from protocol.heartbeat import HEARTBEAT_INTERVAL, HEARTBEAT_TTL, heartbeat_key
from protocol.messages import worker_queue
from tasks.app import app
from tasks.identity import orchestrator_keys, worker_public_key
from tasks.jobs import HEALTH_PREFIX, engine

logger = get_logger(__name__)


@celeryd_after_setup.connect
def consume_own_queue(sender: str, instance, **_) -> None:
    """Consume only this worker's queue, so the orchestrator alone decides who trains what."""
    queues = instance.app.amqp.queues
    queues.select_add(worker_queue(sender))
    queues.deselect(instance.app.conf.task_default_queue)
    logger.info("worker %s consumes queue %s", sender, worker_queue(sender))


@worker_process_init.connect
def start_engine(**_) -> None:
    """Start the pool child's training engine for the default profile, so torch loads before the first job.

    Neither this process nor its parent imports torch. Each engine is a fresh process, so its
    profile settings take effect before torch and CUDA start.
    """
    engine("default")
    logger.info("pool child %d ready", os.getpid())


def fingerprints(device: str) -> dict[str, dict]:
    """Return profile -> numerical fingerprint of this machine, measured in one engine per profile."""
    engines = {profile: Engine(profile, device).start() for profile in PROFILES}
    try:
        return {profile: engine.fingerprint() for profile, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.close()


def dataset_health(root: Path) -> dict[str, bool]:
    """Return which datasets have their raw training files under the data root."""
    return {
        name: (root / folder / "raw" / "train-images-idx3-ubyte").is_file()
        and (root / folder / "raw" / "t10k-images-idx3-ubyte").is_file()
        for name, folder in DATASETS.items()
    }


class Heartbeat(bootsteps.StartStopStep):
    """Refresh this worker's heartbeat record from the parent's event loop, busy or not."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, parent, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.timer_entry = None
        self.client: redis.Redis | None = None
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()

    def start(self, parent) -> None:
        # A worker without its key or the orchestrator's public keys could do nothing useful.
        self.public_key = worker_public_key()
        orchestrator_keys()
        logger.info("worker %s has public key %s; the operator enrolls it with: orchestrator workers enroll "
                    "%s %s --owner OWNER", parent.hostname, self.public_key, parent.hostname, self.public_key)
        # Heartbeats go where the orchestrator reads them, the broker; the store is only checked.
        # Few retries: a heartbeat must not block the worker's event loop while Redis is away.
        self.client = redis_client(broker_url_from_env(), socket_timeout=5, retries=1)
        self.store = redis_client(store_url_from_env(), socket_timeout=5, retries=1)
        self.claim_name(parent.hostname)
        self.device = device_from_env()
        try:
            self.environments = fingerprints(self.device)
            self.environment_problem = ""
        except (EngineError, EOFError, OSError) as error:
            self.environments = {}
            self.environment_problem = f"unhealthy: cannot measure the numerical environment on {self.device}: {error}"
            logger.error("worker %s %s", parent.hostname, self.environment_problem)
        for profile, fingerprint in self.environments.items():
            environment = job_environment(fingerprint, threads=1, allow_tf32=False)
            logger.info("worker %s is in class %s under profile %s: %s", parent.hostname, class_id(environment),
                        profile, describe(environment))
        root = data_root_from_env()
        if not any(dataset_health(root).values()):
            logger.warning("worker %s has no dataset under data root %s: it stays unhealthy and gets no jobs; "
                           "set FARM_DATA_ROOT to a folder in torchvision's layout", parent.hostname, root)
        self.beat(parent)
        self.timer_entry = parent.timer.call_repeatedly(HEARTBEAT_INTERVAL, self.beat, (parent,), priority=10)
        logger.info("worker %s started heartbeats every %.0f s", parent.hostname, HEARTBEAT_INTERVAL)

    def stop(self, parent) -> None:
        if self.timer_entry is not None:
            self.timer_entry.cancel()
            self.timer_entry = None
        if self.client is not None:
            try:
                self.client.delete(heartbeat_key(parent.hostname))
            except redis.RedisError:
                pass
        logger.info("worker %s stopped heartbeats", parent.hostname)

    def claim_name(self, name: str) -> None:
        """Refuse to start while another live worker uses the same name, since names are identities."""
        deadline = time.monotonic() + HEARTBEAT_TTL + HEARTBEAT_INTERVAL
        first = self.client.get(heartbeat_key(name))
        while first is not None and time.monotonic() < deadline:
            time.sleep(1.5 * HEARTBEAT_INTERVAL)  # longer than one refresh period
            current = self.client.get(heartbeat_key(name))
            if current is None or current == first:
                return  # the old record expired or stopped changing: its owner is gone
            first = current
        if first is not None:
            raise RuntimeError(
                f"another live worker is named {name!r}; start this one with a unique "
                f"name, for example: celery -A tasks worker -n {name.split('@')[0]}-2@%h"
            )

    def beat(self, parent) -> None:
        root = data_root_from_env()
        datasets = dataset_health(root)
        active = sorted(request.id for request in worker_state.active_requests)
        health = "ok" if any(datasets.values()) else f"unhealthy: no dataset under data root {root}"
        try:
            self.store.ping()
        except redis.RedisError as error:
            health = f"unhealthy: cannot reach the weights store: {error}"
        try:
            problem = self.client.get(f"{HEALTH_PREFIX}{parent.hostname}")
        except redis.RedisError:
            problem = None
        if problem and health == "ok":
            health = f"unhealthy: {problem.decode()}"
        if self.environment_problem and health == "ok":
            health = self.environment_problem
        record = {
            "worker": parent.hostname,
            "public_key": self.public_key,
            "instance": self.instance,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": self.started_at,
            "beat_at": time.time(),
            "datasets": datasets,
            "data_root": str(root),
            "health": health,
            "device": self.device,
            "environments": self.environments,  # profile -> fingerprint: the orchestrator derives classes
            "active": active,
            # Counts are keyed by the name shown in Flower, which each job sets to its epoch and segment.
            "processed": sum(worker_state.total_count.values()),
        }
        try:
            self.client.set(heartbeat_key(parent.hostname), json.dumps(record), ex=HEARTBEAT_TTL)
        except redis.RedisError as error:
            logger.warning("worker %s heartbeat failed: %s", parent.hostname, error)


app.steps["worker"].add(Heartbeat)
