"""Bounded storage: keep what exact unlearning needs for a horizon of rounds, prune the rest.

Exact unlearning of member ``T`` rolls a component back to a checkpoint free of ``T`` and
re-runs the rounds since from the neighbours' updates this node kept (:mod:`._unlearning`).
So a forget request can be honoured exactly only back to the oldest checkpoint kept, with every
update since.  With a horizon of ``H`` rounds, at each checkpoint the node:

1. finds the *base*: the newest round ``B`` at which every component has a checkpoint and
   ``B <= round - H`` (for the component furthest behind);
2. prunes (:meth:`p2pfed.ledger.Ledger.compact`: deleted, the signed ``compaction`` entry
   names the runs) the checkpoints older than ``B`` and the entries of the rounds before
   each component's checkpoint at ``B`` (its local updates, contributions, mixes, catch-ups);
   membership, forget and unlearning entries are never pruned;
3. deletes the blobs no kept entry (or the rounds in progress) names.

A member whose influence on this node began at round ``B`` or later can then be forgotten
exactly; one whose influence began earlier cannot (the request is recorded as
``forget-failed``: no checkpoint free of it remains) — :attr:`Retention.oldest` says where the
line is, and ``p2pfed status`` shows it.  Nothing is pruned while an unlearning is under way.
With ``max_bytes`` set, a node whose ledger and blobs still exceed it after pruning stops
starting rounds (with one clear error) instead of filling the disk.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p2pfed.journal import (
    SCHEMA,
    CatchUp,
    Checkpoint,
    Compaction,
    Contribution,
    Forget,
    LocalUpdate,
    Mix,
    Stored,
    Unlearned,
)
from p2pfed.node._journal import Journal
from p2pfed.node._state import ComponentRound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """How much history a node keeps (``NodeConfig.retention``)."""

    #: rounds of history kept for exact unlearning (0: keep everything)
    horizon_rounds: int = 0
    #: ledger and blob bytes the node may use (0: no cap)
    max_bytes: int = 0


def base_round(checkpoints: Iterable[Stored[Checkpoint]], rounds: Mapping[str, int],
               horizon: int) -> int | None:
    """The newest round at which every component has a checkpoint and that lies at least
    ``horizon`` rounds behind each component's current round (None: there is none)."""
    if not rounds:
        return None
    limit = min(rounds.values()) - horizon
    found: dict[str, set[int]] = {c: set() for c in rounds}
    for ck in checkpoints:
        if ck.record.component in found and ck.record.round <= limit:
            found[ck.record.component].add(ck.record.round)
    common = set.intersection(*found.values())
    return max(common) if common else None


@dataclass(frozen=True)
class Window:
    """The entries a compaction decides about, read from the ledger once."""

    checkpoints: list[Stored[Checkpoint]]
    updates: list[Stored[LocalUpdate]]
    contributions: list[Stored[Contribution]]


def prunable(journal: Journal, window: Window, base: int, components: Iterable[str]
             ) -> list[int]:
    """The ledger indexes to prune for a base round ``base``."""
    components = set(components)
    cutoff: dict[str, int] = {}
    prune = []
    for ck in window.checkpoints:
        c = ck.record
        if c.component not in components:
            continue
        if c.round < base:
            prune.append(ck.index)
        elif c.round == base:
            cutoff[c.component] = ck.index  # (the newest checkpoint at the base round)

    def before(entry: Stored[LocalUpdate] | Stored[Contribution] | Stored[Mix]
               | Stored[CatchUp]) -> bool:
        return entry.index < cutoff.get(entry.record.component, -1)

    prune += [e.index for e in window.updates if before(e)]
    prune += [e.index for e in window.contributions if before(e)]
    prune += [e.index for e in journal.read(Mix) if before(e)]
    prune += [e.index for e in journal.read(CatchUp) if before(e)]
    return prune


