"""Homogeneous redundancy on a real farm whose workers emulate two kinds of CPU.

Workers native1 and native2 run torch's own kernels. baseline1 and baseline2 emulate an older
CPU through ATen's baseline kernels and MKL's SSE4.2 path, which change the bits. Under the
default profile the farm has two classes, and under the portable profile one.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from config.settings import TrainingSettings
from model.numerics import class_id
from orchestrator.cli import main
from orchestrator.errors import StaffingError
from orchestrator.local import LocalFarm
from orchestrator.staffing import environment_for
from tests.farmrun import train

BASELINE_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
SEGMENTS = 4


@pytest.fixture(scope="module")
def mixed_farm(data_root, tmp_path_factory):
    with LocalFarm(workers=2, data_root=data_root, log_dir=tmp_path_factory.mktemp("mixed-farm-logs"),
                   worker_prefix="native") as farm:
        farm.start_worker("baseline1", env=BASELINE_CPU)
        farm.start_worker("baseline2", env=BASELINE_CPU)
        farm.wait_for_workers(4)
        yield farm


@pytest.fixture(scope="module")
def mixed_client(mixed_farm):
    from orchestrator.client import FarmClient

    return FarmClient(mixed_farm.broker_url, mixed_farm.broker_url)


def classes_of(client, profile: str) -> dict[str, str]:
    """Return worker -> class for a run of `profile` with default settings, from the heartbeats."""
    training = TrainingSettings(profile=profile)
    return {name: class_id(environment_for(record, training)) for name, record in client.live_workers().items()}


def test_default_profile_splits_the_farm_into_two_classes(mixed_farm, mixed_client):
    classes = classes_of(mixed_client, "default")
    native = {classes[mixed_farm.node("native1")], classes[mixed_farm.node("native2")]}
    baseline = {classes[mixed_farm.node("baseline1")], classes[mixed_farm.node("baseline2")]}
    assert len(native) == 1
    assert len(baseline) == 1
    assert native != baseline
    assert len(set(classes_of(mixed_client, "portable").values())) == 1


def test_workers_list_shows_each_workers_classes(mixed_farm, mixed_client):
    result = CliRunner().invoke(main, ["workers", "list", "--broker-url", mixed_farm.broker_url,
                                       "--state-dir", str(mixed_farm.state_dir)])
    assert result.exit_code == 0, result.output
    default, portable = classes_of(mixed_client, "default"), classes_of(mixed_client, "portable")
    for name in ("native1", "native2", "baseline1", "baseline2"):
        node = mixed_farm.node(name)
        line = next(line for line in result.output.splitlines() if line.startswith(node))
        assert line.split()[-2:] == [default[node], portable[node]]
    assert "CLASS DEFAULT" in result.output
    assert "CLASS PORTABLE" in result.output
    assert f"  {portable[mixed_farm.node('native1')]}  cpu DEFAULT, ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE " in result.output
    assert ": 4 worker(s)" in result.output  # the portable class contains all four
    assert "ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2, torch " in result.output


def test_workers_list_shows_classes_for_other_threads(mixed_farm, mixed_client):
    result = CliRunner().invoke(main, ["workers", "list", "--threads", "2", "--broker-url", mixed_farm.broker_url,
                                       "--state-dir", str(mixed_farm.state_dir)])
    assert result.exit_code == 0, result.output
    node = mixed_farm.node("native1")
    line = next(line for line in result.output.splitlines() if line.startswith(node))
    record = mixed_client.live_workers()[node]
    assert line.split()[-2] == class_id(environment_for(record, TrainingSettings(threads=2)))
    assert line.split()[-1] == class_id(environment_for(record, TrainingSettings(profile="portable")))
    assert "for runs with 2 thread(s)" in result.output


def test_replicas_of_a_job_stay_in_one_class(mixed_farm, mixed_client, data_root, tmp_path):
    result = train(mixed_farm, mixed_client, tmp_path / "default", data_root, epochs=1,
                   training={"segments": SEGMENTS})
    classes = classes_of(mixed_client, "default")
    record = result.metrics[0]
    assert record["accepted"] == SEGMENTS
    # Replicas of one job from two classes would disagree (their bits differ) and be rejected.
    assert record["disagreements"] == 0
    assert not record["rejected"]
    assert not record["failed"]
    accepted = [json.loads(line)["data"] for line in (result.run_dir / "ledger.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "segment_accepted"]
    used = set()
    for entry in accepted:
        voter_classes = {classes[voter["worker"]] for voter in entry["voters"]}
        assert voter_classes == {entry["class"]}
        assert {class_id(voter["result"]["environment"]) for voter in entry["voters"]} == {entry["class"]}
        used.add(entry["class"])
    assert len(used) == 2  # load balancing spread the segments over both classes


def test_run_that_no_class_can_staff_is_refused(mixed_farm, mixed_client, data_root, tmp_path):
    with pytest.raises(StaffingError) as caught:
        train(mixed_farm, mixed_client, tmp_path / "refused", data_root, epochs=1, replicas=3, quorum=3,
              worker_wait=1.0)
    message = caught.value.message
    assert "no numerical class holds live workers of 3 distinct owners" in message
    for klass in set(classes_of(mixed_client, "default").values()):
        assert f"class {klass} (cpu " in message
    assert message.count("2 worker(s) of 2 owner(s)") == 2
    assert "--profile portable" in message
    assert not (tmp_path / "refused").exists()


def test_cli_refuses_a_run_it_cannot_staff(mixed_farm, data_root, tmp_path):
    result = CliRunner().invoke(main, [
        "run", "--broker-url", mixed_farm.broker_url, "--state-dir", str(mixed_farm.state_dir), "--epochs", "1",
        "--replicas", "3", "--quorum", "3", "--worker-wait", "1", "--subset", "400", "--no-download",
        "--data-root", str(data_root), "--run-dir", str(tmp_path / "cli-refused"),
    ])
    assert result.exit_code == 3, result.output
    assert "no numerical class holds live workers of 3 distinct owners" in result.output
    assert "2 worker(s) of 2 owner(s)" in result.output


def test_portable_profile_lets_every_worker_agree(mixed_farm, mixed_client, data_root, tmp_path):
    result = train(mixed_farm, mixed_client, tmp_path / "portable", data_root, epochs=1, replicas=4, quorum=4,
                   training={"profile": "portable"})
    record = result.metrics[0]
    assert record["accepted"] == 2
    assert record["disagreements"] == 0
    assert not record["rejected"]
    for segment in record["accepted_segments"]:
        assert len(segment["voters"]) == 4  # native and emulated baseline CPUs returned the same bits
