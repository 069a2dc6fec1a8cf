"""An operator's first day: one daemon per home and per port, one-line errors with their
documented exit codes, honest answers to repeated commands, and an honest state after leaving.

The two tests marked ``network`` run real ``p2pfed run`` processes on 127.0.0.1; everything else
runs in this process (the federation ones over the memory transport on a mock clock).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from gossip.errors import ConfigError
from gossip.identity import load_identity
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.config import Config
from p2pfed.fedstore import parse_invite_token
from p2pfed.ledger import Ledger
from p2pfed.runtime.control import SOCKET_NAME, ControlUnavailableError, request
from p2pfed.runtime.localfed import free_ports
from p2pfed.sim.topology import parse_topology
from tests.test_federated import build, run_federation

#: generous: a loaded 2-core machine imports torch in a few seconds, not in two minutes
START_S = 120.0


def init(home: Path, *extra: str) -> None:
    assert main(["init", "--home", str(home), *extra]) == 0


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


# --------------------------------------------------------------------------- one per home
def spawn_run(home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "p2pfed", "run", "--home", str(home)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)


def wait_ready(home: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            status = request(home / SOCKET_NAME, "status")
        except ControlUnavailableError:
            time.sleep(0.2)
            continue
        assert isinstance(status, dict)
        return status
    raise AssertionError(f"the daemon on {home} did not answer within {START_S} s")


def refused(home: Path) -> tuple[int, str]:
    proc = spawn_run(home)
    _, err = proc.communicate(timeout=START_S)
    return proc.returncode, err


@pytest.mark.network
def test_a_second_daemon_on_a_home_or_a_port_is_refused_and_the_first_runs_on(
        tmp_path: Path) -> None:
    port = free_ports(1)[0]
    first, other = tmp_path / "first", tmp_path / "other"
    for home in (first, other):
        init(home, "--listen", f"/ip4/127.0.0.1/tcp/{port}", "--interval", "0.2")
        assert main(["federation", "create", f"fed-{home.name}", "--home", str(home)]) == 0
    proc = spawn_run(first)
    try:
        before = wait_ready(first, proc)
        # the same home: refused by its lock, before anything is touched
        code, err = refused(first)
        assert code == exitcodes.IN_USE, err
        assert f"a daemon is already running on {first} (pid {proc.pid})" in err
        assert err.count("\n") == 1  # one line
        # another home on the same port: refused (py-libp2p alone would share the port)
        code, err = refused(other)
        assert code == exitcodes.IN_USE, err
        assert f"port {port} is in use" in err and err.count("\n") == 1
        # the first daemon never noticed: same peer, its socket and ledger still its own
        after = request(first / SOCKET_NAME, "status")
        assert after["peer_id"] == before["peer_id"] and after["ledger_ok"] is True
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=START_S)
    assert proc.returncode == 0, err
    assert not (first / SOCKET_NAME).exists()
    # the lock went with the process: the home starts again
    assert (first / "daemon.lock").read_text() == ""


def test_a_running_daemons_home_refuses_join_and_names_the_holder(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfed.home import HomeInUseError, locked_home

    home = tmp_path / "home"
    init(home)
    with locked_home(home):  # as the daemon holds it (flock: another descriptor is refused)
        assert (home / "daemon.lock").read_text() == f"{os.getpid()} run\n"
        capsys.readouterr()
        assert main(["federation", "create", "x", "--home", str(home)]) == exitcodes.IN_USE
        assert "a daemon is already running on" in one_error_line(capsys)
        with pytest.raises(HomeInUseError, match=f"pid {os.getpid()}"), locked_home(home, "join"):
            pass
    assert main(["federation", "create", "x", "--home", str(home)]) == 0


# --------------------------------------------------------------------------- one line each
@pytest.mark.parametrize("listen", ["127.0.0.1:4001", "/ip4/127.0.0.1/tcp/99999",
                                    "/ip4/127.0.0.1/udp/4001", "/dns4/school.example/tcp/1"])
def test_a_bad_listen_address_is_refused_at_init(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str) -> None:
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--listen", listen]) == exitcodes.CONFIG
    assert f"node.listen: {listen!r}" in one_error_line(capsys)
    assert not home.exists()  # nothing written


def test_a_bad_listen_address_in_the_file_is_refused_at_start(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    init(home)
    text = (home / "p2pfed.toml").read_text()
    (home / "p2pfed.toml").write_text(text.replace('"/ip4/0.0.0.0/tcp/4001"',
                                                   '"0.0.0.0:4001"'))
    capsys.readouterr()
    assert main(["run", "--home", str(home)]) == exitcodes.CONFIG
    assert "'0.0.0.0:4001' is not a multiaddr" in one_error_line(capsys)


def test_a_home_that_is_a_file_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    for command in (["run"], ["init"], ["status"], ["federation", "create", "x"]):
        assert main([*command, "--home", str(file)]) == exitcodes.CONFIG
        assert f"the home {file} is a file, not a folder" in one_error_line(capsys)


def test_config_errors_keep_their_section_names(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    init(home)
    text = (home / "p2pfed.toml").read_text()
    (home / "p2pfed.toml").write_text(text.replace("interval_s =", "intervl_s ="))
    capsys.readouterr()
    assert main(["federation", "create", "x", "--home", str(home)]) == exitcodes.CONFIG
    assert "[rounds] has unknown key(s): intervl_s" in one_error_line(capsys)


def test_a_held_component_the_model_lacks_is_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    init(home, "--hold", "encoder.text.lora", "--hold", "head.topc")
    text = (home / "p2pfed.toml").read_text()
    (home / "p2pfed.toml").write_text(text.replace('kind = "consensus"', 'kind = "m3t"'))
    capsys.readouterr()
    assert main(["federation", "create", "x", "--home", str(home)]) == exitcodes.CONFIG
    line = one_error_line(capsys)
    assert "not components of this model: head.topc" in line and "head.topic" in line
    assert not (home / "federation").exists()


@pytest.mark.parametrize(("table", "key"), [
    ({"component": {"backbone": "all"}}, "component"),
    ({"graph": {"kind": "ring", "n": 4, "nn": 16}}, "nn"),
    ({"graph": {"kind": "hierarchical", "levels": [{"group": "a", "count": 2, "conect": "ring"}]}},
     "conect"),
    ({"churn": [{"round": 1, "action": "leave", "node": "node-1", "nod": "x"}]}, "nod"),
])
def test_topology_files_refuse_unknown_sections_and_keys(table: dict[str, object],
                                                         key: str) -> None:
    data: dict[str, object] = {"graph": {"kind": "ring", "n": 4}, **table}
    with pytest.raises(ConfigError, match=f"unknown key\\(s\\): {key}"):
        parse_topology(data)


# --------------------------------------------------------------------------- invites
def founded(tmp_path: Path) -> tuple[Path, Path, str]:
    """An admin's home, a newcomer's home, and an invite for the newcomer."""
    admin, newcomer = tmp_path / "admin", tmp_path / "newcomer"
    for home in (admin, newcomer):
        init(home, "--listen", "/ip4/127.0.0.1/tcp/0")
    assert main(["federation", "create", "district-7", "--home", str(admin)]) == 0
    peer = load_identity(newcomer / "identity.key").peer_id
    return admin, newcomer, invite(admin, peer)


def invite(admin: Path, peer: str, *extra: str) -> str:
    from p2pfed.fedstore import make_invite_token

    ident = load_identity(admin / "identity.key")
    ttl = int(extra[0]) if extra else 3_600_000
    return make_invite_token(admin, ident, invitee=peer, modules=[], ttl_ms=ttl,
                             bootstrap=["/ip4/127.0.0.1/tcp/1/p2p/" + ident.peer_id],
                             now_ms=int(time.time() * 1000))


def ledger_size(home: Path) -> int:
    with Ledger.open(home / "ledger.sqlite3", load_identity(home / "identity.key"),
                     create=False) as ledger:
        return len(ledger)


def test_a_wrapped_token_joins_and_joining_again_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin, newcomer, token = founded(tmp_path)
    wrapped = "\n".join(token[i:i + 72] for i in range(0, len(token), 72)) + "\n  "
    assert parse_invite_token(wrapped).invite == parse_invite_token(token).invite
    assert main(["join", wrapped, "--home", str(newcomer)]) == 0
    assert "ready to join district-7" in capsys.readouterr().out
    size = ledger_size(newcomer)
    assert main(["join", token, "--home", str(newcomer)]) == 0
    assert "nothing to do: already asked" in capsys.readouterr().out
    assert ledger_size(newcomer) == size
    # a new invite (say, the first expired unused) replaces the request waiting
    peer = load_identity(newcomer / "identity.key").peer_id
    assert main(["join", invite(admin, peer), "--home", str(newcomer)]) == 0
    assert "ready to join" in capsys.readouterr().out and ledger_size(newcomer) == size + 1


def test_a_member_joining_again_is_told_so(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    admin = tmp_path / "admin"
    init(admin)
    assert main(["federation", "create", "district-7", "--home", str(admin)]) == 0
    token = invite(admin, load_identity(admin / "identity.key").peer_id)
    size = ledger_size(admin)
    capsys.readouterr()
    assert main(["join", token, "--home", str(admin)]) == 0
    assert "nothing to do: already a member of district-7" in capsys.readouterr().out
    assert ledger_size(admin) == size


def test_expired_damaged_and_foreign_invites_share_one_exit_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin, newcomer, token = founded(tmp_path)
    peer = load_identity(newcomer / "identity.key").peer_id
    expired = invite(admin, peer, "1")
    time.sleep(0.01)
    someone_else = invite(admin, load_identity(admin / "identity.key").peer_id)
    cases = {expired: "has expired", token[:-12]: "damaged", someone_else: "another peer id",
             "hello": "not a p2pfed invite"}
    capsys.readouterr()
    for bad, why in cases.items():
        assert main(["join", bad, "--home", str(newcomer)]) == exitcodes.CONFIG
        assert why in one_error_line(capsys)


# --------------------------------------------------------------------------- honest state
def test_a_node_that_left_signs_once_stops_its_rounds_and_says_so() -> None:
    nodes = build(3, {"backbone": [0, 1, 2]})
    quitter = nodes[2]

    async def scenario() -> None:
        await run_federation(nodes, 30.0, leave_at=(2, 10.0))

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    assert quitter.standing() == "left" and quitter.halted and quitter.left
    assert nodes[0].standing() == "member" and not nodes[0].halted
    leaves = len(quitter.view.leaves_of(quitter.identity.public_key))
    rounds = quitter.completed_of("backbone")
    entries = len(quitter.ledger)
    # leaving again signs nothing; time passing starts no round
    assert quitter.leave("again", 40_000) == []
    assert quitter.tick(10**9) == [] or quitter.completed_of("backbone") == rounds
    assert len(quitter.view.leaves_of(quitter.identity.public_key)) == leaves == 1
    assert quitter.completed_of("backbone") == rounds and len(quitter.ledger) == entries
    status = quitter.status()
    assert (status["standing"], status["member"], status["rounds_halted"]) == ("left", False,
                                                                               True)
    # the others went on without it
    assert nodes[0].completed_of("backbone") > rounds


def test_a_second_forget_request_signs_nothing() -> None:
    nodes = build(3, {"backbone": [0, 1, 2]})
    admin, target = nodes[0], nodes[2].peer_id

    async def scenario() -> None:
        await run_federation(nodes, 8.0)

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))
    first = admin.request_forget(target, "exact", "asked by the family", 9_000)
    assert first and admin.forget_requested(target)
    entries = len(admin.ledger)
    assert admin.request_forget(target, "exact", "asked again", 9_500) == []
    assert len(admin.ledger) == entries
    assert nodes[2].status()["forgotten"] is False  # (it has not heard yet)


def test_status_prints_standing_and_training(capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfed.cli_daemon import training_table

    table = training_table({"topic": {"round": 7, "loss": 0.4321, "examples": 90, "heldout": 10,
                                      "accuracy": 0.8, "accuracy_round": 7}})
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    assert "topic" in text and "0.4321" in text and "0.800" in text and "+10 held out" in text


def test_the_trainer_reports_loss_and_held_out_accuracy() -> None:
    import numpy as np

    from p2pfed.model.local import split_holdout
    from p2pfed.model.train import TaskData

    data = TaskData({"image": np.zeros((20, 1, 4, 4), dtype=np.float32)},
                    np.arange(20) % 2)
    train, kept = split_holdout(data, 0.1, seed=3)
    assert (len(train), len(kept)) == (18, 2)
    assert sorted([*train.labels, *kept.labels]) == sorted(data.labels)
    again = split_holdout(data, 0.1, seed=3)[1]
    assert (again.labels == kept.labels).all()  # seeded
    assert len(split_holdout(data, 0.0, seed=3)[1]) == 0
    assert len(split_holdout(data.subset(np.arange(1)), 0.5, seed=3)[1]) == 0  # keeps one


def test_holdout_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.holdout"):
        Config().with_overrides(model__holdout=1.0)


@pytest.mark.network
def test_leave_and_unlearn_twice_on_a_running_daemon_and_status_after(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfed.runtime.daemon import Daemon
    from p2pfed.runtime.systemd import Notifier

    home = tmp_path / "home"
    init(home, "--listen", "/ip4/127.0.0.1/tcp/0", "--interval", "0.1", "--timeout", "1")
    assert main(["federation", "create", "district-7", "--home", str(home)]) == 0
    me = load_identity(home / "identity.key").peer_id
    daemon = Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({}))
    said: dict[str, object] = {}

    async def cli(*args: str) -> str:
        capsys.readouterr()
        code = await trio.to_thread.run_sync(main, [*args, "--home", str(home)])
        assert code == 0
        return capsys.readouterr().out

    async def status() -> dict[str, object]:
        st = await trio.to_thread.run_sync(request, home / SOCKET_NAME, "status")
        assert isinstance(st, dict)
        return st

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.fail_after(START_S):
                while True:
                    if (await status())["rounds_completed"] >= 2:
                        break
                    await trio.sleep(0.1)
            said["unlearn"] = await cli("unlearn", me)
            said["unlearn again"] = await cli("unlearn", me)
            said["leave"] = await cli("leave")
            said["leave again"] = await cli("leave")
            await trio.sleep(1.0)  # a round under way completes; then none starts
            first = await status()
            await trio.sleep(1.0)
            said["status"], said["later"] = first, await status()
            said["printed"] = await cli("status")
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    assert "asked to forget" in str(said["unlearn"])
    assert "nothing to do" in str(said["unlearn again"]) and "rolled back" not in str(
        said["unlearn again"])
    assert "left the federation" in str(said["leave"])
    assert "nothing to do: this node is not a member (left)" in str(said["leave again"])
    first, later = said["status"], said["later"]
    assert isinstance(first, dict) and isinstance(later, dict)
    assert (first["standing"], first["member"], first["rounds_halted"]) == ("left", False, True)
    assert first["forgotten"] is True
    assert later["components"] == first["components"]  # no round ran meanwhile
    printed = str(said["printed"])
    assert "left district-7" in printed and "no new rounds start" in printed
    with Ledger.open(home / "ledger.sqlite3", load_identity(home / "identity.key"),
                     create=False) as ledger:
        kinds = [e.kind for e in ledger.entries()]
    assert kinds.count("forget-record") == 1


@pytest.mark.parametrize("bad", [["--workload", "nope"], ["--robust", "nope"],
                                 ["--attack", "nope:1"], ["--dtype", "float16"],
                                 ["--mode", "nope"]])
def test_every_bad_simulate_option_is_a_usage_error(
        bad: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    topology = Path(__file__).resolve().parent.parent / "topologies" / "ring-16.toml"
    assert main(["simulate", str(topology), "--rounds", "2", "-q", *bad]) == exitcodes.USAGE
    assert f"Invalid value for {bad[0]}" in capsys.readouterr().err


def test_a_port_probe_error_is_one_config_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import socket

    from p2pfed.runtime import ports

    def no_ipv6(*_args: object, **_kwargs: object) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(ports.socket, "socket", no_ipv6)
    with pytest.raises(ConfigError, match="this machine has no IPv6"):
        ports.check_listen_addresses(["/ip6/::/tcp/4001"])
    ports.check_listen_addresses(["/ip6/::/tcp/0"])  # (a port the system picks: not probed)


def test_a_graph_kind_that_is_not_a_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown graph kind"):
        parse_topology({"graph": {"kind": ["ring"], "n": 4}})


def test_only_file_errors_become_one_line_a_socket_error_keeps_its_traceback(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from p2pfed.runtime.daemon import Daemon

    home = tmp_path / "home"
    init(home)

    async def resets(_self: Daemon, **_kwargs: object) -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(Daemon, "run", resets)
    with pytest.raises(ConnectionResetError):  # a bug to report, not a storage problem
        main(["run", "--home", str(home)])


def test_boot_epochs_drawn_at_once_are_all_different(tmp_path: Path) -> None:
    import threading

    from p2pfed.fedstore import next_boot_epoch

    drawn: list[int] = []

    def draw() -> None:
        for _ in range(25):
            drawn.append(next_boot_epoch(tmp_path))  # (as invites beside the daemon do)

    threads = [threading.Thread(target=draw) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(drawn) == list(range(1, 151))
