"""Asynchronous members: a share of rounds trained, a training schedule, stale states.

In-process, no sockets: nodes driven by hand, a fake trainer that writes into the flat
buffers in action order (as the simulator trains).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import networkx as nx
import pytest
import torch

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer, open_envelope, packb, seal
from gossip.errors import ConfigError, MalformedMessageError
from gossip.identity import Identity
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.config import Config, RoundsSection
from p2pfed.journal import LocalUpdate
from p2pfed.ledger import Ledger
from p2pfed.lineage import Lineage
from p2pfed.mixing import stale_weights, staleness
from p2pfed.node import (
    ANNOUNCE,
    Announce,
    Announcement,
    Fetch,
    Node,
    NodeConfig,
    PeerRejected,
    Train,
    TrainHours,
)
from p2pfed.node._participation import Participation, draw, drawn, make_up
from p2pfed.runtime.daemon import node_config
from tests.test_node import FED, deliver, make_node, wire

PEER = "12D3KooWParticipationTestPeer"


# ---------------------------------------------------------------- the draw
def test_the_draw_is_deterministic_and_its_frequency_is_the_share() -> None:
    rounds = range(1000)
    first = [drawn(PEER, r, 0.3) for r in rounds]
    assert first == [drawn(PEER, r, 0.3) for r in rounds]  # the same answer, every time
    assert 240 <= sum(first) <= 360  # ~0.3 (σ ≈ 14.5 rounds)
    assert 0.0 <= min(draw(PEER, r) for r in rounds) < max(draw(PEER, r) for r in rounds) < 1.0
    assert all(drawn(PEER, r, 1.0) for r in rounds)  # everything at 1
    # a smaller share trains in a subset of the rounds of a larger one (one number per round)
    assert all(not small or big for small, big in
               zip((drawn(PEER, r, 0.1) for r in rounds), first, strict=True))
    # another member draws other rounds
    assert first != [drawn(PEER + "x", r, 0.3) for r in rounds]


def test_make_up_counts_the_rounds_skipped_just_before() -> None:
    share = 0.3
    trained = [drawn(PEER, r, share) for r in range(200)]
    for r in range(200):
        skipped = 0
        while r - skipped - 1 >= 0 and not trained[r - skipped - 1]:
            skipped += 1
        assert make_up(PEER, r, share, 5) == min(1 + skipped, 5)
        assert make_up(PEER, r, share, 1) == 1
    assert Participation(PEER, 1.0, None, 5).factor(7) == 1  # (a full-time member)
    mean = sum(make_up(PEER, r, share, 100) for r in range(2000) if drawn(PEER, r, share))
    assert mean / sum(drawn(PEER, r, share) for r in range(2000)) == pytest.approx(1 / share,
                                                                               rel=0.1)


def test_only_the_draws_since_a_member_began_running_rounds_are_made_up() -> None:
    """A part-time member that joins a federation at round 10 (fast-forwarded, as a member
    that joins or rejoins a running federation is) makes up only the draws it skipped from
    round 10 on: not the rounds before it was there.  A jump ahead counts the same way."""
    share, cap = 0.3, 5
    nodes = [_node(0, participation=share, make_up=cap), _node(1)]
    _path(nodes)
    for n in nodes:
        n.fast_forward(10)
    _rounds(nodes, 30, start=10)
    ups = [s.record for s in nodes[0]._journal.read(LocalUpdate) if s.record.trained]
    first = ups[0]
    assert first.round >= 10 and first.make_up == min(1 + first.round - 10, cap)
    assert make_up(nodes[0].peer_id, first.round, share, cap) > first.make_up  # (it mattered)
    for u in ups:
        assert u.make_up == make_up(nodes[0].peer_id, u.round, share, cap, since=10)
    assert make_up(PEER, 12, 0.3, 5, since=12) == 1


def test_a_restart_makes_up_the_rounds_it_runs_again_as_the_first_time() -> None:
    """Both members restart from a checkpoint at the start of a round the part-time member
    trains after skipping the one before (the ledger then holds that round and the next
    twice): every round trained twice records the same make-up factor, counted from the round
    the member last jumped ahead to (the ledger's newest ``catch-up``; none here: 0)."""
    share, cap = 0.3, 5
    nodes = [_node(0, participation=share, make_up=cap), _node(1)]
    peer = nodes[0].peer_id
    c = next(r for r in range(2, 400, 2)  # (checkpoints every 2 rounds)
             if drawn(peer, r, share) and not drawn(peer, r - 1, share))
    _path(nodes)
    _rounds(nodes, c + 1)
    again = []
    for n in nodes:
        fresh = Node(n.identity, FED, {"backbone": FlatComponent.from_params(
            ComponentSpec.from_name("backbone"), {"w": torch.zeros(4, dtype=torch.float64)})},
            n.ledger, n.blobs, n.config, Sequencer(10**6))
        assert fresh.restore() == {"backbone": c}
        again.append(fresh)
    _path(again)
    _rounds(again, c + 8, start=c)
    factors: dict[int, list[int | None]] = {}
    for s in again[0]._journal.read(LocalUpdate):
        if s.record.trained:
            factors.setdefault(s.record.round, []).append(s.record.make_up)
    assert factors[c] == [make_up(peer, c, share, cap)] * 2 and factors[c][0] > 1  # (twice)
    assert {r: set(f) for r, f in factors.items()} == {
        r: {make_up(peer, r, share, cap)} for r in factors}


def test_a_restart_keeps_the_round_the_member_last_jumped_to() -> None:
    from p2pfed.journal import CatchUp
    from p2pfed.node._restore import restore_since
    from p2pfed.node._state import ComponentRound, jump

    node = _node(0, participation=0.3)
    node._journal.write(CatchUp("backbone", 0, 7), 0)
    node._journal.write(CatchUp("backbone", 9, 15), 0)
    states = {"backbone": ComponentRound(node.components["backbone"])}
    restore_since(node._journal.read(CatchUp, reverse=True), states)
    assert states["backbone"].since == 15
    jump(states["backbone"], 40)
    assert states["backbone"].since == 40 and states["backbone"].round == 40


def test_a_part_time_members_update_is_scaled_by_the_rounds_it_made_up() -> None:
    """The same two-node run with make_up 1 and 5: at the part-time member's first training
    round r0 (every round before skipped) its update is (1 + min(r0, 4)) times as large."""
    credits = {}
    for cap in (1, 5):
        nodes = [_node(0, participation=0.3, make_up=cap), _node(1)]
        _path(nodes)
        _rounds(nodes, 12)
        ups = [s.record for s in nodes[0]._journal.read(LocalUpdate) if s.record.trained]
        credits[cap] = (ups[0].round, ups[0].credit)
    (r0, plain), (r1, scaled) = credits[1], credits[5]
    assert r0 == r1 == 1 and plain > 0  # (round 0 skipped: a factor of 2)
    assert scaled == pytest.approx((1 + min(r0, 4)) * plain, rel=1e-12)


def test_made_up_by_steps_the_update_is_not_scaled_and_the_trainer_is_asked() -> None:
    """``make_up_by`` steps: the node leaves the update as trained and asks the trainer for
    the factor instead (``Train.steps``); a full-time member is asked for 1.  The part-time
    member's ``local-update`` records the factor of each round it trained (the full-time
    member's, 1)."""
    credits = {}
    for by in ("update", "steps"):
        nodes = [_node(0, participation=0.3, make_up=1 if by == "update" else 5,
                       make_up_by=by), _node(1, make_up_by=by)]
        _path(nodes)
        asked: dict[tuple[str, int], int] = {}
        _rounds(nodes, 12, steps=asked)
        ups = [s.record for s in nodes[0]._journal.read(LocalUpdate) if s.record.trained]
        credits[by] = (ups[0].round, ups[0].credit)
        if by == "steps":
            for u in ups:
                assert asked[nodes[0].peer_id, u.round] == u.make_up == make_up(
                    nodes[0].peer_id, u.round, 0.3, 5)
            assert asked[nodes[0].peer_id, ups[0].round] == 1 + min(ups[0].round, 4)
            assert set(asked.values()) != {1}  # (some round made up)
            full = [v for (p, _), v in asked.items() if p == nodes[1].peer_id]
            assert full and set(full) == {1}
            assert {s.record.make_up for s in nodes[1]._journal.read(LocalUpdate)
                    if s.record.trained} == {1}
    assert credits["update"] == credits["steps"]  # (the fake trainer ignores the factor)
    with pytest.raises(ConfigError, match="make_up_by"):
        NodeConfig(make_up_by="both")


def test_the_share_must_be_in_range() -> None:
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="participation must be in"):
            NodeConfig(participation=bad)


