"""Job and result messages: plain JSON objects validated field by field on both sides."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import asdict, dataclass, field

PROTOCOL_VERSION = 1
TASK_NAME = "farm.train_segment"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WEIGHTS_KEY = re.compile(r"^farm:replica-weights:[0-9a-f]{32}$")
_SIGNATURE = re.compile(r"^[A-Za-z0-9+/]{86}==$")  # base64 of a 64-byte Ed25519 signature
_ASSIGNMENT_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^[A-Za-z0-9_.@:+=-]{1,200}$")
MAX_ERROR_CHARS = 2000


class ProtocolError(ValueError):
    """A message is malformed: a field is missing, of the wrong type or out of range."""


def worker_queue(worker: str) -> str:
    """Return the name of the queue that only `worker` consumes."""
    return f"farm.worker.{worker}"


def loss_bits(loss: float) -> str:
    """Return the IEEE 754 float64 bits of a loss as 16 hex digits, for exact comparison."""
    return struct.pack(">d", loss).hex()


@dataclass(frozen=True)
class Job:
    """One replica of a segment job: train `base_digest` for one pass over a segment."""

    run_id: str
    epoch: int
    segment: int
    assignment_id: str  # random nonce naming this replica; also the Celery task id
    worker: str  # the worker this replica is assigned to
    base_digest: str
    data_digest: str  # SHA-256 of the segment's image bytes, checked by the worker before training
    training: dict  # TrainingSettings as a dict
    reply_to: str  # Redis list the result is pushed to
    issued_at: float
    expires_at: float
    signature: str = ""  # the orchestrator's Ed25519 signature over every other field

    def to_message(self) -> dict:
        return {"type": "farm.job", "version": PROTOCOL_VERSION, **asdict(self)}

    @classmethod
    def from_message(cls, message: object) -> Job:
        fields = _fields(message, "farm.job")
        job = cls(
            **_assignment_fields(fields),
            data_digest=_match(fields, "data_digest", _HEX64),
            training=_dict(fields, "training"),
            reply_to=_name(fields, "reply_to"),
            issued_at=_float(fields, "issued_at"),
            expires_at=_float(fields, "expires_at"),
            signature=_match(fields, "signature", _SIGNATURE),
        )
        _reject_extra(fields, cls)
        return job


@dataclass(frozen=True)
class Result:
    """A worker's result for one assignment: the digest of its new weights and its loss, or an error."""

    run_id: str
    epoch: int
    segment: int
    assignment_id: str
    worker: str
    base_digest: str
    status: str  # "ok" or "error"
    weights_digest: str = ""  # set when status is "ok"
    loss: float = 0.0
    loss_bits: str = ""  # loss_bits(loss); both are compared
    error: str = ""  # set when status is "error"
    seconds: float = 0.0  # wall time the worker spent on the job
    weights_key: str = ""  # store key of the sealed result weights, random per replica
    environment: dict = field(default_factory=dict)  # the worker's numerical environment
    signature: str = ""  # the worker's Ed25519 signature over every other field

    def to_message(self) -> dict:
        return {"type": "farm.result", "version": PROTOCOL_VERSION, **asdict(self)}

    @classmethod
    def from_message(cls, message: object) -> Result:
        fields = _fields(message, "farm.result")
        status = fields.get("status")
        if status not in ("ok", "error"):
            raise ProtocolError(f"invalid status {status!r}: expected 'ok' or 'error'")
        common = dict(
            **_assignment_fields(fields),
            status=status,
            seconds=_float(fields, "seconds"),
            environment=_environment(fields),
            signature=_match(fields, "signature", _SIGNATURE),
        )
        if status == "error":
            error = fields.get("error")
            if not isinstance(error, str) or not error:
                raise ProtocolError("error result without an error message")
            result = cls(**common, error=error[:MAX_ERROR_CHARS])
        else:
            loss = _float(fields, "loss")
            bits = _match(fields, "loss_bits", re.compile(r"^[0-9a-f]{16}$"))
            if bits != loss_bits(loss):
                raise ProtocolError(f"loss_bits {bits} do not encode loss {loss!r}")
            result = cls(**common, weights_digest=_match(fields, "weights_digest", _HEX64), loss=loss, loss_bits=bits,
                         weights_key=_match(fields, "weights_key", _WEIGHTS_KEY))
        _reject_extra(fields, cls)
        return result


def signed_payload(message: dict) -> dict:
    """Return the part of a message that its signature covers: everything but the signature."""
    return {key: value for key, value in message.items() if key != "signature"}


def _environment(fields: dict) -> dict:
    value = _dict(fields, "environment")
    if len(value) > 32 or not all(
        isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool) and len(str(v)) <= 200
        for k, v in value.items()
    ):
        raise ProtocolError("invalid environment: expected at most 32 short string or integer values")
    return value


def _fields(message: object, kind: str) -> dict:
    if not isinstance(message, dict):
        raise ProtocolError(f"message is {type(message).__name__}, expected a JSON object")
    if message.get("type") != kind:
        raise ProtocolError(f"message type is {message.get('type')!r}, expected {kind!r}")
    if message.get("version") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {message.get('version')!r} is not supported; this side speaks {PROTOCOL_VERSION}"
        )
    return message


def _assignment_fields(fields: dict) -> dict:
    """Parse the fields that bind a job or result to one assignment."""
    return {
        "run_id": _name(fields, "run_id"),
        "epoch": _int(fields, "epoch"),
        "segment": _int(fields, "segment"),
        "assignment_id": _match(fields, "assignment_id", _ASSIGNMENT_ID),
        "worker": _name(fields, "worker"),
        "base_digest": _match(fields, "base_digest", _HEX64),
    }


def _reject_extra(fields: dict, cls: type) -> None:
    extra = sorted(set(fields) - set(cls.__dataclass_fields__) - {"type", "version"})
    if extra:
        raise ProtocolError(f"unexpected fields {extra}")


def _get(fields: dict, key: str) -> object:
    if key not in fields:
        raise ProtocolError(f"missing field {key!r}")
    return fields[key]


def _int(fields: dict, key: str) -> int:
    value = _get(fields, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(f"invalid {key} {value!r}: expected a non-negative integer")
    return value


def _float(fields: dict, key: str) -> float:
    value = _get(fields, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"invalid {key} {value!r}: expected a finite number")
    return float(value)


def _dict(fields: dict, key: str) -> dict:
    value = _get(fields, key)
    if not isinstance(value, dict):
        raise ProtocolError(f"invalid {key} {value!r}: expected an object")
    return value


def _match(fields: dict, key: str, pattern: re.Pattern) -> str:
    value = _get(fields, key)
    if not isinstance(value, str) or not pattern.match(value):
        raise ProtocolError(f"invalid {key} {str(value)[:80]!r}: expected {pattern.pattern}")
    return value


def _name(fields: dict, key: str) -> str:
    return _match(fields, key, _NAME)
