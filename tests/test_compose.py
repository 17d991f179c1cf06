"""docker-compose.yml validates offline and keeps the deployment's invariants.

`docker-compose config` resolves and validates the file without a Docker engine, so these
tests need only the docker-compose binary.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SERVICES = ("redis", "worker", "flower", "orchestrator")
REDIS_PASSWORD = "test-redis-password"
FLOWER_AUTH = "operator:test-flower-password"

COMPOSE = shutil.which("docker-compose")
pytestmark = pytest.mark.skipif(
    COMPOSE is None, reason="docker-compose is not installed (apt-get install docker-compose)"
)


def _compose(*args: str) -> subprocess.CompletedProcess:
    # Variables a developer may have exported would hide whether the file's own defaults work.
    env = {key: value for key, value in os.environ.items() if key not in ("FARM_DATASETS", "FARM_RUN_NAME")}
    env.update(FARM_REDIS_PASSWORD=REDIS_PASSWORD, FLOWER_BASIC_AUTH=FLOWER_AUTH)
    return subprocess.run(
        [COMPOSE, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )


def _scalar(text: str):
    if text == "{}":
        return {}
    if text == "[]":
        return []
    if text.startswith("'") and text.endswith("'"):
        return text[1:-1].replace("''", "'")
    if text.startswith('"') and text.endswith('"'):
        return json.loads(text)
    return text


def _parse_block(lines: list[tuple[int, str]], pos: int, indent: int):
    """Parse the node whose lines start at POS with INDENT; return it and the next position."""
    if lines[pos][1].startswith("- "):
        items = []
        while pos < len(lines) and lines[pos][0] == indent and lines[pos][1].startswith("- "):
            item = lines[pos][1][2:]
            if item.endswith(":") or ": " in item:
                # A mapping item, such as a port without a host address, which v1 prints in long
                # syntax. Its first key follows "- " and the other keys are two columns deeper.
                lines[pos] = (indent + 2, item)
                value, pos = _parse_block(lines, pos, indent + 2)
                items.append(value)
                continue
            items.append(_scalar(item))
            pos += 1
        return items, pos
    mapping = {}
    while pos < len(lines) and lines[pos][0] == indent:
        content = lines[pos][1]
        if content.startswith("- "):
            break
        if content.endswith(":"):
            key, rest = content[:-1], ""
        else:
            key, separator, rest = content.partition(": ")
            if not separator:
                raise ValueError(f"unsupported line in docker-compose config output: {content!r}")
        pos += 1
        value = None
        if not rest and pos < len(lines):
            next_indent, next_content = lines[pos]
            if next_indent > indent or (next_indent == indent and next_content.startswith("- ")):
                value, pos = _parse_block(lines, pos, next_indent)
        elif rest:
            value = _scalar(rest)
        mapping[_scalar(key)] = value
    if pos < len(lines) and lines[pos][0] > indent:
        raise ValueError(f"unexpected indentation in docker-compose config output: {lines[pos][1]!r}")
    return mapping, pos


def parse_compose_yaml(text: str) -> dict:
    """Parse the block-style YAML that docker-compose 1.x prints, for machines without PyYAML.

    It reads mappings, sequences and quoted scalars, which is all `config` prints for this file.
    Anything else, such as a scalar folded over several lines, raises ValueError so that it is
    never misread.
    """
    lines = [
        (len(raw) - len(raw.lstrip(" ")), raw.strip())
        for raw in text.splitlines()
        if raw.strip() and not raw.lstrip().startswith("#")
    ]
    document, pos = _parse_block(lines, 0, lines[0][0])
    if pos != len(lines):
        raise ValueError(f"unparsed docker-compose config output from line: {lines[pos][1]!r}")
    return document


@pytest.fixture(scope="module")
def config_run() -> subprocess.CompletedProcess:
    return _compose("config")


@pytest.fixture(scope="module")
def config(config_run: subprocess.CompletedProcess) -> dict:
    if config_run.returncode != 0:
        pytest.fail(f"docker-compose config failed:\n{config_run.stderr}")
    try:
        import yaml
    except ImportError:
        pass
    else:
        return yaml.safe_load(config_run.stdout)
    # Compose v2 prints YAML that the fallback parser cannot read, but it can also print JSON.
    # Version 1 prints its help text and exits 0 on the unknown option, so only v2 is asked.
    version = _compose("version", "--short").stdout.strip().lstrip("v")
    if not version.startswith("1."):
        as_json = _compose("config", "--format", "json")
        if as_json.returncode == 0 and as_json.stdout.lstrip().startswith("{"):
            return json.loads(as_json.stdout)
    return parse_compose_yaml(config_run.stdout)


def _command(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def _has_pair(command: list[str], flag: str, value: str) -> bool:
    return any(first == flag and second == value for first, second in zip(command, command[1:]))


def _host_ips(ports: list) -> list[str]:
    """Return the host address of each published port, given in short or long syntax."""
    addresses = []
    for port in ports:
        if isinstance(port, dict):
            addresses.append(port.get("host_ip", "0.0.0.0"))
        else:
            parts = str(port).split(":")
            addresses.append(parts[0] if len(parts) == 3 else "0.0.0.0")
    return addresses


def _volume_is_read_only(volume) -> bool:
    if isinstance(volume, dict):
        return bool(volume.get("read_only"))
    return str(volume).split(":")[-1] == "ro"


def _volumes_at(service: dict, target: str) -> list:
    volumes = service.get("volumes") or []
    return [
        volume for volume in volumes
        if (volume.get("target") if isinstance(volume, dict) else str(volume).split(":")[1]) == target
    ]


def test_config_exits_zero(config_run: subprocess.CompletedProcess) -> None:
    assert config_run.returncode == 0, config_run.stderr


@pytest.mark.parametrize("name", SERVICES)
def test_service_exists(config: dict, name: str) -> None:
    assert name in config["services"]


def test_redis_enables_append_only_file(config: dict) -> None:
    assert _has_pair(_command(config["services"]["redis"]), "--appendonly", "yes")


def test_redis_never_evicts(config: dict) -> None:
    assert _has_pair(_command(config["services"]["redis"]), "--maxmemory-policy", "noeviction")


def test_redis_keeps_data_in_a_volume(config: dict) -> None:
    assert _volumes_at(config["services"]["redis"], "/data")


def test_redis_has_healthcheck(config: dict) -> None:
    assert "redis-cli" in " ".join(config["services"]["redis"]["healthcheck"]["test"])


def test_redis_is_not_published_beyond_loopback(config: dict) -> None:
    ports = config["services"]["redis"].get("ports") or []
    assert all(address == "127.0.0.1" for address in _host_ips(ports))


def test_worker_name_uses_container_hostname(config: dict) -> None:
    assert _has_pair(_command(config["services"]["worker"]), "-n", "worker@%h")


def test_worker_has_no_container_name(config: dict) -> None:
    assert "container_name" not in config["services"]["worker"]


def test_worker_publishes_no_ports(config: dict) -> None:
    assert not config["services"]["worker"].get("ports")


def test_worker_mounts_datasets_read_only(config: dict) -> None:
    volumes = _volumes_at(config["services"]["worker"], "/data/datasets")
    assert volumes
    assert all(_volume_is_read_only(volume) for volume in volumes)


def test_worker_reads_the_mounted_datasets(config: dict) -> None:
    assert config["services"]["worker"]["environment"]["FARM_DATA_ROOT"] == "/data/datasets"


def test_worker_waits_for_healthy_redis(config: dict) -> None:
    assert config["services"]["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_worker_runs_two_replicas_by_default(config: dict) -> None:
    assert str(config["services"]["worker"]["deploy"]["replicas"]) == "2"


def test_flower_publishes_a_port(config: dict) -> None:
    assert config["services"]["flower"].get("ports")


def test_flower_port_bound_to_loopback(config: dict) -> None:
    assert _host_ips(config["services"]["flower"]["ports"]) == ["127.0.0.1"]


def test_orchestrator_is_in_train_profile(config: dict) -> None:
    assert "train" in config["services"]["orchestrator"].get("profiles", [])


def test_orchestrator_writes_runs_to_a_volume(config: dict) -> None:
    assert _volumes_at(config["services"]["orchestrator"], "/runs")


def test_parser_reads_compose_v1_output() -> None:
    text = (
        "services:\n  a:\n    command:\n    - x\n    - '3'\n    - \"yes\"\n"
        "    environment:\n      K: redis://r:1/0\n    ports:\n    - published: 6379\n      target: 6379\n"
        "volumes:\n  v: {}\n"
    )
    assert parse_compose_yaml(text) == {
        "services": {
            "a": {
                "command": ["x", "3", "yes"],
                "environment": {"K": "redis://r:1/0"},
                "ports": [{"published": "6379", "target": "6379"}],
            }
        },
        "volumes": {"v": {}},
    }


def test_redis_requires_password(config: dict) -> None:
    assert _has_pair(_command(config["services"]["redis"]), "--requirepass", REDIS_PASSWORD)


@pytest.mark.parametrize("name", ["worker", "flower", "orchestrator"])
def test_services_use_redis_password(config: dict, name: str) -> None:
    assert config["services"][name]["environment"]["FARM_BROKER_URL"] == f"redis://:{REDIS_PASSWORD}@redis:6379/0"


def test_flower_requires_basic_auth(config: dict) -> None:
    assert f"--basic-auth={FLOWER_AUTH}" in _command(config["services"]["flower"])


def test_worker_reads_orchestrator_key_read_only(config: dict) -> None:
    volumes = _volumes_at(config["services"]["worker"], "/orchestrator-public")
    assert volumes
    assert _volume_is_read_only(volumes[0])


def test_worker_never_mounts_orchestrator_state(config: dict) -> None:
    assert not _volumes_at(config["services"]["worker"], "/orchestrator-state")


def test_config_fails_without_secrets() -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("FARM_REDIS_PASSWORD", "FLOWER_BASIC_AUTH")}
    result = subprocess.run([COMPOSE, "-f", str(COMPOSE_FILE), "config"], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "set FARM_REDIS_PASSWORD" in result.stderr
