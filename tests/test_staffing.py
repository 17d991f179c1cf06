"""Class-aware placement and the staffing check, as pure logic over heartbeat records."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from config.settings import TrainingSettings
from model.numerics import class_id, job_environment
from orchestrator.assignment import choose_class
from orchestrator.errors import StaffingError
from orchestrator.registry import Enrollment
from orchestrator.staffing import classes, eligible_workers, ineligibility, staffed_classes, wait_for_workers

AVX512 = {"profile": "default", "torch": "2.14.1", "device": "cpu", "cpu_capability": "AVX512"}
AVX2 = {**AVX512, "cpu_capability": "AVX2"}
PORTABLE = {"profile": "portable", "torch": "2.14.1", "device": "cpu", "cpu_capability": "DEFAULT"}


def heartbeat(name: str, default_print: dict, **extra) -> dict:
    return {"worker": name, "public_key": f"key-{name}", "health": "ok", "datasets": {"mnist": True},
            "environments": {"default": default_print, "portable": PORTABLE}, **extra}


def enrollment(name: str, owner: str) -> Enrollment:
    return Enrollment(public_key=f"key-{name}", owner=owner, enrolled_at=0.0)


def klass(fingerprint: dict, threads: int = 1) -> str:
    return class_id(job_environment(fingerprint, threads=threads, allow_tf32=False))


FARM = {"w1": ("alice", AVX512), "w2": ("bob", AVX512), "w3": ("carol", AVX2), "w4": ("dave", AVX2),
        "w5": ("erin", AVX2)}
HEARTBEATS = {name: heartbeat(name, fingerprint) for name, (_, fingerprint) in FARM.items()}
ENROLLMENTS = {name: enrollment(name, owner) for name, (owner, _) in FARM.items()}


def test_members_carry_the_class_of_the_runs_settings():
    members = eligible_workers(HEARTBEATS, ENROLLMENTS, TrainingSettings())
    assert {name: member.klass for name, member in members.items()} == {
        "w1": klass(AVX512), "w2": klass(AVX512), "w3": klass(AVX2), "w4": klass(AVX2), "w5": klass(AVX2)}
    threaded = eligible_workers(HEARTBEATS, ENROLLMENTS, TrainingSettings(threads=2))
    assert threaded["w1"].klass == klass(AVX512, threads=2) != members["w1"].klass
    portable = eligible_workers(HEARTBEATS, ENROLLMENTS, TrainingSettings(profile="portable"))
    assert len(classes(portable)) == 1  # every worker shares the portable class


def test_worker_without_a_fingerprint_is_not_eligible():
    record = heartbeat("w1", AVX512)
    del record["environments"]["portable"]
    assert ineligibility(record, ENROLLMENTS["w1"], TrainingSettings(profile="portable")) == (
        "no numerical fingerprint for profile portable (update the worker)")
    assert ineligibility(record, ENROLLMENTS["w1"], TrainingSettings()) is None


def test_staffed_classes_count_distinct_owners():
    members = eligible_workers(HEARTBEATS, ENROLLMENTS, TrainingSettings())
    assert staffed_classes(members, 2) == [klass(AVX2), klass(AVX512)]
    assert staffed_classes(members, 3) == [klass(AVX2)]
    assert staffed_classes(members, 4) == []
    same_owner = {**ENROLLMENTS, "w4": enrollment("w4", "carol"), "w5": enrollment("w5", "carol")}
    assert staffed_classes(eligible_workers(HEARTBEATS, same_owner, TrainingSettings()), 2) == [klass(AVX512)]


def test_choose_class_prefers_full_staffing():
    members = {"w1": ("alice", "x"), "w2": ("bob", "y"), "w3": ("carol", "y")}
    for seed in range(20):
        assert choose_class(members, count=2, load=Counter(), rng=random.Random(seed)) == "y"


def test_choose_class_balances_load():
    members = {"w1": ("alice", "x"), "w2": ("bob", "x"), "w3": ("carol", "y"), "w4": ("dave", "y")}
    assert choose_class(members, count=2, load=Counter({"w1": 1, "w2": 1})) == "y"
    picks = {choose_class(members, count=2, load=Counter(), rng=random.Random(seed)) for seed in range(40)}
    assert picks == {"x", "y"}
    assert choose_class({}, count=2, load=Counter()) is None


class StubClient:
    """Stands in for FarmClient: returns fixed heartbeats."""

    def __init__(self, heartbeats: dict) -> None:
        self.heartbeats = heartbeats

    def live_workers(self) -> dict:
        return self.heartbeats


class StubRegistry:
    def __init__(self, enrollments: dict) -> None:
        self.enrollments = enrollments

    def load(self) -> dict:
        return self.enrollments


def test_staffing_check_lists_classes_with_their_counts():
    heartbeats = {**HEARTBEATS, "w6": heartbeat("w6", AVX512, health="unhealthy: no dataset")}
    enrollments = {**ENROLLMENTS, "w6": enrollment("w6", "frank")}
    with pytest.raises(StaffingError) as caught:
        wait_for_workers(StubClient(heartbeats), StubRegistry(enrollments), training=TrainingSettings(), owners=4,
                         timeout=0.01)
    message = caught.value.message
    assert "no numerical class holds live workers of 4 distinct owners with mnist (profile default, 1 thread(s))" \
        in message
    assert f"class {klass(AVX2)} (cpu AVX2, torch 2.14.1, profile default, 1 thread(s)): 3 worker(s) of 3 owner(s): " \
           "w3 (owner carol), w4 (owner dave), w5 (owner erin)" in message
    assert f"class {klass(AVX512)} (cpu AVX512, torch 2.14.1, profile default, 1 thread(s)): 2 worker(s) of " \
           "2 owner(s)" in message
    assert "w6: unhealthy: no dataset" in message
    assert "--profile portable puts x86-64 CPUs with different instruction sets into one class" in message


def test_staffing_check_passes_when_one_class_suffices():
    members = wait_for_workers(StubClient(HEARTBEATS), StubRegistry(ENROLLMENTS), training=TrainingSettings(),
                               owners=3, timeout=0.01)
    assert sorted(members) == ["w1", "w2", "w3", "w4", "w5"]
    members = wait_for_workers(StubClient(HEARTBEATS), StubRegistry(ENROLLMENTS),
                               training=TrainingSettings(profile="portable"), owners=5, timeout=0.01)
    assert len({member.klass for member in members.values()}) == 1
