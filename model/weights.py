"""Canonical weight digests and safetensors encoding with strict validation on decode."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from model.network import Autoencoder

StateDict = dict[str, torch.Tensor]
# name -> (shape, dtype name), the layout every blob must match exactly.
Spec = dict[str, tuple[tuple[int, ...], str]]

# The default model encodes to about 0.9 MB; anything far larger is rejected before parsing.
DEFAULT_MAX_BLOB_BYTES = 16 * 1024 * 1024


class WeightsError(ValueError):
    """A weights blob is corrupted, oversized, mis-shaped, non-finite or has the wrong digest."""


def state_dict_digest(state_dict: StateDict) -> str:
    """Return the SHA-256 hex digest over sorted names, dtypes, shapes and raw tensor bytes.

    The digest depends on tensor contents only, never on a file encoding, so two workers
    that compute the same bits agree however their blobs were serialized.
    """
    sha = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        header = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode()
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for part in (header, data):
            sha.update(len(part).to_bytes(8, "little"))
            sha.update(part)
    return sha.hexdigest()


def spec_of(state_dict: StateDict) -> Spec:
    """Return the name -> (shape, dtype) layout of a state_dict."""
    return {name: (tuple(t.shape), str(t.dtype)) for name, t in state_dict.items()}


def model_spec() -> Spec:
    """Return the layout of the default autoencoder's state_dict."""
    return spec_of(Autoencoder().state_dict())


def encode(state_dict: StateDict) -> bytes:
    """Serialize a state_dict as safetensors bytes (never pickle)."""
    return safetensors_save({name: t.detach().cpu().contiguous() for name, t in state_dict.items()})


def decode(blob: bytes, spec: Spec, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> StateDict:
    """Parse safetensors bytes and check size, names, shapes, dtypes and finiteness against `spec`."""
    if not isinstance(blob, (bytes, bytearray)):
        raise WeightsError(f"weights blob is {type(blob).__name__}, expected bytes")
    if len(blob) > max_bytes:
        raise WeightsError(f"weights blob is {len(blob)} bytes, over the limit of {max_bytes} bytes")
    try:
        state_dict = safetensors_load(bytes(blob))
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise WeightsError(f"weights blob is not valid safetensors: {error}") from None

    missing = sorted(set(spec) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(spec))
    if missing or unexpected:
        raise WeightsError(f"weights names do not match the model: missing {missing}, unexpected {unexpected}")
    for name, (shape, dtype) in spec.items():
        tensor = state_dict[name]
        if tuple(tensor.shape) != shape or str(tensor.dtype) != dtype:
            raise WeightsError(
                f"tensor {name} is {str(tensor.dtype)}{list(tensor.shape)}, expected {dtype}{list(shape)}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"tensor {name} contains NaN or infinite values")
    return state_dict


def decode_verified(blob: bytes, digest: str, spec: Spec, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> StateDict:
    """Decode a blob and check that its canonical digest equals `digest`."""
    state_dict = decode(blob, spec, max_bytes=max_bytes)
    actual = state_dict_digest(state_dict)
    if actual != digest:
        raise WeightsError(f"weights digest mismatch: blob hashes to {actual[:16]}, expected {digest[:16]}")
    return state_dict
