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
