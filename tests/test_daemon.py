"""The daemon in-process on 127.0.0.1: systemd notifications, control socket, refusals."""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import urllib.request
from pathlib import Path

import pytest
import trio
import trio.testing

from gossip.errors import KeyPermissionError, StorageError
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.config import Config
from p2pfed.home import MissingStateError
from p2pfed.node import NodeConfig
from p2pfed.runtime.control import SOCKET_NAME, ControlUnavailableError, request
from p2pfed.runtime.daemon import Daemon
from p2pfed.runtime.localfed import free_ports
from p2pfed.runtime.systemd import Notifier
from tests.test_status_schema import errors as schema_errors
from tests.test_status_schema import load_schema as load_status_schema


def make_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--interval", "0.2", "--timeout", "1"]) == 0
    assert main(["federation", "create", "solo", "--home", str(home)]) == 0
    return home


def run_daemon_rounds(home: Path, rounds: int) -> None:
    """Run the home's daemon in this process until it has completed ``rounds`` rounds."""
    daemon = Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({}))

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.fail_after(60):
                while True:
                    status = await trio.to_thread.run_sync(request, home / SOCKET_NAME,
                                                           "status")
                    if status["rounds_completed"] >= rounds:
                        break
                    await trio.sleep(0.2)
            nursery.cancel_scope.cancel()

    trio.run(scenario)


