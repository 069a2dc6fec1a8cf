"""Applying forget requests: the members forgotten, the epoch, and the re-runs under way.

The planner (:mod:`._unlearning`) says what a request does; :class:`Forgetting` carries it
out on the components' round states: it records the request durably, rolls the components
back, gives each re-running component its :class:`~._replay.Replay` (the neighbours' clean
updates and, in fast mode, this node's own), feeds those updates into the re-run rounds, and
says when a re-run is over.  It writes only through the node's :class:`~._journal.Journal`
and never calls the node: the node asks, and acts on the values it gets back.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Collection, Iterable, Mapping

import torch

from p2pfed.journal import (
    Checkpoint,
    Contribution,
    Forget,
    ForgetFailed,
    LocalUpdate,
    Stored,
    Unlearned,
)
from p2pfed.lineage import Lineage
from p2pfed.mixing import Memory
from p2pfed.node._journal import Journal
from p2pfed.node._provenance import fields, recorded
from p2pfed.node._records import Announcement
from p2pfed.node._restore import checkpoint_of, forget_history, load_checkpoint
from p2pfed.node._state import ComponentRound, Event, Phase, Received, transition
from p2pfed.node._unlearning import (
    ForgetPlan,
    forget_record,
    plan_forget,
    plan_replay,
    plan_resume,
    stored_update,
)

log = logging.getLogger(__name__)

EARLY = 1024  # announcements of a later epoch kept until this node applies the same forget


class Forgetting:
    """What this node has forgotten, and the unlearnings it is carrying out."""

    def __init__(self, self_id: str, journal: Journal, states: Mapping[str, ComponentRound],
                 trains: Collection[str], forward_deps: Mapping[str, Iterable[str]],
                 stride: int) -> None:
        self.self_id = self_id
        self._journal = journal
        self._states = states  # the node's components (this room moves them only as told)
        self._trains = frozenset(trains)
        self._forward_deps = forward_deps
        self._stride = stride
        self.forgotten: set[str] = set()
        #: forget requests applied (announcements carry it: an older epoch is never mixed)
        self.epoch = 0
        #: target -> its forget record and the components still re-running
        self.pending: dict[str, tuple[Forget, set[str]]] = {}
        #: announcements of a later epoch, kept until this node applies that forget
        self.early: deque[tuple[str, bytes]] = deque(maxlen=EARLY)

    def _who(self) -> str:
        return self.self_id[-8:]

    # ---------------------------------------------------------------- a request
    def plan(self, target: str, mode: str) -> ForgetPlan:
        """What forgetting ``target`` would do (:func:`~._unlearning.plan_forget`)."""
        return plan_forget(
            target, mode, self_id=self.self_id,
            lineages={c: st.lineage for c, st in self._states.items()},
            rounds={c: st.round for c, st in self._states.items()},
            trains=self._trains, forward_deps=self._forward_deps,
            checkpoints=self._journal.read(Checkpoint), forgotten=self.forgotten)

    def refuse(self, plan: ForgetPlan, now_ms: int) -> None:
        """No checkpoint free of the target (lost, or payloads not kept): say so, durably."""
        log.error("%s: cannot forget %s: no checkpoint free of it for %s", self._who(),
                  plan.target[-8:], sorted(plan.rerun))
        self._journal.write(ForgetFailed(plan.target, plan.mode, tuple(sorted(plan.rerun))),
                            now_ms, durable=True)

    def apply(self, plan: ForgetPlan, now_ms: int) -> None:
        """Record ``plan`` durably, then roll its components back and start their re-runs.
        Components re-run only to feed the others are checkpointed first: their present state
        is put back when the re-run is over."""
        assert plan.start is not None
        states = self._states
        keep = self.checkpoint(plan.fed_only, now_ms)
        self.epoch += 1
        forget = forget_record(plan, self.epoch, keep, states)
        index = self._journal.write(forget, now_ms, durable=True)
        self.forgotten.add(plan.target)
        for name in sorted(plan.rerun):
            st = states[name]
            if st.phase in (Phase.TRAINING, Phase.COLLECTING):  # (a queued Train is dropped)
                transition(st, Event.ABANDON)
            st.deadline_ms = st.start_at_ms = st.origin = None
            load_checkpoint(st, self._journal, plan.checkpoints[name], self.self_id)
            if plan.rounds[name] > plan.start:
                self._begin_replay(st, name, forget, plan.rounds[name], index, keep.get(name))
        self.pending[plan.target] = (forget, {c for c in plan.rerun
                                              if states[c].replay is not None})
        log.info("%s: forgetting %s (%s): rolled back %s to round %d (%s re-run only)",
                 self._who(), plan.target[-8:], plan.mode, sorted(plan.influenced), plan.start,
                 plan.fed_only)

    def take_early(self) -> list[tuple[str, bytes]]:
        """The announcements that waited for this epoch (handled again by the node)."""
        early, self.early = list(self.early), deque(maxlen=EARLY)
        return early

    def checkpoint(self, components: Iterable[str], now_ms: int) -> dict[str, Checkpoint]:
        """Store the present state of ``components`` and record it, durably."""
        out = {}
        for name in sorted(components):
            out[name] = checkpoint_of(self._journal, name, self._states[name])
            self._journal.write(out[name], now_ms, durable=True)
        return out

    # ---------------------------------------------------------------- a restart
    def restore(self) -> tuple[Stored[Forget], ...]:
        """Read the forget requests back from the ledger; those whose unlearning a stop cut
        short (resume each with :meth:`resume` once the checkpoints are loaded)."""
        history = forget_history(self._journal.read(Forget), self._journal.read(Unlearned))
        self.forgotten |= history.forgotten
        self.epoch = max(self.epoch, history.epoch)
        return history.unfinished

    def resume(self, forget: Stored[Forget], latest: Mapping[str, Stored[Checkpoint]]) -> None:
        """Carry on an unlearning the node was stopped in the middle of."""
        pending = set()
        for step in plan_resume(forget, latest, self._states):
            st = self._states[step.name]
            if step.rollback is not None:
                load_checkpoint(st, self._journal, step.rollback, self.self_id)
            if step.until is not None:
                self._begin_replay(st, step.name, forget.record, step.until, forget.index,
                                   step.keep)
                pending.add(step.name)
        self.pending[forget.record.target] = (forget.record, pending)
        log.info("%s: resuming the unlearning of %s (%s)", self._who(),
                 forget.record.target[-8:], sorted(pending))

    # ---------------------------------------------------------------- re-running rounds
    def _begin_replay(self, st: ComponentRound, name: str, forget: Forget, until: int,
                      index: int, keep: Checkpoint | None) -> None:
        fast = forget.mode == "fast" and name in self._trains
        # a component it trains re-runs as its live rounds trained and mixed (whether, the
        # make-up, the objective, the lean), whatever the settings say now (a share, hours, a
        # profile may have changed); a fast re-run's records are not the history
        ups = list(self._journal.read(LocalUpdate)) if name in self._trains else None
        fast_reruns = {f.record.epoch: f.record.components[name].until
                       for f in self._journal.read(Forget) if f.index < index
                       and f.record.mode == "fast" and name in f.record.components}
        st.replay = plan_replay(
            self._journal.read(Contribution), ups if fast else None,
            name, forget.target, forget.mode, forget.start, until, index,
            forgotten=self.forgotten, stride=self._stride, keep=keep, trained=ups,
            fast_reruns=fast_reruns)

    def stored_update(self, name: str, st: ComponentRound) -> torch.Tensor | None:
        """This node's own training update of the round ``st`` re-runs, as it was made before
        the request (None: not re-run, not trained here, or not kept)."""
        if st.replay is None or name not in self._trains:
            return None
        return stored_update(self._journal, name, st.replay, st.round, st.comp.layout)

    def feed(self, name: str, st: ComponentRound, epoch: int, now_ms: int) -> None:
        """A re-run round: take the neighbours' clean updates from this node's store."""
        assert st.replay is not None
        for peer in st.neighbours:
            kept = st.replay.history.get((st.round, peer))
            rec = st.inbox.get((st.round, peer))
            if kept is None or (rec is not None and rec.flat is not None):
                continue
            state = self._journal.state(name, kept.digest, st.comp.layout)
            prov = None if kept.mass is None else recorded(kept.mass, kept.prov_flags,
                                                           kept.lineage, st.round)
            ann = Announcement(name, st.round, kept.digest, 0, 0, kept.lineage,
                               noise=kept.noise, epoch=epoch, age=kept.age, prov=prov)
            st.inbox[(st.round, peer)] = Received(ann, state)
            self._journal.write(Contribution(peer, name, st.round, kept.digest,
                                             st.weights.get(peer, 0.0), kept.lineage,
                                             kept.noise, kept=True, age=kept.age,
                                             **fields(prov, kept.lineage)), now_ms)

    def round_done(self, name: str, st: ComponentRound) -> str | None:
        """``st`` completed a round: when that ends its re-run, the target it was for."""
        if st.replay is None or st.round < st.replay.until:
            return None
        target, keep, st.replay = st.replay.target, st.replay.keep, None
        if keep is not None:
            self._put_back(name, st, keep)
        if target in self.pending:
            self.pending[target][1].discard(name)
        return target

    def _put_back(self, name: str, st: ComponentRound, keep: Checkpoint) -> None:
        """A component re-run only to feed others gets its state from before the request."""
        kept = self._journal.tensor(keep.digest)
        if not torch.equal(kept, st.comp.flat):  # exact re-runs reproduce it bit for bit
            log.info("%s: re-run of %s ended %.3g away from its kept state; restoring it",
                     self._who(), name, float((kept - st.comp.flat).abs().max()))
        st.comp.load_(kept)
        st.lineage = keep.lineage | Lineage.of([self.self_id])
        st.memory = Memory.from_record(keep.memory)
        st.prov = recorded(keep.mass, keep.prov_flags, keep.lineage, keep.round)

    def finish(self, target: str, now_ms: int) -> None:
        """Close the unlearning of ``target`` once none of its components re-runs any more:
        checkpoint the unlearned states (what a restart must load), then record it done."""
        pending = self.pending.get(target)
        if pending is None or pending[1]:
            return
        del self.pending[target]
        forget = pending[0]
        self.checkpoint([c for c in forget.components if c in self._states], now_ms)
        self._journal.write(Unlearned.closing(forget), now_ms, durable=True)
        log.info("%s: unlearning of %s done", self._who(), forget.target[-8:])

    def targets(self) -> Iterable[str]:
        return list(self.pending)
