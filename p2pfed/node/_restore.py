"""Checkpoints: what a component's checkpoint records, and what a restart reads back.

A checkpoint stores a component's flat state as safetensors in the blob store and records a
durable ``checkpoint`` ledger entry (round, digest, lineage, the mixing rule's memory).  On
restart (:meth:`p2pfed.node.Node.restore`) the node reads the ledger newest first:

* :func:`forget_history`: the members forgotten, the epoch, and the unlearnings a stop cut
  short (the planner, :mod:`._unlearning`, says how to resume them);
* :func:`load_newest`: per component, the newest checkpoint free of every forgotten member
  whose blob reads correctly (a damaged one is skipped for the one before it);
* :func:`releases_spent`: the differentially private releases already made (never given back);
* :func:`restore_states`: both, for :meth:`p2pfed.node.Node.restore`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

from gossip.errors import StorageError
from p2pfed.journal import CatchUp, Checkpoint, Forget, LocalUpdate, Stored, Unlearned
from p2pfed.lineage import Lineage
from p2pfed.mixing import Memory
from p2pfed.node._journal import Journal
from p2pfed.node._privacy import PrivacyAccount
from p2pfed.node._provenance import fields, recorded
from p2pfed.node._state import ComponentRound
from p2pfed.unlearning import is_clean

log = logging.getLogger(__name__)


def checkpoint_of(journal: Journal, name: str, st: ComponentRound) -> Checkpoint:
    """Store ``name``'s state; the ``checkpoint`` record that names it."""
    return Checkpoint(name, st.round,
                      journal.put_checkpoint(name, st.round, st.comp.flat, st.comp.layout),
                      st.lineage, st.memory.to_record(), **fields(st.prov, st.lineage))


def load_checkpoint(st: ComponentRound, journal: Journal, ck: Checkpoint, self_id: str) -> None:
    """Put the state ``ck`` names back into ``st`` (its inbox is emptied)."""
    st.comp.load_(journal.tensor(ck.digest))
    st.round = ck.round
    st.lineage = ck.lineage | Lineage.of([self_id])
    st.memory = Memory.from_record(ck.memory)
    st.prov = recorded(ck.mass, ck.prov_flags, ck.lineage, ck.round)
    st.inbox.clear()
    st.age = 0  # (ages are not checkpointed: a catch-up after a restart counts them again)


def restore_candidates(
    newest_first: Iterable[Stored[Checkpoint]], forgotten: Iterable[str],
    components: Iterable[str],
) -> Iterator[Stored[Checkpoint]]:
    """Checkpoints of ``components`` free of every forgotten member, in the order given
    (newest first: a caller that stops once it has loaded one checkpoint per component reads
    only the recent end of the ledger, and can skip a damaged one)."""
    forgotten, components = set(forgotten), set(components)
    for ck in newest_first:
        if ck.record.component in components and is_clean(ck.record.lineage, forgotten):
            yield ck


def load_newest(states: Mapping[str, ComponentRound], journal: Journal,
                newest_first: Iterable[Stored[Checkpoint]], forgotten: Iterable[str],
                self_id: str) -> dict[str, Stored[Checkpoint]]:
    """Load, per component, the newest clean checkpoint whose blob reads correctly; return
    them by component.

    Reads the ledger newest first and stops once every component is loaded.  A damaged
    blob is skipped (with a warning) for the checkpoint before it."""
    latest: dict[str, Stored[Checkpoint]] = {}
    damaged: set[str] = set()
    for ck in restore_candidates(newest_first, forgotten, states):
        name = ck.record.component
        if name in latest:
            continue
        try:
            load_checkpoint(states[name], journal, ck.record, self_id)
        except StorageError as exc:
            log.warning("checkpoint of %s at round %s (ledger entry %d) is damaged, "
                        "trying an older one: %s", name, ck.record.round, ck.index, exc)
            damaged.add(name)
            continue
        latest[name] = ck
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
    #: forget entries whose unlearning a stop cut short, oldest first
    unfinished: tuple[Stored[Forget], ...]


def forget_history(forgets: Iterable[Stored[Forget]],
                   unlearned: Iterable[Stored[Unlearned]]) -> ForgetHistory:
    """Read the ``forget`` and ``unlearned`` entries of a ledger."""
    requests = sorted(forgets, key=lambda e: e.index)
    done = {e.record.target for e in unlearned}
    return ForgetHistory(
        frozenset(e.record.target for e in requests),
        max((e.record.epoch for e in requests), default=0),
        tuple(e for e in requests if e.record.target not in done))


def releases_spent(newest_first: Iterable[Stored[LocalUpdate]],
                   components: Collection[str]) -> dict[str, int]:
    """Per component of ``components``, the private releases its newest ``local-update``
    entry counts (they count them all)."""
    spent: dict[str, int] = {}
    for entry in newest_first:
        dp, name = entry.record.dp, entry.record.component
        if dp is not None and name in components and name not in spent:
            spent[name] = dp.releases
            if len(spent) == len(components):
                break
    return spent


def missing_checkpoints(newest_first: Iterable[Stored[Checkpoint]],
                        components: Iterable[str]) -> set[str]:
    """The components with no ``checkpoint`` entry at all (reads only until each has one)."""
    missing = set(components)
    for e in newest_first:
        missing.discard(e.record.component)
        if not missing:
            break
    return missing


def restore_states(journal: Journal, states: Mapping[str, ComponentRound],
                   forgotten: Iterable[str], self_id: str,
                   privacy: Mapping[str, PrivacyAccount]) -> dict[str, Stored[Checkpoint]]:
    """A restart: load each component's newest clean checkpoint (:func:`load_newest`) and give
    each privacy account the releases the ledger counts; the checkpoints loaded."""
    latest = load_newest(states, journal, journal.read(Checkpoint, reverse=True), forgotten,
                         self_id)
    if privacy:  # (else the ledger's local updates are not read at all)
        for name, releases in releases_spent(journal.read(LocalUpdate, reverse=True),
                                             privacy).items():
            privacy[name].restored(releases)
    restore_since(journal.read(CatchUp, reverse=True), states)
    return latest


def restore_since(newest_first: Iterable[Stored[CatchUp]],
                  states: Mapping[str, ComponentRound]) -> None:
    """Each component's :attr:`~ComponentRound.since` as it was before the restart: the round
    its newest catch-up jumped to (0 when it never jumped), so the rounds a restart runs again
    make up as they did the first time."""
    left = set(states)
    for c in newest_first:
        name = c.record.component
        if name in left:
            states[name].since = c.record.to_round
            left.discard(name)
            if not left:
                break
