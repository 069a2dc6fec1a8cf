"""The task catalogue: admin-signed records, any merge order the same catalogue (gossip.taskcat)."""

from __future__ import annotations

import contextlib
import itertools

import pytest

from gossip.catalog import ComponentSpec
from gossip.envelope import packb, seal
from gossip.errors import (
    ClockSkewError,
    ForgedSignatureError,
    MalformedMessageError,
    NotAdminError,
    OversizedMessageError,
    UnauthorizedError,
    WrongFederationError,
)
from gossip.identity import Identity
from gossip.membership import Genesis, MembershipView, make_join, view_from
from gossip.records import Join
from gossip.taskcat import (
    ACTIVE,
    ENCODERS,
    MAX_TASK_RECORDS,
    RETIRED,
    TASK_ADD,
    TaskAdd,
    TaskBook,
    TaskData,
    TaskRecord,
    TaskRetire,
    decode_task_body,
    default_components,
    make_task_record,
)

FOUNDER = Identity.from_seed(b"f" * 32)
ADMIN = Identity.from_seed(b"a" * 32)  # an admin who is not a founder
MEMBER = Identity.from_seed(b"m" * 32)
CATALOG = tuple(ComponentSpec.from_name(n) for n in ("backbone", "head.topic"))
GENESIS = Genesis("edu", (FOUNDER.public_key,), CATALOG, 5000, 10,
                  admins=(FOUNDER.public_key, ADMIN.public_key))
FED = GENESIS.federation_id
OTHER = Genesis("other", (FOUNDER.public_key,), CATALOG, 5000, 10)


def rec(record: TaskRecord, at: int = 100, by: Identity = FOUNDER, fed: bytes = FED) -> bytes:
    return make_task_record(by, fed, record, at, at).to_bytes()


ESSAY = TaskAdd("essay", ("text",), 5)


def test_an_add_names_its_head_and_defaults_to_its_pipeline() -> None:
    assert ESSAY.components == ("encoder.text.lora", "head.essay")
    both = TaskAdd("mood", ("text", "activity", "text"), 3)
    assert both.modalities == ("activity", "text")
    assert default_components("x", ["image"]) == ("encoder.image", "head.x")
    for bad in (lambda: TaskAdd("essay", ("text",), 1), lambda: TaskAdd("essay", ("smell",), 2),
                lambda: TaskAdd("essay", (), 2), lambda: TaskAdd("Essay", ("text",), 2),
                lambda: TaskAdd("essay", ("text",), 1001),
                lambda: TaskAdd("essay", ("text",), 5, ("backbone",)),  # no head.essay
                lambda: TaskAdd("essay", ("text",), 5, ("head.essay", "nope.x")),
                lambda: TaskAdd("essay", ("text",), 5, data_version="bad version"),
                lambda: TaskData("essay", ""), lambda: TaskRetire("a.b")):
        with pytest.raises(MalformedMessageError):
            bad()


def test_the_encoders_are_the_models() -> None:
    m3t = pytest.importorskip("p2pfed.model.m3t")
    assert m3t.ENCODERS == ENCODERS


def test_bodies_are_canonical_and_bounded() -> None:
    for record in (ESSAY, TaskRetire("essay"), TaskData("essay", "2026-11")):
        assert decode_task_body(record.KIND, record.to_body()) == record
    unsorted = packb([1, "essay", ["text"], 5, ["head.essay", "encoder.text.lora"], ""])
    with pytest.raises(MalformedMessageError, match="canonical"):
        decode_task_body(TASK_ADD, unsorted)
    with pytest.raises(MalformedMessageError):
        decode_task_body(TASK_ADD, packb([1, "essay", ["text"], True, ["head.essay"], ""]))
    with pytest.raises(OversizedMessageError):
        decode_task_body(TASK_ADD, packb([1, "essay", ["text"], 5, ["x" * 3000], ""]))
    with pytest.raises(MalformedMessageError):
        decode_task_body("task-rename", TaskRetire("essay").to_body())


def view() -> MembershipView:
    return MembershipView(GENESIS)


def test_admins_add_retire_and_version_data() -> None:
    v = view()
    assert v.task_catalogue().version == 0 and v.task_catalogue().tasks == {}
    assert v.add_bytes(rec(ESSAY, 100))
    assert v.add_bytes(rec(TaskData("essay", "v2"), 200, ADMIN))
    cat = v.task_catalogue()
    assert cat.version == 2 and cat.active() == ["essay"]
    assert cat.tasks["essay"].to_status() == {
        "phase": ACTIVE, "modalities": ["text"], "classes": 5,
        "components": ["encoder.text.lora", "head.essay"], "data_version": "v2"}
    assert v.add_bytes(rec(TaskRetire("essay"), 300))
    assert v.task_catalogue().tasks["essay"].phase == RETIRED
    assert v.task_catalogue().active() == []
    assert "head.essay" in v.task_catalogue().components()


