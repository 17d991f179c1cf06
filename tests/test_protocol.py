"""Job and result messages: round trips and rejection of malformed fields."""

import json
import math

import pytest

from config.settings import TrainingSettings
from protocol.messages import Job, ProtocolError, Result, loss_bits

DIGEST = "ab" * 32
SIGNATURE = "A" * 86 + "=="  # well-formed; tests of real signatures live in test_crypto.py


def make_result(**changes) -> dict:
    result = Result(run_id="run1", epoch=1, segment=0, assignment_id="cd" * 16, worker="w1@host",
                    base_digest=DIGEST, status="ok", weights_digest=DIGEST, loss=0.25, loss_bits=loss_bits(0.25),
                    weights_key="farm:replica-weights:" + "12" * 16, environment={"torch": "2.14.1", "threads": 1},
                    signature=SIGNATURE)
    return result.to_message() | changes


def test_job_round_trip():
    job = Job(run_id="run1", epoch=2, segment=1, assignment_id="ef" * 16, worker="w1@host", base_digest=DIGEST,
              data_digest=DIGEST, training=TrainingSettings().to_dict(), reply_to="farm:results:run1",
              issued_at=1.0, expires_at=2.0, signature=SIGNATURE)
    assert Job.from_message(json.loads(json.dumps(job.to_message()))) == job


def test_result_round_trip():
    message = make_result()
    assert Result.from_message(json.loads(json.dumps(message))).to_message() == message


def test_loss_bits_are_exact():
    assert loss_bits(0.1) != loss_bits(math.nextafter(0.1, 1.0))
    assert loss_bits(0.1) == "3fb999999999999a"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"type": "farm.job"}, "message type is 'farm.job', expected 'farm.result'"),
        ({"version": 99}, "protocol version 99 is not supported"),
        ({"weights_digest": "xyz"}, "invalid weights_digest 'xyz'"),
        ({"epoch": -1}, "invalid epoch -1"),
        ({"epoch": True}, "invalid epoch True"),
        ({"loss": float("nan"), "loss_bits": loss_bits(float("nan"))}, "invalid loss nan"),
        ({"loss_bits": loss_bits(0.5)}, "do not encode loss 0.25"),
        ({"status": "maybe"}, "invalid status 'maybe'"),
        ({"extra": 1}, r"unexpected fields \['extra'\]"),
        ({"worker": "a b"}, "invalid worker 'a b'"),
        ({"weights_key": "farm:weights:" + "ab" * 32}, "invalid weights_key"),
        ({"signature": "short"}, "invalid signature 'short'"),
        ({"environment": {"torch": ["list"]}}, "invalid environment"),
    ],
)
def test_malformed_result_rejected(changes, message):
    with pytest.raises(ProtocolError, match=message):
        Result.from_message(make_result(**changes))


def test_missing_field_rejected():
    message = make_result()
    del message["assignment_id"]
    with pytest.raises(ProtocolError, match="missing field 'assignment_id'"):
        Result.from_message(message)


def test_non_object_rejected():
    with pytest.raises(ProtocolError, match="message is list"):
        Result.from_message([1, 2])
