"""The orchestrator's command line: run training on the farm, watch it, list workers.

    orchestrator run --epochs 5 --data-root ../shared/datasets
    orchestrator status
    orchestrator workers
    orchestrator local --epochs 3 --workers 2     # Redis, workers and Flower on loopback, then a run
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import click
import redis

from config.settings import (
    DATASETS,
    DEFAULT_BROKER_URL,
    FarmSettings,
    SettingsError,
    TrainingSettings,
    broker_url_from_env,
    data_root_from_env,
)
from model.numerics import PROFILES
from orchestrator.client import FarmClient
from orchestrator.identity import state_dir_from_env
from orchestrator.progress import Progress

logger = logging.getLogger("orchestrator")

DEFAULTS_TRAINING = TrainingSettings()
OPTION_NAMES = {"learning_rate": "--lr"}  # settings whose option name is not the field name
DEFAULTS_FARM = FarmSettings()


def _progress_factory():
    """Return a progress-bar factory on a terminal, None otherwise (no bar lines in logs)."""
    return BarProgress if sys.stderr.isatty() else None


class BarProgress(Progress):
    """A click progress bar over the replicas of one epoch, grown as replicas are re-issued."""

    def __init__(self, epoch: int) -> None:
        self.label = f"epoch {epoch} replicas"
        self.bar = None

    def add(self, count: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=count, label=self.label, file=sys.stderr, show_eta=False)
            self.bar.__enter__()
        else:
            self.bar.length += count
            self.bar.render_progress()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("celery", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _connect(broker_url: str, store_url: str | None) -> FarmClient:
    try:
        client = FarmClient(broker_url, store_url or broker_url)
        client.ping()
    except ValueError as error:
        raise click.ClickException(
            f"invalid broker or store URL {_redact(broker_url)}: {error}. "
            f"Pass --broker-url or set FARM_BROKER_URL, for example redis://127.0.0.1:6379/0"
        ) from None
    except redis.RedisError as error:
        raise click.ClickException(
            f"cannot reach the broker at {_redact(broker_url)}: {str(error).rstrip('.')}. "
            f"Start Redis, or pass --broker-url or set FARM_BROKER_URL"
        ) from None
    return client


def _redact(url: str) -> str:
    """Hide the password in a Redis URL before it is shown."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def training_options(command):
    """Add the options that define a run's training settings and farm policy."""
    options = [
        click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True,
                     help="Epochs to train; each is one pass of every segment job."),
        click.option("--segments", type=click.IntRange(min=1), default=DEFAULTS_TRAINING.segments, show_default=True,
                     help="Segments S per epoch; segment k contains the images whose index mod S is k."),
        click.option("--replicas", type=click.IntRange(min=1), default=DEFAULTS_FARM.replicas, show_default=True,
                     help="Replicas R of every job, each on a worker of a distinct owner."),
        click.option("--quorum", type=click.IntRange(min=1), default=DEFAULTS_FARM.quorum, show_default=True,
                     help="Distinct owners Q (at most R) whose workers must return identical weights and loss."),
        click.option("--max-reissues", type=click.IntRange(min=0), default=DEFAULTS_FARM.max_reissues, show_default=True,
                     help="Extra replicas per segment and epoch after disagreement, failure or timeout."),
        click.option("--job-timeout", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS_FARM.job_timeout,
                     show_default=True, help="Seconds a replica may run before it is re-issued to another worker."),
        click.option("--max-strikes", type=click.IntRange(min=1), default=DEFAULTS_FARM.max_strikes,
                     show_default=True, help="Strikes (outvoted or invalid results) before a worker is quarantined."),
        click.option("--arbitrate/--no-arbitrate", default=DEFAULTS_FARM.arbitrate, show_default=True,
                     help="Re-execute a job that reaches no quorum in the orchestrator, instead of stopping."),
        click.option("--spot-check", type=click.FloatRange(0, 1), default=DEFAULTS_FARM.spot_check,
                     show_default=True, help="Fraction of accepted segments the orchestrator re-executes."),
        click.option("--straggler-factor", type=click.FloatRange(min=0), default=DEFAULTS_FARM.straggler_factor,
                     show_default=True, help="Re-issue a replica running this many median job times to an idle "
                                             "worker (0: never)."),
        click.option("--worker-wait", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS_FARM.worker_wait,
                     show_default=True, help="Seconds to wait at each epoch's start for live workers of R distinct owners."),
        click.option("--dataset", type=click.Choice(sorted(DATASETS)), default=DEFAULTS_TRAINING.dataset,
                     show_default=True, help="Training set."),
        click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), envvar="FARM_DATA_ROOT",
                     default=data_root_from_env, show_default="FARM_DATA_ROOT or ./data",
                     help="Folder with datasets in torchvision's layout (MNIST/raw/...)."),
        click.option("--download/--no-download", default=True, show_default=True,
                     help="Let torchvision download the dataset into --data-root when it is missing."),
        click.option("--lr", "learning_rate", type=float, default=DEFAULTS_TRAINING.learning_rate, show_default=True,
                     help="Adam learning rate."),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS_TRAINING.batch_size,
                     show_default=True, help="Images per optimizer step."),
        click.option("--weight-decay", type=float, default=DEFAULTS_TRAINING.weight_decay, show_default=True,
                     help="Adam weight decay (L2 penalty)."),
        click.option("--shuffle/--no-shuffle", default=DEFAULTS_TRAINING.shuffle, show_default=True,
                     help="Shuffle each job's batch order with a generator seeded by (seed, epoch, segment)."),
        click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS_TRAINING.seed, show_default=True,
                     help="Run seed for the initial weights and every batch order."),
        click.option("--threads", type=click.IntRange(min=1), default=DEFAULTS_TRAINING.threads, show_default=True,
                     help="torch threads per job; replicas only agree at equal thread counts."),
        click.option("--profile", type=click.Choice(list(PROFILES)), default=DEFAULTS_TRAINING.profile,
                     show_default=True, help="Numerical profile: portable puts x86-64 CPUs with different "
                                             "instruction sets into one class, at a speed cost (see the README)."),
        click.option("--allow-tf32/--no-allow-tf32", default=DEFAULTS_TRAINING.allow_tf32, show_default=True,
                     help="Let GPU workers use TF32 matrix products (faster, less precise)."),
        click.option("--subset", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Train on the first N training images only (0: all 60,000)."),
        click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                     show_default="runs/RUN_ID", help="Directory for weights, metrics and plots; must be new."),
        click.option("-v", "--verbose", is_flag=True, help="Log each replica as it is issued."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def connection_options(command):
    command = click.option("--store-url", envvar="FARM_STORE_URL", default=None,
                           show_default="FARM_STORE_URL or the broker URL",
                           help="Redis URL of the weights store.")(command)
    command = click.option("--broker-url", envvar="FARM_BROKER_URL", default=broker_url_from_env,
                           show_default=f"FARM_BROKER_URL or {DEFAULT_BROKER_URL}",
                           help="Redis URL of the Celery broker.")(command)
    return command


def state_dir_option(command):
    return click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), envvar="FARM_STATE_DIR",
                        default=state_dir_from_env, show_default="FARM_STATE_DIR or ./farm-state",
                        help="Directory of the orchestrator's key and the worker registry.")(command)


