"""The orchestrator's own, trusted re-execution of a job: the last word in disputes and spot checks."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from config.settings import TrainingSettings
from model.training import configure_torch, job_seed, train_segment
from model.weights import Spec, StateDict, decode_verified, state_dict_digest
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
    """Train a segment job in this process, exactly as an honest worker would."""

    def __init__(self, *, training: TrainingSettings, segments: list[torch.Tensor], store: WeightStore,
                 spec: Spec) -> None:
        self.training = training
        self.segments = segments  # uint8 images of each segment, as the workers hold them
        self.store = store
        self.spec = spec

    def train(self, epoch: int, segment: int, base_digest: str) -> Verdict:
        started = time.monotonic()
        base = decode_verified(self.store.get(base_weights_key(base_digest)), base_digest, self.spec)
        configure_torch(self.training.threads)
        state, loss = train_segment(base, self.segments[segment], self.training,
                                    seed=job_seed(self.training.seed, epoch, segment))
        configure_torch(1)
        digest = state_dict_digest(state)
        logger.info("re-executed epoch %d segment %d: weights %s in %.1f s",
                    epoch, segment, digest[:12], time.monotonic() - started)
        return Verdict(digest, loss, loss_bits(loss), state)