# ---------------------------------------------------------------- a tiny driver that trains
def _step(i: int, r: int) -> float:
    return 0.25 * (i + 1) + 0.01 * r


def _drive(nodes: list[Node], actions: list[tuple[str, object]], now: int = 0,
           trained: list[tuple[str, str, int]] | None = None,
           steps: dict[tuple[str, int], int] | None = None) -> None:
    """Carry out actions until quiet; ``Train`` runs a fake trainer inline (deterministic:
    each node shrinks its state and adds a step of its own for the round; it keeps the step
    factor it was asked for in ``steps``, and ignores it)."""
    by_id = {n.peer_id: n for n in nodes}
    index = {n.peer_id: i for i, n in enumerate(nodes)}
    queue = list(actions)
    while queue:
        src, action = queue.pop(0)
        if isinstance(action, Train):
            node = by_id[src]
            if not node.awaiting_update(action.component, action.round):
                continue  # (rolled back meanwhile)
            flat = node.components[action.component].flat
            flat.mul_(0.9).add_(_step(index[src], action.round))
            if action.objective is not None and action.objective[0] == "group-dro":
                flat.add_(0.5 * action.objective[1])  # (another objective, another step)
            if trained is not None:
                trained.append((src, action.component, action.round))
            if steps is not None:
                steps[src, action.round] = action.steps
            queue += [(src, a) for a in node.local_update_done(action.component,
                                                               action.round, now)]
        elif isinstance(action, Announce):
            for peer in action.recipients:
                if peer in by_id:
                    queue += [(peer, a) for a in by_id[peer].receive(src, action.data, now)]
        elif isinstance(action, Fetch):
            data = by_id[action.peer].serve_payload(action.digest)
            assert data is not None
            queue += [(src, a) for a in by_id[src].payload_received(
                action.peer, action.component, action.round, action.digest, data, now)]


