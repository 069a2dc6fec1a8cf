"""Content-addressed blob store beside the ledger: ``<home>/blobs/<2 hex>/<hex digest>``.

Payloads are stored exactly as they travel (the :mod:`p2pfed.codec` format); checkpoints are
safetensors files (never pickle).  Writes are atomic (temporary file in the same directory,
fsync, rename) and reads re-check the digest, so a corrupt file is reported, never used.
Files are 0600 and folders 0700 whatever the umask (opening a store tightens the folders of an
older one); a full disk raises :class:`~p2pfed.home.DiskFullError`.

With ``root=None`` the store keeps blobs in a dict (simulations); its bytes are immutable, so
reads skip the digest check there.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from gossip.envelope import DIGEST_BYTES, digest
from gossip.errors import LocalError, P2PFedError, StorageError
from p2pfed.codec import MAGIC, decode_payload
from p2pfed.home import PRIVATE_DIR, PRIVATE_FILE, fsync_dir, make_private, storage_error

log = logging.getLogger(__name__)

DEFAULT_MAX_BLOB_BYTES = 2 << 30
_TMP_PREFIX = ".tmp-"
_HEX = frozenset("0123456789abcdef")


def _is_digest(key: object) -> bool:
    return isinstance(key, bytes) and len(key) == DIGEST_BYTES


class BlobStore:
    """Blobs by SHA-256 digest, on disk under ``root`` or in memory when ``root`` is None.

    ``max_bytes`` bounds a single blob, on write and on read.  ``fsync=False`` skips the
    fsyncs (for throw-away simulation homes); writes stay atomic.
    """

    def __init__(
        self, root: Path | None, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES, fsync: bool = True
    ) -> None:
        if max_bytes <= 0:
            raise LocalError(f"max_bytes must be positive, not {max_bytes}")
        self.root = root
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._memory: dict[bytes, bytes] = {}
        if root is not None:
            try:
                root.mkdir(parents=True, exist_ok=True)
                make_private(root, PRIVATE_DIR)  # closes every blob below it to others
                for shard in root.iterdir():  # at most 256 folders, whatever the blob count
                    if _is_shard(shard.name) and shard.is_dir():
                        make_private(shard, PRIVATE_DIR)
            except OSError as exc:
                raise storage_error(exc, f"cannot create blob store {root}") from exc

    def __repr__(self) -> str:
        return f"BlobStore({self.root if self.root is not None else 'memory'})"

    def path(self, key: bytes) -> Path:
        """Where the blob with digest ``key`` lives (on-disk stores only)."""
        if self.root is None:
            raise LocalError("an in-memory blob store has no paths")
        if not _is_digest(key):
            raise StorageError(f"not a {DIGEST_BYTES}-byte digest: {key!r}")
        hexd = key.hex()
        return self.root / hexd[:2] / hexd

    # ------------------------------------------------------------------ bytes
    def put(self, data: bytes | bytearray | memoryview, *, key: bytes | None = None,
            durable: bool = True) -> bytes:
        """Store ``data`` and return its digest.  Idempotent; atomic on disk.

        ``key``: its digest, when the caller has just checked it (not computed again).
        ``durable=False``: no fsync (for data a durable ledger entry names by digest: a power
        cut may lose the file, never leave a wrong one; reads re-check the digest)."""
        size = memoryview(data).nbytes
        if size > self.max_bytes:
            raise StorageError(f"blob of {size} bytes exceeds the cap of {self.max_bytes} bytes")
        key = digest(data) if key is None else key
        if self.root is None:
            if key not in self._memory:  # (bytes are kept as they are: immutable, shared)
                self._memory[key] = data if isinstance(data, bytes) else bytes(data)
            return key
        target = self.path(key)
        try:
            if target.stat().st_size == size:
                return key  # already stored (get() re-checks the content)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"cannot stat blob file {target}") from exc
        self._write(target, data, self.fsync and durable)
        return key

    def _write(self, target: Path, data: bytes | bytearray | memoryview, sync: bool) -> None:
        directory = target.parent
        tmp: str | None = None
        try:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                os.chmod(directory, PRIVATE_DIR)
                if self.fsync and self.root is not None:
                    fsync_dir(self.root)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=_TMP_PREFIX)  # created 0600
            os.fchmod(fd, PRIVATE_FILE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
            if sync:
                fsync_dir(directory)
        except OSError as exc:
            raise storage_error(exc, f"cannot write blob file {target}") from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def get(self, key: bytes) -> bytes:
        """The blob with digest ``key``; :class:`StorageError` when missing or corrupt."""
        if not _is_digest(key):
            raise StorageError(f"no blob {key!r}: not a {DIGEST_BYTES}-byte digest")
        if self.root is None:
            try:
                return self._memory[key]
            except KeyError:
                raise StorageError(f"no blob {key.hex()} in the in-memory store") from None
        target = self.path(key)
        try:
            size = target.stat().st_size
            if size > self.max_bytes:
                raise StorageError(
                    f"blob file {target} is corrupt: {size} bytes exceeds the cap of "
                    f"{self.max_bytes} bytes"
                )
            data = target.read_bytes()
        except FileNotFoundError:
            raise StorageError(f"no blob {key.hex()} (expected at {target})") from None
        except OSError as exc:
            raise StorageError(f"cannot read blob file {target}: {exc}") from exc
        if digest(data) != key:
            raise StorageError(f"blob file {target} is corrupt: its content does not match")
        return data

    def has(self, key: bytes) -> bool:
        """Whether a blob with digest ``key`` is stored (False for a malformed digest)."""
        if not _is_digest(key):
            return False
        if self.root is None:
            return key in self._memory
        return self.path(key).is_file()

    __contains__ = has

    def delete(self, key: bytes) -> bool:
        """Remove a blob; returns whether it was there."""
        if not _is_digest(key):
            return False
        if self.root is None:
            return self._memory.pop(key, None) is not None
        target = self.path(key)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"cannot delete blob file {target}: {exc}") from exc
        return True

    def digests(self) -> Iterator[bytes]:
        """Digests of the stored blobs, sorted (temporary files are never listed)."""
        if self.root is None:
            yield from sorted(self._memory)
            return
        try:
            subdirs = sorted(p for p in self.root.iterdir() if _is_shard(p.name) and p.is_dir())
            for sub in subdirs:
                for name in sorted(f.name for f in sub.iterdir()):
                    if len(name) == 2 * DIGEST_BYTES and name.startswith(sub.name) \
                            and set(name) <= _HEX:
                        yield bytes.fromhex(name)
        except OSError as exc:
            raise StorageError(f"cannot list blob store {self.root}: {exc}") from exc

    def __len__(self) -> int:
        if self.root is None:
            return len(self._memory)
        return sum(1 for _ in self.digests())

    def nbytes(self) -> int:
        """The stored blobs' bytes (walks the store: for status and budgets, not every write)."""
        if self.root is None:
            return sum(len(b) for b in self._memory.values())
        try:
            return sum(self.path(d).stat().st_size for d in self.digests())
        except FileNotFoundError:  # deleted while walking: count again
            return self.nbytes()
        except OSError as exc:
            raise storage_error(exc, f"cannot read blob store {self.root}") from exc

    # ------------------------------------------------------------------ tensors
    def put_tensors(
        self, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
    ) -> bytes:
        """Store tensors as one safetensors file and return its digest.

        The bytes depend only on the tensors and metadata (safetensors writes metadata in hash
        order; it is put in sorted order here), so equal checkpoints get equal digests.
        Tensors are moved to the CPU; views of one storage are copied apart.
        """
        prepared: dict[str, torch.Tensor] = {}
        storages: set[int] = set()
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise LocalError(f"put_tensors needs str -> Tensor, got {name!r}")
            t = tensor.detach().to("cpu")
            ptr = t.untyped_storage().data_ptr()
            if ptr != 0 and ptr in storages:
                t = t.clone(memory_format=torch.contiguous_format)
            else:
                t = t.contiguous()
            storages.add(t.untyped_storage().data_ptr())
            prepared[name] = t
        if metadata is not None and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise LocalError("safetensors metadata must map str to str")
        try:
            raw = st_save(prepared, metadata=dict(metadata) if metadata else None)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise LocalError(f"cannot encode tensors as safetensors: {exc}") from exc
        return self.put(_canonical_safetensors(raw))

    def get_tensors(self, key: bytes) -> dict[str, torch.Tensor]:
        """The tensors stored by :meth:`put_tensors` (on the CPU)."""
        data = self.get(key)
        try:
            tensors: dict[str, torch.Tensor] = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise StorageError(f"blob {key.hex()} is not a valid safetensors file: {exc}") from exc
        return tensors

    def get_tensor_metadata(self, key: bytes) -> dict[str, str]:
        """The metadata stored with :meth:`put_tensors` (empty when there was none)."""
        header = _safetensors_header(self.get(key), key)
        meta = header.get("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise StorageError(f"blob {key.hex()} has malformed safetensors metadata")
        return meta


def read_state(store: BlobStore, key: bytes, max_bytes: int = DEFAULT_MAX_BLOB_BYTES
               ) -> torch.Tensor:
    """A checkpoint's flat state: a payload-format blob (:mod:`p2pfed.codec`, from ledger
    schema 2), or a safetensors file with one tensor ``flat`` (before).  The tensor may be a
    view of the stored bytes: read it, copy it, never write into it."""
    data = store.get(key)
    if data[:len(MAGIC)] == MAGIC:
        try:
            return decode_payload(data, max_bytes=max_bytes, shared=True).flat
        except P2PFedError as exc:
            raise StorageError(f"blob {key.hex()} is not a valid state: {exc}") from exc
    return store.get_tensors(key)["flat"]


def _is_shard(name: str) -> bool:
    return len(name) == 2 and set(name) <= _HEX


def _safetensors_header(data: bytes, key: bytes) -> dict[str, object]:
    if len(data) < 8:
        raise StorageError(f"blob {key.hex()} is not a valid safetensors file: too short")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise StorageError(f"blob {key.hex()} is not a valid safetensors file: bad header size")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, ValueError) as exc:
        raise StorageError(f"blob {key.hex()} is not a valid safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise StorageError(f"blob {key.hex()} is not a valid safetensors file: header not a map")
    return header


def _canonical_safetensors(raw: bytes) -> bytes:
    """Rewrite the header of safetensors bytes with its metadata keys in sorted order."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or len(meta) < 2:
        return raw
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    return b"".join((len(text).to_bytes(8, "little"), text, memoryview(raw)[8 + n :]))