def fake_notify_socket(tmp_path: Path) -> tuple[socket.socket, dict[str, str]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock, {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.mark.network
def test_ready_after_listening_then_watchdog_and_control(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    sock, env = fake_notify_socket(tmp_path)
    config = Config.from_toml(home / "p2pfed.toml").with_overrides(
        metrics__enabled=True, metrics__port=free_ports(1)[0])
    daemon = Daemon(home, config, Notifier(env))
    seen: dict[str, object] = {}

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            assert drain(sock) == []
            await nursery.start(daemon.run)
            first = drain(sock)
            seen["first"] = first
            assert (home / SOCKET_NAME).exists()
            await trio.sleep(1.0)
            seen["later"] = drain(sock)
            seen["status"] = await trio.to_thread.run_sync(request, home / SOCKET_NAME, "status")
            seen["peers"] = await trio.to_thread.run_sync(request, home / SOCKET_NAME, "peers")
            url = f"http://127.0.0.1:{daemon.metrics_port}/metrics"
            seen["metrics"] = await trio.to_thread.run_sync(
                lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    first = seen["first"]
    assert isinstance(first, list) and first[0].startswith("READY=1")
    assert "listening on /ip4/127.0.0.1/tcp/" in first[0]
    later = seen["later"]
    assert isinstance(later, list) and sum(m == "WATCHDOG=1" for m in later) >= 3
    status = seen["status"]
    assert isinstance(status, dict)
    assert status["ledger_ok"] is True and status["member"] is True
    assert status["federation"] == "solo" and status["rounds_completed"] >= 1
    # the real output fits docs/status.schema.json, the mixing rule included
    assert schema_errors(status, load_status_schema()) == []
    assert status["components"]["backbone"]["mixing"] == "mh"
    assert seen["peers"] == []
    metrics = seen["metrics"]
    assert isinstance(metrics, str)
    assert 'p2pfed_round{component="backbone"}' in metrics
    assert "p2pfed_members 1.0" in metrics and "p2pfed_ledger_entries" in metrics
    assert oct((home / "identity.key").stat().st_mode & 0o777) == "0o600"
    assert not (home / SOCKET_NAME).exists()  # removed on exit


def test_broken_ledger_refuses_to_start_and_never_signals_ready(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    conn = sqlite3.connect(home / "ledger.sqlite3")
    conn.execute("UPDATE entries SET ts = ts + 1 WHERE idx = 1")
    conn.commit()
    conn.close()
    sock, env = fake_notify_socket(tmp_path)
    daemon = Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier(env))
    with pytest.raises(StorageError, match="entry 1"):
        trio.run(daemon.run)
    assert drain(sock) == []


def test_unsafe_key_stops_run_with_a_clear_message(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    home = make_home(tmp_path)
    os.chmod(home / "identity.key", 0o644)
    assert main(["run", "--home", str(home)]) == exitcodes.KEY_FILE
    assert "chmod 600" in capsys.readouterr().err
    with pytest.raises(KeyPermissionError):
        trio.run(Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({})).run)


def test_commands_need_a_running_daemon(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    home = make_home(tmp_path)
    assert main(["status", "--home", str(home)]) != 0
    assert "no daemon is running" in capsys.readouterr().err
    with pytest.raises(ControlUnavailableError):
        request(home / SOCKET_NAME, "status")


def test_notifier_is_silent_outside_systemd() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and n.watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "@abstract", "WATCHDOG_USEC": "5000000"}).watchdog_s == 5.0


def tiny_topic_home(home: Path, **model: object) -> Path:
    """A founded home whose m3t model (the tiny text model) trains the topic head and the text
    adapter on 24 local questions; ``model``: more ``[model]`` settings."""
    import json
    import tomllib

    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--interval", "0.1", "--timeout", "1", "--hold", "encoder.text.lora",
                 "--hold", "head.topic"]) == 0
    questions = [json.dumps({"text": f"what is {w} in lesson {i}", "label": i % 4})
                 for i, w in enumerate(["energy", "a verb", "a cell", "a prime"] * 6)]
    (home / "questions.jsonl").write_text("\n".join(questions), encoding="utf-8")
    data = tomllib.loads((home / "p2pfed.toml").read_text(encoding="utf-8"))
    data["model"] = {"kind": "m3t", "text_model": "tiny", "lora_layers": [1], **model}
    data["data"] = {"topic": {"text": {"kind": "text-jsonl", "path": "questions.jsonl"}}}
    (home / "p2pfed.toml").write_text(Config.from_dict(data).to_toml(), encoding="utf-8")
    assert main(["federation", "create", "school", "--home", str(home)]) == 0
    return home


@pytest.mark.network
def test_the_daemon_trains_the_model_its_config_names_and_export_loads_in_peft(
        tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from p2pfed.model.textbase import _tiny_bert

    home = tiny_topic_home(tmp_path / "home", steps=2, batch_size=4)
    run_daemon_rounds(home, 6)
    from gossip.identity import load_identity
    from p2pfed.ledger import Ledger

    ident = load_identity(home / "identity.key")
    with Ledger.open(home / "ledger.sqlite3", ident) as ledger:
        updates = {e.body["component"] for e in ledger.entries("local-update")}
    assert updates == {"encoder.text.lora", "head.topic"}
    assert main(["export", "encoder.text.lora", str(tmp_path / "adapter"),
                 "--home", str(home)]) == 0
    assert main(["export", "head.topic", str(tmp_path / "head"), "--home", str(home)]) == 0
    assert set(load_file(str(tmp_path / "head" / "head.topic.safetensors"))) == {"weight", "bias"}
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # trained: B left zero
    loaded = PeftModel.from_pretrained(_tiny_bert(), str(tmp_path / "adapter")).eval()
    assert any("lora_B" in n for n, _ in loaded.named_parameters())
    assert main(["export", "backbone", str(tmp_path / "x"), "--home", str(home)]) != 0


def test_a_members_missing_ledger_is_refused_not_replaced(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home = make_home(tmp_path)
    (home / "ledger.sqlite3").unlink()
    capsys.readouterr()
    assert main(["run", "--home", str(home)]) == exitcodes.STATE_MISSING
    message = " ".join(capsys.readouterr().err.split())  # (rich wraps long lines)
    assert "is missing, but" in message and "from a backup" in message
    assert not (home / "ledger.sqlite3").exists()  # history, audit trail and ε not reset
    with pytest.raises(MissingStateError):
        trio.run(Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({})).run)


def test_a_restart_on_a_full_disk_exits_with_the_storage_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(tmp_path)

    def no_space(_home: Path) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("p2pfed.runtime.daemon.next_boot_epoch", no_space)
    capsys.readouterr()
    assert main(["run", "--home", str(home)]) == exitcodes.STORAGE
    assert "disk is full" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    sqlite3.OperationalError("database or disk is full"),
    ExceptionGroup("from a nursery", [OSError(errno.EDQUOT, "Disk quota exceeded")]),
])
def test_a_full_disk_anywhere_in_a_command_is_the_storage_code(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        error: BaseException) -> None:
    home = make_home(tmp_path)

    async def fails(_self: Daemon, **_kwargs: object) -> None:
        raise error

    monkeypatch.setattr(Daemon, "run", fails)
    capsys.readouterr()
    assert main(["run", "--home", str(home)]) == exitcodes.STORAGE
    assert "disk is full" in " ".join(capsys.readouterr().err.split())