def _settings(options: dict) -> tuple[TrainingSettings, FarmSettings]:
    try:
        training = TrainingSettings(
            dataset=options["dataset"], segments=options["segments"], learning_rate=options["learning_rate"],
            batch_size=options["batch_size"], weight_decay=options["weight_decay"], shuffle=options["shuffle"],
            seed=options["seed"], threads=options["threads"], subset=options["subset"],
            profile=options["profile"], allow_tf32=options["allow_tf32"],
        ).validate()
        farm = FarmSettings(
            replicas=options["replicas"], quorum=options["quorum"], max_reissues=options["max_reissues"],
            job_timeout=options["job_timeout"], worker_wait=options["worker_wait"], max_strikes=options["max_strikes"],
            arbitrate=options["arbitrate"], spot_check=options["spot_check"],
            straggler_factor=options["straggler_factor"],
        ).validate()
    except SettingsError as error:
        option = OPTION_NAMES.get(error.field, f"--{(error.field or '').replace('_', '-')}")
        raise click.BadParameter(str(error), param_hint=f"'{option}'") from None
    return training, farm


def _train(client: FarmClient, training: TrainingSettings, farm: FarmSettings, options: dict, run_id: str):
    from orchestrator.training import run_training
    from protocol.crypto import CryptoError

    run_dir = options["run_dir"] or Path("runs") / run_id
    try:
        return run_training(
            client=client, training=training, farm=farm, epochs=options["epochs"], run_dir=run_dir,
            data_root=options["data_root"], state_dir=options["state_dir"], download=options["download"],
            run_id=run_id,
            progress_factory=_progress_factory(),
        )
    except FileExistsError as error:
        raise click.UsageError(str(error)) from None
    except CryptoError as error:
        raise click.ClickException(str(error)) from None
    except RuntimeError as error:  # DatasetError and friends: show the message, not a traceback
        if isinstance(error, click.ClickException):
            raise
        raise click.ClickException(str(error)) from None


