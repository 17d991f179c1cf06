"""A misbehaving worker for tests. It speaks the real protocol over the real broker and lies in the way a test selects.

    celery -A tests.attackers.worker worker -n mallory@%h

It reuses the production app (queue, heartbeats, keys, torch setup) but replaces the training
task in its own process only. The test picks the lie per worker by setting the Redis key
mode_key(worker), or for every attacker at once by setting ATTACK_MODE_KEY:

    honest       behave like a production worker
    corrupt      store sealed random bytes and claim the honest digest
    oversized    store a sealed blob larger than any valid weights
    wrong-shape  return weights with one tensor transposed
    nan          return weights with a NaN in one tensor
    poison       return weights shifted by a fixed amount with the honest loss; colluders agree on them
    wrong-loss   return the honest weights with a slightly different loss
    other-class  return the honest result, claiming a numerical environment of another class
    unknown-job  first send a result for an assignment that was never issued
    duplicate    send the same sealed result twice
    replay       first send the sealed result it sent for its previous job
    forge        sign the result with a key that is not enrolled
    sybil        also send the result signed by a second identity of the same owner (FARM_SYBIL_KEY)
    copier       read everything in Redis while a peer's replica is done, and record what it learned
    silent       train but never reply, like a worker that hangs
    stall        sleep a minute before training, so a test can kill the worker mid-job
    slow         sleep 15 seconds before training, like a straggler
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from pathlib import Path

import torch

from protocol.crypto import generate_key, load_private_key, seal
from protocol.envelope import WEIGHTS_CONTEXT, seal_result, sign_result
from protocol.messages import TASK_NAME, Result, loss_bits
from protocol.store import base_weights_key
from tasks import app, jobs
from tasks.identity import orchestrator_keys, worker_key

ATTACK_MODE_KEY = "test:attack-mode"
COPIER_REPORT_KEY = "test:copier-report"
LAST_SEALED_KEY = "test:last-sealed:"
STALLING_KEY = "test:stalling:"

app.tasks.unregister(TASK_NAME)


def mode_key(worker: str) -> str:
    return f"{ATTACK_MODE_KEY}:{worker}"


def honest_state(job):
    """Return the honest result weights of `job`, trained again because the sealed copy cannot be opened."""
    from model.weights import decode_verified, model_spec

    reply, blob = jobs.engine(job.training["profile"]).train(
        root=str(jobs.data_root_from_env()), training=job.training, epoch=job.epoch, segment=job.segment,
        base_digest=job.base_digest, base_blob=jobs._store().get(base_weights_key(job.base_digest)),
    )
    return decode_verified(blob, reply["weights_digest"], model_spec())


def push_sealed(job, result: Result, key=None) -> dict:
    """Sign `result` with `key` (default: this worker's key), seal it and push it."""
    sealed = seal_result(sign_result(result, key or worker_key()), orchestrator_keys().sealing)
    jobs._redis().rpush(job.reply_to, json.dumps(sealed))
    return sealed


def replace_weights(job, honest: Result, weights) -> Result:
    """Store `weights` sealed under the honest result's key and return the result claiming them."""
    from model.weights import encode, state_dict_digest

    jobs._store().put(honest.weights_key, seal(orchestrator_keys().sealing, encode(weights), WEIGHTS_CONTEXT))
    return dataclasses.replace(honest, weights_digest=state_dict_digest(weights))


def copy_everything(job, honest: Result) -> dict:
    """Wait for a peer's result, read every key in Redis, and look for this job's digest or weights."""
    from model.weights import WeightsError, decode, model_spec, state_dict_digest

    client = jobs._redis()

    def peer_blobs() -> list[bytes]:
        own = honest.weights_key.encode()
        return [key for key in client.scan_iter(match="farm:replica-weights:*") if key != own]

    # The orchestrator takes replies off the list at once, so wait for a peer's stored weights instead.
    deadline = time.monotonic() + 10
    while not peer_blobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    peers = len(peer_blobs())
    found, keys, blobs = [], 0, 0
    for key in client.scan_iter(count=1000):
        keys += 1
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key)]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = list(client.hgetall(key).values())
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = client.zrange(key, 0, -1)
        else:
            values = []
        for value in values:
            if value is None:
                continue
            if honest.weights_digest.encode() in value or honest.loss_bits.encode() in value:
                found.append(key.decode())
            try:
                decoded = decode(value, model_spec())
            except WeightsError:
                continue  # not plain weights: sealed, or something else entirely
            blobs += 1
            if state_dict_digest(decoded) == honest.weights_digest:
                found.append(key.decode())
    return {"keys": keys, "decodable_blobs": blobs, "found": sorted(set(found)), "peer_blobs": peers}


