"""Numerical profiles and environment classes: which workers can produce the same bits.

Two processes produce bit-identical weights for a job only when they compute the same way:
same torch build, same kernels (the ATen vector level, MKL's code path, oneDNN's instruction
set), same thread count, same device. A worker's *fingerprint* records all of that; its
*class* is a short digest of the fingerprint plus the job's thread count and TF32 flags.
Replicas of one job go to workers of one class only (homogeneous redundancy).

A *profile* is a set of environment variables fixed before torch starts:

    default    torch's own choices: the widest vector unit of the CPU, MKL's fastest path.
               Classes split by CPU model and instruction set.
    portable   ATen's scalar-friendly "default" kernels, MKL's conditional numerical
               reproducibility in COMPATIBLE mode, oneDNN capped at SSE4.1, one thread.
               x86-64 CPUs with different instruction sets fall into one class.

This module imports no torch, so the Celery parent and pool processes stay free of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

PROFILES: dict[str, dict[str, str]] = {
    "default": {},
    "portable": {
        "ATEN_CPU_CAPABILITY": "default",  # ATen's baseline kernels instead of AVX2/AVX-512 ones
        "MKL_CBWR": "COMPATIBLE",  # MKL's code path that gives the same results on every x86-64 CPU
        "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN's lowest instruction set
    },
}
PROFILE_THREADS = {"portable": 1}  # profiles that fix the thread count

# Variables that change the bits a CPU computes. Each is part of the fingerprint.
CPU_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
GPU_VARIABLES = ("CUBLAS_WORKSPACE_CONFIG",)
# cuBLAS is deterministic only with a fixed workspace, and PyTorch's reproducibility notes give these two values.
CUBLAS_WORKSPACE = ":4096:8"
DEVICES = ("cpu", "cuda")
CLASS_DIGITS = 12  # hex digits of a class id: plenty to tell apart the classes of one farm


class NumericsError(ValueError):
    """A profile or device name is unknown."""


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise NumericsError(f"unknown numerical profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return profile


def check_device(device: str) -> str:
    if device not in DEVICES:
        raise NumericsError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    return device


def profile_environment(profile: str, device: str, base: Mapping[str, str]) -> dict[str, str]:
    """Return the environment a training process of `profile` on `device` starts with.

    The profile's variables replace any value in `base`, so an operator's setting cannot
    move a portable worker out of its class. Thread pools start with one thread; each
    job sets its own count.
    """
    env = dict(base)
    env.update(PROFILES[check_profile(profile)])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    if check_device(device) == "cuda":
        # Read when cuBLAS creates its handle, so it must be set before CUDA starts.
        if env.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
            env["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    return env


def overridden(profile: str, base: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Return variable -> (operator's value, profile's value) for each setting the profile replaces."""
    return {name: (base[name], value) for name, value in PROFILES[profile].items()
            if name in base and base[name] != value}


def job_environment(fingerprint: Mapping[str, object], *, threads: int, allow_tf32: bool) -> dict:
    """Return the numerical environment of a job: the worker's fingerprint plus the job's settings."""
    return {**fingerprint, "threads": threads, "tf32": int(allow_tf32)}


def class_id(environment: Mapping[str, object]) -> str:
    """Return the class of a numerical environment: a digest of its canonical JSON."""
    canonical = json.dumps(dict(environment), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:CLASS_DIGITS]


def describe(environment: Mapping[str, object]) -> str:
    """Return a one-line summary of an environment, e.g. 'cpu DEFAULT, torch 2.14.1, profile portable, 1 thread(s)'."""
    if environment.get("device") == "cuda":
        device = f"{environment.get('gpu')} (sm {environment.get('gpu_capability')}, CUDA {environment.get('cuda')})"
    else:
        device = f"cpu {environment.get('cpu_capability')}"
        if environment.get("cpu_model"):
            device += f" ({environment['cpu_model']})"
    parts = [device]
    # Variables that are set tell apart classes on the same processor.
    settings = [f"{name}={environment[name]}" for name in CPU_VARIABLES + GPU_VARIABLES if environment.get(name)]
    if settings:
        parts.append(" ".join(settings))
    parts += [f"torch {environment.get('torch')}", f"profile {environment.get('profile')}"]
    if "threads" in environment:
        parts.append(f"{environment['threads']} thread(s)")
    if environment.get("tf32"):
        parts.append("TF32")
    return ", ".join(parts)