def kept_digests(journal: Journal, window: Window, states: Mapping[str, ComponentRound],
                 pruned: Collection[int]) -> set[bytes]:
    """The blobs that the entries kept (all but ``pruned``), unfinished unlearnings and the
    rounds in progress name."""
    keep = {d for st in states.values() for d in (st.own_digest, st.start_digest) if d}
    keep |= {e.record.digest for e in window.checkpoints if e.index not in pruned}
    keep |= {e.record.digest for e in window.contributions if e.index not in pruned}
    for update in window.updates:
        # (fast unlearning re-applies trained updates; an untrained round's state is what the
        # re-run recomputes, and the neighbours keep what they took of it)
        if update.index not in pruned and update.record.trained:
            keep |= {update.record.digest, update.record.start} - {b""}
    done = {e.record.target for e in journal.read(Unlearned)}
    for forget in journal.read(Forget):
        if forget.record.target not in done:
            for rerun in forget.record.components.values():
                keep.add(rerun.checkpoint)
                if rerun.keep is not None:
                    keep.add(rerun.keep.digest)
    return keep


class Retention:
    """A node's storage under its :class:`RetentionPolicy`."""

    def __init__(self, policy: RetentionPolicy | None, journal: Journal,
                 states: Mapping[str, ComponentRound], who: str) -> None:
        self.policy = policy or RetentionPolicy()
        self._journal = journal
        self._states = states
        self._who = who
        #: the oldest round a forget can roll back to (None: nothing pruned yet), as the
        #: last compaction (before a restart, too) left it
        last = journal.last(Compaction)
        self.oldest: int | None = (min(last.record.oldest.values())
                                   if last is not None and last.record.oldest else None)
        self.full = False  # over max_bytes even after pruning: no new rounds

    def bytes_used(self) -> int:
        return self._journal.bytes_used()

    def status(self) -> dict[str, Any]:
        """``status``'s ``storage``: bytes used and allowed, the horizon and the oldest round a
        forget can roll back to (None: nothing pruned, every kept checkpoint is a candidate)."""
        return {"bytes": self.bytes_used(), "max_bytes": self.policy.max_bytes or None,
                "horizon_rounds": self.policy.horizon_rounds or None,
                "oldest_round": self.oldest, "full": self.full}

    def compact(self, now_ms: int, busy: bool) -> Compaction | None:
        """Prune what the horizon no longer needs (not while ``busy`` unlearning); then check
        the byte budget.  Returns the compaction record written, if any."""
        record = None
        horizon = self.policy.horizon_rounds
        if horizon > 0 and not busy:
            record = self._prune(now_ms, horizon)
        cap = self.policy.max_bytes
        if cap:
            used = self.bytes_used()
            if used > cap and not self.full:
                log.error("%s: storage uses %d bytes, over [storage] max_bytes = %d even after "
                          "pruning: no new rounds start (raise max_bytes or lower "
                          "unlearn_horizon_rounds, then restart)", self._who, used, cap)
            self.full = used > cap
        return record

    def _prune(self, now_ms: int, horizon: int) -> Compaction | None:
        rounds = {c: st.round for c, st in self._states.items()}
        checkpoints = list(self._journal.read(Checkpoint))
        base = base_round(checkpoints, rounds, horizon)
        step = max(1, horizon // 4)  # (one compaction entry per quarter horizon at most)
        if base is None or (self.oldest is not None and base < self.oldest + step):
            return None
        window = Window(checkpoints, list(self._journal.read(LocalUpdate)),
                        list(self._journal.read(Contribution)))
        indexes = prunable(self._journal, window, base, rounds)
        pruned = set(indexes)
        keep = kept_digests(self._journal, window, self._states, pruned)
        unused = [d for d in self._journal.blob_digests() if d not in keep]
        # the record first, the blobs after: a stop in between leaves blobs the next
        # compaction deletes, never an entry naming a deleted blob
        entry = self._journal.compact(indexes, now_ms, {
            "v": SCHEMA, "horizon": horizon, "oldest": dict.fromkeys(rounds, base),
            "blobs": len(unused)})
        self.oldest = base
        self._journal.delete_blobs(unused)
        if entry is None:
            return None
        log.info("%s: pruned %d ledger entries and %d blobs before round %d (horizon %d)",
                 self._who, len(pruned), len(unused), base, horizon)
        record = Compaction.from_body(entry.body)
        assert isinstance(record, Compaction)
        return record
