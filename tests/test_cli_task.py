"""``p2pfed task``: admins sign catalogue records; without a daemon into the ledger, with one to
the daemon, which spreads them to the members."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import trio

from gossip.catalog import ComponentSpec
from gossip.identity import Identity, load_identity
from gossip.membership import Invite, Join, MembershipView, make_admit, make_invite, make_join
from gossip.transport.memory import MemoryNetwork
from p2pfed import exitcodes
from p2pfed.blobs import BlobStore
from p2pfed.cli import main
from p2pfed.components import FlatComponent
from p2pfed.federated import FederatedNode
from p2pfed.fedstore import FederationStore
from p2pfed.home import KEY_FILE, LEDGER_FILE
from p2pfed.journal import CatalogueApplied, Membership, read
from p2pfed.ledger import Ledger
from p2pfed.node import NodeConfig
from p2pfed.runtime.control import SOCKET_NAME, catalogue_handlers, serve_control
from p2pfed.runtime.driver import NodeDriver


def founded(tmp_path: Path, name: str = "a") -> Path:
    home = tmp_path / name
    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/4001"]) == 0
    assert main(["federation", "create", "school", "--home", str(home)]) == 0
    return home


def said(capsys: pytest.CaptureFixture[str], stream: str = "out") -> str:
    """What was printed, with the console's line wrapping undone."""
    return " ".join(getattr(capsys.readouterr(), stream).split())


