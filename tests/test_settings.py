"""Invalid settings and CLI options are rejected with messages that name the value and the fix."""

import pytest
from click.testing import CliRunner

from config.settings import FarmSettings, SettingsError, TrainingSettings
from orchestrator.cli import main


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (TrainingSettings(dataset="cifar"), "invalid dataset 'cifar': choose one of fashion-mnist, mnist"),
        (TrainingSettings(segments=0), "invalid segments 0: use an integer >= 1"),
        (TrainingSettings(batch_size=0), "invalid batch_size 0"),
        (TrainingSettings(learning_rate=-1.0), "invalid learning_rate -1.0: use a positive number"),
        (TrainingSettings(learning_rate=float("nan")), "invalid learning_rate nan"),
        (TrainingSettings(weight_decay=-0.1), "invalid weight_decay -0.1"),
        (TrainingSettings(subset=1, segments=2), "invalid subset 1: it must hold at least one image per segment"),
        (TrainingSettings(threads=0), "invalid threads 0"),
    ],
)
def test_training_settings_rejected(settings, message):
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        settings.validate()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (FarmSettings(quorum=3, replicas=2), "invalid quorum 3: it cannot exceed replicas \\(2\\)"),
        (FarmSettings(replicas=0), "invalid replicas 0"),
        (FarmSettings(job_timeout=0.0), "invalid job_timeout 0.0: use a positive number of seconds"),
        (FarmSettings(max_reissues=-1), "invalid max_reissues -1"),
    ],
)
def test_farm_settings_rejected(settings, message):
    with pytest.raises(SettingsError, match=message):
        settings.validate()


def test_defaults_are_valid():
    assert TrainingSettings().validate() == TrainingSettings()
    assert FarmSettings().validate() == FarmSettings()


def test_from_dict_rejects_unknown_keys():
    data = TrainingSettings().to_dict() | {"momentum": 0.9}
    with pytest.raises(SettingsError, match=r"unknown keys \['momentum'\]"):
        TrainingSettings.from_dict(data)


def test_from_dict_round_trip():
    settings = TrainingSettings(batch_size=64, subset=100)
    assert TrainingSettings.from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--quorum", "3", "--replicas", "2"], "invalid quorum 3: it cannot exceed replicas (2)"),
        (["--epochs", "0"], "Invalid value for '--epochs': 0 is not in the range x>=1"),
        (["--dataset", "cifar"], "Invalid value for '--dataset'"),
        (["--lr", "-0.5"], "Invalid value for '--lr': invalid learning_rate -0.5"),
        (["--subset", "1"], "Invalid value for '--subset'"),
        (["--batch-size", "abc"], "'abc' is not a valid integer"),
        (["--job-timeout", "0"], "Invalid value for '--job-timeout'"),
    ],
)
def test_cli_rejects_invalid_options(arguments, message):
    result = CliRunner().invoke(main, ["run", *arguments, "--broker-url", "redis://127.0.0.1:1/0"], terminal_width=200)
    assert result.exit_code == 2
    assert message in result.output


def test_cli_unreachable_broker_named():
    result = CliRunner().invoke(main, ["run", "--broker-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1
    assert "cannot reach the broker at redis://127.0.0.1:1/0" in result.output
    assert "set FARM_BROKER_URL" in result.output


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379/0", "redis//127.0.0.1:6379"])
def test_cli_malformed_broker_url_named(url):
    result = CliRunner().invoke(main, ["workers", "--broker-url", url])
    assert result.exit_code == 1
    assert f"invalid broker or store URL {url}" in result.output
    assert "Traceback" not in result.output


def test_cli_password_hidden_in_errors():
    result = CliRunner().invoke(main, ["workers", "--broker-url", "redis://:s3cret@127.0.0.1:1/0"])
    assert result.exit_code == 1
    assert "s3cret" not in result.output
    assert "redis://***@127.0.0.1:1/0" in result.output


def test_status_rejects_directory_without_state(tmp_path):
    result = CliRunner().invoke(main, ["status", "--run-dir", str(tmp_path), "--broker-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 1
    assert f"{tmp_path} has no state.json" in result.output


def test_cli_help_documents_defaults():
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("--replicas", "--quorum", "[default: 2; x>=1]", "Seconds a replica may run", "--data-root"):
        assert text in result.output


@pytest.mark.parametrize("command", [["--help"], ["status", "--help"], ["workers", "--help"], ["local", "--help"]])
def test_every_command_has_help(command):
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0
    assert "Usage:" in result.output