@pytest.mark.network
def test_the_daemon_verifies_its_ledger_as_it_grows_never_all_of_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = make_home(tmp_path)
    monkeypatch.setattr("p2pfed.runtime.daemon.VERIFY_EVERY_S", 0.1)
    seen: dict[str, dict[str, object]] = {}

    async def run_once(tag: str, tamper: bool = False) -> None:
        daemon = Daemon(home, Config.from_toml(home / "p2pfed.toml"), Notifier({}))
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            with trio.fail_after(20):
                while True:
                    st = await trio.to_thread.run_sync(request, home / SOCKET_NAME, "status")
                    if st["rounds_completed"] >= 3 and st["ledger_verified"] > 3:
                        break
                    await trio.sleep(0.1)
            if tamper:  # an entry the daemon verified already: status does not read it again
                conn = sqlite3.connect(home / "ledger.sqlite3")
                conn.execute("UPDATE entries SET ts = ts + 1 WHERE idx = 1")
                conn.commit()
                conn.close()
            seen[tag] = await trio.to_thread.run_sync(request, home / SOCKET_NAME, "status")
            nursery.cancel_scope.cancel()

    trio.run(run_once, "first", True)
    assert seen["first"]["ledger_ok"] is True
    # the full verification ('p2pfed ledger verify') still reads every entry and finds it
    assert main(["ledger", "verify", "--home", str(home)]) == exitcodes.LEDGER_BROKEN
    trio.run(run_once, "second")  # start-up verifies only what came after the mark
    assert seen["second"]["ledger_ok"] is True


# ---- the driver: bounded fetches, waits instead of polls (memory transport, MockClock) -----


class StubNode:
    """What the driver asks of a node; every announcement asks for a payload."""

    def __init__(self, peer_id: str, fetches_per_message: int = 1,
                 fetch_from: str | None = None) -> None:
        self.peer_id = peer_id
        self.fetched: list[bytes] = []
        self.gone: set[str] = set()
        self.per_message = fetches_per_message
        self.fetch_from = fetch_from
        self.all_fetched = trio.Event()
        self.expect = 0

    def start(self, _now: int) -> list[object]:
        return []

    def next_deadline(self) -> None:
        return None

    def serve_payload(self, key: bytes) -> bytes:
        return b"payload-" + key

    def forgotten(self) -> frozenset[str]:
        return frozenset(self.gone)

    def receive(self, peer: str, data: bytes, _now: int) -> list[object]:
        from p2pfed.node import Fetch

        return [Fetch(f"{self.fetch_from}-{i}" if self.fetch_from else peer, "backbone", 0,
                      data + bytes([i]), 1 << 10)
                for i in range(self.per_message)]

    def payload_received(self, _peer: str, _c: str, _r: int, _d: bytes, data: bytes,
                         _now: int) -> list[object]:
        self.fetched.append(data)
        if len(self.fetched) == self.expect:
            self.all_fetched.set()
        return []

    def forget(self, target: str, _now: int) -> list[object]:
        from p2pfed.node import ForgetApplied

        self.gone.add(target)
        return [ForgetApplied(target)]


class CountingTransport:
    """A memory endpoint that counts the fetches in flight at once."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.now = self.most = self.most_per_peer = 0
        self.per_peer: dict[str, int] = {}

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def fetch(self, peer: str, key: bytes, max_bytes: int) -> bytes:
        self.now += 1
        self.most = max(self.most, self.now)
        self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        self.most_per_peer = max(self.most_per_peer, self.per_peer[peer])
        try:
            data: bytes = await self.inner.fetch(peer, key, max_bytes)  # type: ignore[attr-defined]
            return data
        finally:
            self.now -= 1
            self.per_peer[peer] -= 1


async def test_a_flood_of_announcements_never_runs_more_fetches_than_the_limit(
        autojump_clock: trio.testing.MockClock) -> None:
    from gossip.transport.memory import MemoryNetwork
    from p2pfed.runtime.driver import NodeDriver

    net = MemoryNetwork(latency_s=0.5)
    flooder, counting = net.attach("flooder"), CountingTransport(net.attach("me"))
    for j in range(4):  # each announcement asks each of four servers for one payload
        net.attach(f"server-{j}").set_payload_server(lambda key: b"payload-" + key)
    node = StubNode("me", fetches_per_message=4, fetch_from="server")
    node.expect = 200
    driver = NodeDriver(node, counting, max_fetches=3)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        for i in range(50):  # 50 announcements, each asking for 4 payloads
            await flooder.send("me", b"ann-%d" % i)
        with trio.fail_after(600):
            await node.all_fetched.wait()
        nursery.cancel_scope.cancel()
    assert sorted(node.fetched) == sorted(b"payload-ann-%d" % i + bytes([j])
                                          for i in range(50) for j in range(4))
    assert counting.most == 3  # the limit was reached, never passed
    assert driver.fetch_limiter.borrowed_tokens == 0
    assert counting.most_per_peer == 1  # and each server had one fetch in flight at a time
    # 200 fetches of 1 s (twice the latency), three at a time: about 67 s of (mock) time
    assert trio.current_time() >= 200 / 3


async def test_a_slow_neighbour_holds_one_fetch_slot_and_never_starves_the_others(
        autojump_clock: trio.testing.MockClock) -> None:
    """One neighbour answers its fetches very slowly: its later fetches queue behind its own
    first one, and every other neighbour's fetch goes through meanwhile."""
    from gossip.transport.memory import MemoryNetwork
    from p2pfed.runtime.driver import NodeDriver

    net = MemoryNetwork(latency_s=0.1)
    flooder, me = net.attach("flooder"), net.attach("me")

    class Slow:
        def __getattr__(self, name: str) -> object:
            return getattr(me, name)

        async def fetch(self, peer: str, key: bytes, max_bytes: int) -> bytes:
            if peer == "server-0":
                await trio.sleep(300)  # stalls as long as a fetch may take
            data: bytes = await me.fetch(peer, key, max_bytes)
            return data

    for j in range(4):
        net.attach(f"server-{j}").set_payload_server(lambda key: b"payload-" + key)
    node = StubNode("me", fetches_per_message=4, fetch_from="server")
    node.expect = 3 * 20  # the three fast servers' payloads
    driver = NodeDriver(node, Slow(), max_fetches=3)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        for i in range(20):
            await flooder.send("me", b"ann-%d" % i)
        with trio.fail_after(60):  # well before the slow server's first fetch ends
            await node.all_fetched.wait()
        nursery.cancel_scope.cancel()


