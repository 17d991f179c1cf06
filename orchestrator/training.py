"""The run loop: initial weights, epochs of verified segment jobs, averaging, evaluation, outputs."""

from __future__ import annotations

import logging
import platform
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from config.settings import FarmSettings, TrainingSettings
from model.aggregate import weighted_average
from model.data import data_digest, load_images, segment_images, segment_size, to_inputs
from model.network import initial_state_dict
from model.training import configure_torch, evaluate, reconstruct
from model.weights import WeightsError, decode, decode_verified, encode, model_spec, state_dict_digest
from orchestrator.client import FarmClient
from orchestrator.epoch import EpochOutcome, EpochRunner
from orchestrator.identity import OrchestratorIdentity
from orchestrator.ledger import Ledger
from orchestrator.referee import Referee
from orchestrator.staffing import wait_for_workers
from protocol.crypto import CryptoError, public_key_text, unseal
from protocol.envelope import WEIGHTS_CONTEXT
from orchestrator.registry import Registry
from orchestrator.progress import Progress
from orchestrator.plots import plot_losses, plot_reconstructions
from orchestrator.quorum import SegmentVote
from orchestrator.rundir import RunDirectory
from orchestrator.verify import WeightsVerifier
from protocol.store import StoreError, base_weights_key

logger = logging.getLogger(__name__)

RECONSTRUCTION_SAMPLES = 10


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    final_digest: str
    initial_test_loss: float
    metrics: list[dict]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _epoch_record(epoch: int, outcome: EpochOutcome, sizes: list[int], digest: str, test_loss: float) -> dict:
    """Return the metrics line of one epoch: losses, the aggregate's digest, and every replica's fate."""
    return {
        "epoch": epoch,
        "train_loss": sum(outcome.accepted[k][1] * size for k, size in enumerate(sizes)) / sum(sizes),
        "test_loss": test_loss,
        "weights_digest": digest,
        "accepted": len(outcome.accepted),
        "segments": len(sizes),
        "disagreements": outcome.disagreements,
        "reissues": outcome.reissues,
        "arbitrated": outcome.arbitrated,
        "speculative": outcome.speculative,
        "rejected": [asdict(r) for r in outcome.rejected],
        "failed": [asdict(r) for r in outcome.failed],
        "accepted_segments": [
            {"segment": k, "weights_digest": d, "loss": loss, "class": outcome.classes.get(k), "voters": voters,
             "replicas": outcome.replicas[k]}
            for k, (d, loss, voters) in sorted(outcome.accepted.items())
        ],
        "finished_at": time.time(),
    }


@dataclass
class _Run:
    """Settings, data and services of a new or resumed run, as the epoch loop uses them."""

    client: FarmClient
    training: TrainingSettings
    farm: FarmSettings
    epochs: int
    run_id: str
    directory: RunDirectory
    ledger: Ledger
    identity: OrchestratorIdentity
    registry: Registry
    data_root: str
    data_digests: list[str]
    sizes: list[int]
    test_images: torch.Tensor
    initial_test_loss: float


def _prepare_data(training: TrainingSettings, data_root: Path, download: bool):
    """Return each segment's data digest and size, and the test images."""
    images = load_images(str(data_root), training.dataset, train=True, download=download)
    if training.subset:
        images = images[: training.subset]
    segments = [segment_images(images, training.segments, k) for k in range(training.segments)]
    data_digests = [data_digest(training.dataset, training.segments, k, part) for k, part in enumerate(segments)]
    sizes = [segment_size(images.shape[0], training.segments, k) for k in range(training.segments)]
    test_images = load_images(str(data_root), training.dataset, train=False, download=download)
    return data_digests, sizes, test_images