def _some_loss(component: str, epoch: int, round_: int) -> float:
    """A trainer's loss that changes from round to round (loss mixing)."""
    return 0.1 + 0.2 * (round_ * 7 % 5)


def _node(i: int, comps: tuple[str, ...] = ("backbone",), **config: object) -> Node:
    ident = Identity.from_seed(bytes([90 + i]) * 32)
    components = {
        c: FlatComponent.from_params(ComponentSpec.from_name(c),
                                     {"w": torch.full((4,), float(i), dtype=torch.float64)})
        for c in comps
    }
    cfg = NodeConfig(round_timeout_ms=1000, trains=frozenset(comps), checkpoint_every=2,
                     **config)  # type: ignore[arg-type]
    return Node(ident, FED, components, Ledger.open(None, ident), BlobStore(None), cfg,
                Sequencer(0))


def _path(nodes: list[Node]) -> None:
    g = nx.path_graph([n.peer_id for n in nodes])
    comps = set().union(*(n.components for n in nodes))
    for n in nodes:
        n.set_topology(g, {c: [m.peer_id for m in nodes] for c in comps})


def _rounds(nodes: list[Node], until: int, trained: list[tuple[str, str, int]] | None = None,
            start: int = 0, steps: dict[tuple[str, int], int] | None = None) -> None:
    """Run rounds ``start .. until-1`` one at a time, round ``r`` at ``now = r`` seconds."""
    for r in range(start, until):
        actions: list[tuple[str, object]] = []
        for n in nodes:
            actions += [(n.peer_id, a) for a in n.set_round_limit(r + 1, r * 1000)]
            if r == start:
                actions += [(n.peer_id, a) for a in n.start(r * 1000)]
        _drive(nodes, actions, r * 1000, trained, steps)


# ---------------------------------------------------------------- a member that trains a share
def test_a_member_at_0_3_trains_about_a_third_of_rounds_and_completes_every_one() -> None:
    rounds = 60
    nodes = [_node(0, ("backbone", "head.topic"), participation=0.3),
             _node(1, ("backbone", "head.topic")), _node(2, ("backbone", "head.topic"))]
    wire(nodes, [(0, 1), (1, 2), (0, 2)])
    trained: list[tuple[str, str, int]] = []
    actions: list[tuple[str, object]] = []
    for n in nodes:
        n.set_round_limit(rounds, 0)
        actions += [(n.peer_id, a) for a in n.start(0)]
    _drive(nodes, actions, 0, trained)  # one pass at now = 0: no round waited for a deadline
    part = nodes[0]
    mine = {(c, r) for p, c, r in trained if p == part.peer_id}
    expected = [r for r in range(rounds) if drawn(part.peer_id, r, 0.3)]
    for comp in ("backbone", "head.topic"):  # the same draw for both components
        assert sorted(r for c, r in mine if c == comp) == expected
    assert 0.15 * rounds <= len(expected) <= 0.45 * rounds
    for n in nodes[1:]:  # the others train in every round
        assert len([t for t in trained if t[0] == n.peer_id]) == 2 * rounds
    for n in nodes:
        for comp in ("backbone", "head.topic"):
            assert n.round_of(comp) == rounds
    # the member announced and mixed in every round, with both neighbours, none missing
    updates = [e.body for e in part.ledger.entries("local-update")
               if e.body["component"] == "backbone"]
    assert len(updates) == rounds
    assert [u["round"] for u in updates if u["trained"]] == expected
    mixes = [e.body for e in part.ledger.entries("mix") if e.body["component"] == "backbone"]
    assert len(mixes) == rounds and all(len(m["inputs"]) == 2 and not m["missing"]
                                        for m in mixes)


