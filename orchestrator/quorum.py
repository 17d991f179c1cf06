"""Per-segment vote counting: replicas, their outcomes, and agreement by (digest, loss bits)."""

from __future__ import annotations

from dataclasses import dataclass, field

PENDING = "pending"
AGREED = "ok"
FAILED = "failed"  # the worker reported an error
REJECTED = "rejected"  # the result failed verification
TIMED_OUT = "timed out"
LOST = "lost"  # the worker's heartbeat expired while the replica was pending


@dataclass
class Replica:
    """One assignment of a segment job to one worker, and what became of it."""

    assignment_id: str
    worker: str
    owner: str
    segment: int
    issued_at: float
    deadline: float  # monotonic seconds; past it a pending replica times out
    status: str = PENDING
    weights_digest: str = ""
    loss: float = 0.0
    loss_bits: str = ""
    reason: str = ""
    signed_result: dict | None = None  # the worker's signed result message, kept for the ledger
    weights_key: str = ""  # where the worker stored its sealed result weights
    speculated: bool = False  # a speculative copy of this straggling replica was issued
    queue_depth: int = 1  # jobs on its worker when it was issued, itself included

    def summary(self, *, reveal: bool = True) -> dict:
        """Return the replica as a dict; without `reveal`, its digest and loss are left out."""
        return {
            "assignment_id": self.assignment_id,
            "worker": self.worker,
            "owner": self.owner,
            "status": self.status,
            "weights_digest": self.weights_digest if reveal else "",
            "loss": self.loss if reveal else None,
            "reason": self.reason,
        }


@dataclass
class SegmentVote:
    """Replicas of one segment job; accepted once `quorum` distinct owners return the same bits."""

    segment: int
    quorum: int
    replicas: dict[str, Replica] = field(default_factory=dict)
    # (weights digest, loss bits) -> owners whose workers returned it; an owner counts once
    groups: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    arbitrated: tuple[str, str] | None = None  # the orchestrator's own result, when it had to decide
    restored: bool = False  # decided before the orchestrator stopped, and recorded in the ledger then
    klass: str | None = None  # numerical class of every replica, chosen when the first ones are placed

    def add(self, replica: Replica) -> None:
        if replica.worker in self.workers():
            raise ValueError(f"worker {replica.worker} already has a replica of segment {self.segment}")
        if replica.owner in self.owners():
            raise ValueError(f"owner {replica.owner} already has a replica of segment {self.segment}")
        self.replicas[replica.assignment_id] = replica

    def workers(self) -> set[str]:
        return {replica.worker for replica in self.replicas.values()}

    def owners(self) -> set[str]:
        return {replica.owner for replica in self.replicas.values()}

    def pending(self) -> list[Replica]:
        return [replica for replica in self.replicas.values() if replica.status == PENDING]

    def record_agreeable(self, assignment_id: str, weights_digest: str, loss: float, bits: str,
                         signed_result: dict | None = None) -> None:
        """Count a verified result as one vote of its owner for its (digest, loss bits) group."""
        replica = self._pending(assignment_id)
        replica.status, replica.weights_digest, replica.loss, replica.loss_bits = AGREED, weights_digest, loss, bits
        replica.signed_result = signed_result
        self.groups.setdefault((weights_digest, bits), set()).add(replica.owner)

    def record_failure(self, assignment_id: str, status: str, reason: str) -> None:
        replica = self._pending(assignment_id)
        replica.status, replica.reason = status, reason

    def _pending(self, assignment_id: str) -> Replica:
        replica = self.replicas[assignment_id]
        if replica.status != PENDING:
            raise ValueError(f"assignment {assignment_id} was already counted ({replica.status})")
        return replica

    @property
    def decision(self) -> tuple[str, str] | None:
        """Return the (digest, loss bits) that reached the quorum or that the orchestrator decided, if any."""
        if self.arbitrated is not None:
            return self.arbitrated
        for key, voters in self.groups.items():
            if len(voters) >= self.quorum:
                return key
        return None

    @property
    def disagreement(self) -> bool:
        return len(self.groups) > 1

    def arbitrate(self, weights_digest: str, bits: str) -> None:
        """Decide the segment by the orchestrator's own result, whatever the workers returned."""
        self.arbitrated = (weights_digest, bits)

    def shortfall(self) -> int:
        """Return how many more replicas the segment needs so that a quorum is still reachable."""
        if self.decision is not None:
            return 0
        largest = max((len(voters) for voters in self.groups.values()), default=0)
        return max(0, self.quorum - largest - len(self.pending()))

    def voters(self) -> list[str]:
        """Return the workers whose results match the decision."""
        decision = self.decision
        if decision is None:
            return []
        return sorted(r.worker for r in self.replicas.values() if (r.weights_digest, r.loss_bits) == decision)

    def dissenters(self) -> list[Replica]:
        """Return the replicas whose verified results differ from the decision."""
        decision = self.decision
        return [r for r in self.replicas.values()
                if r.status == AGREED and decision is not None and (r.weights_digest, r.loss_bits) != decision]