def _report(result) -> None:
    last = result.metrics[-1]
    click.echo(f"Run {result.run_id} finished: test loss {result.initial_test_loss:.5f} (initial weights) -> "
               f"{last['test_loss']:.5f} after {len(result.metrics)} epoch(s)")
    click.echo(f"Final weights digest: {result.final_digest}")
    click.echo(f"Run directory: {result.run_dir.resolve()} (final.safetensors, metrics.jsonl, loss.png, reconstructions.png)")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """Train a model on a farm of untrusted Celery workers with redundant, verified segment jobs."""


@main.command()
@training_options
@state_dir_option
@connection_options
def run(**options) -> None:
    """Train on the workers that are live on the broker and write the run directory."""
    _configure_logging(options["verbose"])
    training, farm = _settings(options)
    from orchestrator.training import new_run_id

    client = _connect(options["broker_url"], options["store_url"])
    _report(_train(client, training, farm, options, new_run_id()))


@main.command()
@training_options
@click.option("--workers", "worker_count", type=click.IntRange(min=1), default=2, show_default=True,
              help="Worker processes to start on this machine.")
@click.option("--flower/--no-flower", default=True, show_default=True, help="Start Flower to watch the tasks.")
@click.option("--keep-running", is_flag=True, help="Keep Redis, workers and Flower up after the run until Ctrl-C.")
def local(worker_count: int, flower: bool, keep_running: bool, **options) -> None:
    """Start Redis, workers and Flower on 127.0.0.1, train, then stop everything that was started."""
    from model.data import load_images
    from orchestrator.local import LocalFarm
    from orchestrator.training import new_run_id

    _configure_logging(options["verbose"])
    training, farm = _settings(options)
    if worker_count < farm.replicas:
        raise click.UsageError(f"--workers {worker_count} is fewer than --replicas {farm.replicas}; "
                               f"every replica needs its own worker")
    # Fetch the data before the workers start, so that they find it in place.
    for train in (True, False):
        try:
            load_images(str(options["data_root"]), training.dataset, train=train, download=options["download"])
        except RuntimeError as error:
            raise click.ClickException(str(error)) from None

    run_id = new_run_id()
    options["run_dir"] = options["run_dir"] or Path("runs") / run_id
    log_dir = Path(options["run_dir"]).with_name(Path(options["run_dir"]).name + "-logs")
    with LocalFarm(workers=worker_count, data_root=options["data_root"], log_dir=log_dir, flower=flower) as farm_processes:
        click.echo(f"Redis: {_redact(farm_processes.broker_url)}   workers: {worker_count}   logs: {log_dir}")
        if farm_processes.flower_url:
            hint = "" if keep_running else " (it stops with the run; pass --keep-running to keep it up)"
            click.echo(f"Flower UI: {farm_processes.flower_url}{hint}")
        client = _connect(farm_processes.broker_url, None)
        options["state_dir"] = farm_processes.state_dir
        result = _train(client, training, farm, options, run_id)
        _report(result)
        click.echo(f"Audit the ledger with: orchestrator audit {result.run_dir} --state-dir {farm_processes.state_dir}")
        if keep_running:
            click.echo(f"Farm still running (Flower UI: {farm_processes.flower_url or 'off'}); press Ctrl-C to stop it.")
            try:
                while True:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
    click.echo("Stopped Redis, the workers and Flower." if flower else "Stopped Redis and the workers.")


