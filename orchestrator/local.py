"""A whole farm on loopback for demos, tests and benchmarks: Redis, N workers and Flower.

    with LocalFarm(workers=2, data_root=Path("data"), log_dir=Path("runs/logs")) as farm:
        ...  # farm.broker_url is the Redis the workers consume from
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from orchestrator.identity import KEY_FILE, PUBLIC_FILE, OrchestratorIdentity
from orchestrator.registry import Registry
from protocol.crypto import generate_key, load_private_key, public_key_text
from protocol.heartbeat import read_heartbeats

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalFarm:
    """Start Redis, workers and optionally Flower on 127.0.0.1; stop all of them on exit.

    It also creates the orchestrator's key in `state_dir` (default LOG_DIR/state), a key per
    worker, and enrolls each worker under an owner of its own unless an owner is given.
    """

    def __init__(
        self,
        *,
        workers: int,
        data_root: Path,
        log_dir: Path,
        flower: bool = False,
        worker_prefix: str = "worker",
        extra_env: dict[str, str] | None = None,
        state_dir: Path | None = None,
        redis_password: str | None = None,
        tls: bool = False,
        separate_store: bool = False,
    ) -> None:
        self.worker_count = workers
        self.data_root = Path(data_root).resolve()
        self.log_dir = Path(log_dir)
        self.with_flower = flower
        self.worker_prefix = worker_prefix
        self.extra_env = extra_env or {}
        self.redis_port = free_port()
        self.flower_port = free_port() if flower else None
        self.redis_password = redis_password
        self.tls = tls
        self.tls_dir = self.log_dir / "tls"
        scheme = "rediss" if tls else "redis"
        credentials = f":{redis_password}@" if redis_password else ""
        self.broker_url = f"{scheme}://{credentials}127.0.0.1:{self.redis_port}/0"
        # The store may be another database of the same server, as another server would be in production.
        self.store_url = self.broker_url[:-1] + "1" if separate_store else self.broker_url
        self.redis_process: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self.flower_process: subprocess.Popen | None = None
        self.state_dir = Path(state_dir) if state_dir else self.log_dir / "state"
        self.registry = Registry(self.state_dir)

    @property
    def flower_url(self) -> str | None:
        return f"http://127.0.0.1:{self.flower_port}/" if self.flower_port else None

    def environment(self, worker_key: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["FARM_BROKER_URL"] = self.broker_url
        env["FARM_STORE_URL"] = self.store_url
        env["FARM_DATA_ROOT"] = str(self.data_root)
        env["FARM_ORCHESTRATOR_KEY"] = str((self.state_dir / PUBLIC_FILE).resolve())
        if self.tls:
            env["FARM_REDIS_TLS_CA"] = str((self.tls_dir / "ca.pem").resolve())
        if worker_key is not None:
            env["FARM_WORKER_KEY"] = str(worker_key.resolve())
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        return env

    def __enter__(self) -> LocalFarm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def client(self) -> redis.Redis:
        """Return a client of this farm's Redis, with its password and TLS settings."""
        options = {"ssl_ca_certs": str(self.tls_dir / "ca.pem"), "ssl_cert_reqs": "required"} if self.tls else {}
        return redis.Redis.from_url(self.broker_url, **options)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not (self.state_dir / KEY_FILE).exists():
            OrchestratorIdentity.create(self.state_dir)
        self.start_redis()
        for index in range(1, self.worker_count + 1):
            self.start_worker(f"{self.worker_prefix}{index}")
        if self.with_flower:
            self.start_flower()
        self.wait_for_workers(self.worker_count)

    def start_redis(self) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server not found on PATH; install it (apt-get install redis-server) or run scripts/setup.sh")
        redis_dir = self.log_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        command = [
            server, "--bind", "127.0.0.1", "--port", str(self.redis_port), "--dir", str(redis_dir.resolve()),
            "--save", "", "--appendonly", "yes",
            "--maxmemory-policy", "noeviction",  # kombu's routing tables must never be evicted
        ]
        if self.redis_password:
            command += ["--requirepass", self.redis_password]
        if self.tls:
            write_tls_files(self.tls_dir)
            command += ["--port", "0", "--tls-port", str(self.redis_port), "--tls-auth-clients", "no",
                        "--tls-cert-file", str((self.tls_dir / "server.pem").resolve()),
                        "--tls-key-file", str((self.tls_dir / "server-key.pem").resolve()),
                        "--tls-ca-cert-file", str((self.tls_dir / "ca.pem").resolve())]
        self.redis_process = subprocess.Popen(command, stdout=open(self.log_dir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        client = self.client()
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.redis_process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start; see {self.log_dir / 'redis.log'}") from None
                time.sleep(0.1)
        logger.info("started Redis on 127.0.0.1:%d%s", self.redis_port, " with TLS" if self.tls else "")

    @staticmethod
    def node(name: str) -> str:
        """Return the node name of worker NAME on this host."""
        return f"{name}@{socket.gethostname()}"

    def worker_key(self, name: str) -> Path:
        """Return the key file of worker NAME, creating it on first use."""
        path = self.log_dir / "keys" / f"{name}.key"
        if not path.exists():
            generate_key(path)
        return path

    def start_worker(self, name: str, *, app: str = "tasks", owner: str | None = None, enroll: bool = True,
                     env: dict[str, str] | None = None) -> str:
        """Start a worker of Celery app module `app` named NAME@host, enrolled under `owner` (default NAME)."""
        node = self.node(name)
        key = self.worker_key(name)
        if enroll:
            self.registry.enroll(node, public_key_text(load_private_key(key)), owner or name)
        command = [sys.executable, "-m", "celery", "-A", app, "worker", "-n", node,
                   "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        log = open(self.log_dir / f"{name}.log", "ab")
        self.workers[node] = subprocess.Popen(
            command, cwd=PROJECT_ROOT, env={**self.environment(key), **(env or {})}, stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so a kill reaches the pool child too
        )
        logger.info("started worker %s (pid %d)", node, self.workers[node].pid)
        return node

    def start_flower(self) -> None:
        command = [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                   "--address=127.0.0.1", f"--port={self.flower_port}"]
        log = open(self.log_dir / "flower.log", "ab")
        self.flower_process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=self.environment(), stdout=log, stderr=subprocess.STDOUT)
        logger.info("started Flower on %s", self.flower_url)

    def wait_for_workers(self, count: int, timeout: float = 120.0) -> None:
        """Wait until `count` workers have heartbeats, failing early when one exits."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while len(read_heartbeats(client)) < count:
            for node, process in self.workers.items():
                if process.poll() is not None:
                    raise RuntimeError(f"worker {node} exited with code {process.returncode}; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not report within {timeout:.0f} s; see {self.log_dir}")
            time.sleep(0.2)

    def restart_redis(self) -> None:
        """Stop Redis as a crash would not lose it (its append-only file is kept) and start it again."""
        _stop(self.redis_process, signal.SIGTERM)
        self.start_redis()

    def stop_worker(self, node: str, *, kill: bool = False) -> None:
        process = self.workers.pop(node)
        _stop(process, signal.SIGKILL if kill else signal.SIGTERM)

    def stop(self) -> None:
        for node in list(self.workers):
            self.stop_worker(node)
        if self.flower_process is not None:
            _stop(self.flower_process, signal.SIGTERM)
            self.flower_process = None
        if self.redis_process is not None:
            _stop(self.redis_process, signal.SIGTERM)
            self.redis_process = None
        logger.info("stopped the local farm")


def write_tls_files(directory: Path) -> None:
    """Write a throwaway CA and a server certificate for 127.0.0.1, for a Redis with TLS on loopback."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def write_key(key, name: str) -> None:
        path = directory / name
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "farm local CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .sign(ca_key, hashes.SHA256()))
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "server.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_key(server_key, "server-key.pem")


def _stop(process: subprocess.Popen, sig: int, timeout: float = 20.0) -> None:
    if process.poll() is None:
        if sig == signal.SIGKILL:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        else:
            process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
