"""The unlearning planner: ledger entries in, a plan out; the node applies it.

Forgetting member ``T`` (see :mod:`p2pfed.unlearning` for the method and the ledger audit) is
planned here and applied by :meth:`p2pfed.node.Node.forget`:

* :func:`plan_forget`: which components ``T`` reached (and the ones trained with them), the
  latest round with a clean checkpoint common to all of them, and where each one re-runs to;
  :func:`forget_entry` is the durable ``forget`` ledger entry the plan becomes;
* :func:`plan_replay`: what a component re-running rounds takes from the ledger (the
  neighbours' clean updates, and in fast mode this node's own updates before the request);
* :func:`plan_resume`: after a restart, which components roll back again and which re-run;
Nothing here touches a component's state: functions read ledger records (and stored payloads)
and return values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from p2pfed.components import FlatLayout
from p2pfed.journal import Checkpoint, Contribution, Forget, LocalUpdate, Rerun, Stored
from p2pfed.lineage import Lineage
from p2pfed.node._journal import Journal
from p2pfed.node._replay import Replay
from p2pfed.unlearning import FAST_STRIDE, is_clean

MODES = ("exact", "fast")


# ---------------------------------------------------------------- ledger queries
def rollback_round(
    checkpoints: Iterable[Stored[Checkpoint]], rounds: Mapping[str, int],
    forgotten: Iterable[str],
) -> tuple[int, dict[str, Checkpoint]] | None:
    """The latest round at which every component in ``rounds`` has a clean checkpoint.

    ``rounds`` maps each component to roll back to its current round (a checkpoint after it is
    not a candidate).  Returns that round and, per component, the checkpoint (the latest one at
    that round), or None when there is no common clean round.
    """
    forgotten = set(forgotten)
    found: dict[str, dict[int, Checkpoint]] = {c: {} for c in rounds}
    for entry in checkpoints:
        ck = entry.record
        if (ck.component in found and ck.round <= rounds[ck.component]
                and is_clean(ck.lineage, forgotten)):
            found[ck.component][ck.round] = ck
    common = set.intersection(*(set(v) for v in found.values())) if found else set()
    if not common:
        return None
    start = max(common)
    return start, {c: found[c][start] for c in rounds}


def contributions(
    entries: Iterable[Stored[Contribution]], component: str, start: int, until: int,
    forgotten: Iterable[str],
) -> dict[tuple[int, str], Contribution]:
    """Clean neighbour updates of ``component`` received for rounds ``start .. until-1``.

    A later entry for the same round and neighbour wins: after a restart in the middle of an
    unlearning, what the neighbours sent for the re-run is preferred to what they sent before.
    """
    forgotten = set(forgotten)
    out: dict[tuple[int, str], Contribution] = {}
    for entry in entries:
        c = entry.record
        if (c.component == component and start <= c.round < until
                and c.sender not in forgotten and is_clean(c.lineage, forgotten)):
            out[(c.round, c.sender)] = c
    return out


def _updates_in(entries: Iterable[Stored[LocalUpdate]], component: str, start: int, until: int,
                before: int) -> Iterator[LocalUpdate]:
    """This node's updates of ``component`` for rounds ``start .. until-1``, written before
    entry ``before``, in ledger order."""
    for entry in entries:
        if entry.index >= before:
            break
        u = entry.record
        if u.component == component and start <= u.round < until:
            yield u


def own_updates(
    entries: Iterable[Stored[LocalUpdate]], component: str, start: int, until: int, before: int,
) -> dict[int, tuple[bytes, bytes]]:
    """Per round, (state before training, state after) digests of this node's own updates."""
    return {u.round: (u.start, u.digest)
            for u in _updates_in(entries, component, start, until, before) if u.start}


