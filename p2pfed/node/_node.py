"""The node itself: :class:`Node` takes events in and returns actions, free of I/O.

See :mod:`p2pfed.node` for the round lifecycle.  ``Node`` is the facade over single-purpose
rooms that return values and never call back: the records and actions (:mod:`._records`), the
round state machine (:mod:`._state`), the one port to the ledger and blob store
(:mod:`._journal`), the overlay placement and the mix (:mod:`._mix`), the checks on what
neighbours send (:mod:`._inbound`), each component's privacy account (:mod:`._privacy`), and
unlearning: the planner (:mod:`._unlearning`), its application (:mod:`._forgetting`) and
checkpoints and restarts (:mod:`._restore`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import networkx as nx
import torch

from gossip.envelope import Envelope, ReplayGuard, Sequencer, open_envelope
from gossip.errors import MalformedMessageError, NotAMemberError, RemoteError
from gossip.identity import Identity
from p2pfed.blobs import BlobStore
from p2pfed.codec import Buffer
from p2pfed.components import FlatComponent
from p2pfed.journal import CatchUp, Checkpoint, Contribution, LocalUpdate
from p2pfed.ledger import Ledger
from p2pfed.lineage import Lineage, tag
from p2pfed.mixing import DEFAULT_RULE, MixingRule, rule
from p2pfed.node import _provenance as _prov
from p2pfed.node._announcer import Announcer
from p2pfed.node._config import NodeConfig
from p2pfed.node._forgetting import EARLY, Forgetting
from p2pfed.node._inbound import announcement_of, check_size, fetch_of, payload_state
from p2pfed.node._journal import Journal
from p2pfed.node._mix import lean_of, mix_round, place_all
from p2pfed.node._participation import Participation
from p2pfed.node._privacy import Noise, PrivacyAccount
from p2pfed.node._records import (
    ANNOUNCE,
    Action,
    Announcement,
    ForgetApplied,
    Mixed,
    PeerRejected,
    RoundCompleted,
    Train,
)
from p2pfed.node._replay import calibrate
from p2pfed.node._restore import missing_checkpoints, restore_states
from p2pfed.node._retention import Retention
from p2pfed.node._state import (
    ComponentRound,
    Event,
    Phase,
    Received,
    advance,
    all_in,
    begin,
    due,
    fast_forward,
    jump,
    repace,
    transition,
)
from p2pfed.node._unlearning import MODES

__all__ = ["EARLY", "ROUND_WINDOW", "Node", "NodeConfig"]

log = logging.getLogger(__name__)

ROUND_WINDOW = 2  # announcements up to this many rounds ahead are buffered


class Node:
    """A federation member's protocol and learning logic, free of I/O."""

    def __init__(self, identity: Identity, federation_id: bytes,
                 components: Mapping[str, FlatComponent], ledger: Ledger, blobs: BlobStore,
                 config: NodeConfig | None = None, sequencer: Sequencer | None = None) -> None:
        self.identity, self.peer_id, self.federation_id = identity, identity.peer_id, federation_id
        self.config = cfg = config or NodeConfig()
        self.ledger, self.blobs = ledger, blobs
        self._journal = Journal(ledger, blobs, cfg.max_payload_bytes, len(components))
        self._seq = sequencer or Sequencer()
        self._announcer = Announcer(identity, federation_id, self._seq)
        self._replay = ReplayGuard()
        self._states = {name: ComponentRound(comp) for name, comp in components.items()}
        for st in self._states.values():
            st.lineage = Lineage.of([self.peer_id])
        #: how each component mixes (a registered :class:`~p2pfed.mixing.MixingRule`)
        self._rules: dict[str, MixingRule] = {n: rule(self.rule_of(n)) for n in self._states}
        noise = Noise(cfg.noise_seed)
        self._privacy = {n: PrivacyAccount(n, p, noise) for n, p in cfg.privacy.items()
                         if n in self._states}
        self._participation = Participation.of(self.peer_id, cfg)
        self._forgetting = Forgetting(self.peer_id, self._journal, self._states, cfg.trains,
                                      cfg.forward_deps, cfg.fast_stride)
        self._retention = Retention(cfg.retention, self._journal, self._states, self.peer_id[-8:])
        self._graph: nx.Graph = nx.Graph()
        self._holders: dict[str, frozenset[str]] = {}
        self._round_limit: int | None = None
        #: no new round starts (a member that left: its rounds would serve no one)
        self.halted = False
        self._started = False
        self.rejected: dict[str, int] = {}  # messages refused, by error code

    # ---------------------------------------------------------------- inspection
    @property
    def components(self) -> dict[str, FlatComponent]:
        return {name: st.comp for name, st in self._states.items()}

    @property
    def epoch(self) -> int:
        """Forget requests applied (announcements of another epoch are never mixed)."""
        return self._forgetting.epoch

    def round_of(self, component: str) -> int:
        """Number of rounds of ``component`` completed."""
        return self._states[component].round

    def phase_of(self, component: str) -> Phase:
        return self._states[component].phase

    def awaiting_update(self, component: str, round_: int) -> bool:
        """Is ``component`` waiting for its local update of ``round_`` (so free to train)?"""
        st = self._states.get(component)
        return st is not None and st.phase is Phase.TRAINING and st.round == round_

    def lineage_of(self, component: str) -> Lineage:
        """The members that may have shaped ``component``'s state (``peer_id in ...``)."""
        return self._states[component].lineage

    def shaped_by(self, component: str, peer_id: str) -> bool:
        """May the member ``peer_id`` have shaped ``component``'s state?"""
        return peer_id in self._states[component].lineage

    def neighbours_of(self, component: str) -> tuple[str, ...]:
        return self._states[component].neighbours

    def rule_of(self, component: str) -> str:
        """How ``component`` mixes (``NodeConfig.robust``: its own entry, else ``"*"``)."""
        return self.config.robust.get(component, self.config.robust.get("*", DEFAULT_RULE))

    def privacy_of(self, component: str) -> dict[str, Any] | None:
        """ε spent by ``component``'s released updates (None: no privacy policy)."""
        account = self._privacy.get(component)
        return account.status() if account is not None else None

    def storage(self) -> dict[str, Any]:
        """Bytes used, the budget, the unlearning horizon and the oldest round it reaches."""
        return self._retention.status()

    def completed_of(self, component: str) -> int:
        """Rounds of ``component`` mixed since this node started (restarts count from 0)."""
        return self._states[component].completed

    def reset_disagreement(self) -> None:
        for st in self._states.values():
            st.disagreement.clear()

    def disagreement_of(self, component: str) -> list[float]:
        return list(self._states[component].disagreement)

    def weights_of(self, component: str) -> dict[str, float]:
        return dict(self._states[component].weights)

    def provenance_of(self, component: str) -> _prov.Provenance:
        """The mass vector of ``component``'s state (:mod:`p2pfed.provenance`)."""
        return self._states[component].prov

    def next_deadline(self) -> int | None:
        deadlines = [st.deadline_ms if st.phase is Phase.COLLECTING else st.start_at_ms
                     for st in self._states.values()
                     if st.phase in (Phase.COLLECTING, Phase.IDLE)]
        return min((d for d in deadlines if d is not None), default=None)

    def idle(self) -> bool:
        """True when every component waits at the round limit."""
        return all(st.phase is Phase.PAUSED for st in self._states.values())

    # ---------------------------------------------------------------- configuration events
    def set_topology(self, graph: nx.Graph, holders: Mapping[str, Iterable[str]]) -> None:
        """Give the node the overlay and, per component, the peers that hold it.

        Mixing weights are recomputed (Metropolis–Hastings on each holder subgraph).  Safe to
        call at any time, e.g. when a member joins or leaves or a link fails.  Forgotten members
        are left out.
        """
        self._graph, self._holders, new = place_all(self._states, graph, holders,
                                                    self._forgetting.forgotten, self.peer_id)
        self._announcer.joined(new)  # (they never got the current announcements)
        for st in self._states.values():  # (a lone component waits longer between rounds)
            repace(st, self.config.interval(alone=not st.neighbours))

    def set_round_limit(self, limit: int | None, now_ms: int) -> list[Action]:
        """Stop starting rounds at ``limit`` (None: no limit); resumes paused components."""
        self._round_limit = limit
        actions: list[Action] = []
        for name, st in self._states.items():
            if st.phase is Phase.PAUSED and (limit is None or st.round < limit):
                transition(st, Event.RESUME)
                actions += self._start_round(name, now_ms)
        return actions

    def halt(self) -> None:
        """Start no new round (a round under way completes, then its component pauses)."""
        self.halted = True

    def checkpoint(self, now_ms: int,
                   components: Iterable[str] | None = None) -> dict[str, Checkpoint]:
        """Store each component's state as safetensors and record it in the ledger."""
        return self._forgetting.checkpoint(
            components if components is not None else self._states, now_ms)

    def restore(self) -> dict[str, int]:
        """Load each component's latest checkpoint from the ledger (before ``start``); forget
        requests in it are applied again (their members stay out, a checkpoint holding their
        influence is never loaded, an unlearning cut short resumes)."""
        unfinished = self._forgetting.restore()
        latest = restore_states(self._journal, self._states, self._forgetting.forgotten,
                                self.peer_id, self._privacy)
        for forget in unfinished:
            self._forgetting.resume(forget, latest)
        return {name: ck.record.round for name, ck in latest.items()}

    # ---------------------------------------------------------------- unlearning
    def forgotten(self) -> frozenset[str]:
        return frozenset(self._forgetting.forgotten)

    def unlearning(self) -> dict[str, list[str]]:
        """Forgotten members whose unlearning is under way: target -> components replaying."""
        return {t: sorted(cs) for t, (_f, cs) in self._forgetting.pending.items()}

    def replaying(self, component: str) -> tuple[int, int] | None:
        """(round, until) while ``component`` re-runs rounds for an unlearning, else None."""
        st = self._states[component]
        return (st.round, st.replay.until) if st.replay is not None else None

    def forget(self, target: str, mode: str, now_ms: int) -> list[Action]:
        """Remove ``target``'s influence from every component it reached, once: those whose
        lineage holds it (and those their training reads) roll back to the latest common
        checkpoint free of it and re-run the rounds since in ``mode`` ("exact" or "fast").
        Recorded durably first (a restart resumes it).  Call with training paused."""
        if mode not in MODES:
            raise ValueError(f"unknown unlearning mode {mode!r}")
        forgetting = self._forgetting
        if target in forgetting.forgotten:
            return []
        plan = forgetting.plan(target, mode)
        if not plan.feasible:
            forgetting.refuse(plan, now_ms)
            return []
        forgetting.apply(plan, now_ms)
        self.set_topology(self._graph, self._holders)
        forgetting.finish(target, now_ms)  # (at once when nothing had to re-run)
        actions: list[Action] = [ForgetApplied(target)]
        for name in sorted(plan.rerun):
            if self._states[name].phase is Phase.IDLE:
                actions += self._start_round(name, now_ms)
        for peer, data in forgetting.take_early():  # announcements that waited for this epoch
            actions += self.receive(peer, data, now_ms)
        return actions

    def fast_forward(self, round_: int) -> None:
        """Move paused components to ``round_`` (a member rejoining a running federation)."""
        for st in self._states.values():
            fast_forward(st, round_)

    # ---------------------------------------------------------------- driver events
    def start(self, now_ms: int) -> list[Action]:
        if self._started:
            return []
        self._started = True
        if self.config.keep_payloads:  # a clean state to roll back to, should a member go
            # newest first, so that a long ledger is read only until every component has one
            missing = missing_checkpoints(self._journal.read(Checkpoint, reverse=True),
                                          self._states)
            if missing:
                self.checkpoint(now_ms, missing)
        actions: list[Action] = []
        for target in self._forgetting.targets():
            self._forgetting.finish(target, now_ms)
        for name in sorted(self._states):
            actions += self._start_round(name, now_ms)
        return actions

    def tick(self, now_ms: int) -> list[Action]:
        """Advance time: complete every round whose deadline has passed, start paced ones."""
        actions: list[Action] = []
        for name in sorted(self._states):
            event = due(self._states[name], now_ms)
            if event is Event.START:
                actions += self._start_round(name, now_ms)
            elif event is Event.COMPLETE:
                actions += self._complete_round(name, now_ms)
        return actions

    def local_update_done(self, component: str, round_: int, now_ms: int) -> list[Action]:
        """Local training of ``component`` for ``round_`` has written into its flat buffer."""
        st = self._states[component]
        if st.phase is not Phase.TRAINING or st.round != round_:
            raise AssertionError(f"unexpected training result for {component} round {round_}")
        origin, st.origin = st.origin, None
        if origin is not None and (k := self._participation.scale(st.make_up)) > 1:
            st.comp.flat.sub_(origin).mul_(float(k)).add_(origin)  # (making up skipped rounds)
        if origin is not None and st.replay is not None and st.replay.mode == "fast":
            # fast unlearning: the calibration update takes the size of the stored update
            stored = self._forgetting.stored_update(component, st)
            if stored is not None:
                calibrate(st.comp.flat, origin, stored)
        account = self._privacy.get(component)
        if origin is not None and account is not None:
            account.release(origin, st.comp.flat)
        fast = st.replay is not None and st.replay.mode == "fast"
        st.credit = _prov.credit(st, tag(self.peer_id), origin, approx=fast)
        st.lean = lean_of(self.config, component, st, self.epoch, component in self._privacy,
                          self._rules[component])
        st.lineage = st.lineage.union(*(self._states[d].lineage for d in sorted(
            self.config.forward_deps.get(component, ())) if d in self._states))
        transition(st, Event.TRAINED)
        return self._publish(component, now_ms)

    def receive(self, peer: str, data: bytes, now_ms: int) -> list[Action]:
        """A control message arrived from ``peer``.  Bad input is rejected per peer."""
        return self._guarded(peer, self._receive, peer, data, now_ms)

    def payload_received(self, peer: str, component: str, round_: int, dig: bytes, data: Buffer,
                         now_ms: int) -> list[Action]:
        """A payload fetched from ``peer`` for ``component``'s ``round_``."""
        return self._guarded(peer, self._payload_received, peer, component, round_, dig, data,
                             now_ms)

    def payload_failed(self, peer: str, component: str, round_: int, reason: str,
                       now_ms: int) -> list[Action]:
        """The fetch failed; the round completes without this peer at the deadline."""
        log.info("%s: fetch of %s round %d from %s failed: %s",
                 self.peer_id[-8:], component, round_, peer[-8:], reason)
        return []

    def send_failed(self, peer: str, data: bytes, now_ms: int) -> list[Action]:
        """The driver could not deliver ``data`` to ``peer``: resent when it is back."""
        self._announcer.failed(peer, data)
        return []

    def serve_payload(self, dig: bytes) -> bytes | None:
        """Answer a neighbour's fetch by digest (None when unknown)."""
        return self._journal.payload(dig)

    # ---------------------------------------------------------------- internals
    def _guarded(self, peer: str, handle: Callable[..., list[Action]], *args: Any
                 ) -> list[Action]:
        """Handle input from ``peer``: bad input is rejected per peer, never raised."""
        try:
            return handle(*args)
        except RemoteError as exc:
            return self._reject(peer, exc)

    def _reject(self, peer: str, exc: RemoteError) -> list[Action]:
        self.rejected[exc.code] = self.rejected.get(exc.code, 0) + 1
        log.debug("rejected message from %s: %s (%s)", peer[-8:], exc, exc.code)
        return [PeerRejected(peer, exc)]  # the driver logs it, a few lines per peer at most

    def _start_round(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        limit = st.round if self._retention.full or self.halted else self._round_limit
        if not begin(st, limit, now_ms, self.config.interval(alone=not st.neighbours)):
            return []
        replay, account = st.replay, self._privacy.get(name)
        trains = name in self.config.trains and (replay is None or replay.trains_at(st.round))
        if trains:  # (this round may be one the node skips: a share, a schedule)
            trains = self._participation.trains(st.round, now_ms,
                                                replay.idle if replay is not None else None)
        if trains and account is not None:
            trains = account.may_release(self.peer_id[-8:])
        st.trained, st.start_digest, st.credit, st.lean = trains, b"", 0.0, None
        st.make_up, st.objective = self._participation.how(st, replay) if trains else (1, None)
        if trains:
            st.origin = st.comp.flat.clone()  # (privacy, fast mode, provenance, making up)
            if self.config.keep_payloads:  # fast unlearning sizes its steps by these
                st.start_digest, _ = self._journal.put_state(name, st.round, st.comp.flat,
                                                             st.comp.layout)
            return [Train(name, st.round, self._participation.steps(st.make_up), st.objective)]
        stored = self._forgetting.stored_update(name, st)
        if stored is not None:  # fast mode between calibrations: re-apply the stored update
            st.comp.flat.add_(stored)
            st.credit = _prov.credit(st, tag(self.peer_id), None, stored=stored, approx=True)
        transition(st, Event.TRAINED)
        return self._publish(name, now_ms)

    def _publish(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        st.deadline_ms = now_ms + self.config.round_timeout_ms
        state = self._outgoing(name, st.round, st.comp.flat)
        st.own_digest, size = self._journal.put_state(name, st.round, state, st.comp.layout)
        account = self._privacy.get(name)
        spent, st.noise = account.published() if account is not None else (None, 0.0)
        # The ledger entry (with the privacy spent so far) precedes the send and is durable.
        self._journal.write(LocalUpdate(name, st.round, st.own_digest, st.trained,
                                        st.start_digest, st.lineage, self.epoch, spent,
                                        credit=st.credit if self.config.provenance else None,
                                        **self._participation.recorded(st)),
                            now_ms, durable=True)
        ann = Announcement(name, st.round, st.own_digest, size, len(st.neighbours), st.lineage,
                           st.noise, self.epoch, st.age,
                           _prov.outgoing(st) if self.config.provenance else None)
        actions = self._announcer.announce(ann, st.neighbours, now_ms)
        if st.replay is not None:
            self._forgetting.feed(name, st, self.epoch, now_ms)
        # Announcements that arrived early for this round can now be fetched.
        for (rnd, peer), rec in sorted(st.inbox.items()):
            if rnd == st.round and rec.flat is None:
                actions.append(fetch_of(peer, rec.announcement, self.config.max_payload_bytes))
        return actions + self._maybe_complete(name, now_ms)

    def _outgoing(self, name: str, round_: int, state: torch.Tensor) -> torch.Tensor:
        """The update this node releases for ``round_``: its state (the simulator's Byzantine
        members, :mod:`p2pfed.sim.attacks`, send something else)."""
        return state

    def _receive(self, peer: str, data: bytes, now_ms: int) -> list[Action]:
        env = open_envelope(data, federation_id=self.federation_id, now_ms=now_ms,
                            max_skew_ms=self.config.max_skew_ms)
        if env.sender_id != peer:
            raise NotAMemberError(f"envelope from {env.sender_id} relayed by {peer}", peer=peer)
        back = self._announcer.resend(peer, now_ms)  # heard from: what it missed
        if env.kind != ANNOUNCE:
            return back + self._other_record(peer, env, now_ms)
        return back + self._announcement(peer, env, data, now_ms)

    def _announcement(self, peer: str, env: Envelope, data: bytes,
                      now_ms: int) -> list[Action]:
        ann, st = announcement_of(peer, env, self._states)
        if ann.epoch != self.epoch:
            if ann.epoch > self.epoch:  # the sender applied a forget we have not seen yet
                self._forgetting.early.append((peer, data))
            return []  # an older epoch may carry a forgotten member's influence
        self._replay.check(env.sender, env.seq, env.timestamp_ms)
        check_size(ann, self.config.max_payload_bytes)
        actions: list[Action] = []
        if ann.round > st.round + ROUND_WINDOW:
            if st.phase not in (Phase.IDLE, Phase.COLLECTING) or st.replay is not None:
                return []  # (an unlearning re-run is never cut short)
            actions += self._catch_up(ann.component, ann.round, now_ms)
        if ann.round < st.round or (ann.round, peer) in st.inbox:
            return actions  # an old round, or a second announcement: keep the first
        st.inbox[(ann.round, peer)] = Received(ann)
        if ann.round == st.round and st.phase is Phase.COLLECTING:
            actions.append(fetch_of(peer, ann, self.config.max_payload_bytes))
        return actions

    def _other_record(self, peer: str, env: Envelope, now_ms: int) -> list[Action]:
        """Records other than announcements; subclasses (the federated node) handle more."""
        raise MalformedMessageError(f"unexpected record kind {env.kind!r}", peer=peer)

    def _catch_up(self, name: str, round_: int, now_ms: int) -> list[Action]:
        """A neighbour is well ahead (we restarted or were cut off): jump to its round."""
        st = self._states[name]
        log.info("%s: catching up from round %d to %d", name, st.round, round_)
        self._journal.write(CatchUp(name, st.round, round_), now_ms)
        jump(st, round_)
        return self._start_round(name, now_ms)

    def _payload_received(self, peer: str, name: str, round_: int, dig: bytes, data: Buffer,
                          now_ms: int) -> list[Action]:
        st = self._states.get(name)
        flat = payload_state(peer, name, round_, dig, data, st, self.config.max_payload_bytes)
        if st is None or flat is None:
            return []
        if self.config.keep_payloads:
            self._journal.put_payload(data, dig)
        rec = st.inbox[(round_, peer)]
        rec.flat = flat
        ann = rec.announcement
        self._journal.write(Contribution(peer, name, round_, dig, st.weights.get(peer, 0.0),
                                         ann.lineage, ann.noise, age=ann.age,
                                         **_prov.fields(ann.prov, ann.lineage)), now_ms)
        return self._maybe_complete(name, now_ms)

    def _maybe_complete(self, name: str, now_ms: int) -> list[Action]:
        return self._complete_round(name, now_ms) if all_in(self._states[name]) else []

    def _complete_round(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        mixed = mix_round(name, st, self._rules[name], self.peer_id, self.epoch, st.lean)
        self._journal.write(mixed.record, now_ms)
        actions: list[Action] = []
        if self.config.report_mixes:
            actions.append(Mixed(name, st.round, self.epoch, st.comp.flat.detach().clone()))
        actions.append(RoundCompleted(name, st.round, mixed.present, mixed.missing))
        advance(st)
        every = self.config.checkpoint_every
        if every and st.round % every == 0:
            self.checkpoint(now_ms, [name])  # the state at the start of round st.round
            self._retention.compact(now_ms, busy=bool(self._forgetting.pending))
        target = self._forgetting.round_done(name, st)
        if target is not None:
            self._forgetting.finish(target, now_ms)
        return actions + self._start_round(name, now_ms)
