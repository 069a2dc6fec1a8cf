"""The node's one port to its disk: typed ledger records and the blob store.

Nothing else in the node reads or writes the ledger or the blob store.  Records are
:mod:`p2pfed.journal`'s (one per entry kind, with its schema version); states go to the blob
store in the payload format, both what neighbours fetch and checkpoints.  A checkpoint of a
component that is not trained is the payload it announces next, byte for byte: stored once
(and in memory, one object).  Checkpoints written before schema 2 are safetensors files and
read the same way (:func:`p2pfed.blobs.read_state`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from p2pfed.blobs import BlobStore, read_state
from p2pfed.codec import Buffer, decode_payload, encode_payload_bytes, same_bits
from p2pfed.components import FlatLayout
from p2pfed.journal import R, Record, Stored, stored, write
from p2pfed.ledger import Ledger, LedgerEntry


class Journal:
    """A node's ledger and blob store, spoken to in records and states."""

    def __init__(self, ledger: Ledger, blobs: BlobStore, max_payload_bytes: int,
                 components: int = 1) -> None:
        self.ledger = ledger
        self.blobs = blobs
        self.max_payload_bytes = max_payload_bytes
        #: this node's latest payloads (two per component: this round's and the last)
        self._served: OrderedDict[bytes, bytes] = OrderedDict()
        self._serve_max = 2 * max(1, components)
        #: per component, the last checkpoint stored (round, bytes), until its payload is made
        self._checkpoints: dict[str, tuple[int, bytes]] = {}

    # ---------------------------------------------------------------- the ledger
    def write(self, record: Record, now_ms: int, *, durable: bool = False) -> int:
        """Append ``record``; its ledger index.  ``durable`` before anything it names is sent
        or acted on (the commit is on disk when this returns)."""
        return write(self.ledger, record, now_ms, durable=durable).index

    def last(self, kind: type[R]) -> Stored[R] | None:
        """The newest record of ``kind``, if any."""
        entry = self.ledger.last(kind.KIND)
        return stored(entry, kind) if entry is not None else None

    def read(self, kind: type[R], *, reverse: bool = False) -> Iterator[Stored[R]]:
        """The records of ``kind``, oldest first (``reverse``: newest first; stop early to read
        only the end of a long ledger)."""
        for entry in self.ledger.entries(kind.KIND, reverse=reverse):
            yield stored(entry, kind)

    def compact(self, indexes: Iterable[int], now_ms: int,
                extra: Mapping[str, Any]) -> LedgerEntry | None:
        """Prune the entries at ``indexes``, accounted for by a signed ``compaction`` entry."""
        return self.ledger.compact(indexes, now_ms, extra)

    def bytes_used(self) -> int:
        """The ledger's and the blob store's bytes (on disk, or held in memory)."""
        return self.ledger.nbytes() + self.blobs.nbytes()

    # ---------------------------------------------------------------- the blob store
    def blob_digests(self) -> list[bytes]:
        return list(self.blobs.digests())

    def delete_blobs(self, digests: Iterable[bytes]) -> None:
        for dig in digests:
            self.blobs.delete(dig)

    def put_state(self, name: str, round_: int, flat: torch.Tensor,
                  layout: FlatLayout) -> tuple[bytes, int]:
        """Store ``flat`` as ``name``'s payload of ``round_``; its digest and size.  Not
        fsynced: the durable ledger entry that names it follows, and a lost file is found by
        its digest.  The last few are also kept in memory, to serve neighbours' fetches."""
        data = self._checkpointed(name, round_, flat) or encode_payload_bytes(
            name, round_, flat, layout)
        dig = self.blobs.put(data, durable=False)
        self._served[dig] = data
        while len(self._served) > self._serve_max:
            self._served.popitem(last=False)
        return dig, len(data)

    def put_payload(self, data: Buffer, dig: bytes) -> None:
        """Keep a neighbour's payload, just checked against its announced digest ``dig``."""
        self.blobs.put(data, key=dig, durable=False)

    def payload(self, dig: bytes) -> bytes | None:
        """The payload stored under ``dig`` (None: not kept)."""
        if dig in self._served:
            return self._served[dig]
        return self.blobs.get(dig) if self.blobs.has(dig) else None

    def state(self, name: str, dig: bytes, layout: FlatLayout) -> torch.Tensor:
        """The state of ``name`` in the payload stored under ``dig``."""
        return decode_payload(self.blobs.get(dig), max_bytes=self.max_payload_bytes,
                              expected_component=name, expected_layout=layout,
                              shared=True).flat  # (read only: replays mix it, never write)

    def put_checkpoint(self, name: str, round_: int, flat: torch.Tensor,
                       layout: FlatLayout) -> bytes:
        """Store a checkpoint's state (the start of ``round_``), durably; its digest."""
        data = encode_payload_bytes(name, round_, flat, layout)
        dig = self.blobs.put(data)
        self._checkpoints[name] = (round_, data)
        return dig

    def _checkpointed(self, name: str, round_: int, flat: torch.Tensor) -> bytes | None:
        """The checkpoint just stored for ``name``'s ``round_``, when ``flat`` is its state
        (then the payload of that round is those very bytes)."""
        found = self._checkpoints.pop(name, None)
        if found is None or found[0] != round_:
            return None
        data = found[1]
        if not same_bits(flat, decode_payload(data, shared=True).flat):
            return None
        return data

    def tensor(self, dig: bytes) -> torch.Tensor:
        """A checkpoint's state (read only: copy it into a component)."""
        return read_state(self.blobs, dig, self.max_payload_bytes)
