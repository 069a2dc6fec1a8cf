"""Node identity: one ed25519 key, also used as the libp2p host key.

The key file holds the raw 32-byte ed25519 seed.  It is created with mode 0600 and refused when
group or others can read or write it, like ssh refuses an unsafe private key.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gossip.errors import KeyFileError, KeyPermissionError

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

# libp2p PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_LIBP2P_ED25519_PREFIX = bytes([0x08, 0x01, 0x12, PUBLIC_KEY_BYTES])
# multihash "identity" code and length of the 36-byte protobuf above
_MULTIHASH_IDENTITY = bytes([0x00, len(_LIBP2P_ED25519_PREFIX) + PUBLIC_KEY_BYTES])


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id (``12D3KooW...``) of an ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"ed25519 public key must be {PUBLIC_KEY_BYTES} bytes")
    return _peer_id(bytes(public_key))


@functools.lru_cache(maxsize=4096)  # (base58 in Python; every envelope opened asks again)
def _peer_id(public_key: bytes) -> str:
    raw = _MULTIHASH_IDENTITY + _LIBP2P_ED25519_PREFIX + public_key
    return base58.b58encode(raw).decode("ascii")


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; raises ``ValueError`` on other key types."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise ValueError(f"not a base58 peer id: {peer_id!r}") from exc
    head = _MULTIHASH_IDENTITY + _LIBP2P_ED25519_PREFIX
    if len(raw) != len(head) + PUBLIC_KEY_BYTES or not raw.startswith(head):
        raise ValueError(f"not an ed25519 libp2p peer id: {peer_id!r}")
    return raw[len(head) :]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        VerifyKey(public_key).verify(message, signature)
    except BadSignatureError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class Identity:
    """An ed25519 signing identity."""

    signing_key: SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != SEED_BYTES:
            raise KeyFileError(f"ed25519 seed must be {SEED_BYTES} bytes, got {len(seed)}")
        return cls(SigningKey(seed))

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte signature of ``message``."""
        return self.signing_key.sign(message).signature

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"


def check_key_permissions(path: Path) -> None:
    """Refuse a key file that group or others may read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"key file {path} has mode {stat.S_IMODE(mode):04o}; it must be readable by its owner "
            f"only. Fix it with: chmod 600 {path}"
        )


def load_identity(path: Path) -> Identity:
    """Load the identity stored at ``path``, refusing unsafe permissions or corrupt content."""
    if not path.exists():
        raise KeyFileError(f"no key file at {path}; run 'p2pfed init' first")
    check_key_permissions(path)
    seed = path.read_bytes()
    if len(seed) != SEED_BYTES:
        raise KeyFileError(
            f"key file {path} is corrupt: expected {SEED_BYTES} bytes, got {len(seed)}"
        )
    return Identity.from_seed(seed)


def create_identity(path: Path, identity: Identity | None = None) -> Identity:
    """Store a new (or the given) identity at ``path`` with mode 0600; never overwrites."""
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = identity or Identity.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(identity.seed)
        f.flush()
        os.fsync(f.fileno())
    return identity


def load_or_create_identity(path: Path) -> Identity:
    return load_identity(path) if path.exists() else create_identity(path)
