"""Train the same job twice on a GPU and compare the digests: can this GPU serve a farm class?

    .venv/bin/python scripts/gpu_determinism.py --data-root ../shared/datasets

Each training runs in its own engine process, as on a worker with FARM_DEVICE=cuda: the
deterministic CUDA settings (cuBLAS workspace, deterministic cuDNN, deterministic
algorithms, TF32 off unless --allow-tf32) are in place before CUDA starts, and no process
that has started CUDA forks. The script prints the GPU's numerical class, both digests and
losses, and the job times. With --compare-cpu it also trains the job on the CPU, to show
whether the GPU's class can share bits with CPU workers (normally not).

Exit status: 0 when both GPU runs agree bit for bit, 1 when they differ, 2 when no GPU
(or no CUDA build of torch) is available.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.settings import TrainingSettings, data_root_from_env  # noqa: E402
from model.engine import Engine, EngineError  # noqa: E402
from model.network import initial_state_dict  # noqa: E402
from model.numerics import class_id, describe  # noqa: E402
from model.weights import encode, state_dict_digest  # noqa: E402


def train_in_fresh_engine(device: str, training: TrainingSettings, data_root: Path) -> tuple[dict, float]:
    """Train epoch 1, segment 0 from the seed-0 initial weights in a new engine; return (reply, seconds)."""
    state = initial_state_dict(training.seed)
    engine = Engine(training.profile, device)
    try:
        engine.fingerprint()  # start CUDA before the clock starts
        started = time.perf_counter()
        reply, _ = engine.train(root=str(data_root), training=training.to_dict(), epoch=1, segment=0,
                                base_digest=state_dict_digest(state), base_blob=encode(state))
        return reply, time.perf_counter() - started
    finally:
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=data_root_from_env(),
                        help="datasets in torchvision's layout (default: FARM_DATA_ROOT or ./data)")
    parser.add_argument("--subset", type=int, default=0, help="train on the first N images only (default: all)")
    parser.add_argument("--allow-tf32", action="store_true", help="let the GPU use TF32 matrix products")
    parser.add_argument("--compare-cpu", action="store_true", help="also train the job on the CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="device to check (cpu only exercises this script)")
    args = parser.parse_args()

    training = TrainingSettings(subset=args.subset, allow_tf32=args.allow_tf32).validate()
    try:
        runs = [train_in_fresh_engine(args.device, training, args.data_root) for _ in range(2)]
    except EngineError as error:
        if error.kind == "settings":
            print(f"no GPU: {error}", file=sys.stderr)
            return 2
        raise
    for index, (reply, seconds) in enumerate(runs, start=1):
        environment = reply["environment"]
        print(f"run {index}: class {class_id(environment)} ({describe(environment)}), weights "
              f"{reply['weights_digest']}, loss {reply['loss']!r}, {seconds:.2f} s")
    (first, _), (second, _) = runs
    same = (first["weights_digest"], first["loss"], class_id(first["environment"])) == (
        second["weights_digest"], second["loss"], class_id(second["environment"]))
    if args.compare_cpu and args.device != "cpu":
        reply, seconds = train_in_fresh_engine("cpu", training, args.data_root)
        relation = "the same as" if reply["weights_digest"] == first["weights_digest"] else "different from"
        print(f"cpu:   class {class_id(reply['environment'])}, weights {reply['weights_digest']}, {seconds:.2f} s; "
              f"bits {relation} the GPU's")
    print("identical: both runs returned the same weights and loss" if same
          else "DIFFERENT: this device is not deterministic with these settings")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
