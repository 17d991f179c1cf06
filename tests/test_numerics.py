"""Numerical fingerprints, classes and profiles, measured in real engine processes.

The instruction-set matrix emulates CPUs with fewer vector units through the variables torch
and its libraries honour: ATEN_CPU_CAPABILITY (ATen's kernels), MKL_ENABLE_INSTRUCTIONS (MKL's
code path) and ONEDNN_MAX_CPU_ISA (oneDNN's). Under the portable profile, every variant must
train to the same digest in one class. Under the default profile, variants whose digests
differ must fall into different classes.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from config.settings import SettingsError, TrainingSettings
from model.engine import Engine, EngineError
from model.network import initial_state_dict
from model.numerics import (
    CPU_VARIABLES,
    NumericsError,
    class_id,
    describe,
    job_environment,
    overridden,
    profile_environment,
)
from model.weights import decode_verified, encode, model_spec, state_dict_digest

SUBSET = 2000
VARIANTS = {
    "native": {},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-sse4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "onednn-sse41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def clean_environment(**variant: str) -> dict[str, str]:
    """Return this process's environment without any numeric setting, plus `variant`."""
    env = {name: value for name, value in os.environ.items() if name not in CPU_VARIABLES}
    return {**env, **variant}


def train_once(data_root, profile: str, variant: dict[str, str]) -> tuple[str, str, dict]:
    """Train epoch 1, segment 0 in a fresh engine; return (weights digest, class, environment)."""
    start = initial_state_dict(5)
    engine = Engine(profile, base_env=clean_environment(**variant))
    try:
        reply, blob = engine.train(root=str(data_root), training=TrainingSettings(subset=SUBSET, profile=profile).to_dict(),
                                   epoch=1, segment=0, base_digest=state_dict_digest(start), base_blob=encode(start))
    finally:
        engine.close()
    decode_verified(blob, reply["weights_digest"], model_spec())  # the weights match their digest
    return reply["weights_digest"], class_id(reply["environment"]), reply["environment"]


@pytest.fixture(scope="module")
def matrix(data_root) -> dict[str, dict[str, tuple[str, str, dict]]]:
    return {profile: {name: train_once(data_root, profile, variant) for name, variant in VARIANTS.items()}
            for profile in ("default", "portable")}


# --- pure logic -----------------------------------------------------------------