@main.command()
@click.argument("weights")
@click.option("--dataset", type=click.Choice(sorted(DATASETS)), default=DEFAULTS_TRAINING.dataset, show_default=True,
              help="Test set to evaluate on.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), envvar="FARM_DATA_ROOT",
              default=data_root_from_env, show_default="FARM_DATA_ROOT or ./data",
              help="Folder with datasets in torchvision's layout (MNIST/raw/...).")
@connection_options
def evaluate(weights: str, dataset: str, data_root: Path, broker_url: str, store_url: str | None) -> None:
    """Print the test-set reconstruction loss of WEIGHTS: a .safetensors file or a weights digest in the store."""
    from model.data import load_images
    from model.training import configure_torch, evaluate as test_loss
    from model.weights import WeightsError, decode, decode_verified, model_spec, state_dict_digest
    from protocol.store import StoreError, base_weights_key

    try:
        if Path(weights).is_file():
            state = decode(Path(weights).read_bytes(), model_spec())
        elif len(weights) == 64 and all(c in "0123456789abcdef" for c in weights):
            client = _connect(broker_url, store_url)
            state = decode_verified(client.store.get(base_weights_key(weights)), weights, model_spec())
        else:
            raise click.BadParameter(f"{weights!r} is neither a file nor a 64-digit hex weights digest",
                                     param_hint="WEIGHTS")
        images = load_images(str(data_root), dataset, train=False)
    except (WeightsError, StoreError, RuntimeError) as error:
        if isinstance(error, click.ClickException):
            raise
        raise click.ClickException(str(error)) from None
    configure_torch(1)
    click.echo(f"test loss {test_loss(state, images):.6f} on {dataset} ({images.shape[0]:,} images), "
               f"weights {state_dict_digest(state)}")


@main.command()
@click.option("--run-dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Read this run's state.json instead of the broker's current run.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw state as JSON.")
@state_dir_option
@connection_options
def status(run_dir: Path | None, as_json: bool, state_dir: Path, broker_url: str, store_url: str | None) -> None:
    """Show live workers and the current run's epoch and per-segment state."""
    from orchestrator.rundir import RunDirectory

    state = None
    workers = None
    if run_dir is not None:
        state = RunDirectory(run_dir).read_state()
        if state is None:
            raise click.ClickException(f"{run_dir} has no state.json: it is not a run directory, "
                                       f"or its run stopped before it started")
    try:
        client = _connect(broker_url, store_url)
        workers = client.live_workers()
        if run_dir is None:
            state = client.read_status()
    except click.ClickException:
        if run_dir is None:
            raise
    if as_json:
        click.echo(json.dumps({"workers": workers, "run": state}, indent=2))
        return
    if workers is not None:
        _print_workers(workers, _enrollments(state_dir))
    if not state:
        click.echo("No run has published its state yet.")
        return
    click.echo(f"\nRun {state['run_id']} ({state['state']}): epoch {state.get('epoch', 0)} of {state['epochs']}, "
               f"directory {state['run_dir']}")
    if state.get("error"):
        click.echo(f"  error: {state['error']}")
    for segment, info in sorted(state.get("segments", {}).items(), key=lambda item: int(item[0])):
        decision = f"accepted {info['decision'][:12]}" if info["decision"] else "undecided"
        klass = f" (class {info['class']})" if info.get("class") else ""
        click.echo(f"  segment {segment}: {decision}{klass}")
        for replica in info["replicas"]:
            detail = replica["weights_digest"][:12] or replica["reason"]
            click.echo(f"    {replica['assignment_id'][:12]} {replica['worker']:<30} {replica['status']:<9} {detail}")


