"""The daemon's control API: JSON lines over a Unix socket in its home (owner only).

Request: one JSON object per line, ``{"cmd": "status"}``; reply: ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "..."}``.  The CLI (``p2pfed status``, ``peers``, ``leave``) is the
usual client; anything that can write to the socket (only its owner can) may use it.

Each connection is its own error boundary: whatever a request or its handler raises (a request
nested too deeply to parse, a bug in a handler) is answered with an error reply and logged with
its traceback, never fatal to the daemon.  Cancellation and ``KeyboardInterrupt`` still go
through.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossip.errors import LocalError, P2PFedError

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from p2pfed.federated import FederatedNode
    from p2pfed.runtime.driver import NodeDriver

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlUnavailableError(LocalError):
    """No daemon answers on the control socket."""

    code = "control-unavailable"


async def serve_control(
    path: Path, handlers: dict[str, Handler], *, task_status: TaskStatus[None]
) -> None:
    """Serve ``handlers`` (command name -> async handler) on the Unix socket at ``path``."""
    _clear_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(
                lambda stream: _serve_one(stream, handlers), [listener],
                handler_nursery=nursery,
            )
    finally:
        _remove(path)


def _clear_stale_socket(path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise LocalError(f"{path} exists and is not a socket; refusing to replace it")
        path.unlink()


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _serve_one(stream: trio.abc.Stream, handlers: dict[str, Handler]) -> None:
    async with stream:
        try:
            line = await _read_line(stream)
            if line is None:
                return
            reply = _encode(await _dispatch(line, handlers))
        except Exception:  # the boundary: one bad request never stops the daemon
            log.exception("control request failed")
            reply = _encode({"ok": False, "error": "internal error (see the daemon's log)"})
        await _send(stream, reply)


async def _read_line(stream: trio.abc.Stream) -> bytes | None:
    """The request line, or None when the client went away, stalled or sent too much."""
    buf = bytearray()
    try:
        with trio.fail_after(10):
            while b"\n" not in buf:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return None
                buf += chunk
                if len(buf) > MAX_REQUEST_BYTES:
                    await _send(stream, _encode({"ok": False, "error": "request too large"}))
                    return None
    except (trio.TooSlowError, trio.BrokenResourceError):
        return None
    return bytes(buf.split(b"\n", 1)[0])


async def _dispatch(line: bytes, handlers: dict[str, Handler]) -> dict[str, Any]:
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"ok": False, "error": "request is not JSON"}
    except RecursionError:
        return {"ok": False, "error": "request is not JSON (nested too deeply)"}
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        return {"ok": False, "error": "request needs a 'cmd' string"}
    handler = handlers.get(request["cmd"])
    if handler is None:
        return {"ok": False, "error": f"unknown command {request['cmd']!r}",
                "commands": sorted(handlers)}
    try:
        return {"ok": True, "result": await handler(request)}
    except P2PFedError as exc:
        return {"ok": False, "error": str(exc)}


def _encode(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply).encode() + b"\n"


async def _send(stream: trio.abc.Stream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("control client went away before the reply")


def catalogue_handlers(node: FederatedNode, driver: NodeDriver,
                       guard: Callable[[Handler], Handler] = lambda h: h) -> dict[str, Handler]:
    """The task catalogue's commands (``p2pfed task``): ``catalogue`` answers the view's
    catalogue and the version in effect here; ``task`` takes a catalogue record signed by the
    CLI with the home's key (``{"record": hex}``), checks it as a peer's would be, keeps and
    spreads it (inside ``guard``: the daemon's, which stops it on a full disk)."""

    def describe() -> dict[str, Any]:
        return {**node.view.task_catalogue().describe(),
                "in_effect": node.catalogue_status()["version"]}

    async def catalogue(_req: dict[str, Any]) -> dict[str, Any]:
        return describe()

    async def task(req: dict[str, Any]) -> dict[str, Any]:
        text = req.get("record")
        try:
            if not isinstance(text, str):
                raise ValueError
            raw = bytes.fromhex(text)
        except ValueError:
            raise LocalError("'record' must be a signed task record, in hex") from None
        known = node.view.knows(raw)
        await driver.deliver(node.add_task_record, raw)
        return {"added": not known, **describe()}

    return {"catalogue": catalogue, "task": guard(task)}


def request(path: Path, cmd: str, timeout_s: float = 10.0, **args: Any) -> Any:
    """Blocking client: send one command to the daemon and return its result."""
    if not path.exists():
        raise ControlUnavailableError(f"no daemon is running (no socket at {path})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(str(path))
            sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = bytearray()
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise ControlUnavailableError(f"the daemon at {path} does not answer: {exc}") from exc
    try:
        reply = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ControlUnavailableError(f"bad reply from the daemon: {exc}") from exc
    if not reply.get("ok"):
        raise LocalError(f"daemon refused {cmd!r}: {reply.get('error')}")
    return reply.get("result")
