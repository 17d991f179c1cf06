"""A farm whose Redis needs a password and TLS, with the weights store in another database.

It trains, and no secret reaches any log.
"""

from __future__ import annotations

import io
import logging
import os
import secrets

import pytest
import redis

from orchestrator.client import FarmClient
from orchestrator.local import LocalFarm
from tests.farmrun import train


@pytest.fixture(scope="module")
def password() -> str:
    return "pw-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def secure_farm(data_root, tmp_path_factory, password):
    log_dir = tmp_path_factory.mktemp("secure-farm")
    with LocalFarm(workers=2, data_root=data_root, log_dir=log_dir, flower=True, redis_password=password,
                   tls=True, separate_store=True) as farm:
        yield farm


@pytest.fixture(scope="module")
def secure_run(secure_farm, data_root, tmp_path_factory):
    """Train one epoch on the secure farm; return the result and everything the orchestrator logged."""
    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    os.environ["FARM_REDIS_TLS_CA"] = str(secure_farm.tls_dir / "ca.pem")
    try:
        client = FarmClient(secure_farm.broker_url, secure_farm.store_url)
        result = train(secure_farm, client, tmp_path_factory.mktemp("secure-run") / "run", data_root, epochs=1)
    finally:
        del os.environ["FARM_REDIS_TLS_CA"]
        root.removeHandler(handler)
        root.setLevel(previous_level)
    return result, captured.getvalue()


def test_farm_trains_over_tls_with_password(secure_farm, secure_run):
    result, _ = secure_run
    assert secure_farm.broker_url.startswith("rediss://")
    assert result.metrics[0]["accepted"] == 2


def test_weights_stay_in_the_store_database(secure_farm, secure_run):
    store = redis.Redis.from_url(secure_farm.store_url, ssl_ca_certs=str(secure_farm.tls_dir / "ca.pem"))
    broker = secure_farm.client()
    assert list(store.scan_iter(match="farm:weights:*"))
    assert not list(broker.scan_iter(match="farm:weights:*"))
    assert list(broker.scan_iter(match="farm:workers:*"))  # heartbeats are where the orchestrator reads them


def test_plain_connection_refused(secure_farm, password):
    plain = redis.Redis(host="127.0.0.1", port=secure_farm.redis_port, password=password, socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        plain.ping()


def test_no_secret_in_any_log(secure_farm, secure_run, password):
    _, orchestrator_log = secure_run
    logs = [path.read_text(errors="replace") for path in secure_farm.log_dir.glob("*.log")] + [orchestrator_log]
    assert len(logs) >= 5  # redis, two workers, Flower, the orchestrator
    assert "run " in orchestrator_log  # the capture worked
    hidden = [password]
    for key_file in [*(secure_farm.log_dir / "keys").glob("*.key"), secure_farm.state_dir / "orchestrator.key",
                     secure_farm.tls_dir / "server-key.pem"]:
        # The base64 body of each private key, line by line.
        hidden += [line for line in key_file.read_text().splitlines() if not line.startswith("-----")]
    for text in logs:
        for secret in hidden:
            assert secret not in text
