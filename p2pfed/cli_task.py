"""``p2pfed task``: the federation's task catalogue (registered by :mod:`p2pfed.cli`).

``add``, ``retire`` and ``data`` each sign one catalogue record (:mod:`gossip.taskcat`) with the
home's key.  Only the federation's admins may: anyone else is refused before anything is signed
(the same ``not-admin`` error every member would answer, exit 7).  A record the catalogue would
ignore is not signed either: a repeat says "nothing to do" (exit 0), a conflict says why (exit 1).

The record goes to the running daemon, which checks it as any peer's, keeps it in the ledger and
spreads it with the membership records; without a daemon it is written to the ledger and goes
out when the daemon next starts.  Each member applies the new catalogue at its next round
boundary (a ``catalogue`` ledger entry; ``p2pfed status`` shows it).  ``list`` reads the daemon,
or the ledger when none runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gossip.envelope import Sequencer
from gossip.errors import LocalError, MalformedMessageError, NotAdminError, RemoteError
from gossip.identity import Identity, load_identity
from gossip.taskcat import (
    ACTIVE,
    MAX_CLASSES,
    MIN_CLASSES,
    MODALITIES,
    RETIRED,
    Task,
    TaskAdd,
    TaskCatalogue,
    TaskData,
    TaskRecord,
    TaskRetire,
    created_components,
    make_task_record,
)
from p2pfed.home import KEY_FILE, LEDGER_FILE, locked_home, resolve_home

out = Console()

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Node home (default: $P2PFED_HOME or ~/.local/share/p2pfed)."),
]
NameArg = Annotated[str, typer.Argument(
    metavar="NAME", help="Task name: a lower-case letter, then letters, digits, '-' or '_' (its "
    "head is the component head.NAME).")]

app = typer.Typer(
    help="The federation's task catalogue: admins add, retire and version tasks; every member "
    "applies the catalogue at its next round boundary.", no_args_is_help=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _catalogue(described: dict[str, Any]) -> TaskCatalogue:
    """A catalogue as ``describe`` wrote it (the daemon's answer, or the ledger's view)."""
    tasks = {name: Task(name, t["phase"], tuple(t["modalities"]), int(t["classes"]),
                        tuple(t["components"]), t["data_version"])
             for name, t in described["tasks"].items()}
    return TaskCatalogue(int(described["version"]), bytes.fromhex(described["digest"]), tasks)


def _current(root: Path, identity: Identity) -> tuple[dict[str, Any], bool]:
    """The catalogue the daemon holds (True), or, when none runs, the ledger's (False)."""
    from p2pfed.fedstore import FederationStore
    from p2pfed.ledger import Ledger
    from p2pfed.runtime.control import SOCKET_NAME, ControlUnavailableError, request

    try:
        return request(root / SOCKET_NAME, "catalogue"), True
    except ControlUnavailableError:
        pass
    with locked_home(root, "task"), \
            Ledger.open(root / LEDGER_FILE, identity, create=False) as ledger:
        view = FederationStore(root).view(ledger)
        return {**view.task_catalogue().describe(), "in_effect": None}, False


def _repeat(record: TaskRecord, task: Task | None) -> bool:
    """Is ``record`` what the catalogue says already (so signing it would change nothing)?"""
    if task is None:
        return False
    if isinstance(record, TaskRetire):
        return task.phase == RETIRED
    if isinstance(record, TaskData):
        return task.phase == ACTIVE and task.data_version == record.data_version
    return task.phase == ACTIVE and (task.modalities, task.classes, task.components) == (
        record.modalities, record.classes, record.components)


def _submit(home: Path | None, make: Any) -> dict[str, Any] | None:
    """Sign the record ``make()`` builds and hand it on; the catalogue after it (None: nothing
    was signed, the catalogue says so already)."""
    from p2pfed.fedstore import FederationStore, next_boot_epoch
    from p2pfed.journal import Membership, write
    from p2pfed.ledger import Ledger
    from p2pfed.runtime.control import SOCKET_NAME, ControlUnavailableError, request

    try:
        record: TaskRecord = make()
    except MalformedMessageError as exc:
        raise typer.BadParameter(str(exc)) from None
    root = resolve_home(home)
    identity = load_identity(root / KEY_FILE)
    store = FederationStore(root)
    genesis = store.genesis()
    if identity.public_key not in genesis.admins:
        raise NotAdminError(
            f"this node ({identity.peer_id}) is not an admin of {genesis.name}: only its "
            f"{len(genesis.admins)} admin(s) named in the genesis may change the task catalogue "
            "(ask one of them); nothing was signed")
    described, live = _current(root, identity)
    catalogue = _catalogue(described)
    reason = catalogue.would_ignore(record)
    if reason is not None:
        if _repeat(record, catalogue.tasks.get(record.name)):
            out.print(f"nothing to do: {escape(reason)}; no record was signed")
            return None
        raise LocalError(f"{reason}; no record was signed")
    now = _now_ms()
    raw = make_task_record(identity, genesis.federation_id, record, now,
                           Sequencer(next_boot_epoch(root)).next()).to_bytes()
    if live:
        try:
            result: dict[str, Any] = request(root / SOCKET_NAME, "task", timeout_s=60.0,
                                             record=raw.hex())
            return result
        except ControlUnavailableError as exc:
            if not isinstance(exc.__cause__, ConnectionError | FileNotFoundError) and (
                    root / SOCKET_NAME).exists():  # (it may have taken the record: no retry)
                raise LocalError(f"{exc}; it may have taken the record: see 'p2pfed task "
                                 "list' before trying again") from exc
            # it stopped meanwhile: the ledger takes the record
    with locked_home(root, "task"), \
            Ledger.open(root / LEDGER_FILE, identity, create=False) as ledger:
        view = store.view(ledger)
        try:
            view.add_bytes(raw, now_ms=now)
        except RemoteError as exc:
            raise LocalError(f"the task record is refused: {exc} ({exc.code})") from exc
        write(ledger, Membership(raw), now, durable=True)
        out.print("no daemon is running: the record is in the ledger and goes out when the "
                  "daemon next starts")
        return {**view.task_catalogue().describe(), "in_effect": None}


