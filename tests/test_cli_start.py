"""The commands that do not train import neither torch nor networkx (issue 13).

Each check runs the commands in a fresh interpreter, through ``p2pfed.cli.main``, and looks at
``sys.modules`` after each one.  A command may fail with its usual error (no daemon running),
but it must not pay for the model on the way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.runtime.control import SOCKET_NAME, serve_control

HEAVY = ("torch", "networkx")

#: runs each argv of ``sys.argv[1]`` (JSON) and prints, per command, its exit code, what it
#: printed and which heavy modules are loaded by then
SNIPPET = """
import contextlib, io, json, sys
from p2pfed.cli import main
HEAVY = ("torch", "networkx")
results = []
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    results.append({"argv": argv, "code": code, "out": buf.getvalue(),
                    "heavy": [m for m in HEAVY if m in sys.modules]})
print(json.dumps(results))
"""


def run_commands(*argvs: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run([sys.executable, "-c", SNIPPET, json.dumps(argvs)],
                          capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    return results


async def run_commands_async(*argvs: list[str]) -> list[dict[str, Any]]:
    done = await trio.run_process([sys.executable, "-c", SNIPPET, json.dumps(argvs)],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    results: list[dict[str, Any]] = json.loads(done.stdout.decode().splitlines()[-1])
    return results


def assert_light(results: list[dict[str, Any]]) -> None:
    for r in results:
        assert r["heavy"] == [], f"p2pfed {' '.join(r['argv'])} imported {r['heavy']}"


def founded_home(tmp_path: Path) -> Path:
    home = tmp_path / "a"
    assert main(["init", "--home", str(home), "--listen", "/ip4/127.0.0.1/tcp/4001"]) == 0
    assert main(["federation", "create", "school", "--home", str(home)]) == 0
    return home


def test_commands_that_do_not_train_import_no_torch(tmp_path: Path) -> None:
    home, newcomer = founded_home(tmp_path), tmp_path / "b"
    first = run_commands(
        ["--help"],
        ["init", "--home", str(newcomer)],
        ["invite", "--home", str(home)],
        ["status", "--home", str(home)],
        ["status", "--json", "--home", str(home)],
        ["peers", "--home", str(home)],
        ["leave", "--home", str(home)],
        ["unlearn", "12D3KooWnobody", "--home", str(home)],
        ["ledger", "verify", "--home", str(home)],
    )
    assert_light(first)
    codes = {" ".join(r["argv"][:2]): r["code"] for r in first}
    assert codes["--help"] == codes["init --home"] == exitcodes.OK
    assert codes["invite --home"] == codes["ledger verify"] == exitcodes.OK
    # no daemon: the clients say so, with the usual code
    assert codes["status --home"] == codes["peers --home"] == exitcodes.FAILURE
    token = first[2]["out"].strip()
    assert token.startswith("p2pfed1.")
    joined = run_commands(["join", token, "--home", str(newcomer)])
    assert_light(joined)
    assert joined[0]["code"] == exitcodes.OK


async def test_clients_of_a_running_daemon_import_no_torch(tmp_path: Path) -> None:
    """status --json and the other clients against a daemon's control socket (a stand-in that
    answers as the daemon does: the client's imports are what is measured here)."""
    home = tmp_path / "h"
    home.mkdir()

    async def status(_: dict[str, Any]) -> Any:
        return {"peer_id": "12D3KooWme", "members": 1}

    async def peers(_: dict[str, Any]) -> Any:
        return []

    async def forget(_: dict[str, Any]) -> Any:
        return {"rolled_back": []}

    handlers = {"status": status, "peers": peers, "leave": forget, "unlearn": forget}
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_control, home / SOCKET_NAME, handlers)
        with trio.fail_after(60):
            results = await run_commands_async(
                ["status", "--json", "--home", str(home)],
                ["peers", "--json", "--home", str(home)],
                ["leave", "--home", str(home)],
                ["unlearn", "12D3KooWnobody", "--home", str(home)],
            )
        nursery.cancel_scope.cancel()
    assert_light(results)
    assert [r["code"] for r in results] == [exitcodes.OK] * 4
    assert json.loads(results[0]["out"])["peer_id"] == "12D3KooWme"


def test_python_m_p2pfed_help_is_quick() -> None:
    """The one number issue 13 is about: ``python -m p2pfed --help`` without the model."""
    code = ("import runpy, sys; sys.argv = ['p2pfed', '--help']\n"
            "try:\n    runpy.run_module('p2pfed', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
            f"sys.exit(1 if any(m in sys.modules for m in {HEAVY!r}) else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


def test_ledger_kinds_have_one_definition() -> None:
    """Every module names ledger kinds through p2pfed.kinds (a leaf), never as bare strings."""
    import ast
    import re
    from pathlib import Path

    from p2pfed import federated, fedstore, kinds

    assert fedstore.MEMBERSHIP_ENTRY == federated.MEMBERSHIP_ENTRY == kinds.MEMBERSHIP
    assert fedstore.JOIN_REQUEST_ENTRY == federated.JOIN_REQUEST_ENTRY == kinds.JOIN_REQUEST
    tree = ast.parse(Path(kinds.__file__).read_text())
    assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    bare = re.compile(r"ledger\.(append|entries|last)\(\s*\"")
    root = Path(kinds.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if bare.search(p.read_text())]
    assert offenders == []


def test_status_says_how_much_storage_is_used_and_how_far_back_a_forget_reaches() -> None:
    from p2pfed.cli_daemon import storage_line

    line = storage_line({"bytes": 28_100_000, "max_bytes": 50_000_000, "horizon_rounds": 100,
                         "oldest_round": 1995, "full": False})
    assert line == ("storage 28.1 MB of 50.0 MB; history kept for 100 rounds: a member can be "
                    "forgotten exactly back to round 1995")
    full = storage_line({"bytes": 2_000_000, "max_bytes": 1_000_000, "horizon_rounds": None,
                         "oldest_round": None, "full": True})
    assert "FULL: no new rounds start" in full and full.endswith("all history kept")
