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

The node plans and applies this (:mod:`p2pfed.node._unlearning`, the planner;
:mod:`p2pfed.node._forgetting`, its application; the re-run in :mod:`p2pfed.node._replay`;
restarts in :mod:`p2pfed.node._restore`).  This module, free of torch so that the CLI stays
quick, holds the read-only queries over a ledger (its records read through
:mod:`p2pfed.journal`): :func:`latest_clean_checkpoints` (what to export or restart from),
:func:`unlearning_status` and :func:`check_unlearning`, the audit that ``p2pfed ledger verify``
runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from p2pfed import kinds
from p2pfed.journal import (
    Checkpoint,
    Contribution,
    Forget,
    LocalUpdate,
    Mix,
    Record,
    SchemaError,
    Unlearned,
    decode,
    read,
)
from p2pfed.ledger import LedgerEntry
from p2pfed.lineage import Lineage

FORGET_ENTRY = kinds.FORGET
UNLEARNED_ENTRY = kinds.UNLEARNED
#: fast mode: one calibration training stands for this many rounds
FAST_STRIDE = 4


def is_clean(lineage: Lineage, forgotten: Iterable[str]) -> bool:
    """True when ``lineage`` names none of ``forgotten``."""
    return not any(f in lineage for f in forgotten)


def latest_clean_checkpoints(
    entries: Iterable[LedgerEntry], forgotten: Iterable[str],
) -> dict[str, tuple[int, Checkpoint]]:
    """Per component, the last checkpoint (ledger index, record) free of every forgotten
    member: the state to restart from or export, never one a forget request still has to
    undo."""
    forgotten = set(forgotten)
    latest: dict[str, tuple[int, Checkpoint]] = {}
    for ck in read(entries, Checkpoint):
        if is_clean(ck.record.lineage, forgotten):
            latest[ck.record.component] = (ck.index, ck.record)
    return latest


def _records(entries: Iterable[LedgerEntry]) -> Iterator[tuple[int, Record]]:
    """The entries that decode (``p2pfed ledger verify`` reports the others, see
    :func:`p2pfed.journal.schema_problems`)."""
    for entry in entries:
        try:
            yield entry.index, decode(entry)
        except SchemaError:
            continue


def _state_problems(index: int, record: Record, forgotten: set[str]) -> list[str]:
    """What a state-bearing record uses of the forgotten members."""
    if not isinstance(record, LocalUpdate | Mix | Checkpoint | Contribution):
        return []
    problems = []
    tainted = {f for f in forgotten if f in record.lineage}
    round_ = getattr(record, "round", None)
    if tainted:
        problems.append(f"entry {index} ({record.KIND} of {record.component} round {round_}): "
                        f"lineage holds forgotten {sorted(tainted)}")
    if isinstance(record, Contribution) and record.sender in forgotten:
        problems.append(f"entry {index}: contribution from forgotten {record.sender}")
    if isinstance(record, Mix):
        used = {i.peer for i in record.inputs} & forgotten
        if used:
            problems.append(f"entry {index}: mix of {record.component} round {round_} uses "
                            f"forgotten {sorted(used)}")
    return problems


def check_unlearning(entries: Iterable[LedgerEntry], owner: str | None = None) -> list[str]:
    """Audit a ledger's unlearning: problems found (an empty list when all is well).

    After the ``forget`` entry for a member, no state may carry it in its lineage, no
    contribution may come from it and no mix may use it; every ``unlearned`` entry must follow
    a ``forget`` entry for the same member.  ``owner`` (the ledger's own peer id) is exempt: a
    member that asked to be forgotten keeps its own model.
    """
    problems: list[str] = []
    forgotten: dict[str, int] = {}
    for index, record in _records(entries):
        if isinstance(record, Forget):
            if record.target != owner:
                forgotten.setdefault(record.target, index)
        elif isinstance(record, Unlearned):
            if record.target not in forgotten and record.target != owner:
                problems.append(f"entry {index}: unlearning of {record.target} without a "
                                "forget entry before it")
        elif forgotten:
            problems += _state_problems(index, record, set(forgotten))
    return problems


def unlearning_status(entries: Iterable[LedgerEntry]) -> list[dict[str, Any]]:
    """Per forgotten member: mode, what was rolled back, and whether it is done."""
    out: dict[str, dict[str, Any]] = {}
    for _index, r in _records(entries):
        if isinstance(r, Forget):
            out[r.target] = {
                "target": r.target, "mode": r.mode, "done": False,
                "rolled_back": list(r.influenced), "untouched": list(r.untouched),
                "rerun": sorted(r.components), "from_round": r.start, "epoch": r.epoch}
        elif isinstance(r, Unlearned) and r.target in out:
            out[r.target]["done"] = True
    return list(out.values())