def test_a_replay_changes_nothing() -> None:
    v = view()
    raw = rec(ESSAY)
    assert v.add_bytes(raw) and not v.add_bytes(raw) and not v.add_bytes(raw, now_ms=100)
    assert v.task_catalogue().version == 1
    assert v.knows(raw) and raw in v.records() and v.task_records() == {raw}
    assert len(v) == 0  # (no membership record: the members are untouched)


def test_what_cannot_apply_is_ignored_and_reported() -> None:
    v = view()
    for raw in (rec(TaskRetire("ghost"), 50), rec(ESSAY, 100),
                rec(TaskAdd("essay", ("image",), 10), 150),  # a name that exists
                rec(TaskData("essay", "v1"), 160), rec(TaskData("essay", "v1"), 170),
                rec(TaskRetire("essay"), 200), rec(TaskRetire("essay"), 210),
                rec(TaskData("essay", "v3"), 220),
                rec(TaskAdd("essay", ("text",), 5), 230)):  # retired names are not reused
        v.add_bytes(raw)
    cat = v.task_catalogue()
    assert cat.version == 9
    assert cat.tasks["essay"].phase == RETIRED and cat.tasks["essay"].modalities == ("text",)
    assert cat.tasks["essay"].data_version == "v1"
    reasons = [str(i) for i in cat.ignored]
    assert len(reasons) == 6
    assert "no task ghost" in reasons[0] and "exists (active)" in reasons[1]
    assert "v1 already" in reasons[2] and "retired" in reasons[3] and "retired" in reasons[4]
    assert "exists (retired)" in reasons[5]
    assert cat.would_ignore(TaskAdd("essay", ("text",), 5)) is not None
    assert cat.would_ignore(TaskAdd("quiz", ("text",), 5)) is None


def test_any_arrival_order_gives_the_same_catalogue() -> None:
    records = [rec(ESSAY, 100), rec(TaskAdd("essay", ("image",), 7), 100, ADMIN),
               rec(TaskData("essay", "v2"), 150, ADMIN), rec(TaskRetire("essay"), 120),
               rec(TaskAdd("digits", ("image",), 10), 90), rec(TaskRetire("ghost"), 95)]
    seen = set()
    for order in itertools.permutations(records):
        v = view()
        for raw in order:
            v.add_bytes(raw)
        cat = v.task_catalogue()
        seen.add((cat.digest, tuple(sorted((n, t) for n, t in cat.tasks.items())),
                  cat.ignored, v.digest()))
    assert len(seen) == 1
    # merged views agree too
    left, right = view_from(GENESIS, records[:3]), view_from(GENESIS, records[3:])
    left.merge(right)
    right.merge(view_from(GENESIS, records[:3]))
    assert left.task_catalogue() == right.task_catalogue() and left.digest() == right.digest()


def test_a_non_admin_is_refused_with_its_own_code() -> None:
    v = view()
    v.add_bytes(make_join(FOUNDER, FED, Join(b"", ("backbone",), (), 0), 20, 1).to_bytes())
    with pytest.raises(NotAdminError) as exc:
        v.add_bytes(rec(ESSAY, by=MEMBER))
    assert exc.value.code == "not-admin" and isinstance(exc.value, UnauthorizedError)
    assert v.task_catalogue().version == 0 and v.task_records() == frozenset()


def test_forged_foreign_early_future_and_malformed_records_are_refused() -> None:
    v = view()
    raw = bytearray(rec(ESSAY))
    raw[-3] ^= 1  # in the signature
    with pytest.raises(ForgedSignatureError):
        v.add_bytes(bytes(raw))
    with pytest.raises(WrongFederationError):
        v.add_bytes(rec(ESSAY, fed=OTHER.federation_id))
    with pytest.raises(MalformedMessageError, match="before the federation"):
        v.add_bytes(rec(ESSAY, at=5))
    with pytest.raises(ClockSkewError):
        v.add_bytes(rec(ESSAY, at=10_000_000), now_ms=100)
    junk = seal(FOUNDER, kind=TASK_ADD, federation_id=FED, seq=1, timestamp_ms=100,
                body=packb([1, "essay"])).to_bytes()
    with pytest.raises(MalformedMessageError):
        v.add_bytes(junk)
    huge = seal(FOUNDER, kind=TASK_ADD, federation_id=FED, seq=1, timestamp_ms=100,
                body=b"\x00" * 4096).to_bytes()
    with pytest.raises(OversizedMessageError):
        v.add_bytes(huge)
    assert v.task_catalogue().version == 0


