"""Measure the farm's steady-state epoch time against perfectly parallel plain PyTorch, in one run.

    .venv/bin/python bench/farm_vs_plain.py --data-root ../shared/datasets

It starts Redis and W workers on 127.0.0.1, trains the default workload (full MNIST, S=2
segments, R=2 replicas, quorum 2) for a few epochs, then times plain single-process PyTorch
(one thread, the same settings) on one segment pass, half of the passes before the farm starts
and half after it stops, so that slow drifts of a shared machine hit both sides. It prints

    ratio = farm epoch time / (S x R x plain pass time / W)

the farm's cost over ideal, overhead-free parallel work, and each worker's peak resident
memory (Celery parent, pool child and training engine). Epoch 1 is excluded as warm-up (the
engines load the dataset).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.settings import FarmSettings, TrainingSettings  # noqa: E402
from model.data import load_images, segment_images  # noqa: E402
from model.network import initial_state_dict  # noqa: E402
from model.training import configure_torch, job_seed, train_segment  # noqa: E402
from orchestrator.client import FarmClient  # noqa: E402
from orchestrator.local import LocalFarm  # noqa: E402
from orchestrator.training import run_training  # noqa: E402


def peak_rss_mib(pid: int) -> float:
    """Return VmHWM (peak resident set) of a process in MiB, 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def child_pids(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children.extend(int(child) for child in text)
    return children


def time_plain_passes(data_root: Path, settings: TrainingSettings, passes: int) -> list[float]:
    """Time `passes` one-segment passes of plain single-process PyTorch with the farm's settings."""
    configure_torch(1)
    images = load_images(str(data_root), settings.dataset, train=True)
    state = initial_state_dict(settings.seed)
    times = []
    for index in range(passes):
        segment = index % settings.segments
        inputs = segment_images(images, settings.segments, segment)
        started = time.perf_counter()
        train_segment(state, inputs, settings, seed=job_seed(settings.seed, 1, segment))
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True, help="datasets in torchvision's layout")
    parser.add_argument("--epochs", type=int, default=7, help="farm epochs; the first is warm-up (default 7)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes W (default 2)")
    parser.add_argument("--plain-passes", type=int, default=6, help="plain passes to time (default 6)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    training = TrainingSettings()  # the default workload: full MNIST, S=2
    farm_settings = FarmSettings(replicas=2, quorum=2)
    work = Path(tempfile.mkdtemp(prefix="farm-bench-"))

    # Plain PyTorch, first half, before any farm process exists.
    plain = time_plain_passes(args.data_root, training, args.plain_passes // 2)

    # Farm: epochs on W workers, then peak memory of each worker process tree.
    with LocalFarm(workers=args.workers, data_root=args.data_root, log_dir=work / "logs") as farm:
        client = FarmClient(farm.broker_url, farm.broker_url)
        result = run_training(client=client, training=training, farm=farm_settings, epochs=args.epochs,
                              run_dir=work / "run", data_root=args.data_root, state_dir=farm.state_dir)
        memory = {}
        for node, process in farm.workers.items():
            parent = peak_rss_mib(process.pid)
            children = child_pids(process.pid)  # the pool child
            engines = [engine for child in children for engine in child_pids(child)]  # its training engine
            pool = sum(peak_rss_mib(child) for child in children)
            engine = sum(peak_rss_mib(pid) for pid in engines)
            memory[node] = {"parent_mib": parent, "pool_child_mib": pool, "engine_mib": engine,
                            "total_mib": parent + pool + engine}

    finished = [record["finished_at"] for record in result.metrics]
    steady = [b - a for a, b in zip(finished, finished[1:])]  # epoch-to-epoch cadence after warm-up
    farm_epoch = statistics.median(steady)

    # Plain PyTorch, second half, after the farm stopped so that nothing competes for the cores.
    plain += time_plain_passes(args.data_root, training, args.plain_passes - args.plain_passes // 2)
    plain_pass = statistics.median(plain)
    ideal = training.segments * farm_settings.replicas * plain_pass / args.workers
    ratio = farm_epoch / ideal

    report = {
        "workers": args.workers, "segments": training.segments, "replicas": farm_settings.replicas,
        "batch_size": training.batch_size, "epochs": args.epochs,
        "farm_epoch_seconds": steady, "farm_epoch_median": farm_epoch,
        "plain_pass_seconds": plain, "plain_pass_median": plain_pass,
        "ideal_epoch_seconds": ideal, "ratio": ratio, "worker_memory": memory,
        "test_loss": [record["test_loss"] for record in result.metrics],
    }
    print(f"farm epoch (median of epochs 2..{args.epochs}): {farm_epoch:.3f} s  {['%.3f' % s for s in steady]}")
    print(f"plain pass (median of {args.plain_passes}):       {plain_pass:.3f} s  {['%.3f' % s for s in plain]}")
    print(f"ideal epoch = {training.segments} x {farm_settings.replicas} x {plain_pass:.3f} / {args.workers} = {ideal:.3f} s")
    print(f"ratio farm / ideal: {ratio:.3f}")
    for node, usage in memory.items():
        print(f"peak RSS {node}: parent {usage['parent_mib']:.0f} MiB + pool child "
              f"{usage['pool_child_mib']:.0f} MiB + engine {usage['engine_mib']:.0f} MiB = {usage['total_mib']:.0f} MiB")
    print(f"test loss per epoch: {['%.5f' % loss for loss in report['test_loss']]}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