def run_training(
    *,
    client: FarmClient,
    training: TrainingSettings,
    farm: FarmSettings,
    epochs: int,
    run_dir: Path,
    data_root: Path,
    state_dir: Path,
    download: bool = False,
    run_id: str | None = None,
    progress_factory: Callable[[int], Progress] | None = None,
    placement_rng: random.Random | None = None,
) -> RunResult:
    """Train for `epochs` epochs on the farm and write the run directory; return the final digest."""
    training.validate()
    farm.validate()
    identity = OrchestratorIdentity.load(state_dir)
    registry = Registry(state_dir, max_strikes=farm.max_strikes)
    run_id = run_id or new_run_id()
    configure_torch(1)  # the orchestrator's own math is light; leave the cores to the workers
    progress_factory = progress_factory or (lambda epoch: Progress())

    # Refuse a run no class of workers can staff before anything is written.
    wait_for_workers(client, registry, training=training, owners=farm.replicas, timeout=farm.worker_wait)
    data_digests, sizes, test_images = _prepare_data(training, data_root, download)

    # Run directory and initial weights.
    state = initial_state_dict(training.seed)
    base_digest = state_dict_digest(state)
    initial_test_loss = evaluate(state, test_images)
    directory = RunDirectory(run_dir)
    directory.create({
        "run_id": run_id,
        "created_at": time.time(),
        "epochs": epochs,
        "training": training.to_dict(),
        "farm": asdict(farm),
        "data_root": str(data_root),
        "data_digests": data_digests,
        "initial_weights_digest": base_digest,
        "initial_test_loss": initial_test_loss,
        "torch": torch.__version__,
        "python": platform.python_version(),
    })
    client.store.put(base_weights_key(base_digest), encode(state))
    directory.save_epoch_weights(0, state)
    ledger = Ledger(directory.path, identity.signing)
    ledger.append("run_started", {
        "run_id": run_id, "segments": training.segments, "replicas": farm.replicas, "quorum": farm.quorum,
        "training": training.to_dict(), "initial_digest": base_digest, "data_digests": data_digests,
        "orchestrator_key": public_key_text(identity.signing),
    })
    logger.info("run %s: %d epoch(s), %d segments x %d replicas, quorum %d, profile %s, initial weights %s "
                "(test loss %.5f), run directory %s", run_id, epochs, training.segments, farm.replicas, farm.quorum,
                training.profile, base_digest[:12], initial_test_loss, run_dir)

    run = _Run(client=client, training=training, farm=farm, epochs=epochs, run_id=run_id, directory=directory,
               ledger=ledger, identity=identity, registry=registry, data_root=str(data_root), data_digests=data_digests,
               sizes=sizes, test_images=test_images, initial_test_loss=initial_test_loss)
    return _train_epochs(run, state=state, base_digest=base_digest, first_epoch=1,
                         progress_factory=progress_factory, placement_rng=placement_rng)