async def test_unlearn_and_leave_wait_for_what_the_node_says(
        autojump_clock: trio.testing.MockClock) -> None:
    from gossip.transport.memory import MemoryNetwork
    from p2pfed.node import Announce, Broadcast
    from p2pfed.runtime.driver import NodeDriver

    net = MemoryNetwork(latency_s=2.0)
    node = StubNode("me")
    driver = NodeDriver(node, net.attach("me"))  # type: ignore[arg-type]
    assert driver.fetch_limiter.total_tokens == 8  # (the default)
    other = net.attach("other")
    woke: list[float] = []

    async def waiter() -> None:
        await driver.wait_forgotten("x")
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        nursery.start_soon(waiter)
        await trio.sleep(7)
        assert woke == []  # nobody polls: it waits for the node
        driver.call(node.forget, "x")
        await trio.testing.wait_all_tasks_blocked()
        assert woke == [7]
        with trio.fail_after(1):
            await driver.wait_forgotten("x")  # forgotten already: at once
        start = trio.current_time()
        sent = await driver.deliver(lambda _now: [Broadcast(b"bye"), Announce(("other",),
                                                                               b"bye!")])
        assert len(sent) == 2
        # returns once the messages are out: after the latency, not a fixed pause
        assert trio.current_time() - start == 2.0
        got = {other.incoming.receive_nowait(), other.incoming.receive_nowait()}
        assert got == {("me", b"bye"), ("me", b"bye!")}
        nursery.cancel_scope.cancel()


class TrainingNode(StubNode):
    """A node that asks for one training at start: the driver reads the rest off it."""

    def __init__(self) -> None:
        super().__init__("me")
        self.config = NodeConfig(trains=frozenset({"a", "b", "c"}))
        self.epoch = 2
        self.waiting = {("a", 3), ("b", 3), ("c", 2), ("d", 3)}  # d: held, not trained here
        self.done = trio.Event()

    def start(self, _now: int) -> list[object]:
        from p2pfed.node import Train

        return [Train("a", 3)]

    def awaiting_update(self, component: str, round_: int) -> bool:
        return (component, round_) in self.waiting

    def local_update_done(self, component: str, round_: int, _now: int) -> list[object]:
        self.waiting.discard((component, round_))
        self.done.set()
        return []


@pytest.mark.parametrize("inline", [False, True])
async def test_the_trainer_gets_the_group_and_epoch_in_its_request(inline: bool) -> None:
    from gossip.transport.memory import MemoryNetwork
    from p2pfed.model.train import TrainRequest
    from p2pfed.runtime.driver import NodeDriver

    node = TrainingNode()
    got: list[TrainRequest] = []
    driver = NodeDriver(node, MemoryNetwork().attach("me"),  # type: ignore[arg-type]
                        trainer=got.append, train_inline=inline)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        with trio.fail_after(10):
            await node.done.wait()
        nursery.cancel_scope.cancel()
    # b waits for the same round (c for another; d is not trained here): a plain record
    assert got == [TrainRequest("a", 3, ready=frozenset({"b"}), epoch=2)]
    assert ("a", 3) not in node.waiting and ("b", 3) in node.waiting
