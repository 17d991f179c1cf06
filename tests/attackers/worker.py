"""A misbehaving worker for tests. It speaks the real protocol over the real broker and lies as told.

    celery -A tests.attackers.worker worker -n mallory@%h

It reuses the production app (queue, heartbeats, torch setup) but replaces the training
task in its own process only. The test picks the lie by setting ATTACK_MODE_KEY in Redis:

    honest       behave like a production worker
    corrupt      store random bytes and claim the honest digest
    wrong-shape  return weights with one tensor transposed
    nan          return weights with a NaN in one tensor
    unknown-job  first send a result for an assignment that was never issued
    wrong-loss   return the honest weights with a slightly different loss
    silent       train but never reply, like a worker that hangs
"""

from __future__ import annotations

import secrets
import time

import torch

from protocol.crypto import seal
from protocol.envelope import WEIGHTS_CONTEXT
from protocol.messages import TASK_NAME, Result, loss_bits
from protocol.store import base_weights_key
from tasks import app, jobs
from tasks.identity import orchestrator_keys

ATTACK_MODE_KEY = "test:attack-mode"

app.tasks.unregister(TASK_NAME)


def unsealed_honest_weights(job) -> bytes:
    """Return the honest result weights as safetensors bytes by training the job again."""
    from config.settings import TrainingSettings
    from model.training import job_seed, train_segment
    from model.weights import decode_verified, encode, model_spec

    settings = TrainingSettings.from_dict(job.training)
    images, _ = jobs._segment(str(jobs.data_root_from_env()), settings.dataset, settings.subset,
                              settings.segments, job.segment)
    base = decode_verified(jobs._store().get(base_weights_key(job.base_digest)), job.base_digest, model_spec())
    weights, _ = train_segment(base, images, settings, seed=job_seed(settings.seed, job.epoch, job.segment))
    return encode(weights)


@app.task(name=TASK_NAME, bind=True)
def lying_train_segment(self, message: dict) -> dict:
    from model.weights import decode, encode, model_spec, state_dict_digest

    started = time.monotonic()
    job = jobs._parse(message, self.request.hostname)
    honest = jobs._train(job, self.request.hostname, started)
    mode = (jobs._redis().get(ATTACK_MODE_KEY) or b"honest").decode()
    key = honest.weights_key
    sealing = orchestrator_keys().sealing
    result = honest

    if mode == "corrupt":
        jobs._store().put(key, seal(sealing, secrets.token_bytes(4096), WEIGHTS_CONTEXT))
    elif mode in ("wrong-shape", "nan"):
        # The attacker cannot open its own sealed blob, so it trains and encodes once more.
        weights = decode(unsealed_honest_weights(job), model_spec())
        if mode == "wrong-shape":
            weights["encoder.0.weight"] = weights["encoder.0.weight"].t().contiguous()
        else:
            weights["decoder.4.weight"][0, 0] = torch.nan
        digest = state_dict_digest(weights)
        jobs._store().put(key, seal(sealing, encode(weights), WEIGHTS_CONTEXT))
        result = Result(**{**honest.__dict__, "weights_digest": digest})
    elif mode == "unknown-job":
        bogus = Result(**{**honest.__dict__, "assignment_id": secrets.token_hex(16)})
        jobs._reply(job, bogus)
    elif mode == "wrong-loss":
        loss = honest.loss + 1e-4
        result = Result(**{**honest.__dict__, "loss": loss, "loss_bits": loss_bits(loss)})

    if mode == "silent":
        return {}
    jobs._reply(job, result)
    return result.to_message()