def _train_epochs(run: _Run, *, state: dict, base_digest: str, first_epoch: int,
                  progress_factory: Callable[[int], Progress], placement_rng: random.Random | None,
                  restored: dict[int, dict] | None = None) -> RunResult:
    """Run epochs `first_epoch`..`run.epochs` from `state`, then write the final outputs."""
    client, training, farm, epochs, run_id = run.client, run.training, run.farm, run.epochs, run.run_id
    directory, ledger, identity, registry = run.directory, run.ledger, run.identity, run.registry
    data_digests, sizes, test_images = run.data_digests, run.sizes, run.test_images
    initial_test_loss = run.initial_test_loss
    status = {"run_id": run_id, "run_dir": str(directory.path.resolve()), "epochs": epochs,
              "state": "waiting for workers", "epoch": first_epoch - 1, "updated_at": time.time()}
    directory.write_state(status)
    client.publish_status(status)

    def publish(epoch: int, votes: dict[int, SegmentVote]) -> None:
        # Status goes to Redis, which workers can read: no digest or loss of an undecided job may leak.
        status.update(state="running", epoch=epoch, updated_at=time.time(), segments={
            str(k): {"decision": vote.decision[0] if vote.decision else None, "class": vote.klass,
                     "replicas": [replica.summary(reveal=vote.decision is not None)
                                  for replica in vote.replicas.values()]}
            for k, vote in votes.items()
        })
        directory.write_state(status)
        client.publish_status(status)

    referee = Referee(training=training, data_root=run.data_root, data_digests=data_digests, store=client.store,
                      spec=model_spec()) if farm.arbitrate or farm.spot_check else None
    runner = EpochRunner(client=client, run_id=run_id, training=training, farm=farm,
                         data_digests=data_digests,
                         verifier=WeightsVerifier(client.store, model_spec(), sealing=identity.sealing),
                         identity=identity, registry=registry, ledger=ledger, on_change=publish,
                         referee=referee, rng=placement_rng)
    try:
        epoch_started = time.monotonic()
        epoch = first_epoch
        if epoch <= epochs:
            for segment, accepted in (restored or {}).items():
                runner.verifier.remember(accepted["weights_digest"], accepted["state_dict"])
            runner.start_epoch(epoch, base_digest, restored=restored)
        while epoch <= epochs:
            progress = progress_factory(epoch)
            try:
                outcome = runner.finish_epoch(progress)
            finally:
                progress.close()

            # Spot checks: a wrong accepted segment quarantines its voters and restarts the epoch.
            wrong = runner.spot_check(epoch, base_digest, outcome, farm.spot_check)
            if wrong:
                logger.warning("epoch %d: spot check rejected segments %s; restarting the epoch from %s",
                               epoch, wrong, base_digest[:12])
                ledger.append("epoch_restarted", {"epoch": epoch, "base_digest": base_digest, "segments": wrong})
                runner.verifier.clear()
                runner.delete_replica_weights()
                runner.start_epoch(epoch, base_digest)
                continue

            # Aggregate: the size-weighted average of the accepted segment weights, stored before use.
            state = weighted_average([outcome.states[k] for k in range(training.segments)], sizes)
            base_digest = state_dict_digest(state)
            client.store.put(base_weights_key(base_digest), encode(state))
            runner.verifier.clear()
            directory.save_epoch_weights(epoch, state)
            ledger.append("epoch_aggregated", {"epoch": epoch, "weights_digest": base_digest,
                                               "segment_digests": [outcome.accepted[k][0] for k in range(training.segments)]})
            runner.delete_replica_weights()

            # Start the next epoch before evaluating this one, so the workers do not wait for the evaluation.
            next_started = time.monotonic()
            if epoch < epochs:
                runner.start_epoch(epoch + 1, base_digest)

            record = _epoch_record(epoch, outcome, sizes, base_digest, evaluate(state, test_images))
            record["wall_seconds"] = next_started - epoch_started
            directory.append_metrics(record)
            epoch_started = next_started
            logger.info(
                "epoch %d/%d: train loss %.5f, test loss %.5f, accepted %d/%d segments, %d disagreements, "
                "%d re-issues, %d rejected, %.1f s",
                epoch, epochs, record["train_loss"], record["test_loss"], record["accepted"], training.segments,
                outcome.disagreements, outcome.reissues, len(outcome.rejected), record["wall_seconds"],
            )
            epoch += 1
    except BaseException as error:
        ledger.append("run_failed", {"error": str(error) or type(error).__name__})
        status.update(state="failed", error=str(error) or type(error).__name__, updated_at=time.time())
        directory.write_state(status)
        client.publish_status(status)
        raise
    finally:
        if referee is not None:
            referee.close()

    # Final outputs.
    directory.save_final(state)
    metrics = directory.read_metrics()
    plot_losses(metrics, directory.path / "loss.png", initial_test_loss=initial_test_loss)
    samples = test_images[:RECONSTRUCTION_SAMPLES]
    plot_reconstructions(to_inputs(samples), reconstruct(state, samples), directory.path / "reconstructions.png")
    ledger.append("run_finished", {"final_digest": base_digest, "epochs": epochs})
    status.update(state="finished", final_digest=base_digest, updated_at=time.time())
    directory.write_state(status)
    client.publish_status(status)
    client.redis.delete(runner.reply_key)
    logger.info("run %s finished: final weights %s in %s", run_id, base_digest[:12], directory.path / "final.safetensors")
    return RunResult(run_id=run_id, run_dir=directory.path, final_digest=base_digest,
                     initial_test_loss=initial_test_loss, metrics=metrics)


def _accepted_segments(entries: list[dict], epoch: int) -> list[dict]:
    """Return the segment_accepted data of the latest attempt at `epoch`, up to its aggregate if any.

    An attempt that restored segments after a stop keeps their entries from the attempt before.
    """
    current, accepted = None, []
    for entry in entries:
        if entry["kind"] == "epoch_started":
            current = entry["data"]["epoch"]
            if current == epoch:
                kept = set(entry["data"].get("restored_segments", []))
                accepted = [a for a in accepted if a["segment"] in kept]
        elif entry["kind"] == "segment_accepted" and current == epoch:
            accepted.append(entry["data"])
        elif entry["kind"] == "epoch_aggregated" and entry["data"]["epoch"] == epoch:
            return accepted
    return accepted


