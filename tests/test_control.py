"""The control socket: owner-only, JSON lines, bad requests answered, never fatal."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from gossip.errors import LocalError
from p2pfed.runtime.control import request, serve_control


async def _echo(req: dict[str, Any]) -> dict[str, Any]:
    return {"echo": req.get("x")}


async def _fail(_req: dict[str, Any]) -> None:
    raise LocalError("nope")


def _raw(path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    result: dict[str, Any] = json.loads(data)
    return result


def test_requests_and_bad_requests(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    results: dict[str, Any] = {}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, {"echo": _echo, "fail": _fail})
            results["mode"] = stat.S_IMODE(path.stat().st_mode)
            results["echo"] = await trio.to_thread.run_sync(lambda: request(path, "echo", x=5))
            results["garbage"] = await trio.to_thread.run_sync(_raw, path, b"{not json\n")
            results["nocmd"] = await trio.to_thread.run_sync(_raw, path, b"[1]\n")
            results["unknown"] = await trio.to_thread.run_sync(_raw, path, b'{"cmd": "x"}\n')
            results["big"] = await trio.to_thread.run_sync(_raw, path, b"x" * 70_000 + b"\n")
            with pytest.raises(LocalError, match="nope"):
                await trio.to_thread.run_sync(lambda: request(path, "fail"))
            results["after"] = await trio.to_thread.run_sync(lambda: request(path, "echo", x=1))
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert results["mode"] == 0o600
    assert results["echo"] == {"echo": 5}
    assert results["garbage"] == {"ok": False, "error": "request is not JSON"}
    assert results["nocmd"]["ok"] is False
    assert results["unknown"]["commands"] == ["echo", "fail"]
    assert results["big"] == {"ok": False, "error": "request too large"}
    assert results["after"] == {"echo": 1}
    assert not path.exists()


def test_refuses_to_replace_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("important")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, {})

    with pytest.RaisesGroup(pytest.RaisesExc(LocalError, match="not a socket")):
        trio.run(main)
    assert path.read_text() == "important"


async def _buggy(_req: dict[str, Any]) -> None:
    raise ValueError("a bug in a handler")


async def _unencodable(_req: dict[str, Any]) -> object:
    return {"set": {1, 2}}  # json cannot encode a set


def test_every_request_has_its_own_error_boundary(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "control.sock"
    results: dict[str, Any] = {}
    handlers = {"echo": _echo, "buggy": _buggy, "odd": _unencodable}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, handlers)
            results["deep"] = await trio.to_thread.run_sync(_raw, path, b"[" * 60_000 + b"\n")
            results["deep_map"] = await trio.to_thread.run_sync(
                _raw, path, b'{"cmd": ' + b"[" * 30_000 + b"\n")
            results["buggy"] = await trio.to_thread.run_sync(_raw, path, b'{"cmd": "buggy"}\n')
            results["odd"] = await trio.to_thread.run_sync(_raw, path, b'{"cmd": "odd"}\n')
            results["after"] = await trio.to_thread.run_sync(lambda: request(path, "echo", x=2))
            nursery.cancel_scope.cancel()

    with caplog.at_level("ERROR", logger="p2pfed.runtime.control"):
        trio.run(main)
    assert results["deep"] == {"ok": False, "error": "request is not JSON (nested too deeply)"}
    assert results["deep_map"]["ok"] is False
    assert results["buggy"]["ok"] is False and "internal error" in results["buggy"]["error"]
    assert results["odd"]["ok"] is False
    assert results["after"] == {"echo": 2}  # and the server is still answering
    failures = [r for r in caplog.records if r.name == "p2pfed.runtime.control"]
    assert len(failures) == 2  # one record, with its traceback, per unexpected failure
    assert all(r.exc_info is not None for r in failures)
    assert "a bug in a handler" in caplog.text


def test_cancellation_still_goes_through_the_boundary(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "control.sock"
    entered = trio.Event()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    async def _hang(_req: dict[str, Any]) -> None:
        entered.set()
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_control, path, {"hang": _hang})
            client.connect(str(path))
            client.sendall(b'{"cmd": "hang"}\n')
            await entered.wait()
            nursery.cancel_scope.cancel()  # must not be taken for a failed request

    with caplog.at_level("ERROR", logger="p2pfed.runtime.control"):
        trio.run(main)
    client.settimeout(5)
    with client:
        assert client.recv(1024) == b""  # closed without an error reply
    assert not caplog.records
    assert not path.exists()
