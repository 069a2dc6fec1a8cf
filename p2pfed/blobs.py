"""Content-addressed blob store beside the ledger: ``<home>/blobs/<2 hex>/<hex digest>``.

Payloads are stored exactly as they travel (the :mod:`p2pfed.codec` format); checkpoints are
safetensors files.  Writes are atomic (temporary file, fsync, rename) and reads re-check the
digest, so a corrupt file is reported, never used.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gossip.envelope import digest
from gossip.errors import StorageError

DEFAULT_MAX_BLOB_BYTES = 2 << 30


class BlobStore:
    """Blobs by SHA-256 digest, on disk under ``root`` or in memory when ``root`` is None."""

    def __init__(self, root: Path | None, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._memory: dict[bytes, bytes] = {}
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def path(self, key: bytes) -> Path:
        if self.root is None:
            raise StorageError("an in-memory blob store has no paths")
        hexd = key.hex()
        return self.root / hexd[:2] / hexd

    def put(self, data: bytes | bytearray | memoryview) -> bytes:
        """Store ``data``; returns its digest.  Idempotent."""
        if len(data) > self.max_bytes:
            raise StorageError(f"blob of {len(data)} bytes exceeds the cap of {self.max_bytes}")
        key = digest(data)
        if self.root is None:
            self._memory.setdefault(key, bytes(data))
            return key
        target = self.path(key)
        if target.exists():
            return key
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write blob {target}: {exc.strerror}") from exc
        return key

    def get(self, key: bytes) -> bytes:
        """The blob with digest ``key``; StorageError when missing or corrupt."""
        if self.root is None:
            try:
                return self._memory[key]
            except KeyError:
                raise StorageError(f"no blob {key.hex()}") from None
        target = self.path(key)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no blob {key.hex()} (expected at {target})") from None
        if digest(data) != key:
            raise StorageError(f"blob file {target} is corrupt: its content does not match")
        return data

    def has(self, key: bytes) -> bool:
        if self.root is None:
            return key in self._memory
        return self.path(key).exists()

    def delete(self, key: bytes) -> None:
        if self.root is None:
            self._memory.pop(key, None)
        else:
            self.path(key).unlink(missing_ok=True)

    def digests(self) -> Iterator[bytes]:
        if self.root is None:
            yield from sorted(self._memory)
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith("."):
                        yield bytes.fromhex(f.name)

    def __len__(self) -> int:
        return sum(1 for _ in self.digests())

    # ------------------------------------------------------------------ checkpoints
    def put_tensors(
        self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> bytes:
        """Store tensors as a safetensors file; returns its digest."""
        data = st_save({k: v.detach().contiguous() for k, v in tensors.items()},
                       metadata=dict(metadata) if metadata else None)
        return self.put(data)

    def get_tensors(self, key: bytes) -> dict[str, torch.Tensor]:
        data = self.get(key)
        try:
            return st_load(data)
        except Exception as exc:  # safetensors raises its own untyped errors
            raise StorageError(f"blob {key.hex()} is not a safetensors file: {exc}") from exc
