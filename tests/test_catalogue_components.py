"""A task the catalogue adds becomes components: who holds them (the same on every member),
their initial values (from the federation id and their names), a node rebuilt with them, and
the data a catalogue task accepts."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import trio
import trio.testing

from gossip.catalog import ComponentSpec
from gossip.envelope import Sequencer
from gossip.errors import ConfigError
from gossip.identity import Identity
from gossip.membership import Genesis, MembershipView, make_join, view_from
from gossip.records import Invite, Join, make_admit, make_invite
from gossip.taskcat import TaskAdd, TaskRecord, TaskRetire, make_task_record
from gossip.transport.memory import MemoryNetwork
from p2pfed.config import Config
from p2pfed.federated import FederatedNode
from p2pfed.journal import LocalUpdate, Mix, read
from p2pfed.ledger import Ledger
from p2pfed.model.local import build_model, build_trainer
from p2pfed.model.m3t import M3TModel
from p2pfed.runtime.driver import NodeDriver
from p2pfed.runtime.loading import holdings, load_node, needs_rebuild, reload_node

IDS = [Identity.from_seed(bytes([0x40 + i]) * 32) for i in range(3)]
CATALOG = tuple(ComponentSpec.from_name(n) for n in (
    "backbone", "encoder.image", "encoder.text.lora", "head.digits", "head.topic"))
GENESIS = Genesis("school", (IDS[0].public_key,), CATALOG, 1000, 0)
FED = GENESIS.federation_id
TOPIC = ("encoder.text.lora", "head.topic")
#: node 0 (the founder, an admin) and node 1 hold the text adapter; node 2 does not
MODULES = (TOPIC, ("encoder.text.lora",), ("backbone", "encoder.image", "head.digits"))
ESSAY = TaskAdd("essay", ("text",), 5)


def membership() -> list[bytes]:
    records = []
    for i, ident in enumerate(IDS):
        invite = b"" if i == 0 else make_invite(
            IDS[0], FED, Invite(ident.public_key, (), 10**12, (), b"n"), 0, i).to_bytes()
        join = make_join(ident, FED, Join(invite, MODULES[i], (f"/memory/{i}",), 0), 0, 1)
        records.append(join.to_bytes() if i == 0 else
                       make_admit(IDS[0], FED, join.to_bytes(), 0, 10 + i).to_bytes())
    return records


def task(record: TaskRecord, at: int, by: Identity = IDS[0]) -> bytes:
    return make_task_record(by, FED, record, at, at).to_bytes()


def config(hold: Sequence[str], data: dict[str, object] | None = None) -> Config:
    return Config.from_dict({
        "components": {"hold": list(hold)},
        "rounds": {"interval_s": 1.0, "timeout_s": 2.0},
        "model": {"kind": "m3t", "text_model": "tiny", "lora_layers": [1], "steps": 2,
                  "batch_size": 4},
        "data": data or {},
    })


def write_texts(path: Path, classes: int, n: int = 16) -> dict[str, object]:
    lines = [json.dumps({"text": f"essay {i} on theme {i % classes}", "label": i % classes})
             for i in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"text": {"kind": "text-jsonl", "path": path.name}}


def params(model: M3TModel, component: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.parameters_of(component).items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- who holds what
def test_a_new_head_is_held_by_the_holders_of_the_rest_of_its_pipeline_in_any_order() -> None:
    quiz = TaskAdd("quiz", ("text",), 4, ("encoder.text.lora", "head.quiz", "prompt.quiz"))
    odd = TaskAdd("odd", ("text",), 3, ("encoder.image", "head.odd"))  # no text encoder
    alone = TaskAdd("alone", ("image",), 3, ("head.alone",))  # names nothing of the genesis
    records = [*membership(), task(ESSAY, 50), task(quiz, 51), task(odd, 52),
               task(alone, 53), task(TaskRetire("essay"), 60)]
    digests = set()
    for seed in range(12):
        order = list(records)
        random.Random(seed).shuffle(order)
        view = view_from(GENESIS, order)
        text = sorted(i.public_key for i in IDS[:2])
        assert view.holders("head.essay") == text  # retired: still held (names stay taken)
        assert view.holders("head.quiz") == text == view.holders("prompt.quiz")
        assert view.holders("head.odd") == [] == view.holders("head.alone")
        assert view.holders("head.topic") == [IDS[0].public_key]
        assert view.holdings(IDS[2].public_key) == frozenset(MODULES[2])
        assert view.holdings(IDS[1].public_key) == {
            "encoder.text.lora", "head.essay", "head.quiz", "prompt.quiz"}
        assert view.holdings(Identity.from_seed(b"x" * 32).public_key) == frozenset()
        digests.add(view.digest())
    assert len(digests) == 1


# ---------------------------------------------------------------- the model
def test_a_new_head_starts_from_the_same_values_on_every_holder(tmp_path: Path) -> None:
    view = view_from(GENESIS, [*membership(), task(ESSAY, 50)])
    cat = view.task_catalogue()
    one = build_model(config(TOPIC), [*TOPIC, "head.essay"], FED, cat)
    two = build_model(config(["encoder.text.lora"]), ["encoder.text.lora", "head.essay"],
                      FED, cat)
    before = build_model(config(TOPIC), TOPIC, FED)  # (as before the catalogue)
    essay = params(one, "head.essay")
    assert essay["weight"].shape == (5, 64)
    assert same(essay, params(two, "head.essay"))
    for c in TOPIC:  # the components of old keep their values, bit for bit
        assert same(params(one, c), params(before, c))
    assert same(params(one, "encoder.text.lora"), params(two, "encoder.text.lora"))
    other = Genesis("other", (IDS[0].public_key,), CATALOG, 1000, 0).federation_id
    assert not same(essay, params(build_model(config(TOPIC), [*TOPIC, "head.essay"], other,
                                              cat), "head.essay"))
    with pytest.raises(ConfigError, match="essay"):  # unknown without the catalogue
        build_model(config(TOPIC), [*TOPIC, "head.essay"], FED)


def test_data_for_a_catalogue_task_is_accepted_and_trains(tmp_path: Path) -> None:
    data = {"essay": write_texts(tmp_path / "essays.jsonl", 5)}
    hold = ["encoder.text.lora", "head.essay"]
    with pytest.raises(ConfigError, match=r"\[data.essay\]: no such task.*p2pfed task add"):
        build_trainer(config(hold, data), TOPIC, FED, bytes(32), tmp_path)
    empty = view_from(GENESIS, membership()).task_catalogue()
    with pytest.raises(ConfigError, match=r"task catalogue \(version 0: none"):
        build_trainer(config(hold, data), TOPIC, FED, bytes(32), tmp_path, empty)
    cat = view_from(GENESIS, [*membership(), task(ESSAY, 50)]).task_catalogue()
    trainer = build_trainer(config(hold, data), hold, FED, bytes(32), tmp_path, cat)
    assert trainer.trainable() == hold
    start = trainer.flats["head.essay"].flat.clone()
    trainer.train("head.essay", 0)
    assert not torch.equal(start, trainer.flats["head.essay"].flat)


def test_a_catalogue_task_the_model_cannot_build_is_left_out_not_fatal() -> None:
    """A catalogue task named like a built-in one, with another pipeline: the model keeps the
    built-in one, so the node holds what its record names (an error is logged)."""
    genesis = Genesis("images", (IDS[0].public_key,), CATALOG[:2], 1000, 0)
    fed = genesis.federation_id
    join = make_join(IDS[0], fed, Join(b"", ("encoder.image",), (), 0), 0, 1).to_bytes()
    clash = make_task_record(IDS[0], fed, TaskAdd("topic", ("image",), 3), 50, 50).to_bytes()
    view = view_from(genesis, [join, clash])
    assert view.holdings(IDS[0].public_key) == {"encoder.image", "head.topic"}
    assert holdings(IDS[0], view, config(["encoder.image"])) == ["encoder.image"]


# ---------------------------------------------------------------- nodes rebuilt with it
def test_an_admins_task_add_gives_every_holder_the_head_which_trains_and_mixes(
        tmp_path: Path) -> None:
    homes = [tmp_path / f"node-{i}" for i in range(3)]
    cfgs = []
    for i, home in enumerate(homes):
        home.mkdir()
        data = {"topic": write_texts(home / "topic.jsonl", 3)} if "head.topic" in MODULES[i] \
            else {}
        cfgs.append(config(MODULES[i], data))
        (home / "p2pfed.toml").write_text(cfgs[i].to_toml(), encoding="utf-8")
    views = [MembershipView(GENESIS) for _ in IDS]
    for view in views:
        for raw in membership():
            view.add_bytes(raw)
    ledgers = [Ledger.open(home / "ledger.sqlite3", ident) for home, ident in zip(
        homes, IDS, strict=True)]
    epochs = iter(range(1, 100))

    async def load_all() -> list[tuple[FederatedNode, object]]:
        return [await load_node(homes[i], cfgs[i], IDS[i], ledgers[i], views[i],
                                Sequencer(next(epochs))) for i in range(3)]

    async def drive(nodes: list[FederatedNode], trainers: list[object], seconds: float,
                    add: bytes | None = None) -> None:
        net = MemoryNetwork(latency_s=0.01)
        async with trio.open_nursery() as nursery:
            drivers = []
            for n, t in zip(nodes, trainers, strict=True):
                drivers.append(NodeDriver(n, net.attach(n.peer_id), train_inline=True,
                                          trainer=getattr(t, "run", None)))
                await nursery.start(drivers[-1].run)
            for d, n in zip(drivers[1:], nodes[1:], strict=True):
                d.call(n.introduce, [nodes[0].peer_id])
            await trio.sleep(3.0)
            if add is not None:
                drivers[0].call(nodes[0].add_task_record, add)
            await trio.sleep(seconds)
            for n in nodes:
                n.checkpoint(int(trio.current_time() * 1000))
            nursery.cancel_scope.cancel()

    loaded = trio.run(load_all)
    nodes, trainers = [n for n, _ in loaded], [t for _, t in loaded]
    # each node measures its loss through its own trainer (loss mixing, when on)
    assert all(n.config.loss_of == getattr(t, "loss_of", None) for n, t in loaded)
    assert all("head.essay" not in n.components for n in nodes)
    trio.run(drive, nodes, trainers, 12.0, task(ESSAY, 4_000),
             clock=trio.testing.MockClock(autojump_threshold=0))
    assert [needs_rebuild(n, c) for n, c in zip(nodes, cfgs, strict=True)] == [
        ["head.essay"], ["head.essay"], []]
    assert all(n.catalogue is not None and n.catalogue.version == 1 for n in nodes)
    kept = {i: {c: nodes[i].components[c].flat.clone() for c in nodes[i].components}
            for i in range(3)}
    # node 1 now has data for the new task: read again from p2pfed.toml when it is rebuilt
    data1 = {"essay": write_texts(homes[1] / "essays.jsonl", 5)}
    (homes[1] / "p2pfed.toml").write_text(config(MODULES[1], data1).to_toml(), encoding="utf-8")

    async def rebuild_all() -> list[tuple[FederatedNode, object, Config]]:
        return [await reload_node(homes[i], cfgs[i], IDS[i], ledgers[i], views[i],
                                  lambda: Sequencer(next(epochs))) for i in range(3)]

    rebuilt = trio.run(rebuild_all)
    again = [n for n, _, _ in rebuilt]
    assert [sorted(n.components) for n in again] == [
        sorted([*TOPIC, "head.essay"]), ["encoder.text.lora", "head.essay"], sorted(MODULES[2])]
    assert [needs_rebuild(n, c) for n, c in zip(again, cfgs, strict=True)] == [[], [], []]
    assert rebuilt[1][2].data.keys() == {"essay"}
    first = again[0].components["head.essay"].flat
    assert torch.equal(first, again[1].components["head.essay"].flat)  # the same start
    initial = build_model(cfgs[0], ["encoder.text.lora", "head.essay"], FED,
                          views[0].task_catalogue())
    named = sorted(initial.modules["head.essay"].named_parameters())  # (bias, then weight)
    assert torch.equal(first, torch.cat([p.detach().flatten() for _, p in named]))
    for i, n in enumerate(again):  # the rest resumed from their checkpoints
        for c, flat in kept[i].items():
            assert torch.equal(n.components[c].flat, flat), (i, c)
        assert n.catalogue is not None and n.catalogue.version == 1
    trio.run(drive, again, [t for _, t, _ in rebuilt], 12.0,
             clock=trio.testing.MockClock(autojump_threshold=0))
    for i in (0, 1):
        assert again[i].round_of("head.essay") >= 3
        mixes = [s.record for s in read(ledgers[i].entries(Mix.KIND), Mix)
                 if s.record.component == "head.essay"]
        other = again[1 - i].peer_id
        assert any(inp.peer == other for m in mixes for inp in m.inputs)  # mixed
    trained = {s.record.component for s in read(ledgers[1].entries(LocalUpdate.KIND),
                                                LocalUpdate)}
    assert "head.essay" in trained  # node 1 trains it on its essays
    for ledger in ledgers:
        assert ledger.verify().ok
        ledger.close()


def test_task_add_says_which_components_it_creates_and_for_whom(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfed.cli import main
    from tests.test_cli_task import said

    home = tmp_path / "a"
    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/4001",
                 "--hold", "backbone", "--hold", "encoder.text.lora"]) == 0
    assert main(["federation", "create", "school", "--home", str(home)]) == 0
    capsys.readouterr()
    assert main(["task", "add", "essay", "--modality", "text", "--classes", "5",
                 "--home", str(home)]) == 0
    assert ("new components head.essay: built by every member that holds encoder.text.lora"
            in said(capsys))
    assert main(["task", "add", "odd", "--modality", "image", "--classes", "3",
                 "--home", str(home)]) == 0  # (its encoder: not in the genesis catalogue)
    assert "creates no component any member builds" in said(capsys)
