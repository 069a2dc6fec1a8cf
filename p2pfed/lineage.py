"""Lineages: which members' data may have shaped a state, eight bytes per member.

A state's lineage names every member whose update (or whose presence in the mixing weights)
reached it; unlearning rolls back the states whose lineage holds the forgotten member.  After a
few rounds on a connected graph every lineage holds the whole federation, and it travels in
every announcement and in every ledger entry of a round.  So a :class:`Lineage` is a set of
*tags* — the first :data:`TAG_BYTES` bytes of a domain-separated SHA-256 of the member's peer
id — kept as one sorted byte string, which is also how it is written: 8 KB for 1,000 members
where their peer ids took about 52 KB, read without splitting it into a thousand objects, and
merged with a sorted union.

A tag answers "may this member have shaped the state?".  Two members whose tags collide (one
chance in 2^64 per pair; a key ground to collide with a given member costs about 2^64 key
generations) would each count as the other: forgetting one rolls back states the other shaped
too, which is more work and never a member's influence kept.

Ledger bodies before schema 2 (and announcements of older peers) hold the peer ids themselves;
:meth:`Lineage.decode` reads either form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np

from gossip.errors import MalformedMessageError

TAG_BYTES = 8
_DOMAIN = b"p2pfed/lineage/v1/"
_WORD = np.dtype(">u8")  # (a tag as a big-endian integer: integer order is byte order)
#: the most members a lineage may name (an announcement must fit one control frame)
MAX_MEMBERS = 4096


def tag(peer_id: str) -> bytes:
    """The tag of the member ``peer_id``."""
    return hashlib.sha256(_DOMAIN + peer_id.encode()).digest()[:TAG_BYTES]


def tags(peer_ids: Iterable[str]) -> frozenset[bytes]:
    return frozenset(tag(p) for p in peer_ids)


class Lineage:
    """An immutable set of member tags, kept packed (sorted, concatenated)."""

    __slots__ = ("_packed",)

    def __init__(self, packed: bytes = b"") -> None:
        """``packed``: canonical tags (use :meth:`unpack` for bytes from elsewhere)."""
        self._packed = packed

    @classmethod
    def of(cls, peer_ids: Iterable[str]) -> Lineage:
        """The lineage naming ``peer_ids``."""
        return cls.from_tags(tags(peer_ids))

    @classmethod
    def from_tags(cls, tag_set: Iterable[bytes]) -> Lineage:
        return cls(b"".join(sorted(set(tag_set))))

    @classmethod
    def unpack(cls, blob: bytes, *, trusted: bool = False) -> Lineage:
        """A lineage as written; :class:`ValueError` unless canonical (whole tags, strictly
        increasing, at most :data:`MAX_MEMBERS`).  ``trusted``: written by this node (a
        signed ledger entry), so the order is not checked again."""
        if len(blob) % TAG_BYTES or len(blob) > MAX_MEMBERS * TAG_BYTES:
            raise ValueError(f"a lineage of {len(blob)} bytes is not whole {TAG_BYTES}-byte "
                             f"tags (at most {MAX_MEMBERS})")
        if not trusted:
            words = np.frombuffer(blob, dtype=_WORD)
            if words.size > 1 and not bool(np.all(words[1:] > words[:-1])):
                raise ValueError("lineage tags are not in strictly increasing order")
        return cls(bytes(blob))

    @classmethod
    def decode(cls, value: object, *, trusted: bool = False) -> Lineage:
        """A lineage as a record holds it: packed tags, or (before schema 2) a list of peer
        ids (:class:`ValueError` for anything else; ``trusted``: see :meth:`unpack`)."""
        if isinstance(value, bytes):
            return cls.unpack(value, trusted=trusted)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            if len(value) > MAX_MEMBERS:
                raise ValueError(f"a lineage of {len(value)} members (at most {MAX_MEMBERS})")
            return cls.of(value)
        raise ValueError("a lineage is packed tags or a list of peer ids")

    @classmethod
    def decode_wire(cls, value: object) -> Lineage:
        """:meth:`decode` for a peer's message (:class:`MalformedMessageError`)."""
        try:
            return cls.decode(value)
        except ValueError as exc:
            raise MalformedMessageError(f"bad lineage: {exc}") from exc

    @property
    def packed(self) -> bytes:
        return self._packed

    def _words(self) -> np.ndarray:
        return np.frombuffer(self._packed, dtype=_WORD)

    def union(self, *others: Lineage) -> Lineage:
        """This lineage and ``others`` together."""
        parts = list(dict.fromkeys(o._packed for o in others
                                   if o._packed and o._packed != self._packed))
        if not parts:
            return self
        if not self._packed and len(parts) == 1:
            return Lineage(parts[0])
        merged = np.unique(np.frombuffer(b"".join([self._packed, *parts]), dtype=_WORD))
        return Lineage(merged.astype(_WORD, copy=False).tobytes())

    def __or__(self, other: Lineage) -> Lineage:
        return self.union(other)

    def __contains__(self, item: object) -> bool:
        """``item``: a peer id or a tag."""
        key = tag(item) if isinstance(item, str) else item
        if not isinstance(key, bytes) or len(key) != TAG_BYTES:
            return False
        words = self._words()
        value = np.frombuffer(key, dtype=_WORD)[0]
        at = int(np.searchsorted(words, value))
        return at < words.size and words[at] == value

    def __iter__(self) -> Iterator[bytes]:
        p = self._packed
        return (p[i:i + TAG_BYTES] for i in range(0, len(p), TAG_BYTES))

    def __len__(self) -> int:
        return len(self._packed) // TAG_BYTES

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lineage) and other._packed == self._packed

    def __hash__(self) -> int:
        return hash(self._packed)

    def __repr__(self) -> str:
        return f"Lineage({len(self)} members)"
