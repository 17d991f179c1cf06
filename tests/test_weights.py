"""Canonical digests and strict decoding of weight blobs."""

import math

import pytest
import torch

from model.network import initial_state_dict
from model.weights import WeightsError, decode, decode_verified, encode, model_spec, state_dict_digest


@pytest.fixture
def state():
    return initial_state_dict(seed=0)


def test_digest_equal_for_equal_weights(state):
    copy = {name: tensor.clone() for name, tensor in state.items()}
    assert state_dict_digest(copy) == state_dict_digest(state)


def test_digest_ignores_insertion_order(state):
    reordered = dict(reversed(list(state.items())))
    assert state_dict_digest(reordered) == state_dict_digest(state)


def test_digest_stable_across_encoding(state):
    assert state_dict_digest(decode(encode(state), model_spec())) == state_dict_digest(state)


def test_digest_changes_with_one_byte(state):
    changed = {name: tensor.clone() for name, tensor in state.items()}
    raw = changed["decoder.0.bias"].view(torch.uint8)
    raw[0] ^= 1
    assert state_dict_digest(changed) != state_dict_digest(state)


def test_digest_changes_with_name(state):
    renamed = dict(state)
    renamed["encoder.0.weight_renamed"] = renamed.pop("encoder.0.weight")
    assert state_dict_digest(renamed) != state_dict_digest(state)


def test_digest_changes_with_shape(state):
    reshaped = dict(state)
    reshaped["encoder.0.weight"] = state["encoder.0.weight"].reshape(784, 128)
    assert state_dict_digest(reshaped) != state_dict_digest(state)


def test_digest_changes_with_dtype(state):
    widened = dict(state)
    widened["decoder.0.bias"] = state["decoder.0.bias"].to(torch.float64)
    assert state_dict_digest(widened) != state_dict_digest(state)


def test_decode_rejects_corrupted_blob(state):
    blob = bytearray(encode(state))
    blob[:8] = b"\xff" * 8  # the header length now points far past the end
    with pytest.raises(WeightsError, match="not valid safetensors"):
        decode(bytes(blob), model_spec())


def test_decode_rejects_truncated_blob(state):
    with pytest.raises(WeightsError, match="not valid safetensors"):
        decode(encode(state)[:-100], model_spec())


def test_decode_rejects_wrong_shape(state):
    wrong = dict(state)
    wrong["encoder.0.weight"] = torch.zeros(64, 784)
    with pytest.raises(WeightsError, match=r"tensor encoder.0.weight is torch.float32\[64, 784\], expected"):
        decode(encode(wrong), model_spec())


def test_decode_rejects_wrong_dtype(state):
    wrong = dict(state)
    wrong["encoder.0.bias"] = state["encoder.0.bias"].to(torch.float64)
    with pytest.raises(WeightsError, match="expected torch.float32"):
        decode(encode(wrong), model_spec())


def test_decode_rejects_missing_tensor(state):
    partial = dict(state)
    del partial["decoder.8.bias"]
    with pytest.raises(WeightsError, match=r"missing \['decoder.8.bias'\]"):
        decode(encode(partial), model_spec())


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_decode_rejects_non_finite(state, bad_value):
    poisoned = {name: tensor.clone() for name, tensor in state.items()}
    poisoned["decoder.4.weight"][3, 5] = bad_value
    with pytest.raises(WeightsError, match="decoder.4.weight contains NaN or infinite"):
        decode(encode(poisoned), model_spec())


def test_decode_rejects_oversized_blob(state):
    with pytest.raises(WeightsError, match="over the limit of 1000 bytes"):
        decode(encode(state), model_spec(), max_bytes=1000)


def test_decode_verified_rejects_wrong_digest(state):
    with pytest.raises(WeightsError, match="digest mismatch"):
        decode_verified(encode(state), "0" * 64, model_spec())


def test_decode_verified_accepts_matching_digest(state):
    decoded = decode_verified(encode(state), state_dict_digest(state), model_spec())
    assert state_dict_digest(decoded) == state_dict_digest(state)
