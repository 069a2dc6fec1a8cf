"""Federated unlearning from a node's own ledger: where to roll back, what to replay, and checks.

Every state a node holds carries a *lineage*: the members whose data (or whose presence in the
mixing graph) could have influenced it.  To forget member ``T`` a node

1. picks the latest round ``R`` at which it checkpointed every component whose lineage holds
   ``T``, with a lineage free of ``T`` (and of everyone forgotten before);
2. rolls those components back to round ``R`` and re-runs rounds ``R .. U-1`` (``U``: where it
   was) without ``T`` — the normal round protocol, tagged with a new *epoch* so that stale
   announcements are never mixed in.  A neighbour's update whose recorded lineage is free of
   ``T`` is taken from this node's own ledger and blob store (it is what the neighbour would
   send again); only tainted ones are waited for.  In exact mode every replayed round trains as
   it did, so the result is the federation that never had ``T``; in fast mode only every
   ``stride``-th round trains, its update rescaled to the size of the stored updates it stands
   for (FedEraser's calibration), and the rounds between only mix.

The node plans and applies this (:mod:`p2pfed.node._unlearning`, the planner; the re-run in
:mod:`p2pfed.node._replay`; restarts in :mod:`p2pfed.node._restore`).  This module, free of
torch so that the CLI stays quick, holds the ledger's vocabulary for it and the read-only
queries over a ledger: :func:`latest_clean_checkpoints` (what to export or restart from),
:func:`unlearning_status` and :func:`check_unlearning`, the audit that ``p2pfed ledger verify``
runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from p2pfed import kinds
from p2pfed.ledger import LedgerEntry

FORGET_ENTRY = kinds.FORGET
UNLEARNED_ENTRY = kinds.UNLEARNED
#: fast mode: one calibration training stands for this many rounds
FAST_STRIDE = 4
#: entry kinds whose body carries the lineage of a state
STATE_KINDS = ("local-update", "mix", "checkpoint", "contribution")


def is_clean(lineage: Iterable[str], forgotten: Iterable[str]) -> bool:
    return not set(lineage) & set(forgotten)


def latest_clean_checkpoints(
    entries: Iterable[LedgerEntry], forgotten: Iterable[str],
) -> dict[str, tuple[int, dict[str, Any]]]:
    """Per component, the last checkpoint (ledger index, body) free of every forgotten member:
    the state to restart from or export, never one a forget request still has to undo."""
    forgotten = set(forgotten)
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for entry in entries:
        body = entry.body
        if entry.kind == "checkpoint" and is_clean(body.get("lineage", ()), forgotten):
            latest[body["component"]] = (entry.index, body)
    return latest


def check_unlearning(entries: Iterable[LedgerEntry], owner: str | None = None) -> list[str]:
    """Audit a ledger's unlearning: problems found (an empty list when all is well).

    After the ``forget`` entry for a member, no state may carry it in its lineage, no
    contribution may come from it and no mix may use it; every ``unlearned`` entry must follow
    a ``forget`` entry for the same member.  ``owner`` (the ledger's own peer id) is exempt: a
    member that asked to be forgotten keeps its own model.
    """
    problems: list[str] = []
    forgotten: dict[str, int] = {}
    for entry in entries:
        body = entry.body
        if entry.kind == FORGET_ENTRY:
            if body["target"] != owner:
                forgotten.setdefault(body["target"], entry.index)
        elif entry.kind == UNLEARNED_ENTRY:
            if body.get("target") not in forgotten and body.get("target") != owner:
                problems.append(f"entry {entry.index}: unlearning of {body.get('target')} "
                                "without a forget entry before it")
        elif entry.kind in STATE_KINDS and forgotten:
            tainted = set(body.get("lineage", ())) & set(forgotten)
            if tainted:
                problems.append(f"entry {entry.index} ({entry.kind} of "
                                f"{body.get('component')} round {body.get('round')}): lineage "
                                f"holds forgotten {sorted(tainted)}")
            if entry.kind == "contribution" and body.get("sender") in forgotten:
                problems.append(f"entry {entry.index}: contribution from forgotten "
                                f"{body['sender']}")
            if entry.kind == "mix":
                used = {i[0] for i in body.get("inputs", ())} & set(forgotten)
                if used:
                    problems.append(f"entry {entry.index}: mix of {body.get('component')} round "
                                    f"{body.get('round')} uses forgotten {sorted(used)}")
    return problems


def unlearning_status(entries: Iterable[LedgerEntry]) -> list[dict[str, Any]]:
    """Per forgotten member: mode, what was rolled back, and whether it is done."""
    out: dict[str, dict[str, Any]] = {}
    for entry in entries:
        body = entry.body
        if entry.kind == FORGET_ENTRY:
            out[body["target"]] = {
                "target": body["target"], "mode": body["mode"], "done": False,
                "rolled_back": body["influenced"], "untouched": body["untouched"],
                "rerun": sorted(body["components"]),
                "from_round": body["start"], "epoch": body["epoch"]}
        elif entry.kind == UNLEARNED_ENTRY and body.get("target") in out:
            out[body["target"]]["done"] = True
    return list(out.values())