def live_updates(
    entries: Iterable[Stored[LocalUpdate]], component: str, start: int, until: int, before: int,
    fast_reruns: Mapping[int, int] | None = None,
) -> dict[int, LocalUpdate]:
    """Per round ``start .. until-1``, the update before ``before`` that the state went on
    from: the last one written, skipping those of fast re-runs (``fast_reruns``: the epoch of
    each fast unlearning before, to the round its re-run went to), which record most rounds
    as untrained.  A round written twice otherwise was run again: after a restart (from a
    checkpoint before it, perhaps with other settings) or after a forget abandoned it, or by
    an exact re-run, which records what its live round did.  Whether it trained, its make-up
    factor, its objective and its mix's lean are what a re-run does."""
    fast = fast_reruns or {}
    last: dict[int, LocalUpdate] = {}
    for u in _updates_in(entries, component, start, until, before):
        if u.round >= fast.get(u.epoch, -1):
            last[u.round] = u
    return last


def idle_rounds(
    entries: Iterable[Stored[LocalUpdate]], component: str, start: int, until: int, before: int,
    fast_reruns: Mapping[int, int] | None = None,
) -> set[int]:
    """Rounds ``start .. until-1`` whose update (:func:`live_updates`) was not trained."""
    live = live_updates(entries, component, start, until, before, fast_reruns)
    return {r for r, u in live.items() if not u.trained}


# ---------------------------------------------------------------- a forget request
@dataclass(frozen=True)
class ForgetPlan:
    """What forgetting ``target`` does to this node's components."""

    target: str
    mode: str
    #: components whose lineage holds the target: rolled back and re-run
    influenced: frozenset[str]
    #: every component re-run: the influenced ones and those trained with them
    rerun: frozenset[str]
    #: per re-run component, the round it re-runs to (where it is now)
    rounds: Mapping[str, int]
    #: the round rolled back to (None: no common clean checkpoint, the request fails)
    start: int | None
    #: per re-run component, the checkpoint to roll back to
    checkpoints: Mapping[str, Checkpoint] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.start is not None

    @property
    def fed_only(self) -> list[str]:
        """Components re-run only to feed the others: their present state is put back."""
        return sorted(self.rerun - self.influenced)


def rerun_of(influenced: Iterable[str], trains: Collection[str],
             forward_deps: Mapping[str, Iterable[str]], components: Collection[str]) -> set[str]:
    """The influenced components and, transitively, those their training reads: re-training
    an influenced component trains these with it, so they re-run too."""
    rerun = set(influenced)
    grown = True
    while grown:
        extra = {d for c in rerun if c in trains
                 for d in forward_deps.get(c, ()) if d in components}
        grown = not extra <= rerun
        rerun |= extra
    return rerun


def plan_forget(
    target: str, mode: str, *, self_id: str, lineages: Mapping[str, Lineage],
    rounds: Mapping[str, int], trains: Collection[str],
    forward_deps: Mapping[str, Iterable[str]], checkpoints: Iterable[Stored[Checkpoint]],
    forgotten: Iterable[str],
) -> ForgetPlan:
    """Plan the forgetting of ``target`` from the components' lineages and current rounds and
    the ledger's ``checkpoint`` records (``forgotten``: the members forgotten before).

    Forgetting this node itself (``self_id``) rolls nothing back: it leaves the mixing."""
    influenced = frozenset(c for c, lineage in lineages.items()
                           if target in lineage and target != self_id)
    rerun = frozenset(rerun_of(influenced, trains, forward_deps, lineages.keys()))
    until = {c: rounds[c] for c in rerun}
    found = rollback_round(checkpoints, until, {*forgotten, target}) if rerun else (0, {})
    if found is None:
        return ForgetPlan(target, mode, influenced, rerun, until, None)
    return ForgetPlan(target, mode, influenced, rerun, until, found[0], found[1])


