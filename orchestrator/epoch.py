"""One epoch: place S x R replicas, collect verified results by deadline, re-issue, reach quorum."""

from __future__ import annotations

import json
import logging
import random
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from config.settings import FarmSettings, TrainingSettings
from model.numerics import class_id, describe
from model.weights import StateDict
from orchestrator.assignment import choose_class, choose_workers
from orchestrator.client import FarmClient
from orchestrator.errors import QuorumError
from orchestrator.progress import Progress
from orchestrator.quorum import FAILED, LOST, REJECTED, TIMED_OUT, Replica, SegmentVote
from orchestrator.identity import OrchestratorIdentity
from orchestrator.ledger import Ledger
from orchestrator.referee import Referee
from orchestrator.registry import Registry
from orchestrator.staffing import Member, eligible_workers, wait_for_workers
from orchestrator.verify import EpochContext, Rejection, WeightsVerifier, check_binding
from protocol.crypto import CryptoError, parse_public_key
from protocol.envelope import open_result, sign_job, verify_result
from protocol.messages import Job, ProtocolError, Result

logger = logging.getLogger(__name__)

HEARTBEAT_CHECK_INTERVAL = 1.0  # seconds between liveness checks of workers with pending replicas
STRAGGLER_SAMPLES = 50  # recent job times the straggler threshold is the median of
STRAGGLER_MIN_SAMPLES = 2


@dataclass
class RejectedResult:
    """A result that did not count, kept as data for the metrics and the log."""

    assignment_id: str
    worker: str
    segment: int | None
    reason: str


@dataclass
class EpochOutcome:
    """The decisions of one epoch: an accepted (digest, loss, voters) per segment, and every failure."""

    accepted: dict[int, tuple[str, float, list[str]]]
    states: dict[int, StateDict]
    replicas: dict[int, list[dict]]  # segment -> every replica issued, with its worker and outcome
    disagreements: int
    reissues: int
    rejected: list[RejectedResult] = field(default_factory=list)
    failed: list[RejectedResult] = field(default_factory=list)
    arbitrated: list[int] = field(default_factory=list)  # segments the orchestrator decided by re-execution
    speculative: int = 0  # replicas issued because another replica of the same job straggled
    accepted_bits: dict[int, str] = field(default_factory=dict)  # segment -> loss bits of the decision
    classes: dict[int, str] = field(default_factory=dict)  # segment -> numerical class of its replicas


