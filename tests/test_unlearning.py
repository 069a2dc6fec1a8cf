"""Federated unlearning: exact rollback and re-run, fast calibration, resumption, the audit."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest
import torch
import trio
import trio.testing

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer
from gossip.errors import LocalError
from gossip.forget import Forget, ForgetMode, make_forget
from gossip.identity import Identity
from gossip.transport.memory import MemoryNetwork
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.federated import FORGET_RECORD_ENTRY as FORGET_RECORD
from p2pfed.federated import FederatedNode
from p2pfed.journal import Checkpoint, Stored
from p2pfed.ledger import Ledger, LedgerEntry
from p2pfed.lineage import Lineage
from p2pfed.node import Node, NodeConfig, status_of
from p2pfed.node._restore import restore_candidates
from p2pfed.sim.education import EducationSettings
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from p2pfed.sim.topology import load_topology
from p2pfed.unlearning import (
    FORGET_ENTRY,
    UNLEARNED_ENTRY,
    check_unlearning,
)
from tests.test_federated import build, start_federation
from tests.test_node import deliver

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
FED = b"U" * 32
SMALL_EDU = EducationSettings(rounds=6, steps=2, batch_size=8, questions=600, traces=300,
                              text_model="tiny", lora_layers=(1,))


# ---------------------------------------------------------------- the simulator's study
def test_exact_unlearning_on_ring_16_equals_the_run_without_the_member() -> None:
    topo = load_topology(TOPOLOGIES / "ring-16.toml")
    report = simulate(SimConfig(topo, rounds=40, seed=2, unlearn=("node-3", 25)))
    u = report["unlearning"]
    assert u["max_abs_diff_vs_retrain"] <= 1e-6
    assert u["components_rolled_back"] == ["backbone"]
    assert 0.3 < u["cost_fraction"] < 1.0  # rounds 0..24 re-run by 15 nodes, not 40 rounds
    # without the unlearning the federation is far from the one without the member
    kept = Simulation(SimConfig(topo, rounds=40, seed=2))
    kept.run()
    gone = Simulation(SimConfig(topo, rounds=40, seed=2, absent=frozenset({"node-3"})))
    gone.run()
    ours, theirs = kept.final_states(), gone.final_states()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in theirs) > 1e-2


def test_an_early_request_leaves_what_the_member_never_reached_untouched() -> None:
    topo = load_topology(TOPOLOGIES / "hierarchical-edu.toml")
    report = simulate(SimConfig(topo, rounds=12, seed=1, unlearn=("student-0-0-0", 1)))
    u = report["unlearning"]
    assert u["max_abs_diff_vs_retrain"] <= 1e-6
    # the student holds only the adapter and the topic head
    assert u["components_rolled_back"] == ["encoder.text.lora", "head.topic"]
    assert set(u["components_untouched"]) == {"backbone", "encoder.activity", "encoder.image",
                                              "head.digits", "head.engagement"}
    # students of the other institutions were not reached after one round
    assert u["rolled_back_per_node"]["student-2-1-2"] == []


@pytest.fixture(scope="module")
def education_studies() -> dict[str, dict[str, object]]:
    topo = load_topology(TOPOLOGIES / "hierarchical-edu.toml")
    out = {}
    for mode in ("exact", "fast"):
        out[mode] = simulate(SimConfig(topo, workload="education", rounds=SMALL_EDU.rounds,
                                       seed=1, education=SMALL_EDU,
                                       unlearn=("student-0-0-0", 4), unlearn_mode=mode))
    return out


def test_exact_unlearning_of_a_trained_model_equals_retraining(
        education_studies: dict[str, dict[str, object]]) -> None:
    u = education_studies["exact"]["unlearning"]
    assert isinstance(u, dict)
    assert u["max_abs_diff_vs_retrain"] <= 1e-6
    assert u["backdoor_success_after"] == pytest.approx(u["backdoor_success_retrain"], abs=1e-9)
    assert u["clean_accuracy_after"] == pytest.approx(u["clean_accuracy_retrain"], abs=1e-9)
    # a student's adapter reaches the backbone (engagement) and then the digits pipeline
    assert "backbone" in u["components_rolled_back"]


def test_fast_unlearning_trains_less_and_is_only_close(
        education_studies: dict[str, dict[str, object]]) -> None:
    exact, fast = (education_studies[m]["unlearning"] for m in ("exact", "fast"))
    assert isinstance(exact, dict) and isinstance(fast, dict)
    assert fast["mode"] == "fast"
    assert fast["cost_fraction"] < exact["cost_fraction"] / 2
    assert fast["max_abs_diff_vs_retrain"] > 1e-6  # an approximation, not the retrain


def test_bad_unlearn_arguments_are_refused() -> None:
    topo = load_topology(TOPOLOGIES / "ring-16.toml")
    with pytest.raises(Exception, match="no node nobody"):
        simulate(SimConfig(topo, rounds=5, unlearn=("nobody", 2)))
    with pytest.raises(Exception, match="unlearning round"):
        simulate(SimConfig(topo, rounds=5, unlearn=("node-1", 9)))


# ---------------------------------------------------------------- the node, by hand
def _path_nodes(n: int, root: Path | None, values: list[float] | None = None,
                every: int = 2, boot: int = 0, rule: str = "mh") -> list[Node]:
    nodes = []
    for i in range(n):
        ident = Identity.from_seed(bytes([40 + i]) * 32)
        comp = FlatComponent.from_params(
            ComponentSpec.from_name("backbone"),
            {"w": torch.full((4,), float((values or list(range(n)))[i]), dtype=torch.float64)})
        home = root / str(i) if root is not None else None
        if home is not None:
            home.mkdir(parents=True, exist_ok=True)
        nodes.append(Node(ident, FED, {"backbone": comp},
                          Ledger.open(home / "ledger.sqlite3" if home else None, ident),
                          BlobStore(home / "blobs" if home else None),
                          NodeConfig(round_timeout_ms=1000, checkpoint_every=every,
                                     robust={"*": rule}),
                          Sequencer(boot)))
    return nodes


def _wire(nodes: list[Node]) -> None:
    g = nx.path_graph([n.peer_id for n in nodes])
    for n in nodes:
        n.set_topology(g, {"backbone": [m.peer_id for m in nodes]})


def _run(nodes: list[Node], limit: int, start: bool = False) -> None:
    actions: list[tuple[str, object]] = []
    for n in nodes:
        actions += [(n.peer_id, a) for a in n.set_round_limit(limit, 0)]
        if start:
            actions += [(n.peer_id, a) for a in n.start(0)]
    deliver(nodes, actions)


def _forget_last(nodes: list[Node]) -> list[Node]:
    target, rest = nodes[-1], nodes[:-1]
    actions: list[tuple[str, object]] = []
    for n in rest:
        actions += [(n.peer_id, a) for a in n.forget(target.peer_id, "exact", 0)]
    deliver(rest, actions)
    return rest


def _kinds(node: Node, kind: str) -> list[LedgerEntry]:
    return list(node.ledger.entries(kind))


def test_a_node_killed_mid_unlearning_resumes_and_applies_it_once(tmp_path: Path) -> None:
    nodes = _path_nodes(5, tmp_path)
    _wire(nodes)
    _run(nodes, 6, start=True)
    rest = _forget_last(nodes)
    _run(rest, 3)  # the re-run has reached round 3 of 6 ...
    victim = rest[1]
    assert victim.unlearning() == {nodes[-1].peer_id: ["backbone"]}
    victim.ledger.close()  # ... when node 1 is killed (nothing more reaches its disk)
    reborn = _path_nodes(5, tmp_path, boot=1)[1]
    assert reborn.restore() == {"backbone": 2}  # its last checkpoint of the re-run
    assert reborn.forgotten() == {nodes[-1].peer_id}
    assert reborn.unlearning() == {nodes[-1].peer_id: ["backbone"]}
    rest[1] = reborn
    _wire(rest)
    deliver(rest, [(reborn.peer_id, a) for a in reborn.start(0)])
    _run(rest, 6)

    # the same federation without the member from the start
    alone = _path_nodes(4, None)
    _wire(alone)
    _run(alone, 6, start=True)
    for ours, theirs in zip(rest, alone, strict=True):
        assert torch.equal(ours.components["backbone"].flat, theirs.components["backbone"].flat)
        assert ours.round_of("backbone") == 6
    for n in rest:
        assert len(_kinds(n, FORGET_ENTRY)) == 1 and len(_kinds(n, UNLEARNED_ENTRY)) == 1
        assert n.unlearning() == {}
        assert check_unlearning(n.ledger.entries()) == []
    # a second restart after the unlearning loads the unlearned state and re-runs nothing
    value = reborn.components["backbone"].flat.clone()
    reborn.ledger.close()
    again = _path_nodes(5, tmp_path, boot=2)[1]
    assert again.restore() == {"backbone": 6}
    assert again.unlearning() == {}
    assert torch.equal(again.components["backbone"].flat, value)


def test_forgetting_twice_applies_once_and_stale_epochs_are_never_mixed() -> None:
    nodes = _path_nodes(4, None)
    _wire(nodes)
    _run(nodes, 4, start=True)
    rest = _forget_last(nodes)
    before = [len(n.ledger) for n in rest]
    assert all(n.forget(nodes[-1].peer_id, "exact", 0) == [] for n in rest)
    assert [len(n.ledger) for n in rest] == before
    assert all(n.epoch == 1 for n in rest)
    _run(rest, 6)
    for n in rest:
        assert not n.shaped_by("backbone", nodes[-1].peer_id)
        assert check_unlearning(n.ledger.entries()) == []
    # the forgotten member (still running, epoch 0) is not a neighbour any more
    actions = nodes[2].receive(nodes[3].peer_id, _stale_announcement(nodes[3]), 0)
    assert actions and type(actions[0]).__name__ == "PeerRejected"


def _stale_announcement(node: Node) -> bytes:
    from gossip.envelope import seal
    from p2pfed.node import ANNOUNCE, Announcement

    ann = Announcement("backbone", 7, b"d" * 32, 10, 1, Lineage.of([node.peer_id]))
    return seal(node.identity, kind=ANNOUNCE, federation_id=FED, seq=10**6, timestamp_ms=0,
                body=ann.to_body()).to_bytes()


def test_the_audit_finds_a_forgotten_member_used_after_the_request() -> None:
    nodes = _path_nodes(3, None)
    _wire(nodes)
    _run(nodes, 3, start=True)
    rest = _forget_last(nodes)
    _run(rest, 3)
    ledger = rest[1].ledger
    assert check_unlearning(ledger.entries()) == []
    target = nodes[-1].peer_id
    ledger.append("contribution", {"sender": target, "component": "backbone", "round": 3,
                                   "digest": b"x" * 32, "weight": 0.3, "lineage": [target]},
                  timestamp_ms=1)
    ledger.append("mix", {"component": "backbone", "round": 3, "self_weight": 0.7,
                          "inputs": [[target, 0.3, b"x" * 32]], "missing": [],
                          "lineage": [target]}, timestamp_ms=1)
    problems = check_unlearning(ledger.entries())
    assert len(problems) == 4  # two lineages, a contribution and a mix input
    assert all(target in p for p in problems)


# ---------------------------------------------------------------- signed requests, gossiped
def _federation() -> list[FederatedNode]:
    return build(4, {"backbone": [0, 1, 2, 3]})


async def test_a_member_asks_to_be_forgotten_and_everyone_applies_it_once(
        autojump_clock: trio.testing.MockClock) -> None:
    nodes = _federation()
    net = MemoryNetwork(latency_s=0.01)
    target = nodes[3]
    async with trio.open_nursery() as nursery:
        drivers = await start_federation(nursery, nodes, net)
        await trio.sleep(20)
        assert all(n.shaped_by("backbone", target.peer_id) for n in nodes[:3])
        drivers[3].call(target.request_forget, target.peer_id, "exact", "moving schools")
        await trio.sleep(30)
        # the same signed record again (a replay, or a relay's copy): nothing new happens
        raw = next(iter(nodes[0].forgets.records()))
        bundle = nodes[3]._bundle_envelopes([raw], int(trio.current_time() * 1000))[0]
        before = [len(list(n.ledger.entries(FORGET_RECORD))) for n in nodes[:3]]
        for n, d in zip(nodes[:3], drivers[:3], strict=True):
            d.call(n.receive, target.peer_id, bundle)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    for n in nodes[:3]:
        assert target.peer_id in n.forgotten()
        assert len(list(n.ledger.entries(FORGET_RECORD))) == 1
        assert len(list(n.ledger.entries(FORGET_ENTRY))) == 1
        assert len(list(n.ledger.entries(UNLEARNED_ENTRY))) == 1
        assert not n.shaped_by("backbone", target.peer_id)
        assert check_unlearning(n.ledger.entries()) == []
        assert [u["done"] for u in n.status()["unlearning"]] == [True]
    assert before == [1, 1, 1]


async def test_only_the_member_or_an_admin_may_ask(
        autojump_clock: trio.testing.MockClock) -> None:
    nodes = _federation()
    net = MemoryNetwork(latency_s=0.01)
    async with trio.open_nursery() as nursery:
        drivers = await start_federation(nursery, nodes, net)
        await trio.sleep(10)
        # member 2 is no admin: it may not ask to forget member 3
        with pytest.raises(LocalError, match="only the member itself or an admin"):
            drivers[2].call(nodes[2].request_forget, nodes[3].peer_id, "exact", "")
        # a forged request from member 2 arriving by gossip is refused by everyone
        forged = make_forget(nodes[2].identity, nodes[2].federation_id,
                             Forget(nodes[3].identity.public_key, ForgetMode.EXACT, 0), 0, 99)
        bundle = nodes[2]._bundle_envelopes([forged.to_bytes()], 10_000)[0]
        for n, d in zip(nodes[:2], drivers[:2], strict=True):
            d.call(n.receive, nodes[2].peer_id, bundle)
        # the admin (member 0, who created the federation) may
        drivers[0].call(nodes[0].request_forget, nodes[3].peer_id, "fast", "revoked")
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert nodes[0].rejected.get("unauthorized") and nodes[1].rejected.get("unauthorized")
    for n in nodes[:3]:
        (entry,) = n.ledger.entries(FORGET_ENTRY)
        assert entry.body["mode"] == "fast" and entry.body["target"] == nodes[3].peer_id


def test_a_trained_model_keeps_what_the_member_never_reached() -> None:
    topo = load_topology(TOPOLOGIES / "hierarchical-edu.toml")
    report = simulate(SimConfig(topo, workload="education", rounds=3, seed=1,
                                education=SMALL_EDU, unlearn=("student-0-0-0", 1)))
    u = report["unlearning"]
    assert u["max_abs_diff_vs_retrain"] <= 1e-6
    assert u["backdoor_task"] == "topic"  # a student's questions carry the trigger
    assert u["components_rolled_back"] == ["encoder.text.lora", "head.topic"]
    assert {"encoder.image", "head.digits"} <= set(u["components_untouched"])


def test_without_a_clean_checkpoint_a_node_says_so_and_changes_nothing() -> None:
    nodes = _path_nodes(3, None)
    for n in nodes:
        n.config = NodeConfig(round_timeout_ms=1000, keep_payloads=False)  # no checkpoints
    _wire(nodes)
    _run(nodes, 3, start=True)
    value = nodes[0].components["backbone"].flat.clone()
    assert nodes[0].forget(nodes[2].peer_id, "exact", 0) == []
    assert torch.equal(nodes[0].components["backbone"].flat, value)
    assert nodes[2].peer_id not in nodes[0].forgotten()
    (failed,) = nodes[0].ledger.entries("forget-failed")
    assert failed.body["target"] == nodes[2].peer_id


def test_restart_and_export_never_take_a_checkpoint_a_forget_must_undo() -> None:
    from p2pfed.unlearning import latest_clean_checkpoints

    nodes = _path_nodes(3, None, every=1)
    _wire(nodes)
    _run(nodes, 3, start=True)
    target = nodes[-1].peer_id
    entries = list(nodes[0].ledger.entries("checkpoint"))
    latest = latest_clean_checkpoints(entries, set())
    assert latest["backbone"][1].round == 3
    clean = latest_clean_checkpoints(entries, {target})  # only the starting state is free of it
    assert clean["backbone"][1].round == 0 and target not in clean["backbone"][1].lineage


def test_clipped_gossip_keeps_its_radius_in_checkpoints_for_restarts_and_rollbacks(
        tmp_path: Path) -> None:
    # the radius remembers earlier rounds, so a node restored from a checkpoint (restart, or
    # an unlearning's rollback) must get that round's radius back to re-run it exactly
    nodes = _path_nodes(3, tmp_path, values=[0.0, 1.0, 3.0], rule="clipped")
    _wire(nodes)
    _run(nodes, 4, start=True)
    middle = nodes[1]
    radius = middle._states["backbone"].radius
    mixes = _kinds(middle, "mix")
    assert radius > 0 and [m.body["radius"] for m in mixes][-1] == radius
    assert _kinds(middle, "checkpoint")[-1].body["radius"] == radius
    assert status_of(middle)["components"]["backbone"]["mixing"] == "clipped"
    for n in nodes:
        n.ledger.close()
    again = _path_nodes(3, tmp_path, values=[0.0, 1.0, 3.0], rule="clipped", boot=1)[1]
    assert again._states["backbone"].radius == 0.0
    assert again.restore() == {"backbone": 4}
    assert again._states["backbone"].radius == radius


def test_restore_candidates_are_clean_checkpoints_newest_first() -> None:
    def cp(index: int, component: str, lineage: list[str]) -> Stored[Checkpoint]:
        return Stored(index, 0, Checkpoint(component, index, bytes(32),
                                           Lineage.of(lineage)))

    newest_first = [cp(9, "backbone", ["a", "t"]), cp(8, "head.topic", ["a"]),
                    cp(6, "backbone", ["a"]), cp(5, "other", []), cp(4, "backbone", [])]
    got = list(restore_candidates(newest_first, {"t"}, ["backbone", "head.topic"]))
    assert [(c.index, c.record.component) for c in got] == [
        (8, "head.topic"), (6, "backbone"), (4, "backbone")]  # 9 holds forgotten t
    lazy = restore_candidates(iter(newest_first), set(), ["backbone"])
    assert next(lazy).index == 9  # a generator: the caller stops reading when it has enough