def _print_workers(live: dict[str, dict], enrollments: dict, *, threads: int = 1, allow_tf32: bool = False) -> None:
    if not live and not enrollments:
        click.echo("No live or enrolled workers. Start one with: celery -A tasks worker -n NAME@%h")
        return
    from model.numerics import PROFILE_THREADS, class_id, describe
    from orchestrator.staffing import environment_for

    click.echo(f"{'WORKER':<28} {'OWNER':<14} {'STANDING':<12} {'LIVE':<10} {'VALID':>5} {'STRIKES':>7} {'JOBS':>5}  "
               + "  ".join(f"{'CLASS ' + profile.upper():<14}" for profile in PROFILES))
    legend: dict[str, tuple[str, list[str]]] = {}
    for name in sorted(set(live) | set(enrollments)):
        record, entry = live.get(name), enrollments.get(name)
        if entry is None:
            standing = "unenrolled"
        elif entry.revoked:
            standing = "revoked"
        elif entry.quarantined:
            standing = "quarantined"
        else:
            standing = "enrolled"
        if record is None:
            state = "offline"
        elif record.get("health") != "ok":
            state = "unhealthy"
        else:
            state = "busy" if record.get("active") else "idle"
        labels = []
        for profile in PROFILES:
            # A profile may fix the thread count; its runs then use that count.
            settings = TrainingSettings(profile=profile, threads=PROFILE_THREADS.get(profile, threads),
                                        allow_tf32=allow_tf32)
            environment = environment_for(record or {}, settings)
            if environment is not None:
                klass = class_id(environment)
                legend.setdefault(klass, (describe(environment), []))[1].append(name)
                labels.append(f"{klass:<14}")
            else:
                labels.append(f"{'-':<14}")
        click.echo(f"{name:<28} {entry.owner if entry else '-':<14} {standing:<12} {state:<10} "
                   f"{entry.valid_results if entry else 0:>5} {entry.strikes if entry else 0:>7} "
                   f"{record.get('processed', 0) if record else 0:>5}  " + "  ".join(labels))
        if record is not None and record.get("health") != "ok":
            click.echo(f"    {record.get('health')}")
        if entry is not None and record is not None and record.get("public_key") != entry.public_key:
            click.echo("    its public key differs from the enrolled one: re-enroll it or check the key file")
    if legend:
        click.echo(f"\nNumerical classes for runs with {threads} thread(s) (profiles that fix the count use theirs) "
                   f"and TF32 {'on' if allow_tf32 else 'off'}; "
                   "replicas of a job only go to workers of one class:")
        for klass, (description, names) in legend.items():
            click.echo(f"  {klass}  {description}: {len(names)} worker(s)")


def _enrollments(state_dir: Path) -> dict:
    from orchestrator.registry import Registry

    return Registry(state_dir).load()


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print heartbeat and enrollment records as JSON.")
@state_dir_option
@connection_options
@click.pass_context
def workers(context: click.Context, as_json: bool, state_dir: Path, broker_url: str, store_url: str | None) -> None:
    """Manage enrolled workers; without a subcommand, list them (see `workers list`)."""
    if context.invoked_subcommand is None:
        context.invoke(list_workers, as_json=as_json, state_dir=state_dir, broker_url=broker_url, store_url=store_url)