def test_portable_profile_replaces_operator_settings():
    env = profile_environment("portable", "cpu", {"ATEN_CPU_CAPABILITY": "avx512", "PATH": "/bin"})
    assert env["ATEN_CPU_CAPABILITY"] == "default"
    assert env["MKL_CBWR"] == "COMPATIBLE"
    assert env["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    assert env["PATH"] == "/bin"
    assert overridden("portable", {"ATEN_CPU_CAPABILITY": "avx512"}) == {"ATEN_CPU_CAPABILITY": ("avx512", "default")}


def test_default_profile_keeps_operator_settings():
    env = profile_environment("default", "cpu", {"ATEN_CPU_CAPABILITY": "avx2"})
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert "MKL_CBWR" not in env
    assert overridden("default", {"ATEN_CPU_CAPABILITY": "avx2"}) == {}


def test_cuda_gets_a_deterministic_cublas_workspace():
    assert profile_environment("default", "cuda", {})["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert profile_environment("default", "cuda", {"CUBLAS_WORKSPACE_CONFIG": ":16:8"})["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert profile_environment("default", "cuda", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"})["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "CUBLAS_WORKSPACE_CONFIG" not in profile_environment("default", "cpu", {})


def test_class_changes_with_every_field():
    fingerprint = {"torch": "2.14.1", "cpu_capability": "AVX512", "profile": "default"}
    base = class_id(job_environment(fingerprint, threads=1, allow_tf32=False))
    assert base == class_id(job_environment(dict(reversed(fingerprint.items())), threads=1, allow_tf32=False))
    assert len(base) == 12
    others = [
        job_environment({**fingerprint, "cpu_capability": "AVX2"}, threads=1, allow_tf32=False),
        job_environment({**fingerprint, "torch": "2.14.0"}, threads=1, allow_tf32=False),
        job_environment(fingerprint, threads=2, allow_tf32=False),
        job_environment(fingerprint, threads=1, allow_tf32=True),
    ]
    assert base not in {class_id(environment) for environment in others}
    assert len({class_id(environment) for environment in others}) == len(others)


def test_unknown_profile_and_device_are_refused():
    with pytest.raises(NumericsError, match="unknown numerical profile 'fast'"):
        Engine("fast")
    with pytest.raises(NumericsError, match="unknown device 'tpu'"):
        Engine("default", "tpu")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(profile="fast"), "invalid profile 'fast': choose one of default, portable"),
        (dict(profile="portable", threads=2), "invalid threads 2 for profile portable: the profile fixes 1 thread"),
        (dict(allow_tf32="yes"), "invalid allow_tf32 'yes'"),
    ],
)
def test_numeric_settings_validated(settings, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainingSettings(**settings).validate()


# --- the fingerprint, measured ------------------------------------------------------


def test_fingerprint_describes_the_build_and_the_settings():
    default = Engine("default", base_env=clean_environment(ATEN_CPU_CAPABILITY="avx2"))
    portable = Engine("portable", base_env=clean_environment(MKL_ENABLE_INSTRUCTIONS="AVX2"))
    try:
        measured = default.start() and portable.start() and (default.fingerprint(), portable.fingerprint())
    finally:
        default.close()
        portable.close()
    default_print, portable_print = measured
    for fingerprint in measured:
        assert fingerprint["torch"] == torch.__version__
        assert fingerprint["torch_commit"] == torch.version.git_version
        assert fingerprint["device"] == "cpu"
        assert fingerprint["blas"] != "none"
        assert fingerprint["onednn"] != "none"
        assert fingerprint["matmul_precision"] == "highest"
    assert default_print["profile"] == "default"
    assert default_print["cpu_capability"] == "AVX2"
    assert default_print["ATEN_CPU_CAPABILITY"] == "avx2"
    assert default_print["MKL_CBWR"] == ""
    assert default_print["cpu_model"]  # the default profile's kernels depend on the processor
    assert portable_print["profile"] == "portable"
    assert portable_print["cpu_capability"] == "DEFAULT"
    assert portable_print["MKL_CBWR"] == "COMPATIBLE"
    assert portable_print["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    # MKL's reproducible mode fixes its code path, and the processor model no longer matters.
    assert "MKL_ENABLE_INSTRUCTIONS" not in portable_print
    assert "cpu_model" not in portable_print
    assert describe(job_environment(portable_print, threads=1, allow_tf32=False)).startswith(
        "cpu DEFAULT, ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE ONEDNN_MAX_CPU_ISA=SSE41, torch ")


def test_job_environment_reports_the_threads_used(data_root, matrix):
    _, klass, environment = matrix["default"]["native"]
    assert environment["threads"] == 1
    assert environment["tf32"] == 0
    engine = Engine("default", base_env=clean_environment())
    try:
        assert klass == class_id(job_environment(engine.fingerprint(), threads=1, allow_tf32=False))
    finally:
        engine.close()


# --- the instruction-set matrix -------------------------------------------------------


def test_portable_profile_unifies_variants(matrix):
    digests = {name: digest for name, (digest, _, _) in matrix["portable"].items()}
    classes = {name: klass for name, (_, klass, _) in matrix["portable"].items()}
    assert len(set(digests.values())) == 1, digests
    assert len(set(classes.values())) == 1, classes


def test_default_profile_separates_variants_that_differ(matrix):
    results = matrix["default"]
    # The emulation bites: torch's own choice and its baseline kernels give different bits.
    assert results["native"][0] != results["aten-default"][0]
    for (name_a, (digest_a, class_a, _)), (name_b, (digest_b, class_b, _)) in itertools.combinations(results.items(), 2):
        if digest_a != digest_b:
            assert class_a != class_b, f"{name_a} and {name_b} differ in bits but share class {class_a}"


def test_profiles_are_different_classes(matrix):
    assert matrix["default"]["native"][1] != matrix["portable"]["native"][1]


# --- the engine process ---------------------------------------------------------------


def test_engine_reports_bad_data_and_bad_weights(data_root):
    start = initial_state_dict(5)
    engine = Engine("default", base_env=clean_environment())
    try:
        with pytest.raises(EngineError, match="dataset mismatch") as caught:
            engine.train(root=str(data_root), training=TrainingSettings(subset=SUBSET).to_dict(), epoch=1, segment=0,
                         base_digest=state_dict_digest(start), base_blob=encode(start), data_digest="0" * 64)
        assert caught.value.kind == "dataset"
        with pytest.raises(EngineError, match="weights digest mismatch") as caught:
            engine.train(root=str(data_root), training=TrainingSettings(subset=SUBSET).to_dict(), epoch=1, segment=0,
                         base_digest="0" * 64, base_blob=encode(start))
        assert caught.value.kind == "weights"
    finally:
        engine.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_engine_without_a_gpu_says_so():
    engine = Engine("default", "cuda", base_env=clean_environment())
    try:
        with pytest.raises(EngineError, match="torch sees no CUDA device"):
            engine.fingerprint()
    finally:
        engine.close()


def test_engine_dies_with_its_parent():
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom model.engine import Engine\n"
         "engine = Engine('default').start()\nprint(engine.pid, flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )
    engine_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(engine_pid):
        time.sleep(0.1)
    assert not _alive(engine_pid), "the engine outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


# --- the GPU determinism script -------------------------------------------------------


def run_gpu_script(data_root, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/gpu_determinism.py", "--data-root", str(data_root),
                           "--subset", "1000", *options], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_script_compares_two_runs(data_root):
    # On the CPU the script's comparison runs end to end; the GPU itself is checked where one exists.
    result = run_gpu_script(data_root, "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    digests = [line.split("weights ")[1].split(",")[0] for line in result.stdout.splitlines()
               if line.startswith("run ")]
    assert len(digests) == 2
    assert digests[0] == digests[1]
    assert "identical: both runs returned the same weights and loss" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the exit status on a machine without a GPU")
def test_gpu_script_without_a_gpu_exits_2(data_root):
    result = run_gpu_script(data_root)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no GPU: device cuda requested, but torch sees no CUDA device" in result.stderr
