"""The orchestrator's own, trusted re-execution of a job: the last word in disputes and spot checks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from config.settings import TrainingSettings
from model.engine import Engine
from model.numerics import class_id, job_environment
from model.weights import Spec, StateDict, decode_verified
from protocol.messages import loss_bits
from protocol.store import WeightStore, base_weights_key

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """The orchestrator's result for one job."""

    weights_digest: str
    loss: float
    loss_bits: str
    state_dict: StateDict


class Referee:
    """Train a segment job in a CPU engine of the run's profile, exactly as an honest worker would.

    Its verdict only means something for jobs of its own numerical class, `klass`. The
    engine starts on first use and keeps its own copy of torch and the data.
    """

    def __init__(self, *, training: TrainingSettings, data_root: str, data_digests: list[str], store: WeightStore,
                 spec: Spec) -> None:
        self.training = training
        self.data_root = data_root
        self.data_digests = data_digests
        self.store = store
        self.spec = spec
        self.engine = Engine(training.profile, "cpu")
        self._klass: str | None = None

    @property
    def klass(self) -> str:
        """The numerical class of the orchestrator's re-executions for this run."""
        if self._klass is None:
            environment = job_environment(self.engine.fingerprint(), threads=self.training.threads,
                                          allow_tf32=self.training.allow_tf32)
            self._klass = class_id(environment)
        return self._klass

    def train(self, epoch: int, segment: int, base_digest: str) -> Verdict:
        started = time.monotonic()
        reply, blob = self.engine.train(
            root=self.data_root, training=self.training.to_dict(), epoch=epoch, segment=segment,
            base_digest=base_digest, base_blob=self.store.get(base_weights_key(base_digest)),
            data_digest=self.data_digests[segment],
        )
        state = decode_verified(blob, reply["weights_digest"], self.spec)
        logger.info("re-executed epoch %d segment %d: weights %s in %.1f s",
                    epoch, segment, reply["weights_digest"][:12], time.monotonic() - started)
        loss = float(reply["loss"])
        return Verdict(reply["weights_digest"], loss, loss_bits(loss), state)

    def close(self) -> None:
        self.engine.close()