def listed(home: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(["task", "list", "--json", "--home", str(home)]) == exitcodes.OK
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


def test_an_admin_adds_versions_and_retires_a_task_without_a_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = founded(tmp_path)
    h = ["--home", str(home)]
    assert main(["task", "add", "essay", "--modality", "text", "--classes", "5", *h]) == 0
    assert "goes out when the daemon next starts" in said(capsys)
    cat = listed(home, capsys)
    assert cat["version"] == 1 and cat["in_effect"] is None and cat["ignored"] == []
    assert cat["tasks"] == {"essay": {
        "phase": "active", "modalities": ["text"], "classes": 5,
        "components": ["encoder.text.lora", "head.essay"], "data_version": ""}}
    # a repeat signs nothing
    assert main(["task", "add", "essay", "--modality", "text", "--classes", "5", *h]) == 0
    assert "nothing to do" in said(capsys)
    assert listed(home, capsys)["version"] == 1
    assert main(["task", "data", "essay", "--version", "2026-11", *h]) == 0
    assert main(["task", "add", "mood", "--modality", "activity", "--modality", "text",
                 "--classes", "3", "--component", "head.mood", "--component", "backbone",
                 "--data-version", "v1", *h]) == 0
    assert main(["task", "retire", "essay", *h]) == 0
    assert main(["task", "retire", "essay", *h]) == 0  # a repeat
    cat = listed(home, capsys)
    tasks = cat["tasks"]
    assert isinstance(tasks, dict) and cat["version"] == 4
    assert tasks["essay"]["phase"] == "retired" and tasks["essay"]["data_version"] == "2026-11"
    assert tasks["mood"] == {"phase": "active", "modalities": ["activity", "text"],
                             "classes": 3, "components": ["backbone", "head.mood"],
                             "data_version": "v1"}
    # conflicts are refused, nothing signed
    capsys.readouterr()
    assert main(["task", "retire", "ghost", *h]) == exitcodes.FAILURE
    assert main(["task", "add", "essay", "--modality", "image", "--classes", "9", *h]) == \
        exitcodes.FAILURE
    assert main(["task", "data", "essay", "--version", "v3", *h]) == exitcodes.FAILURE
    err = said(capsys, "err")
    assert "no task ghost" in err and "never reused" in err and "retired" in err
    assert listed(home, capsys)["version"] == 4
    assert main(["task", "list", *h]) == 0
    shown = said(capsys)
    assert "task catalogue version 4" in shown and "mood" in shown and "retired" in shown
    # the records are membership entries of the ledger, and the ledger verifies
    identity = load_identity(home / KEY_FILE)
    with Ledger.open(home / LEDGER_FILE, identity, create=False) as ledger:
        assert len(list(read(ledger.entries(Membership.KIND), Membership))) == 1 + 4
    assert main(["ledger", "verify", *h]) == exitcodes.OK


@pytest.mark.parametrize("args", [
    ["add", "essay", "--modality", "smell", "--classes", "5"],
    ["add", "essay", "--modality", "text", "--classes", "1"],
    ["add", "essay", "--modality", "text", "--classes", "5", "--component", "backbone"],
    ["add", "Essay!", "--modality", "text", "--classes", "5"],
    ["add", "essay", "--classes", "5"],
    ["data", "essay", "--version", "no spaces"],
])
def test_bad_arguments_are_usage_errors(tmp_path: Path, args: list[str]) -> None:
    home = founded(tmp_path)
    assert main(["task", *args, "--home", str(home)]) == exitcodes.USAGE


def test_help_says_who_may_and_what_happens(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["task", "--help"]) == 0
    text = capsys.readouterr().out
    assert all(cmd in text for cmd in ("add", "retire", "data", "list"))
    assert main(["task", "add", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--modality" in text and "--classes" in text and "admins only" in text


def test_a_member_that_is_not_an_admin_is_refused_with_its_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin = founded(tmp_path)
    member = tmp_path / "b"
    assert main(["init", "--home", str(member)]) == 0
    capsys.readouterr()
    assert main(["invite", "--home", str(admin)]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["join", token, "--home", str(member)]) == 0
    capsys.readouterr()
    code = main(["task", "add", "essay", "--modality", "text", "--classes", "5",
                 "--home", str(member)])
    assert code == exitcodes.REMOTE
    assert "is not an admin of school" in said(capsys, "err")
    assert listed(member, capsys)["version"] == 0


def test_with_a_daemon_the_record_reaches_the_members(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon's control handlers over a home's node; a second member over the memory
    transport gets the record (the CLI runs in a thread, as a separate process would)."""
    home = founded(tmp_path)
    founder = load_identity(home / KEY_FILE)
    store = FederationStore(home)
    genesis = store.genesis()
    fed = genesis.federation_id
    other = Identity.from_seed(b"o" * 32)
    invite = make_invite(founder, fed, Invite(other.public_key, (), 10**15, (), b"n"), 1, 1)
    join = make_join(other, fed, Join(invite.to_bytes(), ("backbone",), (), 0), 2, 1)
    admission = make_admit(founder, fed, join.to_bytes(), 3, 2)
    spec = ComponentSpec.from_name("backbone")
    config = NodeConfig(round_timeout_ms=500, round_interval_ms=200)

    def comps() -> dict[str, FlatComponent]:
        return {"backbone": FlatComponent.from_params(spec, {"w": torch.zeros(4)})}

    with Ledger.open(home / LEDGER_FILE, founder) as ledger:
        view = store.view(ledger)
        view.add(admission)
        mine = FederatedNode(founder, fed, comps(), ledger, BlobStore(None), config, view=view)
        theirs_view = MembershipView(genesis)
        for raw in sorted(view.records()):
            theirs_view.add_bytes(raw)
        theirs = FederatedNode(other, fed, comps(), Ledger.open(None, other), BlobStore(None),
                               config, view=theirs_view)
        codes: list[int] = []

        async def run() -> None:
            net = MemoryNetwork(latency_s=0.01)
            async with trio.open_nursery() as nursery:
                applied = trio.Event()

                def check(_actions: object) -> None:  # after each of its calls
                    if all(n.catalogue_status()["version"] == 1 for n in (mine, theirs)):
                        applied.set()

                drivers = [NodeDriver(n, net.attach(n.peer_id), on_actions=check,
                                      clock_ms=lambda: int(time.time() * 1000))
                           for n in (mine, theirs)]
                for d in drivers:
                    await nursery.start(d.run)
                handlers = catalogue_handlers(mine, drivers[0])
                await nursery.start(serve_control, home / SOCKET_NAME, handlers)
                for argv in (["task", "add", "essay", "--modality", "text", "--classes", "5"],
                             ["task", "add", "essay", "--modality", "text", "--classes", "5"]):
                    codes.append(await trio.to_thread.run_sync(
                        main, [*argv, "--home", str(home)]))
                with trio.fail_after(10):
                    await applied.wait()
                nursery.cancel_scope.cancel()

        trio.run(run)
        assert codes == [0, 0]
        out = said(capsys)
        assert "added task essay: task catalogue version 1" in out and "nothing to do" in out
        for node in (mine, theirs):
            assert node.view.task_catalogue().active() == ["essay"]
        assert mine.catalogue_status()["tasks"]["essay"]["classes"] == 5
        kept = [e.record.record for e in read(ledger.entries(Membership.KIND), Membership)]
        assert any(r in view.task_records() for r in kept)
        assert len(list(read(ledger.entries(CatalogueApplied.KIND), CatalogueApplied))) == 1
    assert main(["ledger", "verify", "--home", str(home)]) == exitcodes.OK


def test_the_task_commands_import_no_torch(tmp_path: Path) -> None:
    from tests.test_cli_start import assert_light, run_commands

    home = founded(tmp_path)
    results = run_commands(
        ["task", "add", "essay", "--modality", "text", "--classes", "5", "--home", str(home)],
        ["task", "list", "--json", "--home", str(home)])
    assert_light(results)
    assert [r["code"] for r in results] == [exitcodes.OK] * 2


def test_status_names_the_catalogue_in_effect(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "h"
    home.mkdir()
    task = {"phase": "active", "modalities": ["text"], "classes": 5,
            "components": ["head.essay"], "data_version": ""}
    status = {"peer_id": "12D3KooWme", "federation": "school", "member": True, "members": 1,
              "peers": 0, "ledger_ok": True, "ledger_entries": 3, "uptime_s": 1.0,
              "components": {}, "catalogue": {"version": 2, "digest": "ab", "tasks": {
                  "essay": task, "quiz": {**task, "phase": "retired"}}}}

    async def answer(_req: dict[str, object]) -> object:
        return status

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, home / SOCKET_NAME, {"status": answer})
            assert await trio.to_thread.run_sync(main, ["status", "--home", str(home)]) == 0
            nursery.cancel_scope.cancel()

    trio.run(run)
    assert "task catalogue version 2: essay ('p2pfed task list')" in said(capsys)