def _restorable_segments(entries: list[dict], epoch: int, store, identity: OrchestratorIdentity) -> dict[int, dict]:
    """Return the segments of the interrupted `epoch` that were accepted and whose weights are still stored.

    Each value is the ledger's segment_accepted data plus the verified "state_dict". Segments the
    orchestrator decided itself, or whose sealed weights are gone, are trained again.
    """
    restorable = {}
    for accepted in _accepted_segments(entries, epoch):
        if accepted.get("arbitrated") or not accepted["voters"]:
            continue
        weights_key = accepted["voters"][0]["result"]["weights_key"]
        try:
            box = store.get(weights_key)
            blob = unseal(identity.sealing, box, WEIGHTS_CONTEXT)
            state = decode_verified(blob, accepted["weights_digest"], model_spec())
        except (StoreError, CryptoError, WeightsError) as error:
            logger.info("segment %d of epoch %d runs again: its accepted weights cannot be reloaded (%s)",
                        accepted["segment"], epoch, error)
            continue
        restorable[accepted["segment"]] = {**accepted, "state_dict": state}
    return restorable


def resume_training(
    *,
    client: FarmClient,
    run_dir: Path,
    state_dir: Path,
    progress_factory: Callable[[int], Progress] | None = None,
    placement_rng: random.Random | None = None,
) -> RunResult:
    """Continue a stopped run from its last aggregated epoch, with the settings in its run.json.

    The ledger and the epoch's weights file must agree. The interrupted epoch runs again from its
    base weights, so the run ends with the same bits as an uninterrupted one.
    """
    directory = RunDirectory(run_dir)
    config = directory.read_config()
    # Runs started before numerical profiles existed trained under the default profile without TF32.
    training = TrainingSettings.from_dict({"profile": "default", "allow_tf32": False, **config["training"]})
    farm = FarmSettings(**config["farm"]).validate()
    identity = OrchestratorIdentity.load(state_dir)
    ledger, entries = Ledger.reopen(directory.path, identity.signing)
    if entries and entries[-1]["kind"] == "run_finished":
        raise FileExistsError(f"run {config['run_id']} in {run_dir} already finished; nothing to resume")

    # The last epoch whose aggregate reached the ledger, and its weights from disk.
    aggregated = [entry["data"] for entry in entries if entry["kind"] == "epoch_aggregated"]
    last_epoch = aggregated[-1]["epoch"] if aggregated else 0
    expected = aggregated[-1]["weights_digest"] if aggregated else config["initial_weights_digest"]
    state = decode(directory.epoch_weights_path(last_epoch).read_bytes(), model_spec())
    base_digest = state_dict_digest(state)
    if base_digest != expected:
        raise ValueError(f"weights of epoch {last_epoch} hash to {base_digest[:16]}, the ledger records "
                         f"{expected[:16]}; check the run with: orchestrator audit {run_dir}")
    configure_torch(1)
    client.store.put(base_weights_key(base_digest), encode(state))
    data_digests, sizes, test_images = _prepare_data(training, Path(config["data_root"]), False)
    if data_digests != config["data_digests"]:
        raise ValueError(f"the data under {config['data_root']} differs from the run's; point the run at its data")

    # An epoch aggregated just before the stop may miss its metrics line; write it from the ledger.
    recorded = {record["epoch"] for record in directory.read_metrics()}
    if last_epoch and last_epoch not in recorded:
        accepted = _accepted_segments(entries, last_epoch)
        directory.append_metrics({
            "epoch": last_epoch, "weights_digest": base_digest, "test_loss": evaluate(state, test_images),
            "train_loss": sum(a["loss"] * sizes[a["segment"]] for a in accepted) / sum(sizes),
            "accepted": len(accepted), "segments": training.segments, "finished_at": time.time(),
            "recovered_from_ledger": True,
        })
    restored = _restorable_segments(entries, last_epoch + 1, client.store, identity)
    ledger.append("run_resumed", {"from_epoch": last_epoch + 1, "base_digest": base_digest,
                                  "restored_segments": sorted(restored)})
    logger.info("run %s resumes at epoch %d from weights %s", config["run_id"], last_epoch + 1, base_digest[:12])

    registry = Registry(state_dir, max_strikes=farm.max_strikes)
    run = _Run(client=client, training=training, farm=farm, epochs=config["epochs"], run_id=config["run_id"],
               directory=directory, ledger=ledger, identity=identity, registry=registry, data_root=config["data_root"],
               data_digests=data_digests, sizes=sizes, test_images=test_images,
               initial_test_loss=config["initial_test_loss"])
    return _train_epochs(run, state=state, base_digest=base_digest, first_epoch=last_epoch + 1,
                         progress_factory=progress_factory or (lambda epoch: Progress()),
                         placement_rng=placement_rng, restored=restored)
