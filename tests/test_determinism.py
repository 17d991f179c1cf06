"""One job trained in two separate processes gives bit-identical weights and loss."""

import json
import subprocess
import sys

from tests.conftest import REPO_ROOT

JOB_SCRIPT = """
import json, sys
from config.settings import TrainingSettings
from model.data import load_images, segment_images
from model.network import initial_state_dict
from model.training import job_seed, train_segment
from model.weights import state_dict_digest
from protocol.messages import loss_bits

settings = TrainingSettings(subset=6000)
images = load_images(sys.argv[1], "mnist", train=True)[: settings.subset]
inputs = segment_images(images, settings.segments, 1)
weights, loss = train_segment(initial_state_dict(7), inputs, settings, seed=job_seed(7, 3, 1))
print(json.dumps({"digest": state_dict_digest(weights), "loss_bits": loss_bits(loss)}))
"""


def train_in_new_process(data_root) -> dict:
    output = subprocess.run(
        [sys.executable, "-c", JOB_SCRIPT, str(data_root)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_job_bit_identical_across_processes(data_root):
    first = train_in_new_process(data_root)
    second = train_in_new_process(data_root)
    assert first["digest"] == second["digest"]
    assert first["loss_bits"] == second["loss_bits"]


def test_job_seed_changes_the_bits(data_root):
    from config.settings import TrainingSettings
    from model.data import load_images, segment_images
    from model.network import initial_state_dict
    from model.training import job_seed, train_segment
    from model.weights import state_dict_digest

    settings = TrainingSettings(subset=2000)
    inputs = segment_images(load_images(str(data_root), "mnist", train=True)[:2000], 2, 0)
    start = initial_state_dict(0)
    epoch_one, _ = train_segment(start, inputs, settings, seed=job_seed(0, 1, 0))
    epoch_two, _ = train_segment(start, inputs, settings, seed=job_seed(0, 2, 0))
    assert state_dict_digest(epoch_one) != state_dict_digest(epoch_two)