class EpochRunner:
    """Run the epochs of one run against live workers."""

    def __init__(
        self,
        *,
        client: FarmClient,
        run_id: str,
        training: TrainingSettings,
        farm: FarmSettings,
        data_digests: list[str],
        verifier: WeightsVerifier,
        identity: OrchestratorIdentity,
        registry: Registry,
        ledger: Ledger,
        referee: Referee | None = None,
        rng: random.Random | None = None,
        on_change: Callable[[int, dict[int, SegmentVote]], None] = lambda epoch, votes: None,
    ) -> None:
        self.identity = identity
        self.registry = registry
        self.ledger = ledger
        self.referee = referee  # None: a segment without a quorum stops the run instead
        self.rng = rng or random.SystemRandom()
        self._durations: list[float] = []  # worker-reported seconds of recent valid results
        self._finished_weights: list[str] = []  # store keys of the last finished epoch's replica weights
        self.client = client
        self.run_id = run_id
        self.training = training
        self.farm = farm
        self.data_digests = data_digests
        self.verifier = verifier
        self.on_change = on_change
        self.reply_key = f"farm:results:{run_id}"

    # --- placement -------------------------------------------------------------

    def _eligible(self) -> dict[str, Member]:
        return eligible_workers(self.client.live_workers(), self.registry.load(), self.training)

    def _issue(self, vote: SegmentVote, count: int, *, epoch: int, base_digest: str, eligible: dict[str, Member]) -> int:
        """Place `count` more replicas of a job on workers of its class; return how many were placed.

        A job's first replicas choose its numerical class; later ones stay in that class.
        """
        pending_load = Counter(
            replica.worker for other in self._votes.values() for replica in other.pending()
        )
        if vote.klass is None:
            vote.klass = choose_class({w: (m.owner, m.klass) for w, m in eligible.items()}, count=count,
                                      load=pending_load, rng=self.rng)
        workers = choose_workers(
            {w: m.owner for w, m in eligible.items() if m.klass == vote.klass}, count=count,
            exclude_workers=vote.workers(), exclude_owners=vote.owners(), load=pending_load, rng=self.rng,
        )
        now_wall, now = time.time(), time.monotonic()
        for worker in workers:
            queue_depth = pending_load[worker] + 1  # jobs ahead of this one on the worker, plus itself
            budget = self.farm.job_timeout * queue_depth
            job = sign_job(Job(
                run_id=self.run_id, epoch=epoch, segment=vote.segment,
                assignment_id=secrets.token_hex(16), worker=worker,
                base_digest=base_digest, data_digest=self.data_digests[vote.segment],
                training=self.training.to_dict(), reply_to=self.reply_key,
                issued_at=now_wall, expires_at=now_wall + budget,
            ), self.identity.signing)
            vote.add(Replica(job.assignment_id, worker, eligible[worker].owner, vote.segment,
                             issued_at=now_wall, deadline=now + budget, queue_depth=queue_depth))
            self.client.send(job, time_limit=self.farm.job_timeout, expires_in=budget)
            pending_load[worker] += 1
            logger.debug("issued segment %d to %s as %s", vote.segment, worker, job.assignment_id)
        return len(workers)

    # --- one epoch -------------------------------------------------------------

    def start_epoch(self, epoch: int, base_digest: str, restored: dict[int, dict] | None = None) -> None:
        """Place R replicas of every segment of `epoch` on workers of distinct owners.

        `restored` maps segments that a stopped orchestrator had accepted in this epoch to their
        ledger entries. Their votes are rebuilt from the signed results, and they get no replicas.
        """
        restored = restored or {}
        self._context = EpochContext(self.run_id, epoch, base_digest)
        self._votes = {k: SegmentVote(k, self.farm.quorum) for k in range(self.training.segments)}
        self._rejected: list[RejectedResult] = []
        self._failed: list[RejectedResult] = []
        self._reissues = Counter()
        self._arbitrated_losses: dict[int, float] = {}
        self._speculative = 0

        eligible = wait_for_workers(self.client, self.registry, training=self.training,
                                    owners=self.farm.replicas, timeout=self.farm.worker_wait)
        # The keys that count this epoch; the ledger records them so that an audit can check each vote.
        self._enrolled = {name: e for name, e in self.registry.load().items() if not e.revoked}
        self.ledger.append("epoch_started", {
            "epoch": epoch, "base_digest": base_digest,
            "workers": {name: {"public_key": e.public_key, "owner": e.owner} for name, e in self._enrolled.items()},
            "restored_segments": sorted(restored),
            "classes": {name: member.klass for name, member in eligible.items()},
        })
        for segment, accepted in restored.items():
            self._restore(self._votes[segment], accepted)
        for vote in self._votes.values():
            if not vote.restored:
                self._issue(vote, self.farm.replicas, epoch=epoch, base_digest=base_digest, eligible=eligible)
        self.on_change(epoch, self._votes)

    def _restore(self, vote: SegmentVote, accepted: dict) -> None:
        """Rebuild a decided vote from its ledger entry, whose weights the caller has verified."""
        for voter in accepted["voters"]:
            result = voter["result"]
            replica = Replica(result["assignment_id"], voter["worker"], voter["owner"], vote.segment,
                              issued_at=time.time(), deadline=time.monotonic(), weights_key=result["weights_key"])
            vote.add(replica)
            vote.record_agreeable(replica.assignment_id, result["weights_digest"], result["loss"],
                                  result["loss_bits"], signed_result=result)
            vote.klass = class_id(result["environment"])
        vote.restored = True
        logger.info("segment %d keeps the weights %s it accepted before the orchestrator stopped",
                    vote.segment, accepted["weights_digest"][:12])

    def finish_epoch(self, progress: Progress | None = None) -> EpochOutcome:
        """Collect results of the started epoch until every segment is decided, re-issuing where needed."""
        progress = progress or Progress()
        context = self._context
        progress.add(sum(len(vote.replicas) for vote in self._votes.values()))

        next_liveness_check = time.monotonic() + HEARTBEAT_CHECK_INTERVAL
        while any(vote.decision is None for vote in self._votes.values()):
            changed = False
            raw = self.client.pop_reply(self.reply_key, timeout=self._time_to_next_deadline(next_liveness_check))
            if raw is not None:
                changed |= self._handle_reply(raw, context, progress)
            now = time.monotonic()
            changed |= self._expire_overdue(now, progress)
            if now >= next_liveness_check:
                changed |= self._expire_lost_workers(progress)
                self._speculate(context.epoch, context.base_digest, progress)
                next_liveness_check = now + HEARTBEAT_CHECK_INTERVAL
            if changed:
                self._reissue_where_short(context.epoch, context.base_digest, self._reissues, progress)
                self.on_change(context.epoch, self._votes)

        # Replies already waiting are late or redundant; record them with this epoch, not the next.
        while (raw := self.client.pop_reply_nowait(self.reply_key)) is not None:
            self._handle_reply(raw, context, progress)

        # Revoke replicas of decided segments, so their workers are free for the next epoch.
        self.client.revoke([r.assignment_id for vote in self._votes.values() for r in vote.pending()])
        self._record_standing(context.epoch)
        outcome = self._outcome(self._reissues)
        self._record_decisions()
        # Replica weights stay in the store until the aggregate is durable, so a resumed run can reuse them.
        self._finished_weights = [r.weights_key for vote in self._votes.values() for r in vote.replicas.values()
                                  if r.weights_key]
        return outcome

    def delete_replica_weights(self) -> None:
        """Delete the stored replica weights of the last finished epoch."""
        self.client.store.delete(self._finished_weights)
        self._finished_weights = []

    def _time_to_next_deadline(self, next_liveness_check: float) -> float:
        deadlines = [r.deadline for vote in self._votes.values() for r in vote.pending()]
        return max(0.0, min(deadlines + [next_liveness_check]) - time.monotonic())

    def _handle_reply(self, raw: bytes, context: EpochContext, progress: Progress) -> bool:
        """Open, authenticate and verify one reply, and count it; return whether any vote changed."""
        try:
            result = open_result(json.loads(raw), self.identity.sealing)
        except (ValueError, ProtocolError, CryptoError) as error:
            self._reject("?", "?", None, f"malformed result: {error}")
            return False
        vote = self._votes.get(result.segment)
        try:
            self._authenticate(result)
            replica = check_binding(result, vote.replicas.get(result.assignment_id) if vote else None, context)
        except Rejection as rejection:
            self._reject(result.assignment_id, result.worker, result.segment, rejection.reason)
            return False  # an unbound result touches no vote

        if result.status == "error":
            self._fail(vote, replica, FAILED, f"worker reported an error: {result.error}", progress)
            return True
        replica.weights_key = result.weights_key
        try:
            result_class = class_id(result.environment)
            if result_class != vote.klass:
                raise Rejection(f"numerical class {result_class} ({describe(result.environment)}) "
                                f"differs from the job's class {vote.klass}")
            self.verifier.verify(result.weights_key, result.weights_digest)
        except Rejection as rejection:
            # The assignment is used up: each assignment counts once, even when its result is rejected.
            self._reject(result.assignment_id, result.worker, result.segment, rejection.reason)
            vote.record_failure(replica.assignment_id, REJECTED, rejection.reason)
            progress.advance()
            return True
        vote.record_agreeable(replica.assignment_id, result.weights_digest, result.loss, result.loss_bits,
                              signed_result=result.to_message())
        self._durations = (self._durations + [result.seconds])[-STRAGGLER_SAMPLES:]
        progress.advance()
        return True

    def _record_standing(self, epoch: int) -> None:
        """Credit the voters of each decision; strike workers that were outvoted or sent invalid weights."""
        self.registry.record_valid([worker for vote in self._votes.values() for worker in vote.voters()])
        for vote in self._votes.values():
            losers = [(r, "outvoted") for r in vote.dissenters()]
            losers += [(r, f"invalid result: {r.reason}") for r in vote.replicas.values() if r.status == REJECTED]
            for replica, why in losers:
                reason = f"epoch {epoch} segment {vote.segment} assignment {replica.assignment_id}: {why}"
                logger.warning("strike for worker %s: %s", replica.worker, reason)
                if self.registry.add_strike(replica.worker, reason):
                    logger.warning("worker %s quarantined after %d strikes", replica.worker, self.registry.max_strikes)

    def _record_decisions(self) -> None:
        """Append each accepted segment with its voters' signed results to the ledger."""
        for vote in self._votes.values():
            if vote.restored:
                continue  # the ledger has recorded it already
            digest, bits = vote.decision
            voters = [r for r in vote.replicas.values() if (r.weights_digest, r.loss_bits) == (digest, bits)]
            self.ledger.append("segment_accepted", {
                "segment": vote.segment, "weights_digest": digest, "loss_bits": bits, "class": vote.klass,
                "loss": self._arbitrated_losses.get(vote.segment, voters[0].loss if voters else None),
                "arbitrated": vote.arbitrated is not None,
                "voters": [{"worker": r.worker, "owner": r.owner, "public_key": self._enrolled[r.worker].public_key,
                            "result": r.signed_result} for r in voters],
            })

    def _authenticate(self, result: Result) -> None:
        """Raise Rejection unless an enrolled, unrevoked worker signed `result` with its enrolled key."""
        current = self.registry.load().get(result.worker)
        if current is None:
            raise Rejection(f"worker {result.worker} is not enrolled")
        if current.revoked:
            raise Rejection(f"worker {result.worker} is revoked")
        enrollment = self._enrolled.get(result.worker)
        if enrollment is None:
            raise Rejection(f"worker {result.worker} was not enrolled when epoch {self._context.epoch} started")
        try:
            verify_result(result, parse_public_key(enrollment.public_key))
        except CryptoError as error:
            raise Rejection(f"invalid signature: {error}") from None

    def _reject(self, assignment_id: str, worker: str, segment: int | None, reason: str) -> None:
        logger.warning("rejected result: assignment %s worker %s segment %s: %s", assignment_id, worker, segment, reason)
        self._rejected.append(RejectedResult(assignment_id, worker, segment, reason))
        self.ledger.append("result_rejected", {"epoch": self._context.epoch, "segment": segment,
                                               "assignment_id": assignment_id, "worker": worker, "reason": reason})

    def _fail(self, vote: SegmentVote, replica: Replica, status: str, reason: str, progress: Progress) -> None:
        logger.warning(
            "replica %s: assignment %s worker %s segment %d: %s",
            status, replica.assignment_id, replica.worker, vote.segment, reason,
        )
        vote.record_failure(replica.assignment_id, status, reason)
        self._failed.append(RejectedResult(replica.assignment_id, replica.worker, vote.segment, reason))
        self.ledger.append("replica_failed", {"epoch": self._context.epoch, "segment": vote.segment, "status": status,
                                              "assignment_id": replica.assignment_id, "worker": replica.worker,
                                              "reason": reason})
        progress.advance()

    def _expire_overdue(self, now: float, progress: Progress) -> bool:
        overdue = [(v, r) for v in self._votes.values() for r in v.pending() if now >= r.deadline]
        for vote, replica in overdue:
            self._fail(vote, replica, TIMED_OUT, "no result before the job deadline", progress)
        return bool(overdue)

    def _expire_lost_workers(self, progress: Progress) -> bool:
        pending = [(v, r) for v in self._votes.values() for r in v.pending()]
        if not pending:
            return False
        live = self.client.live_workers()
        lost = [(v, r) for v, r in pending if r.worker not in live]
        for vote, replica in lost:
            self._fail(vote, replica, LOST, "worker lost: its heartbeat expired", progress)
        return bool(lost)

    def _reissue_where_short(self, epoch: int, base_digest: str, reissues: Counter, progress: Progress) -> None:
        eligible = None
        for vote in self._votes.values():
            shortfall = vote.shortfall()
            if not shortfall:
                continue
            if reissues[vote.segment] + shortfall > self.farm.max_reissues:
                self._settle_dispute(epoch, base_digest, vote, f"the re-issue limit ({self.farm.max_reissues}) is reached")
                continue
            eligible = eligible if eligible is not None else self._eligible()
            issued = self._issue(vote, shortfall, epoch=epoch, base_digest=base_digest, eligible=eligible)
            if issued < shortfall:
                in_class = [w for w, m in eligible.items() if m.klass == vote.klass]
                self._settle_dispute(epoch, base_digest, vote,
                                     f"no fresh live worker is left in class {vote.klass} ({len(in_class)} live: "
                                     f"{', '.join(in_class) or 'none'})")
                continue
            reissues[vote.segment] += issued
            progress.add(issued)
            logger.info("re-issued segment %d of epoch %d to %d more worker(s)", vote.segment, epoch, issued)

    def _speculate(self, epoch: int, base_digest: str, progress: Progress) -> None:
        """Re-issue replicas running past `straggler_factor` median job times to an idle worker.

        The first valid result counts; the slower replica is revoked when the segment is decided.
        A replica that has not started yet is timed from when it was issued, against the threshold
        times the number of jobs that were queued on its worker.
        """
        factor = self.farm.straggler_factor
        if factor <= 0 or len(self._durations) < STRAGGLER_MIN_SAMPLES:
            return
        threshold = factor * statistics.median(self._durations)
        candidates = [(v, r) for v in self._votes.values() if v.decision is None for r in v.pending()
                      if not r.speculated]
        if not candidates:
            return
        started = self.client.started_at([r.assignment_id for _, r in candidates])
        now = time.time()
        busy = {r.worker for v in self._votes.values() for r in v.pending()}
        eligible = None
        for vote, replica in candidates:
            if replica.assignment_id in started:
                running, limit = now - started[replica.assignment_id], threshold
            else:
                running, limit = now - replica.issued_at, threshold * replica.queue_depth
            if running <= limit:
                continue
            eligible = eligible if eligible is not None else self._eligible()
            idle = {w: m for w, m in eligible.items() if w not in busy}
            if not self._issue(vote, 1, epoch=epoch, base_digest=base_digest, eligible=idle):
                continue
            replica.speculated = True
            self._speculative += 1
            progress.add(1)
            busy |= vote.workers()
            logger.info("speculatively re-issued segment %d of epoch %d: replica %s on %s has run %.1f s, "
                        "%.1f times the median job time", vote.segment, epoch, replica.assignment_id,
                        replica.worker, running, running / statistics.median(self._durations))
            self.ledger.append("speculative_reissue", {"epoch": epoch, "segment": vote.segment,
                                                       "straggler": replica.assignment_id, "worker": replica.worker})

    def _settle_dispute(self, epoch: int, base_digest: str, vote: SegmentVote, cause: str) -> None:
        """Re-execute an undecided job here and accept that result; without a referee, stop the run."""
        if self.referee is None:
            raise QuorumError(self._no_quorum_message(epoch, vote, cause))
        if self.referee.klass != vote.klass:
            raise QuorumError(self._no_quorum_message(
                epoch, vote, f"{cause}, and the orchestrator cannot settle it: its own numerical class "
                             f"{self.referee.klass} differs from the job's class {vote.klass}"))
        logger.warning("segment %d of epoch %d has no quorum (%s); re-executing it in the orchestrator",
                       vote.segment, epoch, cause)
        verdict = self.referee.train(epoch, vote.segment, base_digest)
        self.verifier.remember(verdict.weights_digest, verdict.state_dict)
        vote.arbitrate(verdict.weights_digest, verdict.loss_bits)
        self._arbitrated_losses[vote.segment] = verdict.loss
        self.client.revoke([r.assignment_id for r in vote.pending()])

    def spot_check(self, epoch: int, base_digest: str, outcome: EpochOutcome, fraction: float) -> list[int]:
        """Re-execute a random `fraction` of the accepted segments; return those whose result differs."""
        if self.referee is None or fraction <= 0:
            return []
        failed = []
        for segment, (digest, loss, voters) in sorted(outcome.accepted.items()):
            if segment in outcome.arbitrated or self.rng.random() >= fraction:
                continue
            if self._votes[segment].klass != self.referee.klass:
                logger.warning("epoch %d segment %d: no spot check, the job's numerical class %s differs from the "
                               "orchestrator's %s", epoch, segment, self._votes[segment].klass, self.referee.klass)
                continue
            verdict = self.referee.train(epoch, segment, base_digest)
            matches = verdict.weights_digest == digest and verdict.loss_bits == outcome.accepted_bits[segment]
            self.ledger.append("spot_check", {"epoch": epoch, "segment": segment, "accepted_digest": digest,
                                              "orchestrator_digest": verdict.weights_digest, "match": matches,
                                              "voters": voters})
            if not matches:
                failed.append(segment)
                for worker in voters:
                    reason = f"epoch {epoch} segment {segment}: spot check found weights {digest[:12]} wrong"
                    logger.warning("quarantining worker %s: %s", worker, reason)
                    self.registry.quarantine(worker, reason)
        return failed

    def _no_quorum_message(self, epoch: int, vote: SegmentVote, cause: str) -> str:
        lines = [f"segment {vote.segment} of epoch {epoch} cannot reach a quorum of {vote.quorum}: {cause}. Replicas:"]
        for replica in vote.replicas.values():
            detail = f"weights {replica.weights_digest[:16]} loss {replica.loss!r}" if replica.weights_digest else replica.reason
            lines.append(f"  {replica.assignment_id} on {replica.worker}: {replica.status}: {detail}")
        lines.append("Start more workers or raise --max-reissues, then run again.")
        return "\n".join(lines)

    def _outcome(self, reissues: Counter) -> EpochOutcome:
        accepted, states, bits_of = {}, {}, {}
        for segment, vote in self._votes.items():
            digest, bits = vote.decision
            if segment in self._arbitrated_losses:
                loss = self._arbitrated_losses[segment]
            else:
                loss = next(r.loss for r in vote.replicas.values() if (r.weights_digest, r.loss_bits) == (digest, bits))
            accepted[segment] = (digest, loss, vote.voters())
            bits_of[segment] = bits
            states[segment] = self.verifier.state_dict(digest)
        return EpochOutcome(
            accepted=accepted,
            states=states,
            replicas={k: [r.summary() for r in vote.replicas.values()] for k, vote in self._votes.items()},
            disagreements=sum(vote.disagreement for vote in self._votes.values()),
            reissues=sum(reissues.values()),
            rejected=self._rejected,
            failed=self._failed,
            arbitrated=sorted(self._arbitrated_losses),
            speculative=self._speculative,
            accepted_bits=bits_of,
            classes={k: vote.klass for k, vote in self._votes.items()},
        )