def test_the_record_set_is_bounded() -> None:
    book = TaskBook(GENESIS)
    v = view()
    for i in range(MAX_TASK_RECORDS):
        raw = rec(TaskRetire("ghost"), 100 + i)
        assert book.add(v.open(raw), raw)
    late = rec(TaskRetire("ghost"), 100 + MAX_TASK_RECORDS)
    with pytest.raises(UnauthorizedError, match="limit"):
        book.add(v.open(late), late)
    assert len(book) == MAX_TASK_RECORDS
    early = rec(TaskRetire("ghost"), 99)  # (first in the fold's order: it displaces the last)
    assert book.add(v.open(early), early) and len(book) == MAX_TASK_RECORDS
    # whatever order they arrive in, two members keep the same records
    raws = [rec(TaskRetire("ghost"), 100 + i) for i in range(MAX_TASK_RECORDS + 4)]
    kept = []
    for order in (raws, raws[::-1], raws[1::2] + raws[::2]):
        other = TaskBook(GENESIS)
        for raw in order:
            with contextlib.suppress(UnauthorizedError):
                other.add(v.open(raw), raw)
        kept.append(other.keys())
    assert kept[0] == kept[1] == kept[2] and len(kept[0]) == MAX_TASK_RECORDS


# ---------------------------------------------------------------- over the memory transport
def test_an_admins_task_reaches_every_member_one_that_was_away_included() -> None:
    import trio
    import trio.testing

    from gossip.errors import LocalError
    from gossip.transport.memory import MemoryNetwork
    from p2pfed.journal import CatalogueApplied, read
    from p2pfed.runtime.driver import NodeDriver
    from tests.test_federated import build
    from tests.test_status_schema import errors, load_schema

    nodes = build(4, {"backbone": [0, 1, 2, 3]})
    admin, away = nodes[0], nodes[3]
    fed = admin.federation_id
    add = make_task_record(admin.identity, fed, ESSAY, 4_000, 1).to_bytes()
    seen: dict[str, int] = {}

    async def main() -> None:
        net = MemoryNetwork(latency_s=0.01)
        async with trio.open_nursery() as nursery:
            drivers = []
            for n in nodes[:3]:
                drivers.append(NodeDriver(n, net.attach(n.peer_id)))
                await nursery.start(drivers[-1].run)
            for d, n in zip(drivers[1:], nodes[1:3], strict=True):
                d.call(n.introduce, [admin.peer_id])
            await trio.sleep(4.0)
            drivers[0].call(admin.add_task_record, add)
            drivers[0].call(admin.add_task_record, add)  # a replay: nothing more
            with pytest.raises(LocalError, match="not-admin"):
                drivers[1].call(nodes[1].add_task_record, make_task_record(
                    nodes[1].identity, fed, TaskAdd("quiz", ("text",), 4), 4_000, 1).to_bytes())
            await trio.sleep(10.0)
            seen.update({n.peer_id: n.view.task_catalogue().version for n in nodes})
            late = NodeDriver(away, net.attach(away.peer_id))  # the member that was away
            await nursery.start(late.run)
            late.call(away.introduce, [admin.peer_id])
            await trio.sleep(40.0)
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [seen[n.peer_id] for n in nodes] == [1, 1, 1, 0]
    schema = load_schema()
    for n in nodes:
        cat = n.view.task_catalogue()
        assert cat.version == 1 and cat.active() == ["essay"]
        status = n.catalogue_status()  # in effect since a round boundary, with a ledger entry
        assert status["version"] == 1 and status["tasks"]["essay"]["classes"] == 5
        assert errors(status, {"$ref": "#/$defs/catalogue", "$defs": schema["$defs"]}) == []
        entries = list(read(n.ledger.entries(CatalogueApplied.KIND), CatalogueApplied))
        assert len(entries) == 1 and entries[0].record.digest == cat.digest
        assert entries[0].record.component == "backbone" and entries[0].record.round > 0
    assert len({n.view.digest() for n in nodes}) == 1


def test_the_catalogue_in_effect_is_in_the_ledger_and_survives_a_restart() -> None:
    from p2pfed.federated import FederatedNode
    from p2pfed.journal import CatalogueApplied, read
    from tests.test_federated import build

    node = build(1, {"backbone": [0]})[0]
    fed = node.federation_id
    assert node.catalogue_status() == {"version": 0, "digest": "", "tasks": {}}
    node.start(1_000)
    assert not list(node.ledger.entries(CatalogueApplied.KIND))  # (nothing to apply)
    node.add_task_record(make_task_record(node.identity, fed, ESSAY, 1_000, 1).to_bytes(), 1_000)
    assert node.catalogue_status()["version"] == 0  # rounds run here: at the next boundary
    for t in range(1_000, 10_000, 100):
        node.tick(t)
    applied = list(read(node.ledger.entries(CatalogueApplied.KIND), CatalogueApplied))
    assert len(applied) == 1 and applied[0].record.tasks["essay"]["classes"] == 5
    again = FederatedNode(node.identity, fed, dict(node.components), node.ledger,
                          node.blobs, node.config, view=node.view)
    again.restore()
    assert again.catalogue_status() == node.catalogue_status()
    again.start(20_000)
    assert len(list(node.ledger.entries(CatalogueApplied.KIND))) == 1  # nothing new to apply
