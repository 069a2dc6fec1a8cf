"""Checkpoints: what a component's checkpoint records, and what a restart reads back.

A checkpoint stores a component's flat state as safetensors in the blob store and records a
durable ``checkpoint`` ledger entry (round, digest, lineage, the mixing rule's memory).  On
restart (:meth:`p2pfed.node.Node.restore`) the node reads the ledger newest first:

* :func:`forget_history`: the members forgotten, the epoch, and the unlearnings a stop cut
  short (the planner, :mod:`._unlearning`, says how to resume them);
* :func:`load_newest`: per component, the newest checkpoint free of every forgotten member
  whose blob reads correctly (a damaged one is skipped for the one before it);
* :func:`releases_spent`: the differentially private releases already made (never given back).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gossip.errors import StorageError
from p2pfed.blobs import BlobStore
from p2pfed.ledger import LedgerEntry
from p2pfed.mixing import Memory
from p2pfed.node._state import ComponentRound
from p2pfed.unlearning import FORGET_ENTRY, UNLEARNED_ENTRY, is_clean

log = logging.getLogger(__name__)


def checkpoint_body(blobs: BlobStore, name: str, st: ComponentRound) -> dict[str, Any]:
    """Store ``name``'s state and return the body of its ``checkpoint`` ledger entry."""
    key = blobs.put_tensors({"flat": st.comp.flat}, {"component": name, "round": str(st.round)})
    return {"component": name, "round": st.round, "digest": key,
            "lineage": sorted(st.lineage), **st.memory.to_record()}


def load_checkpoint(st: ComponentRound, blobs: BlobStore, body: Mapping[str, Any],
                    self_id: str) -> None:
    """Put the checkpoint ``body`` records back into ``st`` (its inbox is emptied)."""
    st.comp.load_(blobs.get_tensors(body["digest"])["flat"])
    st.round = body["round"]
    st.lineage = set(body.get("lineage", [])) | {self_id}
    st.memory = Memory.from_record(body)
    st.inbox.clear()


def restore_candidates(
    newest_first: Iterable[LedgerEntry], forgotten: Iterable[str], components: Iterable[str],
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Checkpoints of ``components`` free of every forgotten member, as (ledger index, body),
    in the order given (newest first: a caller that stops once it has loaded one checkpoint
    per component reads only the recent end of the ledger, and can skip a damaged one)."""
    forgotten, components = set(forgotten), set(components)
    for entry in newest_first:
        body = entry.body
        if (entry.kind == "checkpoint" and body.get("component") in components
                and is_clean(body.get("lineage", ()), forgotten)):
            yield entry.index, body


def load_newest(states: Mapping[str, ComponentRound], blobs: BlobStore,
                newest_first: Iterable[LedgerEntry], forgotten: Iterable[str],
                self_id: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """Load, per component, the newest clean checkpoint whose blob reads correctly; return
    them as name -> (ledger index, body).

    Reads the ledger newest first and stops once every component is loaded.  A damaged
    blob is skipped (with a warning) for the checkpoint before it."""
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    damaged: set[str] = set()
    for index, body in restore_candidates(newest_first, forgotten, states):
        name = body["component"]
        if name in latest:
            continue
        try:
            load_checkpoint(states[name], blobs, body, self_id)
        except StorageError as exc:
            log.warning("checkpoint of %s at round %s (ledger entry %d) is damaged, "
                        "trying an older one: %s", name, body.get("round"), index, exc)
            damaged.add(name)
            continue
        latest[name] = (index, body)
        if len(latest) == len(states):
            break
    if damaged - latest.keys():
        raise StorageError(f"no checkpoint of {', '.join(sorted(damaged - latest.keys()))} "
                           "reads correctly (see the warnings above)")
    return latest


@dataclass(frozen=True)
class ForgetHistory:
    """The forget requests a ledger holds."""

    forgotten: frozenset[str]
    epoch: int  # forget requests applied
    #: forget entries (ledger index, body) whose unlearning a stop cut short, oldest first
    unfinished: tuple[tuple[int, Mapping[str, Any]], ...]


def forget_history(forgets: Iterable[LedgerEntry],
                   unlearned: Iterable[LedgerEntry]) -> ForgetHistory:
    """Read the ``forget`` and ``unlearned`` entries of a ledger."""
    entries = sorted([*forgets, *unlearned], key=lambda e: e.index)
    done = {e.body["target"] for e in entries if e.kind == UNLEARNED_ENTRY}
    requests = [e for e in entries if e.kind == FORGET_ENTRY]
    return ForgetHistory(
        frozenset(e.body["target"] for e in requests),
        max((e.body["epoch"] for e in requests), default=0),
        tuple((e.index, e.body) for e in requests if e.body["target"] not in done))


def releases_spent(newest_first: Iterable[LedgerEntry],
                   components: Collection[str]) -> dict[str, int]:
    """Per component of ``components``, the private releases its newest ``local-update``
    entry counts (they count them all)."""
    spent: dict[str, int] = {}
    for entry in newest_first:
        dp, name = entry.body.get("dp"), entry.body.get("component", "")
        if dp is not None and name in components and name not in spent:
            spent[name] = dp["releases"]
            if len(spent) == len(components):
                break
    return spent


def missing_checkpoints(newest_first: Iterable[LedgerEntry],
                        components: Iterable[str]) -> set[str]:
    """The components with no ``checkpoint`` entry at all (reads only until each has one)."""
    missing = set(components)
    for e in newest_first:
        missing.discard(e.body.get("component", ""))
        if not missing:
            break
    return missing
