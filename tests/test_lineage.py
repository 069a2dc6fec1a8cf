"""Lineages as member tags: canonical packing, old peer-id lists, sorted unions, and
announcements that stay small at a thousand members."""

from __future__ import annotations

import pytest

from gossip.envelope import MAX_ENVELOPE_BYTES, packb
from gossip.errors import MalformedMessageError
from gossip.identity import Identity
from p2pfed.lineage import MAX_MEMBERS, TAG_BYTES, Lineage, tag, tags
from p2pfed.node import Announcement


def _members(count: int) -> list[str]:
    return [Identity.from_seed(i.to_bytes(32, "little")).peer_id for i in range(count)]


def test_a_lineage_packs_canonically_and_only_canonical_packs_open() -> None:
    members = _members(5)
    lin = Lineage.of(members)
    assert len(lin) == 5 and set(lin) == tags(members)
    assert Lineage.from_tags(reversed(sorted(tags(members)))) == lin  # (order-independent)
    assert list(lin) == sorted(lin) and Lineage.unpack(lin.packed) == lin
    assert all(m in lin for m in members) and all(tag(m) in lin for m in members)
    assert "stranger" not in lin and b"short" not in lin and 7 not in lin
    first, second = sorted(lin)[:2]
    for bad in (lin.packed[:-1], second + first, first + first,
                b"\0" * TAG_BYTES * (MAX_MEMBERS + 1)):
        with pytest.raises(ValueError):
            Lineage.unpack(bad)


def test_union_is_the_sorted_set_of_every_member() -> None:
    members = _members(9)
    a, b, c = Lineage.of(members[:4]), Lineage.of(members[3:7]), Lineage.of(members[6:])
    assert a.union(b, c) == Lineage.of(members) == c | b | a
    assert a.union() is a and a.union(a, Lineage()) is a
    assert Lineage().union(b) == b and Lineage() | Lineage() == Lineage()
    assert Lineage.unpack(a.union(b, c).packed) == Lineage.of(members)  # (canonical)
    assert not any(m in a for m in members[4:]) and members[3] in a


def test_old_records_name_members_by_peer_id_and_read_as_the_same_lineage() -> None:
    members = _members(3)
    assert Lineage.decode(members) == Lineage.decode(Lineage.of(members).packed)
    assert Lineage.decode([]) == Lineage() and not Lineage()
    for bad in ([1, 2], {"a": 1}, "peer", ["p"] * (MAX_MEMBERS + 1)):
        with pytest.raises(ValueError):
            Lineage.decode(bad)


def test_an_announcement_of_a_thousand_member_lineage_fits_a_control_frame() -> None:
    ann = Announcement("backbone", 7, b"d" * 32, 400_064, 4, Lineage.of(_members(1000)))
    body = ann.to_body()
    assert len(body) < 8_100  # (eight bytes a member; 52-character peer ids took ~54 KB)
    assert Announcement.from_body(body) == ann
    # the largest lineage allowed still fits in one envelope
    most = Announcement("backbone", 7, b"d" * 32, 1, 4, Lineage.from_tags(
        i.to_bytes(TAG_BYTES, "big") for i in range(MAX_MEMBERS)))
    assert len(most.to_body()) < MAX_ENVELOPE_BYTES - 1024


def test_an_older_peers_announcement_with_peer_ids_reads_and_a_bad_lineage_is_refused() -> None:
    members = _members(2)
    old = packb(["backbone", 3, b"d" * 32, 10, 2, members, 0.0, 0])
    assert Announcement.from_body(old).lineage == Lineage.of(members)
    mark = tag(members[0])
    for bad in (mark[:5], mark + mark, [1], 7):
        with pytest.raises(MalformedMessageError):
            Announcement.from_body(packb(["backbone", 3, b"d" * 32, 10, 2, bad, 0.0, 0]))