@workers.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print heartbeat and enrollment records as JSON.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Show the classes for runs with this many torch threads per job.")
@click.option("--allow-tf32", is_flag=True, help="Show the classes for runs that allow TF32 on GPUs.")
@state_dir_option
@connection_options
def list_workers(as_json: bool = False, state_dir: Path | None = None, broker_url: str | None = None,
                 store_url: str | None = None, threads: int = 1, allow_tf32: bool = False) -> None:
    """List live and enrolled workers: owner, standing, health, valid results, strikes, jobs, classes."""
    import dataclasses

    client = _connect(broker_url or broker_url_from_env(), store_url)
    live = client.live_workers()
    state_dir = state_dir or state_dir_from_env()
    enrollments = _enrollments(state_dir)
    if not enrollments and not as_json:
        click.echo(f"No worker is enrolled in {state_dir}; pass the orchestrator's --state-dir or enroll workers.")
    if as_json:
        names = sorted(set(live) | set(enrollments))
        click.echo(json.dumps({name: {"heartbeat": live.get(name),
                                      "enrollment": dataclasses.asdict(enrollments[name]) if name in enrollments else None}
                               for name in names}, indent=2))
    else:
        _print_workers(live, enrollments, threads=threads, allow_tf32=allow_tf32)


@workers.command("enroll")
@click.argument("name")
@click.argument("public_key")
@click.option("--owner", required=True, help="Owner label; workers of one owner count once toward a quorum.")
@click.option("--reinstate", is_flag=True, help="Enroll a revoked or quarantined worker again and clear its strikes.")
@state_dir_option
def enroll_worker(name: str, public_key: str, owner: str, reinstate: bool, state_dir: Path) -> None:
    """Enroll worker NAME (its full node name, e.g. alice@host) with its base64 PUBLIC_KEY."""
    from orchestrator.registry import Registry, RegistryError
    from protocol.crypto import CryptoError, key_id

    try:
        Registry(state_dir).enroll(name, public_key, owner, reinstate=reinstate)
    except (RegistryError, CryptoError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"enrolled {name} (owner {owner}, key {key_id(public_key)}) in {state_dir}")


@workers.command("revoke")
@click.argument("name")
@state_dir_option
def revoke_worker(name: str, state_dir: Path) -> None:
    """Revoke worker NAME: it gets no more jobs and its results are rejected."""
    from orchestrator.registry import Registry, RegistryError

    try:
        Registry(state_dir).revoke(name)
    except RegistryError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"revoked {name}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="Log each replica as it is issued.")
@state_dir_option
@connection_options
def resume(run_dir: Path, verbose: bool, state_dir: Path, broker_url: str, store_url: str | None) -> None:
    """Continue a stopped run from its last aggregated epoch, with the settings in RUN_DIR/run.json."""
    from orchestrator.training import resume_training
    from protocol.crypto import CryptoError

    _configure_logging(verbose)
    client = _connect(broker_url, store_url)
    try:
        result = resume_training(client=client, run_dir=run_dir, state_dir=state_dir,
                                 progress_factory=_progress_factory())
    except (FileExistsError, FileNotFoundError, ValueError, CryptoError) as error:
        raise click.ClickException(str(error)) from None
    _report(result)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@state_dir_option
