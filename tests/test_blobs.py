"""Content-addressed blob store: atomic writes, corruption found on read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gossip.envelope import digest
from gossip.errors import StorageError
from p2pfed.blobs import BlobStore


@pytest.mark.parametrize("on_disk", [True, False])
def test_round_trip(tmp_path: Path, on_disk: bool) -> None:
    store = BlobStore(tmp_path / "blobs" if on_disk else None)
    key = store.put(b"payload")
    assert key == digest(b"payload")
    assert store.put(bytearray(b"payload")) == key  # idempotent
    assert store.has(key) and store.get(key) == b"payload"
    assert list(store.digests()) == [key] and len(store) == 1
    store.delete(key)
    assert not store.has(key)
    with pytest.raises(StorageError, match="no blob"):
        store.get(key)


def test_corruption_is_found_on_read(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.put(b"x" * 1000)
    store.path(key).write_bytes(b"y" * 1000)
    with pytest.raises(StorageError, match="corrupt"):
        store.get(key)


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    for i in range(20):
        store.put(bytes([i]) * 100)
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert len(store) == 20


def test_size_cap(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=10)
    with pytest.raises(StorageError, match="exceeds"):
        store.put(b"x" * 11)


def test_tensors_as_safetensors(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float64)}
    key = store.put_tensors(tensors, {"round": "3"})
    back = store.get_tensors(key)
    assert set(back) == {"a", "b"}
    assert torch.equal(back["a"], tensors["a"]) and back["b"].dtype == torch.float64
    bad = store.put(b"not safetensors")
    with pytest.raises(StorageError, match="safetensors"):
        store.get_tensors(bad)
