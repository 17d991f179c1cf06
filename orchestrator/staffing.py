"""Eligibility of workers for a run's jobs, their numerical classes, and the staffing check.

Workers advertise a numerical fingerprint per profile in their heartbeats. A worker's class
for a run is the digest of that fingerprint plus the run's thread count and TF32 flag.
Only workers of one class can return the same bits for a job.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from config.settings import TrainingSettings
from model.numerics import class_id, describe, job_environment
from orchestrator.client import FarmClient
from orchestrator.errors import StaffingError
from orchestrator.registry import Enrollment, Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """An eligible worker: its owner and its numerical class for the run."""

    owner: str
    klass: str
    environment: dict


def environment_for(record: dict, training: TrainingSettings) -> dict | None:
    """Return the numerical environment a worker would train the run's jobs in, or None if unknown."""
    fingerprint = (record.get("environments") or {}).get(training.profile)
    if not isinstance(fingerprint, dict):
        return None
    return job_environment(fingerprint, threads=training.threads, allow_tf32=training.allow_tf32)


def ineligibility(record: dict, enrollment: Enrollment | None, training: TrainingSettings) -> str | None:
    """Return why a live worker may not receive the run's jobs, or None when it may."""
    if enrollment is None:
        return "not enrolled"
    if enrollment.revoked:
        return "revoked"
    if enrollment.quarantined:
        return "quarantined"
    if record.get("public_key") != enrollment.public_key:
        return "public key differs from its enrollment"
    if record.get("health") != "ok":
        return str(record.get("health"))
    if not record.get("datasets", {}).get(training.dataset):
        return f"no {training.dataset} under its data root"
    if environment_for(record, training) is None:
        return f"no numerical fingerprint for profile {training.profile} (update the worker)"
    return None


def eligible_workers(heartbeats: Mapping[str, dict], enrollments: Mapping[str, Enrollment],
                     training: TrainingSettings) -> dict[str, Member]:
    """Return worker -> Member for live workers that are enrolled, in good standing, healthy and hold the data."""
    members = {}
    for name, record in sorted(heartbeats.items()):
        if ineligibility(record, enrollments.get(name), training) is None:
            environment = environment_for(record, training)
            members[name] = Member(enrollments[name].owner, class_id(environment), environment)
    return members


def classes(members: Mapping[str, Member]) -> dict[str, list[str]]:
    """Return class -> its workers, largest class first."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for name, member in sorted(members.items()):
        by_class[member.klass].append(name)
    return dict(sorted(by_class.items(), key=lambda item: (-len(item[1]), item[0])))


def staffed_classes(members: Mapping[str, Member], owners: int) -> list[str]:
    """Return the classes whose workers belong to at least `owners` distinct owners."""
    return [klass for klass, names in classes(members).items()
            if len({members[name].owner for name in names}) >= owners]


def class_table(members: Mapping[str, Member]) -> list[str]:
    """Return one line per class: id, description, worker and owner counts, and its workers."""
    lines = []
    for klass, names in classes(members).items():
        owners = {members[name].owner for name in names}
        lines.append(f"class {klass} ({describe(members[names[0]].environment)}): {len(names)} worker(s) of "
                     f"{len(owners)} owner(s): " + ", ".join(f"{name} (owner {members[name].owner})" for name in names))
    return lines


def wait_for_workers(client: FarmClient, registry: Registry, *, training: TrainingSettings, owners: int,
                     timeout: float) -> dict[str, Member]:
    """Wait until one class contains eligible workers of `owners` distinct owners; raise StaffingError otherwise."""
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        heartbeats = client.live_workers()
        enrollments = registry.load()
        members = eligible_workers(heartbeats, enrollments, training)
        if staffed_classes(members, owners):
            return members
        if time.monotonic() >= deadline:
            raise StaffingError(_understaffed(heartbeats, enrollments, members, training, owners, timeout))
        if not announced:
            logger.info("waiting up to %.0f s for live workers of %d owners in one numerical class (found %d "
                        "eligible worker(s) in %d class(es))", timeout, owners, len(members), len(classes(members)))
            announced = True
        time.sleep(0.5)


def _understaffed(heartbeats: Mapping[str, dict], enrollments: Mapping[str, Enrollment],
                  members: Mapping[str, Member], training: TrainingSettings, owners: int, timeout: float) -> str:
    lines = [f"cannot staff the run: no numerical class holds live workers of {owners} distinct owners with "
             f"{training.dataset} (profile {training.profile}, {training.threads} thread(s)) after {timeout:.0f} s. "
             f"Replicas of a job only go to workers of one class, since only they compute the same bits."]
    lines += ["Eligible workers by class:"] + (["  " + line for line in class_table(members)] or ["  none"])
    excluded = [f"  {name}: {ineligibility(record, enrollments.get(name), training)}"
                for name, record in sorted(heartbeats.items()) if name not in members]
    if excluded:
        lines += ["Live workers that are not eligible:"] + excluded
    hint = "Start more workers of one class (celery -A tasks worker -n NAME@%h) and enroll them (orchestrator " \
           "workers enroll NAME PUBLIC_KEY --owner OWNER), or lower --replicas and --quorum"
    if training.profile == "default" and len(classes(members)) > 1:
        hint += "; --profile portable puts x86-64 CPUs with different instruction sets into one class"
    return "\n".join(lines + [hint + "."])