def audit(run_dir: Path, state_dir: Path) -> None:
    """Verify RUN_DIR's ledger: hash chain, orchestrator signatures, every vote; report the first break."""
    from orchestrator.identity import PUBLIC_FILE
    from orchestrator.ledger import audit as audit_ledger
    from protocol.crypto import parse_public_key

    try:
        public = json.loads((state_dir / PUBLIC_FILE).read_text())
        key = parse_public_key(public["signing_key"])
    except (OSError, ValueError, KeyError) as error:
        raise click.ClickException(f"cannot load the orchestrator's public key from {state_dir / PUBLIC_FILE}: "
                                   f"{error}; pass the orchestrator's state directory with --state-dir") from None
    report = audit_ledger(run_dir, key)
    if not report.ok:
        raise click.ClickException(f"ledger of {run_dir} is broken: {report.error} "
                                   f"({report.entries} entries before it verified)")
    ending = f"final digest {report.final_digest}" if report.outcome == "finished" else "the run failed"
    click.echo(f"ledger of {run_dir} verified: {report.entries} entries, {report.epochs} epochs, {ending}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--epoch", type=click.IntRange(min=0), required=True, help="Epoch whose weights to export (0: initial).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              show_default="RUN_DIR-epoch-N.safetensors", help="File to write; must not exist.")
def export(run_dir: Path, epoch: int, out: Path | None) -> None:
    """Write the weights of one epoch of RUN_DIR to a safetensors file, checked against the ledger."""
    from model.weights import WeightsError, decode, encode, model_spec, state_dict_digest
    from orchestrator.ledger import LEDGER_FILE

    source = run_dir / "weights" / f"epoch-{epoch:04d}.safetensors"
    if not source.is_file():
        raise click.ClickException(f"{source} not found: epoch {epoch} did not finish in this run")
    try:
        state = decode(source.read_bytes(), model_spec())
    except WeightsError as error:
        raise click.ClickException(f"{source} is invalid: {error}") from None
    digest = state_dict_digest(state)
    recorded = None
    if (run_dir / LEDGER_FILE).exists():
        for line in (run_dir / LEDGER_FILE).read_text().splitlines():
            entry = json.loads(line)
            if entry["kind"] == "epoch_aggregated" and entry["data"]["epoch"] == epoch:
                recorded = entry["data"]["weights_digest"]
            elif entry["kind"] == "run_started" and epoch == 0:
                recorded = entry["data"]["initial_digest"]
        if recorded != digest:
            raise click.ClickException(f"{source} hashes to {digest[:16]}, the ledger records {str(recorded)[:16]}; "
                                       f"check the run with: orchestrator audit {run_dir}")
    out = out or run_dir.with_name(f"{run_dir.name}-epoch-{epoch}.safetensors")
    if out.exists():
        raise click.ClickException(f"{out} already exists; pass another --out")
    out.write_bytes(encode(state))
    click.echo(f"wrote epoch {epoch} weights {digest} to {out}")


@main.command()
@state_dir_option
@click.option("--public-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the public key file into this directory, for example a volume workers mount.")
def init(state_dir: Path, public_dir: Path | None) -> None:
    """Create the orchestrator's key pair in the state directory; workers need its public file."""
    import shutil

    from orchestrator.identity import OrchestratorIdentity
    from protocol.crypto import CryptoError

    try:
        identity = OrchestratorIdentity.create(state_dir)
    except CryptoError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"created the orchestrator key in {state_dir}")
    public_file = identity.public_file
    if public_dir is not None:
        public_dir.mkdir(parents=True, exist_ok=True)
        public_file = Path(shutil.copy(identity.public_file, public_dir))
    click.echo(f"copy {public_file} to every worker and set FARM_ORCHESTRATOR_KEY to its path")


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Create a worker's Ed25519 key at PATH (mode 0600) and print its public key for enrollment."""
    from protocol.crypto import generate_key, public_key_text

    try:
        key = generate_key(path)
    except FileExistsError:
        raise click.ClickException(f"{path} already exists; keep that key or remove it first") from None
    click.echo(f"created {path}; set FARM_WORKER_KEY={path} for the worker and enroll it with:")
    click.echo(f"  orchestrator workers enroll NAME@HOST {public_key_text(key)} --owner OWNER")


if __name__ == "__main__":
    main()
