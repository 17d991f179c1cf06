"""Vote counting per segment and placement of replicas on distinct workers."""

from collections import Counter

import pytest

from orchestrator.assignment import choose_workers
from orchestrator.quorum import FAILED, Replica, SegmentVote

D1, D2 = "1" * 64, "2" * 64


def vote_with(workers, quorum=2) -> SegmentVote:
    vote = SegmentVote(segment=0, quorum=quorum)
    for index, worker in enumerate(workers):
        vote.add(Replica(f"a{index}", worker, 0, issued_at=0.0, deadline=100.0))
    return vote


def test_quorum_reached_on_identical_results():
    vote = vote_with(["w1", "w2"])
    vote.record_agreeable("a0", D1, 0.5, "bits")
    assert vote.decision is None
    vote.record_agreeable("a1", D1, 0.5, "bits")
    assert vote.decision == (D1, "bits")
    assert vote.voters() == ["w1", "w2"]


def test_same_weights_different_loss_disagree():
    vote = vote_with(["w1", "w2"])
    vote.record_agreeable("a0", D1, 0.5, "bits-a")
    vote.record_agreeable("a1", D1, 0.6, "bits-b")
    assert vote.decision is None
    assert vote.disagreement


def test_disagreement_needs_one_more_replica():
    vote = vote_with(["w1", "w2"])
    vote.record_agreeable("a0", D1, 0.5, "bits")
    vote.record_agreeable("a1", D2, 0.5, "bits")
    assert vote.shortfall() == 1


def test_failure_needs_replacement():
    vote = vote_with(["w1", "w2"])
    vote.record_failure("a0", FAILED, "dataset mismatch")
    assert vote.shortfall() == 1


def test_pending_replicas_cover_shortfall():
    vote = vote_with(["w1", "w2"])
    vote.record_agreeable("a0", D1, 0.5, "bits")
    assert vote.shortfall() == 0


def test_assignment_counts_once():
    vote = vote_with(["w1", "w2"])
    vote.record_agreeable("a0", D1, 0.5, "bits")
    with pytest.raises(ValueError, match="already counted"):
        vote.record_agreeable("a0", D1, 0.5, "bits")


def test_worker_gets_one_replica_per_segment():
    vote = vote_with(["w1"])
    with pytest.raises(ValueError, match="already has a replica"):
        vote.add(Replica("a9", "w1", 0, issued_at=0.0, deadline=1.0))


def test_choose_distinct_least_loaded_workers():
    chosen = choose_workers(["w1", "w2", "w3"], count=2, exclude=set(), load=Counter({"w1": 2}))
    assert sorted(chosen) == ["w2", "w3"]


def test_choose_excludes_workers_of_the_job():
    chosen = choose_workers(["w1", "w2", "w3"], count=2, exclude={"w2"}, load=Counter())
    assert sorted(chosen) == ["w1", "w3"]


def test_choose_returns_fewer_when_short():
    assert choose_workers(["w1"], count=2, exclude=set(), load=Counter()) == ["w1"]


def test_choose_rotates_ties_by_offset():
    first = choose_workers(["w1", "w2", "w3"], count=1, exclude=set(), load=Counter(), offset=0)
    second = choose_workers(["w1", "w2", "w3"], count=1, exclude=set(), load=Counter(), offset=1)
    assert first != second
