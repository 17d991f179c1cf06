"""Measure what the portable numerical profile costs against the default one, in one run.

    .venv/bin/python bench/profile_cost.py --data-root ../shared/datasets

It starts one training engine per profile (the process a worker trains in) and times the
same job in each: one pass over segment 0 of the default workload (30,000 MNIST images,
batch 32, one thread). The engines take turns, one job each per round, so that slow drifts of
a shared machine hit both. It prints the median job time per profile and

    ratio = portable job time / default job time

The first job of each engine loads torch and the data, and is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config.settings import TrainingSettings, data_root_from_env  # noqa: E402
from model.engine import Engine  # noqa: E402
from model.network import initial_state_dict  # noqa: E402
from model.numerics import PROFILES, class_id, describe  # noqa: E402
from model.weights import encode, state_dict_digest  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=data_root_from_env(),
                        help="datasets in torchvision's layout (default: FARM_DATA_ROOT or ./data)")
    parser.add_argument("--rounds", type=int, default=5, help="timed jobs per profile (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()

    state = initial_state_dict(0)
    base_digest, base_blob = state_dict_digest(state), encode(state)
    engines = {profile: Engine(profile).start() for profile in PROFILES}
    times: dict[str, list[float]] = {profile: [] for profile in PROFILES}
    digests: dict[str, set[str]] = {profile: set() for profile in PROFILES}
    environments = {}
    try:
        for round_index in range(args.rounds + 1):
            for profile, engine in engines.items():
                training = TrainingSettings(profile=profile).to_dict()
                started = time.perf_counter()
                reply, _ = engine.train(root=str(args.data_root), training=training, epoch=1, segment=0,
                                        base_digest=base_digest, base_blob=base_blob)
                elapsed = time.perf_counter() - started
                if round_index:  # round 0 loads torch and the data
                    times[profile].append(elapsed)
                digests[profile].add(reply["weights_digest"])
                environments[profile] = reply["environment"]
    finally:
        for engine in engines.values():
            engine.close()

    medians = {profile: statistics.median(values) for profile, values in times.items()}
    ratio = medians["portable"] / medians["default"]
    for profile in PROFILES:
        print(f"{profile:<9} class {class_id(environments[profile])} ({describe(environments[profile])})")
        print(f"          job median {medians[profile]:.3f} s  {['%.3f' % t for t in times[profile]]}  "
              f"weights {', '.join(sorted(d[:12] for d in digests[profile]))}")
    print(f"ratio portable / default: {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "medians": medians, "ratio": ratio,
                                         "environments": environments,
                                         "digests": {p: sorted(d) for p, d in digests.items()}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
