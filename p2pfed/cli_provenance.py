"""``p2pfed provenance COMPONENT``: how much of each member's training a component's state
holds (registered by :mod:`p2pfed.cli`).

Read-only and free of torch: it reads the home's ledger in one read snapshot (as ``ledger
verify`` does), so it runs beside the daemon.  The vector is the newest ``mix`` entry's (the
newest forget epoch wins), else the newest ``checkpoint`` entry's (:mod:`p2pfed.provenance`).
Member tags are named by the peer ids the home knows: its own (the ledger's ``open`` entry),
the federation's members (``federation/genesis.bin`` and the membership records), the peers
its mixes and contributions name and the members forgotten; a tag none of them has is
``unknown:<hex>``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gossip.errors import ConfigError, LocalError, RemoteError
from p2pfed.home import LEDGER_FILE, resolve_home, storage_error

if TYPE_CHECKING:  # (numpy and the journal load on first use: 'p2pfed --help' stays light)
    from p2pfed.journal import Checkpoint, LocalUpdate, Mix
    from p2pfed.lineage import Lineage
    from p2pfed.provenance import Provenance

out = Console()

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Node home (default: $P2PFED_HOME or ~/.local/share/p2pfed)."),
]


@dataclass
class Entries:
    """What this command reads from a ledger, in ledger order."""

    me: str | None = None  # the owner's peer id (the ``open`` entry)
    mixes: list[Mix] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    updates: list[LocalUpdate] = field(default_factory=list)
    peers: set[str] = field(default_factory=set)  # named by mixes and contributions
    forgotten: list[str] = field(default_factory=list)  # the forget entries' targets
    memberships: list[bytes] = field(default_factory=list)


def read_ledger(root: Path) -> Entries:
    """The entries this command reads, from one read-only snapshot of ``root``'s ledger (an
    entry whose body is not a record of its kind is skipped: 'p2pfed ledger verify' names
    it)."""
    from p2pfed import journal
    from p2pfed.ledger_entry import row_entry
    from p2pfed.ledger_verify import COLUMNS, OPEN, connect

    path = root / LEDGER_FILE
    if not root.is_dir():
        raise ConfigError(f"no node home at {root} (see --home; 'p2pfed init' creates one)")
    if not path.is_file():
        raise ConfigError(f"no ledger at {path}")
    kinds = (journal.Mix.KIND, journal.Checkpoint.KIND, journal.LocalUpdate.KIND,
             journal.Contribution.KIND, journal.Forget.KIND, journal.Membership.KIND, OPEN)
    try:
        conn = connect(path, "ro")
        try:
            conn.execute("BEGIN")  # (one snapshot: the daemon may append meanwhile)
            rows = conn.execute(f"SELECT {COLUMNS} FROM entries WHERE kind IN "
                                f"({', '.join('?' * len(kinds))}) AND length(body) > 0 "
                                "ORDER BY idx", kinds).fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise storage_error(exc, f"cannot read ledger {path}") from exc
    got = Entries()
    for row in rows:
        try:
            r = journal.decode(row_entry(row))
        except journal.SchemaError:
            continue
        if isinstance(r, journal.Mix):
            got.mixes.append(r)
            got.peers.update(i.peer for i in r.inputs)
            got.peers.update(r.missing)
        elif isinstance(r, journal.Checkpoint):
            got.checkpoints.append(r)
        elif isinstance(r, journal.LocalUpdate):
            got.updates.append(r)
        elif isinstance(r, journal.Contribution):
            got.peers.add(r.sender)
        elif isinstance(r, journal.Forget):
            got.forgotten.append(r.target)
        elif isinstance(r, journal.Membership):
            got.memberships.append(r.record)
        elif isinstance(r, journal.Opened):
            got.me = r.peer_id
    return got


@dataclass(frozen=True)
class Source:
    """The record the vector comes from."""

    kind: str  # "mix" or "checkpoint"
    round: int
    epoch: int | None
    rule: str | None
    prov: Provenance


def _newest_per_round(records: Iterable[tuple[int, int, Any]]) -> dict[int, Any]:
    """(round, epoch, record) → per round, the record of the newest epoch (the latest entry
    among equals): what an unlearning re-run left in force."""
    best: dict[int, tuple[int, Any]] = {}
    for round_, epoch, record in records:
        if round_ not in best or epoch >= best[round_][0]:
            best[round_] = (epoch, record)
    return {r: rec for r, (_, rec) in best.items()}


def vector_of(mass: bytes | None, flags: int | None, lineage: Lineage) -> Provenance:
    from p2pfed.provenance import Provenance

    if mass is None:
        raise LocalError("this ledger's entries carry no provenance (written by an older "
                         "p2pfed)")
    try:
        return Provenance.decode(lineage, mass, flags or 0)
    except RemoteError as exc:  # (a MalformedMessageError: the ledger's own record)
        raise LocalError(f"the ledger's provenance cannot be read: {exc}") from exc


def source_of(component: str, got: Entries) -> tuple[Source, list[Mix]]:
    """The newest vector of ``component`` and the mixes in force up to it, by round."""
    components = sorted({m.component for m in got.mixes} | {c.component for c in got.checkpoints}
                        | {u.component for u in got.updates})
    if component not in components:
        raise LocalError(f"this home has no entries of {component!r} (it has: "
                         f"{', '.join(components) or 'none yet'})")
    mixes = [m for m in got.mixes if m.component == component]
    if mixes:
        newest = max(enumerate(mixes), key=lambda im: (im[1].epoch, im[0]))[1]
        in_force = _newest_per_round((m.round, m.epoch, m) for m in mixes
                                     if m.epoch <= newest.epoch)
        used = [in_force[r] for r in sorted(in_force) if r <= newest.round]
        return Source("mix", newest.round, newest.epoch, newest.rule,
                      vector_of(newest.mass, newest.prov_flags, newest.lineage)), used
    checkpoints = [c for c in got.checkpoints if c.component == component]
    if checkpoints:
        last = checkpoints[-1]
        prov = vector_of(last.mass, last.prov_flags, last.lineage)
        if prov.total() > 0.0:
            return Source("checkpoint", last.round, None, None, prov), []
    raise LocalError(f"no mixes of {component} yet")


def members_of(root: Path, raw: list[bytes]) -> set[str]:
    """Every peer that ever joined the federation (nothing when the home has no federation,
    as a simulated node's has not)."""
    from gossip.identity import peer_id_from_public_key
    from gossip.membership import MembershipView
    from p2pfed.fedstore import FederationStore

    store = FederationStore(root)
    if not store.exists():
        return set()
    view = MembershipView(store.genesis())
    for record in raw:
        try:
            view.add_bytes(record)
        except RemoteError:
            continue  # (the daemon warned when it kept it)
    return {peer_id_from_public_key(pk) for pk in view.ever_joined() | set(view.admins)}


def flag_words(flags: int) -> tuple[str, str]:
    """The flags as a short word ("exact", "partial", "partial, approximate") and a sentence."""
    from p2pfed.provenance import APPROX, PARTIAL

    words = ((PARTIAL, "partial", "partial: some mass not attributed (an old checkpoint, or a "
              "neighbour that sent no vector)"),
             (APPROX, "approximate", "approximate: the weights were not the exact linear ones "
              "(trimmed mean, or fast unlearning)"))
    found = [(word, text) for bit, word, text in words if flags & bit]
    if not found:
        return "exact", "exact"
    return ", ".join(w for w, _ in found), "; ".join(t for _, t in found)


def report(root: Path, component: str) -> dict[str, Any]:
    """What ``p2pfed provenance --json`` prints."""
    from p2pfed.lineage import tag

    got = read_ledger(root)
    source, mixes = source_of(component, got)
    peers = got.peers | set(got.forgotten) | members_of(root, got.memberships)
    if got.me is not None:
        peers.add(got.me)
    names = {tag(p): p for p in peers}
    prov = source.prov
    shares = prov.shares()
    mass = {t: float(m) for t, m in zip(prov.tags, prov.mass, strict=True)}
    ups = _newest_per_round((u.round, u.epoch, u) for u in got.updates
                            if u.component == component
                            and (source.epoch is None or u.epoch <= source.epoch))
    credited = sum(1 for r, u in ups.items() if r <= source.round and (u.credit or 0.0) > 0.0)
    members: list[dict[str, Any]] = []
    for t in set(prov.tags) | {tag(p) for p in got.forgotten}:
        peer = names.get(t, f"unknown:{t.hex()}")
        members.append({
            "peer_id": peer, "tag": t.hex(), "share": shares.get(t, 0.0),
            "mass": mass.get(t, 0.0),
            "first_round": next((m.round for m in mixes if t in m.lineage), None),
            "self": peer == got.me, "credited_rounds": credited if peer == got.me else None,
            "forgotten": peer in got.forgotten})
    members.sort(key=lambda m: (-m["share"], m["peer_id"]))
    word, text = flag_words(prov.flags)
    return {"component": component, "source": source.kind, "round": source.round,
            "epoch": source.epoch, "rule": source.rule, "flags": word, "flags_text": text,
            "prov_flags": prov.flags, "total_mass": prov.total(), "self": got.me,
            "members": members}


def _member(m: dict[str, Any]) -> str:
    """A member as the table names it: the end of its peer id (as the daemon's log does)."""
    peer: str = m["peer_id"]
    name = peer[:16] if peer.startswith("unknown:") else f"…{peer[-8:]}"
    marks = [w for w, on in (("this node", m["self"]), ("forgotten", m["forgotten"])) if on]
    return f"{name} ({', '.join(marks)})" if marks else name


def _trained(m: dict[str, Any]) -> str:
    rounds = m["credited_rounds"]
    if rounds is None:
        return ""
    return f"{rounds} round{'s' * (rounds != 1)}" if rounds else "no"


def provenance(
    component: Annotated[str, typer.Argument(help="Component, e.g. backbone or head.topic.")],
    home: HomeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show each member's share of a component's state: how much of its training the newest
    mix holds (read from the ledger; safe while the daemon runs)."""
    rep = report(resolve_home(home), component)
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    where = f"round {rep['round']}"
    if rep["source"] == "mix":
        where += f", epoch {rep['epoch']}, rule {rep['rule']}"
    else:
        where += ", from its checkpoint"
    out.print(f"[bold]{escape(component)}[/bold] at {escape(where)}: {escape(rep['flags_text'])}"
              f"; total mass {rep['total_mass']:.6g}")
    table = Table("member", "share", "mass", "first round", "trained here")
    for m in rep["members"]:
        first = "—" if m["first_round"] is None else str(m["first_round"])
        table.add_row(escape(_member(m)), f"{100 * m['share']:.2f}%", f"{m['mass']:.6g}",
                      first, _trained(m))
    if rep["total_mass"] == 0.0:
        table.caption = "no member's training has reached this state yet"
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command()(provenance)
