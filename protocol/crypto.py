"""Ed25519 signatures over canonical JSON, and sealing of bytes to the orchestrator's X25519 key.

Sealing is an ECIES-style box: an ephemeral X25519 key agrees a secret with the recipient's
key, HKDF-SHA256 derives a ChaCha20-Poly1305 key from it, and the output is
ephemeral public key (32 bytes) || nonce (12 bytes) || ciphertext. Only the holder of the
recipient's private key can open it, and any change to the bytes makes opening fail.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

JOB_DOMAIN = "farm.job.v1"
RESULT_DOMAIN = "farm.result.v1"


class CryptoError(ValueError):
    """A key, signature or sealed box is invalid; the message names which one and the cause."""


def canonical(payload: dict) -> bytes:
    """Return the canonical JSON bytes that are signed: sorted keys, no spaces."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise CryptoError(f"{what} is not valid base64") from None


# --- keys ----------------------------------------------------------------------


def generate_key(path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 private key at `path`, readable by its owner only (mode 0600)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # fails if the file exists
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(pem)
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key, refusing a file that others can read."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        data = path.read_bytes()
    except OSError as error:
        raise CryptoError(f"cannot read key file {path}: {error.strerror}") from None
    if mode & 0o077:
        raise CryptoError(f"key file {path} has permissions {mode:04o}; restrict it with: chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except ValueError:
        raise CryptoError(f"key file {path} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(f"key file {path} is not an Ed25519 key")
    return key


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Return the raw 32-byte public key as base64, the form operators copy and enroll."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return b64(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def parse_public_key(text: str) -> Ed25519PublicKey:
    raw = unb64(text, "public key")
    if len(raw) != 32:
        raise CryptoError(f"public key is {len(raw)} bytes, expected 32 (base64 of a raw Ed25519 key)")
    return Ed25519PublicKey.from_public_bytes(raw)


def key_id(public_text: str) -> str:
    """Return a short fingerprint of a public key for logs and listings."""
    return hashlib.sha256(public_text.encode()).hexdigest()[:16]


def sealing_key(signing_key: Ed25519PrivateKey) -> X25519PrivateKey:
    """Derive the X25519 sealing key that belongs to an Ed25519 identity."""
    seed = signing_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"farm.sealing-key.v1").derive(seed)
    return X25519PrivateKey.from_private_bytes(derived)


def sealing_public_text(key: X25519PrivateKey) -> str:
    return b64(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def parse_sealing_public_key(text: str) -> X25519PublicKey:
    raw = unb64(text, "sealing key")
    if len(raw) != 32:
        raise CryptoError(f"sealing key is {len(raw)} bytes, expected 32")
    return X25519PublicKey.from_public_bytes(raw)


# --- signatures ------------------------------------------------------------------


def sign(key: Ed25519PrivateKey, domain: str, payload: dict) -> str:
    """Return a base64 signature over `domain` and the canonical JSON of `payload`."""
    return b64(key.sign(domain.encode() + b"\n" + canonical(payload)))


def verify(public_key: Ed25519PublicKey, domain: str, payload: dict, signature: str) -> None:
    """Raise CryptoError unless `signature` signs `domain` and `payload` under `public_key`."""
    try:
        public_key.verify(unb64(signature, "signature"), domain.encode() + b"\n" + canonical(payload))
    except InvalidSignature:
        raise CryptoError("signature does not match the signer's key") from None


# --- sealing ---------------------------------------------------------------------


def _box_key(shared: bytes, context: bytes) -> ChaCha20Poly1305:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"farm.seal.v1:" + context).derive(shared)
    return ChaCha20Poly1305(key)


def seal(recipient: X25519PublicKey, plaintext: bytes, context: bytes) -> bytes:
    """Encrypt `plaintext` so that only the recipient's private key opens it."""
    ephemeral = X25519PrivateKey.generate()
    nonce = os.urandom(12)
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ciphertext = _box_key(ephemeral.exchange(recipient), context).encrypt(nonce, plaintext, ephemeral_public)
    return ephemeral_public + nonce + ciphertext


def unseal(recipient: X25519PrivateKey, box: bytes, context: bytes) -> bytes:
    """Open a sealed box, or raise CryptoError when it was altered or sealed to another key."""
    if len(box) < 32 + 12 + 16:
        raise CryptoError(f"sealed box is {len(box)} bytes, too short")
    ephemeral_public, nonce, ciphertext = box[:32], box[32:44], box[44:]
    try:
        shared = recipient.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
        return _box_key(shared, context).decrypt(nonce, ciphertext, ephemeral_public)
    except (InvalidTag, ValueError):
        raise CryptoError("sealed box does not open with the orchestrator's key") from None
