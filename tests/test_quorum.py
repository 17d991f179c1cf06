"""Vote counting per segment by owner, and placement of replicas on distinct workers and owners."""

import random
from collections import Counter

import pytest

from orchestrator.assignment import choose_workers
from orchestrator.quorum import FAILED, Replica, SegmentVote

D1, D2 = "1" * 64, "2" * 64


def vote_with(workers, owners=None, quorum=2) -> SegmentVote:
    vote = SegmentVote(segment=0, quorum=quorum)
    for index, worker in enumerate(workers):
        owner = owners[index] if owners else f"owner-{worker}"
        vote.add(Replica(f"a{index}", worker, owner, 0, issued_at=0.0, deadline=100.0))
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


def test_dissenters_are_the_outvoted():
    vote = vote_with(["w1", "w2", "w3"])
    vote.record_agreeable("a0", D1, 0.5, "bits")
    vote.record_agreeable("a1", D2, 0.5, "bits")
    vote.record_agreeable("a2", D1, 0.5, "bits")
    assert [replica.worker for replica in vote.dissenters()] == ["w2"]


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
        vote.add(Replica("a9", "w1", "other", 0, issued_at=0.0, deadline=1.0))


def test_owner_gets_one_replica_per_segment():
    vote = vote_with(["w1"], owners=["alice"])
    with pytest.raises(ValueError, match="owner alice already has a replica"):
        vote.add(Replica("a9", "w2", "alice", 0, issued_at=0.0, deadline=1.0))


def test_choose_distinct_least_loaded_workers():
    owners = {"w1": "a", "w2": "b", "w3": "c"}
    chosen = choose_workers(owners, count=2, exclude_workers=set(), exclude_owners=set(), load=Counter({"w1": 2}))
    assert sorted(chosen) == ["w2", "w3"]


def test_choose_distinct_owners():
    owners = {"w1": "alice", "w2": "alice", "w3": "bob"}
    for seed in range(20):
        chosen = choose_workers(owners, count=2, exclude_workers=set(), exclude_owners=set(), load=Counter(),
                                rng=random.Random(seed))
        assert sorted(owners[w] for w in chosen) == ["alice", "bob"]


def test_choose_excludes_workers_and_owners_of_the_job():
    owners = {"w1": "a", "w2": "b", "w3": "c", "w4": "d"}
    chosen = choose_workers(owners, count=3, exclude_workers={"w2"}, exclude_owners={"c"}, load=Counter())
    assert sorted(chosen) == ["w1", "w4"]


def test_choose_returns_fewer_when_short():
    assert choose_workers({"w1": "a"}, count=2, exclude_workers=set(), exclude_owners=set(), load=Counter()) == ["w1"]


def test_choose_is_random_among_ties():
    owners = {f"w{i}": f"o{i}" for i in range(6)}
    picks = {choose_workers(owners, count=1, exclude_workers=set(), exclude_owners=set(), load=Counter(),
                            rng=random.Random(seed))[0] for seed in range(40)}
    assert len(picks) > 1