def test_a_schedule_decides_from_the_time_passed_in() -> None:
    # trains only in even seconds (round r runs at now = r s)
    nodes = [_node(i, schedule=lambda ms: (ms // 1000) % 2 == 0) for i in range(2)]
    _path(nodes)
    trained: list[tuple[str, str, int]] = []
    _rounds(nodes, 6, trained)
    assert sorted({r for _, _, r in trained}) == [0, 2, 4]
    assert all(n.round_of("backbone") == 6 for n in nodes)


# ---------------------------------------------------------------- unlearning re-runs
@pytest.mark.parametrize("config", [
    {"participation": 0.5},
    {"schedule": lambda ms: (ms // 1000) % 3 != 1},  # not in rounds 1, 4, 7 ...
    {"participation": 0.6, "schedule": lambda ms: (ms // 1000) % 2 == 0},
], ids=["share", "schedule", "both"])
def test_exact_unlearning_re_runs_the_same_decisions(config: dict[str, object]) -> None:
    rounds = 24  # (more than the rounds whose schedule answer a node remembers)
    nodes = [_node(i, **config) for i in range(4)]
    _path(nodes)
    _rounds(nodes, rounds)
    target, rest = nodes[-1], nodes[:-1]
    assert all(n.shaped_by("backbone", target.peer_id) for n in rest)
    # the re-run happens later, at a time the schedule would answer otherwise for every round
    later = 10**9
    trained: list[tuple[str, str, int]] = []
    actions: list[tuple[str, object]] = []
    for n in rest:
        actions += [(n.peer_id, a) for a in n.forget(target.peer_id, "exact", later)]
    _path(rest)
    for n in rest:  # (paused at the round limit: resumed)
        actions += [(n.peer_id, a) for a in n.set_round_limit(rounds, later)]
    _drive(rest, actions, later, trained)
    assert all(n.unlearning() == {} and n.round_of("backbone") == rounds for n in rest)

    never = [_node(i, **config) for i in range(3)]  # the federation without the member
    _path(never)
    again: list[tuple[str, str, int]] = []
    _rounds(never, rounds, again)
    for ours, theirs in zip(rest, never, strict=True):
        assert torch.equal(ours.components["backbone"].flat, theirs.components["backbone"].flat)
    # every round re-run trained where the never-federation trained
    rerun = {(p, r) for p, _, r in trained}
    assert rerun and rerun <= {(p, r) for p, _, r in again}


# ---------------------------------------------------------------- stale states
def test_stale_weights_by_hand() -> None:
    third = 1 / 3
    # all fresh: the very same numbers come back
    assert stale_weights(0.4, 0, [(0.3, 0), (0.3, 0)]) == (0.4, [0.3, 0.3])
    # a neighbour one round stale keeps half its weight; self takes the other half
    self_w, ws = stale_weights(third, 0, [(third, 1), (third, 0)])
    assert self_w == pytest.approx(0.5) and ws == pytest.approx([1 / 6, third])
    # this node two rounds stale keeps a third of its weight, the rest goes to its neighbours
    # in proportion to their weights
    self_w, ws = stale_weights(third, 2, [(third, 0), (third, 0)])
    assert self_w == pytest.approx(1 / 9) and ws == pytest.approx([4 / 9, 4 / 9])
    self_w, ws = stale_weights(0.5, 1, [(0.375, 0), (0.125, 0)])
    assert self_w == pytest.approx(0.25) and ws == pytest.approx([0.5625, 0.1875])
    # both: first the neighbour's age (self 1/3 + 1/6), then self's (halved, to the neighbours)
    self_w, ws = stale_weights(third, 1, [(third, 1), (third, 0)])
    assert self_w == pytest.approx(0.25)
    assert ws == pytest.approx([1 / 6 + 0.25 * (1 / 6) / 0.5, third + 0.25 * third / 0.5])
    # alone, nowhere to move
    assert stale_weights(1.0, 5, []) == (1.0, [])
    assert [staleness(a) for a in (0, 1, 9)] == [1.0, 0.5, 0.1]


@pytest.mark.parametrize("seed", range(5))
def test_stale_weights_stay_a_convex_row(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(5, generator=gen, dtype=torch.float64)
    row = (raw / raw.sum()).tolist()
    ages = torch.randint(0, 50, (5,), generator=gen).tolist()
    self_w, ws = stale_weights(row[0], ages[0], list(zip(row[1:], ages[1:], strict=True)))
    assert sum([self_w, *ws]) == pytest.approx(1.0)
    assert all(0.0 <= w <= 1.0 for w in (self_w, *ws))
    for (w, a), new in zip(zip(row[1:], ages[1:], strict=True), ws, strict=True):
        if ages[0] == 0:  # a neighbour's weight never grows from its own age
            assert new == pytest.approx(w * staleness(a))


def _announced(data: bytes) -> Announcement:
    return Announcement.from_body(open_envelope(data, federation_id=FED, now_ms=0).body)


def test_a_returning_member_is_down_weighted_and_moves_to_its_neighbours() -> None:
    back, ahead = make_node(0.0), make_node(4.0)
    wire([back, ahead], [(0, 1)])  # one edge: MH weights 1/2, 1/2
    ahead.fast_forward(7)  # the federation went on for 7 rounds while ``back`` was away
    back.set_round_limit(8, 0)
    ahead.set_round_limit(8, 0)
    back_out, ahead_out = back.start(0), ahead.start(0)
    (news,) = [a for a in ahead_out if isinstance(a, Announce)]
    # ``ahead``'s announcement of round 7 makes ``back`` catch up: its state is 7 rounds old
    later = back.receive(ahead.peer_id, news.data, 0)
    catch_up = [(e.body["from"], e.body["to"]) for e in back.ledger.entries("catch-up")]
    assert catch_up == [(0, 7)]
    stale = [_announced(a.data) for a in later if isinstance(a, Announce)]
    assert [(s.round, s.age) for s in stale] == [(7, 7)]
    deliver([back, ahead], [(back.peer_id, a) for a in back_out + later])
    s = staleness(7)  # 1/8
    # ``ahead`` gives ``back`` 1/2 · 1/8 and keeps the rest: it barely moves
    (mix,) = [e.body for e in ahead.ledger.entries("mix") if e.body["round"] == 7]
    assert mix["inputs"][0][1] == pytest.approx(0.5 * s)
    assert mix["self_weight"] == pytest.approx(1 - 0.5 * s)
    # ``back`` keeps 1/8 of its own weight and takes the rest from ``ahead``
    (mine,) = [e.body for e in back.ledger.entries("mix") if e.body["round"] == 7]
    assert mine["self_weight"] == pytest.approx(0.5 * s)
    assert mine["inputs"][0][1] == pytest.approx(1 - 0.5 * s)
    # both end at 3.75 (plain Metropolis–Hastings: both at 2.0, the average)
    assert back.components["backbone"].flat[0].item() == pytest.approx(4.0 * (1 - 0.5 * s))
    assert ahead.components["backbone"].flat[0].item() == pytest.approx(4.0 * (1 - 0.5 * s))
    # after its mix ``back`` is fresh again: its next announcement carries no age
    nxt = [_announced(a.data) for a in back.set_round_limit(9, 0) if isinstance(a, Announce)]
    assert [(a.round, a.age) for a in nxt] == [(8, 0)]


def test_age_zero_keeps_todays_numbers_and_bytes() -> None:
    nodes = [make_node(v) for v in (0.0, 3.0, 9.0)]
    wire(nodes, [(0, 1), (1, 2)])
    actions: list[tuple[str, object]] = []
    for n in nodes:
        n.set_round_limit(3, 0)
        actions += [(n.peer_id, a) for a in n.start(0)]
    deliver(nodes, actions)
    for n in nodes:  # the mix used the Metropolis–Hastings row, exactly
        row = n.weights_of("backbone")
        for e in n.ledger.entries("mix"):
            assert e.body["self_weight"] == row[n.peer_id]
            assert [w for _, w, _ in e.body["inputs"]] == [row[p] for p, _, _ in
                                                           e.body["inputs"]]
    ann = Announcement("backbone", 3, b"d" * 32, 10, 2, Lineage.of([PEER]), 0.5, 1)
    assert ann.to_body() == packb(["backbone", 3, b"d" * 32, 10, 2, Lineage.of([PEER]).packed,
                                   0.5, 1])


# ---------------------------------------------------------------- the announcement's age
def _body(*extra: object, rnd: int = 5) -> bytes:
    return packb(["backbone", rnd, b"d" * 32, 10, 1, Lineage.of([PEER]).packed, 0.0, 0, *extra])


def test_the_old_announcement_decodes_and_the_age_round_trips() -> None:
    old = Announcement.from_body(_body())
    assert old.age == 0 and old.to_body() == _body()
    aged = Announcement.from_body(_body(3))
    assert aged.age == 3 and aged.to_body() == _body(3)
    assert Announcement.from_body(_body(0)).age == 0  # (tolerated, re-encoded as 8 elements)


@pytest.mark.parametrize("age", [-1, 1.5, True, "3", None, 6, 1 << 40])
def test_a_bad_age_is_refused(age: object) -> None:
    rnd = (1 << 41) if age == 1 << 40 else 5  # (huge: refused even below its round)
    with pytest.raises(MalformedMessageError):
        Announcement.from_body(_body(age, rnd=rnd))


def test_an_announcement_of_eleven_elements_or_a_bad_tenth_is_refused() -> None:
    """The 10th element is provenance, ``[masses, flags]`` (tests/test_provenance_node.py)."""
    for extra in [(1, [b"\0" * 8, 0], 3), (1, 2), (1, [b"\0" * 8]), (1, [b"\0" * 16, 0]),
                  (1, [b"\0" * 8, 9])]:
        with pytest.raises(MalformedMessageError):
            Announcement.from_body(_body(*extra))


def test_a_bad_age_is_rejected_per_peer() -> None:
    a, b = make_node(0.0), make_node(1.0)
    wire([a, b], [(0, 1)])
    a.set_round_limit(1, 0)
    a.start(0)
    env = seal(b.identity, kind=ANNOUNCE, federation_id=FED, seq=1, timestamp_ms=0,
               body=_body(-2, rnd=0)).to_bytes()
    out = a.receive(b.peer_id, env, 0)
    assert len(out) == 1 and isinstance(out[0], PeerRejected)
    assert isinstance(out[0].error, MalformedMessageError)


def test_a_recorded_objective_that_cannot_run_now_gives_way_to_the_nodes_own(
        caplog: pytest.LogCaptureFixture) -> None:
    """A re-run keeps the recorded objective unless this version does not know it, or it is
    group-dro where differential privacy now samples the data (the accountant would understate
    a small group's exposure): then the node's own, with a warning."""
    from p2pfed.privacy import Policy

    sampled = {"backbone": Policy(clip=1.0, sigma=1.0, sample_rate=0.5)}
    plain = Participation.of(PEER, NodeConfig())
    private = Participation.of(PEER, NodeConfig(privacy=sampled))
    assert plain._usable(("group-dro", 2.0)) == ("group-dro", 2.0)
    assert private._usable(("erm", 3.0)) == ("erm", 3.0)
    with caplog.at_level("WARNING"):
        assert private._usable(("group-dro", 2.0)) == ("erm", 1.0)
        assert plain._usable(("minimax", 1.0)) == ("erm", 1.0)
    assert "privacy now samples" in caplog.text and "unknown here" in caplog.text


# ---------------------------------------------------------------- the daemon's settings
def test_the_fairness_settings_reach_the_node() -> None:
    cfg = Config.from_dict({"fairness": {"objective": "group-dro", "tilt": 2.5}})
    assert node_config(cfg, frozenset({"backbone"}), {}).objective == ("group-dro", 2.5)
    assert node_config(Config(), frozenset(), {}).objective == ("erm", 1.0)
    # loss mixing: the lean and the trainer's loss reach the node; plain mixing leans not
    def loss_of(component: str, epoch: int, round_: int) -> float | None:
        return 0.5

    leaning = Config.from_dict({"fairness": {"mixing": "loss", "lean": 2.0}})
    made = node_config(leaning, frozenset({"backbone"}), {}, loss_of=loss_of)
    assert (made.lean, made.loss_of) == (2.0, loss_of)
    assert node_config(cfg, frozenset(), {}, loss_of=loss_of).lean == 0.0


def test_rounds_settings_are_checked() -> None:
    cfg = Config.from_dict({"rounds": {"participation": 0.3, "train_hours": "22-6"}})
    assert cfg.rounds.check() == (22, 6)
    made = node_config(cfg, frozenset({"backbone"}), {})
    assert made.participation == 0.3 and made.schedule == TrainHours(22, 6)
    assert node_config(Config(), frozenset(), {}).schedule is None
    assert Config.from_dict({"rounds": {"train_hours": " 9 - 17 "}}).rounds.check() == (9, 17)
    for bad in (0, 0.0, -0.1, 1.01):
        with pytest.raises(ConfigError, match=r"rounds.participation must be in \(0, 1\]"):
            Config.from_dict({"rounds": {"participation": bad}})
    for bad in ("24-6", "6-24", "6-6", "22", "22:00-06:00", "x-6", "-1-6", "²-3"):
        with pytest.raises(ConfigError, match=r'rounds\.train_hours must be "H-H"'):
            Config.from_dict({"rounds": {"train_hours": bad}})
    with pytest.raises(ConfigError, match=r"rounds\.train_hours must be a string"):
        Config.from_dict({"rounds": {"train_hours": 22}})
    assert RoundsSection().check() is None


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_train_hours_wrap_midnight(utc: None) -> None:
    night = TrainHours(22, 6)
    assert [h for h in range(24) if night.allows(h)] == [0, 1, 2, 3, 4, 5, 22, 23]
    day = TrainHours(9, 17)
    assert [h for h in range(24) if day.allows(h)] == list(range(9, 17))
    def at(hour: int) -> int:  # now_ms at hour:59 UTC on some day
        return (19_000 * 86_400 + hour * 3600 + 59 * 60) * 1000

    assert [night(at(h)) for h in (21, 22, 23, 0, 5, 6)] == [False, True, True, True, True,
                                                             False]


def test_a_contribution_keeps_its_senders_age_for_the_rerun() -> None:
    """The ledger's contribution keeps a stale sender's age (only when above 0: older bodies
    and fresh senders read the same), so a re-run down-weights it as the round did."""
    from p2pfed.journal import Contribution

    stale = Contribution("peer", "head.topic", 7, b"\x01" * 32, 0.25, Lineage.of(["peer"]),
                         age=3)
    assert stale.to_body()["age"] == 3
    assert Contribution.from_body(stale.to_body()) == stale
    fresh = Contribution("peer", "head.topic", 7, b"\x01" * 32, 0.25, Lineage.of(["peer"]))
    assert "age" not in fresh.to_body()
    assert Contribution.from_body(fresh.to_body()).age == 0


def test_a_neighbour_that_forces_a_catch_up_does_not_take_the_state_over() -> None:
    """A member announcing a round far ahead makes its neighbour jump with a huge age; the
    neighbour then gives nobody more than twice its Metropolis–Hastings weight."""
    self_weight, (attacker,) = stale_weights(5 / 6, 10**6, [(1 / 6, 0)])
    assert attacker == pytest.approx(2 / 6) and self_weight == pytest.approx(4 / 6)
    self_weight, weights = stale_weights(0.5, 3, [(0.25, 0), (0.25, 0)])  # (under the cap)
    assert weights == [pytest.approx(0.4375)] * 2 and self_weight == pytest.approx(0.125)


@pytest.mark.parametrize(("settings", "now"), [
    ({"participation": 0.4, "make_up": 5}, {"participation": 0.9, "make_up": 1}),
    ({"participation": 0.4, "make_up": 5}, {"participation": 1.0, "make_up": 5}),
    ({"participation": 1.0, "make_up": 5}, {"participation": 0.4, "make_up": 5}),
    ({"participation": 0.4, "objective": ("group-dro", 2.0)},
     {"participation": 0.4, "objective": ("erm", 1.0)}),
    ({"participation": 0.4, "lean": 3.0, "loss_of": _some_loss}, {"lean": 0.5}),
], ids=["less", "full-time-now", "part-time-now", "objective", "lean"])
def test_an_exact_rerun_makes_up_as_the_live_rounds_did_whatever_the_settings_are_now(
        settings: dict[str, Any], now: dict[str, Any]) -> None:
    """Members whose share, make-up (scaling the update), local objective or loss mixing's
    lean change before the unlearning: the re-run reads each round's training, factor,
    objective and lean from its ``local-update`` and ends bit-identical to the federation that
    never had the member, run with the first settings."""
    rounds = 16
    nodes = [_node(i, **settings) for i in range(4)]  # type: ignore[arg-type]
    _path(nodes)
    _rounds(nodes, rounds)
    target, rest = nodes[-1], nodes[:-1]
    ups = [s.record for n in rest for s in n._journal.read(LocalUpdate) if s.record.trained]
    assert all(u.make_up is not None for u in ups)  # (every trained round records it)
    assert {u.objective for u in ups} == {settings.get("objective", ("erm", 1.0))}
    if settings["participation"] < 1:
        assert any((u.make_up or 1) > 1 for u in ups)  # (some round made up: it matters)
    assert {u.lean for u in ups} == {settings.get("lean")}
    later = 10**9
    actions: list[tuple[str, object]] = []
    for n in rest:
        n._participation = Participation.of(n.peer_id, dataclasses.replace(
            n.config, **now))  # type: ignore[arg-type]  # (what the settings say now)
        if "lean" in now:
            n.config = dataclasses.replace(n.config, **now)  # type: ignore[arg-type]
        actions += [(n.peer_id, a) for a in n.forget(target.peer_id, "exact", later)]
    _path(rest)
    for n in rest:
        actions += [(n.peer_id, a) for a in n.set_round_limit(rounds, later)]
    _drive(rest, actions, later)
    assert all(n.unlearning() == {} and n.round_of("backbone") == rounds for n in rest)
    never = [_node(i, **settings) for i in range(3)]  # type: ignore[arg-type]
    _path(never)
    _rounds(never, rounds)
    for ours, theirs in zip(rest, never, strict=True):
        assert torch.equal(ours.components["backbone"].flat, theirs.components["backbone"].flat)


def test_the_objective_in_a_local_update_round_trips_and_a_bad_one_is_refused() -> None:
    from p2pfed.journal import SchemaError

    update = LocalUpdate("head.topic", 3, b"\x00" * 32, True, b"", Lineage.of(["me"]), 0,
                         make_up=1, objective=("group-dro", 2.5))
    body = update.fields()
    assert (body["objective"], body["tilt"]) == ("group-dro", 2.5)
    assert LocalUpdate.from_fields(body) == update
    for bad in ({"objective": ""}, {"objective": "x" * 33}, {"tilt": -1.0},
                {"tilt": float("nan")}, {"objective": 7}):
        with pytest.raises(SchemaError):
            LocalUpdate.from_fields(body | bad)
    no_tilt = dict(body)
    del no_tilt["tilt"]
    with pytest.raises(SchemaError, match="tilt"):
        LocalUpdate.from_fields(no_tilt)


def test_the_lean_in_a_local_update_round_trips_and_a_bad_one_is_refused() -> None:
    from p2pfed.journal import SchemaError

    update = LocalUpdate("backbone", 3, b"\x00" * 32, True, b"", Lineage.of(["me"]), 0,
                         make_up=1, lean=2.5)
    body = update.fields()
    assert body["lean"] == 2.5 and LocalUpdate.from_fields(body) == update
    assert "lean" not in dataclasses.replace(update, lean=None).fields()  # (as older bodies)
    for bad in (0.0, 10.5, -1.0, float("nan"), "far"):
        with pytest.raises(SchemaError, match="lean"):
            LocalUpdate.from_fields(body | {"lean": bad})


def test_a_bad_make_up_in_a_local_update_is_a_schema_error() -> None:
    from p2pfed.journal import SchemaError

    body = LocalUpdate("head.topic", 3, b"\x00" * 32, True, b"", Lineage.of(["me"]), 0,
                       make_up=4).fields()
    assert LocalUpdate.from_fields(body).make_up == 4
    assert "make_up" not in LocalUpdate("head.topic", 3, b"\x00" * 32, True, b"",
                                        Lineage.of(["me"]), 0).fields()  # (as older bodies)
    for bad in (0, 101, -1):
        with pytest.raises(SchemaError, match="make_up"):
            LocalUpdate.from_fields(body | {"make_up": bad})
    with pytest.raises(SchemaError, match="make_up"):
        LocalUpdate.from_fields(body | {"make_up": "4"})


def test_a_rerun_trains_where_the_live_round_trained() -> None:
    """The ``local-update`` the state went on from decides, not a fast re-run's (which records
    most rounds untrained): of a round written twice otherwise (a restart ran it again, with
    other settings perhaps), the later; and it decides whatever the settings are now."""
    from p2pfed.journal import LocalUpdate, Stored
    from p2pfed.node._participation import Participation
    from p2pfed.node._unlearning import idle_rounds

    def update(index: int, round_: int, trained: bool, epoch: int = 0) -> Stored[LocalUpdate]:
        return Stored(index, 0, LocalUpdate("head.topic", round_, b"\x00" * 32, trained, b"",
                                            Lineage.of(["me"]), epoch))

    # round 3 trained live, then a fast unlearning (epoch 1, re-running up to round 6)
    # recorded it untrained; round 4 did not train; round 5 did not train, and after a restart
    # ran again and trained
    entries = [update(0, 3, True), update(1, 4, False), update(2, 5, False), update(3, 5, True),
               update(4, 3, False, epoch=1), update(5, 7, False, epoch=1)]
    assert idle_rounds(entries, "head.topic", 0, 9, before=6, fast_reruns={1: 6}) == {4, 7}
    assert idle_rounds(entries, "head.topic", 0, 9, before=3) == {4, 5}  # (before the restart)
    assert idle_rounds(entries, "head.topic", 0, 9, before=6) == {3, 4, 7}  # (fast not known)
    p = Participation("peer", 0.01, None)  # (now it would almost never train)
    assert p.trains(3, 0, idle={4}) and not p.trains(4, 0, idle={4})