def forget_record(plan: ForgetPlan, epoch: int, keep: Mapping[str, Checkpoint],
                  components: Iterable[str]) -> Forget:
    """The durable ``forget`` record for a feasible ``plan`` (``keep``: the checkpoints of the
    components re-run only to feed the others)."""
    assert plan.start is not None
    ck = plan.checkpoints
    return Forget(
        plan.target, plan.mode, epoch, plan.start,
        {c: Rerun(plan.rounds[c], ck[c].digest, ck[c].lineage, ck[c].memory, keep.get(c),
                  mass=ck[c].mass, prov_flags=ck[c].prov_flags)
         for c in sorted(plan.rerun)},
        tuple(sorted(plan.influenced)), tuple(sorted(set(components) - plan.influenced)))


# ---------------------------------------------------------------- re-running rounds
def plan_replay(contributions_: Iterable[Stored[Contribution]],
                updates: Iterable[Stored[LocalUpdate]] | None,
                name: str, target: str, mode: str, start: int, until: int, forget_index: int,
                *, forgotten: Iterable[str], stride: int = FAST_STRIDE,
                keep: Checkpoint | None = None,
                trained: Iterable[Stored[LocalUpdate]] | None = None,
                fast_reruns: Mapping[int, int] | None = None) -> Replay:
    """The re-run of ``name``'s rounds ``start .. until-1``: the clean neighbour updates from
    the ledger's ``contribution`` records and, when ``updates`` (``local-update`` records) are
    given (fast mode, a trained component), this node's own updates before the request;
    with ``trained`` (the same records, for a component this node trains; ``fast_reruns``:
    :func:`live_updates`), the rounds it did not train and the make-up factors, objectives and
    leans of those it did: the re-run trains and mixes as they did, whatever the settings say
    now."""
    replay = Replay(target, mode, start, until, forget_index, keep=keep, stride=stride)
    replay.history = contributions(contributions_, name, start, until, forgotten)
    if updates is not None:
        replay.updates = own_updates(updates, name, start, until, forget_index)
    if trained is not None:
        live = live_updates(trained, name, start, until, forget_index, fast_reruns)
        replay.idle = {r for r, u in live.items() if not u.trained}
        replay.made_up = {r: u.make_up for r, u in live.items()
                          if u.trained and u.make_up is not None}
        replay.objectives = {r: u.objective for r, u in live.items()
                             if u.trained and u.objective is not None}
        replay.leans = {r: u.lean for r, u in live.items() if u.trained and u.lean is not None}
    return replay


def stored_update(journal: Journal, name: str, replay: Replay, round_: int,
                  layout: FlatLayout) -> torch.Tensor | None:
    """This node's own training update of ``round_`` as it was made before the request."""
    kept = replay.updates.get(round_)
    if kept is None:
        return None
    before, after = (journal.state(name, d, layout) for d in kept)
    return after - before


# ---------------------------------------------------------------- after a restart
@dataclass(frozen=True)
class ResumeStep:
    """One component of an unlearning cut short by a stop."""

    name: str
    #: the checkpoint to roll back to again (None: one made since the request was loaded)
    rollback: Checkpoint | None
    #: the round its re-run goes to (None: the re-run is over)
    until: int | None
    keep: Checkpoint | None = None


def plan_resume(forget: Stored[Forget], latest: Mapping[str, Stored[Checkpoint]],
                components: Collection[str]) -> list[ResumeStep]:
    """How to carry on the unlearning ``forget`` began, given the checkpoint each component
    was restored from (``latest``)."""
    steps = []
    for name, rerun in sorted(forget.record.components.items()):
        if name not in components:
            continue
        ck = latest.get(name)
        rollback = None
        if ck is not None and ck.index > forget.index:
            round_ = ck.record.round  # checkpointed during the re-run: it goes on from there
        else:  # no checkpoint since the request: roll back again
            rollback = rerun.rollback(name, forget.record.start)
            round_ = rollback.round
        steps.append(ResumeStep(name, rollback, rerun.until if round_ < rerun.until else None,
                                rerun.keep))
    return steps
