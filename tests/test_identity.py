"""Identity keys: peer ids match libp2p, key files are private."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gossip.errors import KeyFileError, KeyPermissionError
from gossip.identity import (
    Identity,
    create_identity,
    load_identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_peer_id_matches_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    ident = Identity.generate()
    key = Ed25519PrivateKey.from_bytes(ident.seed)
    assert ID.from_pubkey(key.get_public_key()).to_base58() == ident.peer_id
    assert ident.peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(ident.peer_id) == ident.public_key


def test_bad_peer_id_is_refused() -> None:
    with pytest.raises(ValueError):
        public_key_from_peer_id("QmNotAnEd25519Key")
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"short")


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"msg")
    assert verify_signature(ident.public_key, b"msg", sig)
    assert not verify_signature(ident.public_key, b"msG", sig)
    assert not verify_signature(Identity.generate().public_key, b"msg", sig)
    assert not verify_signature(ident.public_key, b"msg", sig[:-1])


def test_key_file_is_created_private_and_reloads(tmp_path: Path) -> None:
    path = tmp_path / "home" / "identity.key"
    ident = create_identity(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert load_identity(path).public_key == ident.public_key
    assert load_or_create_identity(path).public_key == ident.public_key
    with pytest.raises(KeyFileError, match="already exists"):
        create_identity(path)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_other_readable_key_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    create_identity(path)
    os.chmod(path, mode)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        load_identity(path)


def test_corrupt_or_missing_key_file(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    with pytest.raises(KeyFileError, match="p2pfed init"):
        load_identity(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"not a key")
    os.close(fd)
    with pytest.raises(KeyFileError, match="corrupt"):
        load_identity(path)
