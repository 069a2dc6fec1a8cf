"""Content-addressed blob store: atomic writes, corruption found on read."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import torch

from gossip.envelope import digest
from gossip.errors import StorageError
from p2pfed.blobs import BlobStore
from p2pfed.home import DiskFullError


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


def test_missing_blob_names_its_file_and_bad_digests(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = digest(b"never stored")
    with pytest.raises(StorageError, match=key.hex()[:2] + "/" + key.hex()):
        store.get(key)
    assert not store.has(b"short") and not store.delete(b"short")
    with pytest.raises(StorageError, match="digest"):
        store.get(b"short")
    assert not store.delete(key)


def test_layout_memoryview_and_reopen(tmp_path: Path) -> None:
    data = bytearray(b"abc" * 100)
    key = BlobStore(tmp_path).put(memoryview(data))
    assert (tmp_path / key.hex()[:2] / key.hex()).read_bytes() == bytes(data)
    again = BlobStore(tmp_path)
    assert again.get(key) == bytes(data) and key in again and len(again) == 1


def test_truncated_file_is_rewritten_by_put_and_found_by_get(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.put(b"z" * 64)
    store.path(key).write_bytes(b"z" * 10)
    with pytest.raises(StorageError, match=f"{store.path(key)} is corrupt"):
        store.get(key)
    assert store.put(b"z" * 64) == key and store.get(key) == b"z" * 64


def test_failed_write_leaves_no_temporary_file(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path)

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("p2pfed.blobs.os.replace", broken_replace)
    with pytest.raises(StorageError, match="cannot write blob"):
        store.put(b"data")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert len(store) == 0


def test_leftover_temporary_files_are_not_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    key = store.put(b"real")
    (store.path(key).parent / ".tmp-abc123").write_bytes(b"half written")
    (tmp_path / "zz").mkdir()
    (tmp_path / "README").write_text("not a blob")
    assert list(store.digests()) == [key]


def test_oversized_file_is_not_read(tmp_path: Path) -> None:
    key = BlobStore(tmp_path).put(b"x" * 100)
    with pytest.raises(StorageError, match="exceeds"):
        BlobStore(tmp_path, max_bytes=50).get(key)


def test_checkpoint_digest_depends_only_on_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    tensors = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(3)}
    meta = {f"key{i}": str(i) for i in range(8)}
    keys = {store.put_tensors(tensors, dict(reversed(list(meta.items())))) for _ in range(5)}
    keys.add(store.put_tensors(dict(tensors), meta))
    assert len(keys) == 1  # safetensors alone writes metadata in random hash order
    key = keys.pop()
    assert store.get_tensor_metadata(key) == meta
    assert torch.equal(store.get_tensors(key)["w"], tensors["w"])
    assert store.get_tensor_metadata(store.put_tensors(tensors)) == {}


def test_views_of_one_buffer_and_in_memory_tensors() -> None:
    store = BlobStore(None)
    flat = torch.arange(10.0)
    views = {"a": flat[:4], "b": flat[4:].view(2, 3), "t": flat[:6].view(2, 3).t()}
    back = store.get_tensors(store.put_tensors(views))
    for name, view in views.items():
        assert torch.equal(back[name], view)
    assert flat.tolist() == list(map(float, range(10)))  # caller's tensors untouched
    with pytest.raises(StorageError, match="safetensors"):
        store.get_tensor_metadata(store.put(b"\xff" * 4))


def test_blob_files_and_folders_are_private_whatever_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    old = os.umask(0)
    try:
        store = BlobStore(root)
        key = store.put(b"private payload")
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path(key).parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path(key).stat().st_mode) == 0o600
    # a store from before: its folders are tightened when it is opened again
    os.chmod(root, 0o755)
    os.chmod(store.path(key).parent, 0o755)
    BlobStore(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.path(key).parent.stat().st_mode) == 0o700


def test_a_full_disk_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = BlobStore(tmp_path / "blobs")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFullError, match="disk is full") as info:
        store.put(b"does not fit")
    assert isinstance(info.value, StorageError)
    monkeypatch.undo()
    assert len(store) == 0 and not any(p.is_file() for p in (tmp_path / "blobs").rglob("*"))