def _done(what: str, result: dict[str, Any] | None) -> None:
    if result is not None:
        out.print(f"{what}: task catalogue version {result['version']}; every member applies "
                  "it at its next round boundary ('p2pfed task list', 'p2pfed status')")


@app.command("add")
def add(
    name: NameArg,
    modality: Annotated[list[str], typer.Option(
        metavar="MODALITY", help=f"A modality the task reads, repeatable: "
        f"{', '.join(MODALITIES)}.")],
    classes: Annotated[int, typer.Option(
        metavar="K", help=f"Number of classes ({MIN_CLASSES}..{MAX_CLASSES}).")],
    component: Annotated[list[str] | None, typer.Option(
        metavar="COMPONENT", help="A component its pipeline uses, repeatable (default: each "
        "modality's encoder and head.NAME; head.NAME must be among them).")] = None,
    data_version: Annotated[str, typer.Option(
        metavar="VERSION", help="The version of the data it starts with (default: none).")]
    = "",
    home: HomeOpt = None,
) -> None:
    """Add a task to the federation's catalogue (admins only)."""
    result = _submit(home, lambda: TaskAdd(name, tuple(modality), classes,
                                           tuple(component or ()), data_version))
    _done(f"added task {escape(name)}", result)
    if result is not None and name in result.get("tasks", {}):
        _say_holders(home, name, result["tasks"][name])


def _say_holders(home: Path | None, name: str, task: dict[str, Any]) -> None:
    """Which new components the task brings, and who builds them (docs/continual.md)."""
    from p2pfed.fedstore import FederationStore

    catalog = FederationStore(resolve_home(home)).genesis().component_names
    comps = list(task["components"])
    new = created_components(name, task["modalities"], comps, catalog)
    rest = sorted(set(comps) - set(new))
    if new:
        out.print(f"new components {', '.join(new)}: built by every member that holds "
                  f"{', '.join(rest)}")
    else:
        out.print("[yellow]this task creates no component any member builds: its components "
                  "must be each modality's encoder, optionally backbone and prompt.NAME, and "
                  "head.NAME, at least one of them in the genesis catalogue[/yellow]")


@app.command("retire")
def retire(name: NameArg, home: HomeOpt = None) -> None:
    """Retire a task: no member trains it any more; its name is never reused (admins only)."""
    _done(f"retired task {escape(name)}", _submit(home, lambda: TaskRetire(name)))


@app.command("data")
def data(
    name: NameArg,
    version: Annotated[str, typer.Option(
        metavar="VERSION", help="The new data version: letters, digits and '._:+-'.")],
    home: HomeOpt = None,
) -> None:
    """Attach a new data version to an active task (admins only)."""
    _done(f"task {escape(name)} now at data version {escape(version)}",
          _submit(home, lambda: TaskData(name, version)))


@app.command("list")
def list_tasks(
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show the task catalogue: every task, active or retired, and records it ignored."""
    root = resolve_home(home)
    described, _live = _current(root, load_identity(root / KEY_FILE))
    if as_json:
        print(json.dumps(described, indent=2))
        return
    effect = described.get("in_effect")
    here = f" (version {effect} in effect on this node)" if effect is not None else ""
    table = Table("task", "phase", "modalities", "classes", "components", "data version",
                  title=f"task catalogue version {described['version']}{here}")
    for task_name, t in sorted(described["tasks"].items()):
        table.add_row(escape(task_name), t["phase"], ", ".join(t["modalities"]),
                      str(t["classes"]), ", ".join(t["components"]), t["data_version"] or "—")
    out.print(table)
    for reason in described.get("ignored", []):
        out.print(f"ignored: {escape(reason)}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="task")
