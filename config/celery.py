"""Celery settings shared by the workers and the orchestrator that sends them jobs."""

from __future__ import annotations

import ssl

from config.settings import redis_tls_options

# Backstop limits for any task; the orchestrator sets each job's own limits from --job-timeout.
TASK_TIME_LIMIT = 3600  # seconds before the pool kills a job's process
RESULT_EXPIRES = 24 * 3600  # seconds a task result stays in the result backend


def _celery_tls(broker_url: str) -> dict:
    """Return Celery's TLS settings for a rediss:// broker, built from the FARM_REDIS_TLS_* variables."""
    if not broker_url.startswith("rediss://"):
        return {}
    options = redis_tls_options()
    options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    return {"broker_use_ssl": options, "redis_backend_use_ssl": dict(options)}


def celery_settings(broker_url: str) -> dict:
    """Return the Celery configuration for the farm's app."""
    return _celery_tls(broker_url) | {
        "broker_url": broker_url,
        "result_backend": broker_url,
        # JSON only: a pickle message is refused before any of its bytes are deserialized.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # One job at a time per worker, acknowledged only after it ran.
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "result_expires": RESULT_EXPIRES,
        "task_time_limit": TASK_TIME_LIMIT,
        "task_soft_time_limit": TASK_TIME_LIMIT - 30,
        # Events let Flower list every task, including those still queued.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # Jobs go to per-worker queues; nothing is meant to land on the default queue.
        "task_default_queue": "farm.unrouted",
        "task_create_missing_queues": True,
        # Redelivery of unacknowledged jobs; the orchestrator counts each assignment once anyway.
        "broker_transport_options": {"visibility_timeout": 2 * TASK_TIME_LIMIT},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # keep reconnecting through a Redis restart
        # Publishing a job survives a Redis restart of about a minute.
        "task_publish_retry_policy": {"max_retries": 60, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 2.0},
        # A job keeps running through a broker restart; its reply retries until Redis is back.
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "worker_redirect_stdouts_level": "INFO",
        # Pool children import torch on start, which can take several seconds on a loaded machine.
        "worker_proc_alive_timeout": 60.0,
    }
