"""A training process per numerical profile, started fresh so its settings precede torch and CUDA.

MKL, ATen and cuBLAS read their numeric settings once, when torch loads or CUDA starts, so a
process cannot change profile after the fact. An `Engine` is therefore a child process,
started with `python -m model.engine` (exec, never a bare fork) under its profile's
environment. The parent sends it jobs over a pipe and imports no torch itself. CUDA only
starts in the engine, which forks nothing.

Messages on the pipe: a 4-byte length, a JSON header, an 8-byte length, a binary payload.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Mapping
from typing import BinaryIO

from model.numerics import CPU_VARIABLES, GPU_VARIABLES, check_device, check_profile, overridden, profile_environment

logger = logging.getLogger(__name__)

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 30


class EngineError(RuntimeError):
    """The engine could not run a request; `kind` is "dataset", "weights", "settings" or "internal"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _write(stream: BinaryIO, header: dict, payload: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    stream.write(struct.pack(">I", len(raw)) + raw + struct.pack(">Q", len(payload)))
    stream.write(payload)
    stream.flush()


def _read_exact(stream: BinaryIO, count: int) -> bytes:
    data = stream.read(count)
    if data is None or len(data) != count:
        raise EOFError("the engine's pipe closed")
    return data


def _read(stream: BinaryIO) -> tuple[dict, bytes]:
    (size,) = struct.unpack(">I", _read_exact(stream, 4))
    if size > MAX_HEADER_BYTES:
        raise EngineError("internal", f"engine header of {size} bytes is over the limit")
    header = json.loads(_read_exact(stream, size))
    (size,) = struct.unpack(">Q", _read_exact(stream, 8))
    if size > MAX_PAYLOAD_BYTES:
        raise EngineError("internal", f"engine payload of {size} bytes is over the limit")
    return header, _read_exact(stream, size) if size else b""


class Engine:
    """A training process of one numerical profile on one device, started on first use."""

    def __init__(self, profile: str = "default", device: str = "cpu", *, base_env: Mapping[str, str] | None = None) -> None:
        self.profile = check_profile(profile)
        self.device = check_device(device)
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._process: subprocess.Popen | None = None
        self._fingerprint: dict | None = None
        self._lock = threading.Lock()

    def start(self) -> Engine:
        """Start the process if it is not running; returns at once, while torch loads."""
        if self._process is not None and self._process.poll() is None:
            return self
        for name, (theirs, ours) in overridden(self.profile, self.base_env).items():
            logger.warning("profile %s sets %s=%s in place of %s", self.profile, name, ours, theirs)
        env = profile_environment(self.profile, self.device, self.base_env)
        # The engine imports this package wherever the parent was started from.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "model.engine", self.profile, self.device, str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        logger.info("started %s engine on %s as process %d", self.profile, self.device, self._process.pid)
        return self

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def call(self, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
        """Send one request and return the reply; raise EngineError when the engine reports a failure."""
        with self._lock:
            self.start()
            try:
                _write(self._process.stdin, header, payload)
                reply, data = _read(self._process.stdout)
            except BaseException:
                # Interrupted mid-request (a time limit, a dead engine): the pipe is out of step.
                self.close()
                raise
        if "error" in reply:
            raise EngineError(reply.get("kind", "internal"), reply["error"])
        return reply, data

    def fingerprint(self) -> dict:
        """Return the engine's numerical fingerprint (without the job's thread count and TF32 flags)."""
        if self._fingerprint is None:
            self._fingerprint = self.call({"op": "fingerprint"})[0]["fingerprint"]
        return dict(self._fingerprint)

    def train(self, *, root: str, training: dict, epoch: int, segment: int, base_digest: str,
              base_blob: bytes, data_digest: str | None = None) -> tuple[dict, bytes]:
        """Train one job; return ({weights_digest, loss, data_digest, environment}, encoded weights).

        With `data_digest` set, a segment that hashes differently fails with kind "dataset".
        """
        return self.call({"op": "train", "root": root, "training": training, "epoch": epoch, "segment": segment,
                          "base_digest": base_digest, "data_digest": data_digest}, base_blob)

    def close(self) -> None:
        """Stop the process; a later call starts a new one."""
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        if process.poll() is None:
            process.kill()
        process.wait()
        logger.info("stopped %s engine process %d", self.profile, process.pid)


# --- the engine process -------------------------------------------------------


def _die_with_parent(parent: int) -> None:
    """Have Linux kill this process when its parent dies, so a killed worker leaves no trainer behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        sys.exit(0)  # the parent died before the request above took effect


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()[:120]
    except OSError:
        pass
    import platform

    return platform.processor()[:120] or "unknown"


def _build_line(config: str, marker: str) -> str:
    """Return the line of torch's build description that contains `marker`, trimmed."""
    for line in config.splitlines():
        if marker in line:
            return line.strip(" -")[:120]
    return "none"


def fingerprint(profile: str, device: str) -> dict:
    """Return the versions and settings that decide the bits this process computes; call it in the engine."""
    import platform

    import torch

    config = torch.__config__.show()
    result: dict = {
        "profile": profile,
        "device": device,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch_commit": torch.version.git_version,
        "blas": _build_line(config, "Math Kernel Library") if torch.backends.mkl.is_available()
        else _build_line(config, "BLAS_INFO"),
        "onednn": _build_line(config, "MKL-DNN") if torch.backends.mkldnn.is_available() else "none",
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        result.update({
            "gpu": torch.cuda.get_device_name(0), "gpu_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda or "none", "cudnn": torch.backends.cudnn.version() or 0,
            "cudnn_deterministic": int(torch.backends.cudnn.deterministic),
            **{name: os.environ.get(name, "") for name in GPU_VARIABLES},
        })
        return result
    result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if profile == "default":
        result["cpu_model"] = _cpu_model()  # MKL's fastest path depends on the exact processor
    for name in CPU_VARIABLES:
        result[name] = os.environ.get(name, "")
    if result["MKL_CBWR"].startswith("COMPATIBLE"):
        del result["MKL_ENABLE_INSTRUCTIONS"]  # MKL's reproducible mode fixes the code path by itself
    return result


class _Trainer:
    """The engine's state: its fingerprint and the segments it has loaded."""

    def __init__(self, profile: str, device: str) -> None:
        import torch

        torch.set_num_interop_threads(1)
        torch.use_deterministic_algorithms(True)
        if device == "cuda":
            if not torch.cuda.is_available():
                raise EngineError("settings", "device cuda requested, but torch sees no CUDA device")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        self.device = device
        self.fingerprint = fingerprint(profile, device)
        self._segments: dict[tuple, tuple] = {}

    def segment(self, root: str, dataset: str, subset: int, segments: int, segment: int):
        """Return (uint8 images, data digest) of one segment, loaded and hashed once per process."""
        key = (root, dataset, subset, segments, segment)
        if key not in self._segments:
            from model.data import data_digest, load_images, segment_images

            images = load_images(root, dataset, train=True)
            if subset:
                images = images[:subset]
            part = segment_images(images, segments, segment).contiguous()
            if len(self._segments) >= 8:
                self._segments.pop(next(iter(self._segments)))
            self._segments[key] = (part, data_digest(dataset, segments, segment, part))
        return self._segments[key]

    def train(self, request: dict, base_blob: bytes) -> tuple[dict, bytes]:
        import torch

        from config.settings import TrainingSettings
        from model.data import DatasetError
        from model.numerics import job_environment
        from model.training import job_seed, train_segment
        from model.weights import decode_verified, encode, model_spec, state_dict_digest

        settings = TrainingSettings.from_dict(request["training"])
        images, digest = self.segment(request["root"], settings.dataset, settings.subset, settings.segments,
                                      request["segment"])
        expected = request.get("data_digest")
        if expected is not None and digest != expected:
            raise DatasetError(
                f"dataset mismatch: {settings.dataset} segment {request['segment']}/{settings.segments} hashes to "
                f"{digest[:16]} under data root {request['root']}, the job expects {expected[:16]}; "
                f"point FARM_DATA_ROOT at an unmodified copy of the dataset"
            )
        base = decode_verified(base_blob, request["base_digest"], model_spec())
        torch.backends.cuda.matmul.allow_tf32 = settings.allow_tf32
        torch.backends.cudnn.allow_tf32 = settings.allow_tf32
        state, loss = train_segment(base, images, settings, seed=job_seed(settings.seed, request["epoch"], request["segment"]), device=self.device)
        environment = job_environment(self.fingerprint, threads=torch.get_num_threads(),
                                      allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        reply = {"weights_digest": state_dict_digest(state), "loss": loss, "data_digest": digest,
                 "environment": environment}
        return reply, encode(state)


def serve(profile: str, device: str, parent: int) -> None:
    """Serve requests from stdin until it closes; anything printed goes to stderr, not the pipe."""
    _die_with_parent(parent)
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the replies
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="[engine %(process)d] %(levelname)s %(message)s")
    from config.settings import SettingsError
    from model.data import DatasetError
    from model.weights import WeightsError

    try:
        trainer = _Trainer(profile, device)
        failure = None
    except EngineError as error:
        trainer, failure = None, {"error": str(error), "kind": error.kind}
    while True:
        try:
            request, payload = _read(requests)
        except EOFError:
            return
        if failure is not None:
            _write(replies, failure)
            continue
        try:
            if request.get("op") == "fingerprint":
                reply, data = {"fingerprint": trainer.fingerprint}, b""
            elif request.get("op") == "train":
                reply, data = trainer.train(request, payload)
            else:
                raise EngineError("internal", f"unknown engine request {request.get('op')!r}")
        except DatasetError as error:
            reply, data = {"error": str(error), "kind": "dataset"}, b""
        except WeightsError as error:
            reply, data = {"error": str(error), "kind": "weights"}, b""
        except SettingsError as error:
            reply, data = {"error": str(error), "kind": "settings"}, b""
        except Exception as error:  # reported to the caller, which decides what it means
            logging.exception("engine request failed")
            reply, data = {"error": f"{type(error).__name__}: {error}", "kind": "internal"}, b""
        _write(replies, reply, data)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