@app.task(name=TASK_NAME, bind=True)
def lying_train_segment(self, message: dict) -> dict:
    started = time.monotonic()
    worker = self.request.hostname
    job = jobs._parse(message, worker)
    client = jobs._redis()
    raw_mode = client.get(mode_key(worker)) or client.get(ATTACK_MODE_KEY) or b"honest"
    mode = raw_mode.decode()
    if mode == "stall":
        client.set(STALLING_KEY + worker, job.assignment_id)
        time.sleep(60)
    elif mode == "slow":
        jobs._claim(job, worker)  # a real worker claims the job before it trains, so the start is known
        time.sleep(15)

    honest = jobs._train(job, worker, started)
    result = honest

    if mode == "copier":
        client.rpush(COPIER_REPORT_KEY, json.dumps(copy_everything(job, honest)))
    elif mode == "corrupt":
        jobs._store().put(honest.weights_key, seal(orchestrator_keys().sealing, secrets.token_bytes(4096),
                                                   WEIGHTS_CONTEXT))
    elif mode == "oversized":
        jobs._store().put(honest.weights_key, seal(orchestrator_keys().sealing, secrets.token_bytes(17 << 20),
                                                   WEIGHTS_CONTEXT))
    elif mode in ("wrong-shape", "nan", "poison"):
        weights = honest_state(job)
        if mode == "wrong-shape":
            weights["encoder.0.weight"] = weights["encoder.0.weight"].t().contiguous()
        elif mode == "nan":
            weights["decoder.4.weight"][0, 0] = torch.nan
        else:
            weights["decoder.8.bias"] = weights["decoder.8.bias"] + 0.25
        result = replace_weights(job, honest, weights)
    elif mode == "other-class":
        result = dataclasses.replace(honest, environment={**honest.environment, "cpu_capability": "AVX2"})
    elif mode == "wrong-loss":
        loss = honest.loss + 1e-4
        result = dataclasses.replace(honest, loss=loss, loss_bits=loss_bits(loss))
    elif mode == "unknown-job":
        push_sealed(job, dataclasses.replace(honest, assignment_id=secrets.token_hex(16)))
    elif mode == "replay":
        previous = client.get(LAST_SEALED_KEY + worker)
        if previous:
            client.rpush(job.reply_to, previous)
    elif mode == "forge":
        stranger = Path(f"/tmp/forger-{os.getpid()}-{secrets.token_hex(4)}.key")
        push_sealed(job, honest, key=generate_key(stranger))
        stranger.unlink()
    elif mode == "sybil":
        sybil_name = os.environ["FARM_SYBIL_NAME"]
        push_sealed(job, dataclasses.replace(honest, worker=sybil_name),
                    key=load_private_key(Path(os.environ["FARM_SYBIL_KEY"])))
    if mode == "silent":
        return {}

    sealed = push_sealed(job, result)
    if mode == "duplicate":
        client.rpush(job.reply_to, json.dumps(sealed))
    client.set(LAST_SEALED_KEY + worker, json.dumps(sealed))
    return {"assignment_id": job.assignment_id, "status": "sent"}
