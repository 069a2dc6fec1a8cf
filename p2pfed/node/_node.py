"""The node itself: :class:`Node` takes events in and returns actions, free of I/O.

See :mod:`p2pfed.node` for the round lifecycle; the records are in :mod:`._records`, the
state machine in :mod:`._state`, the status in :mod:`._status`.  Collaborators return plans
or values and never call back: the unlearning planner is :mod:`._unlearning` (with the re-run's
record and math in :mod:`._replay`), checkpoints and what a restart reads are in
:mod:`._restore`; the node applies what they return to its states.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch

from gossip.envelope import (
    Envelope,
    ReplayGuard,
    Sequencer,
    digest,
    open_envelope,
    seal,
)
from gossip.errors import (
    BadPayloadError,
    MalformedMessageError,
    NotAMemberError,
    RemoteError,
)
from gossip.identity import Identity
from p2pfed import kinds
from p2pfed.blobs import BlobStore
from p2pfed.codec import decode_payload, encode_payload
from p2pfed.components import FlatComponent
from p2pfed.consensus import effective_weights, metropolis_hastings_weights
from p2pfed.ledger import Ledger
from p2pfed.mixing import DEFAULT_RULE, Memory, MixingRule, MixInput, Neighbour, rule
from p2pfed.node._records import (
    ANNOUNCE,
    Action,
    Announce,
    Announcement,
    Fetch,
    ForgetApplied,
    Mixed,
    PeerRejected,
    RoundCompleted,
    Train,
)
from p2pfed.node._replay import Replay, calibrate
from p2pfed.node._restore import (
    checkpoint_body,
    forget_history,
    load_checkpoint,
    load_newest,
    missing_checkpoints,
    releases_spent,
)
from p2pfed.node._state import ComponentRound, Event, Phase, Received, transition
from p2pfed.node._unlearning import (
    MODES,
    ForgetPlan,
    forget_entry,
    plan_forget,
    plan_replay,
    plan_resume,
    stored_state,
    stored_update,
    unlearned_entry,
)
from p2pfed.privacy import Policy, privatize
from p2pfed.unlearning import FAST_STRIDE, FORGET_ENTRY, UNLEARNED_ENTRY

log = logging.getLogger(__name__)

ROUND_WINDOW = 2  # announcements up to this many rounds ahead are buffered
EARLY = 1024  # announcements of a later epoch kept until this node applies the same forget


@dataclass(frozen=True)
class NodeConfig:
    round_timeout_ms: int = 30_000
    #: a new round starts no sooner than this after the previous one started (0: at once)
    round_interval_ms: int = 0
    max_payload_bytes: int = 1 << 30
    max_skew_ms: int = 5 * 60 * 1000
    #: components this node trains locally (others are only mixed)
    trains: frozenset[str] = frozenset()
    #: keep every mixed-in payload in the blob store (needed for unlearning)
    keep_payloads: bool = True
    #: checkpoint each component every this many rounds (0: only when asked)
    checkpoint_every: int = 0
    #: per trained component, the other components in the forward passes that train it: its
    #: local update inherits their lineage (a head trained on a tainted encoder is tainted)
    forward_deps: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: fast unlearning trains one round in this many (the others re-apply stored updates)
    fast_stride: int = FAST_STRIDE
    #: differential privacy per trained component: clip and noise every released update
    privacy: Mapping[str, Policy] = field(default_factory=dict)
    #: seeds the DP noise (the daemon draws it from the OS at each start; simulations derive
    #: it from their seed)
    noise_seed: int = 0
    #: return a :class:`Mixed` action, with a copy of the state, after each mix (simulations)
    report_mixes: bool = False
    #: mixing rule per component (a name in the :mod:`p2pfed.mixing` registry); "*" for the rest
    robust: Mapping[str, str] = field(default_factory=dict)


class Node:
    """A federation member's protocol and learning logic, free of I/O."""

    def __init__(
        self,
        identity: Identity,
        federation_id: bytes,
        components: Mapping[str, FlatComponent],
        ledger: Ledger,
        blobs: BlobStore,
        config: NodeConfig | None = None,
        sequencer: Sequencer | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.federation_id = federation_id
        self.config = config or NodeConfig()
        self.ledger = ledger
        self.blobs = blobs
        self._seq = sequencer or Sequencer()
        self._replay = ReplayGuard()
        self._states = {name: ComponentRound(comp) for name, comp in components.items()}
        for st in self._states.values():
            st.lineage.add(self.peer_id)
        #: how each component mixes (a registered :class:`~p2pfed.mixing.MixingRule`)
        self._rules: dict[str, MixingRule] = {name: rule(self.rule_of(name))
                                              for name in self._states}
        self._graph: nx.Graph = nx.Graph()
        self._holders: dict[str, frozenset[str]] = {}
        self._round_limit: int | None = None
        self._started = False
        self.rejected: dict[str, int] = {}
        #: members forgotten, and how many forget requests were applied (the epoch)
        self._forgotten: set[str] = set()
        self.epoch = 0
        self._early: deque[tuple[str, bytes]] = deque(maxlen=EARLY)
        #: forget requests being applied: target -> components still replaying
        self._pending: dict[str, set[str]] = {}
        self._noise: torch.Generator | None = None

    # ---------------------------------------------------------------- inspection
    @property
    def components(self) -> dict[str, FlatComponent]:
        return {name: st.comp for name, st in self._states.items()}

    def round_of(self, component: str) -> int:
        """Number of rounds of ``component`` completed."""
        return self._states[component].round

    def phase_of(self, component: str) -> Phase:
        return self._states[component].phase

    def awaiting_update(self, component: str, round_: int) -> bool:
        """Is ``component`` waiting for its local update of ``round_`` (so free to train)?"""
        st = self._states.get(component)
        return st is not None and st.phase is Phase.TRAINING and st.round == round_

    def lineage_of(self, component: str) -> frozenset[str]:
        return frozenset(self._states[component].lineage)

    def neighbours_of(self, component: str) -> tuple[str, ...]:
        return self._states[component].neighbours

    def rule_of(self, component: str) -> str:
        """How ``component`` mixes (``NodeConfig.robust``: its own entry, else ``"*"``)."""
        return self.config.robust.get(component, self.config.robust.get("*", DEFAULT_RULE))

    def privacy_of(self, component: str) -> dict[str, Any] | None:
        """ε spent by ``component``'s released updates (None: no privacy policy)."""
        policy = self.config.privacy.get(component)
        if policy is None:
            return None
        st = self._states[component]
        return {"epsilon_spent": policy.spent(st.releases), "delta": policy.delta,
                "noise_multiplier": policy.sigma, "clip": policy.clip, "releases": st.releases,
                "budget": policy.budget or None, "exhausted": st.exhausted}

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

    def next_deadline(self) -> int | None:
        deadlines = [
            st.deadline_ms if st.phase is Phase.COLLECTING else st.start_at_ms
            for st in self._states.values()
            if st.phase in (Phase.COLLECTING, Phase.IDLE)
        ]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

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
        self._graph = graph.copy()
        self._graph.remove_nodes_from(self._forgotten)
        if self.peer_id in self._forgotten:
            self._graph = nx.Graph()  # this node's own data was forgotten: it mixes no more
        self._holders = {c: frozenset(h) - self._forgotten for c, h in holders.items()}
        for name, st in self._states.items():
            holders_c = set(self._holders.get(name, ())) | {self.peer_id}
            sub = self._graph.subgraph(n for n in holders_c if n in self._graph)
            if self.peer_id not in sub:
                st.weights, st.neighbours, st.weight_deps = {self.peer_id: 1.0}, (), frozenset()
                continue
            weights = metropolis_hastings_weights(sub, sub.nodes)
            st.weights = dict(weights[self.peer_id])
            st.neighbours = tuple(sorted(p for p in st.weights if p != self.peer_id))
            # A weight w_ij depends on the degrees of i and j: on every holder within two hops.
            st.weight_deps = frozenset(nx.single_source_shortest_path_length(sub, self.peer_id,
                                                                              cutoff=2))

    def set_round_limit(self, limit: int | None, now_ms: int) -> list[Action]:
        """Stop starting rounds at ``limit`` (None: no limit); resumes paused components."""
        self._round_limit = limit
        actions: list[Action] = []
        for name, st in self._states.items():
            if st.phase is Phase.PAUSED and (limit is None or st.round < limit):
                transition(st, Event.RESUME)
                actions += self._start_round(name, now_ms)
        return actions

    def checkpoint(self, now_ms: int,
                   components: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """Store each component's state as safetensors and record it in the ledger."""
        bodies = {}
        for name in sorted(components if components is not None else self._states):
            bodies[name] = checkpoint_body(self.blobs, name, self._states[name])
            self.ledger.append(kinds.CHECKPOINT, bodies[name], timestamp_ms=now_ms, durable=True)
        return bodies

    def restore(self) -> dict[str, int]:
        """Load each component's latest checkpoint from the ledger (before ``start``).

        Forget requests in the ledger are applied again: their members stay out, a checkpoint
        holding their influence is never loaded, and an unlearning cut short by a stop resumes
        where its last checkpoint left it (or from its rollback point).
        """
        history = forget_history(self.ledger.entries(FORGET_ENTRY),
                                 self.ledger.entries(UNLEARNED_ENTRY))
        self._forgotten |= history.forgotten
        self.epoch = max(self.epoch, history.epoch)
        latest = load_newest(self._states, self.blobs,
                             self.ledger.entries(kinds.CHECKPOINT, reverse=True),
                             self._forgotten, self.peer_id)
        private = set(self.config.privacy) & set(self._states)
        if private:
            spent = releases_spent(self.ledger.entries(kinds.LOCAL_UPDATE, reverse=True), private)
            for name, releases in spent.items():
                st = self._states[name]
                st.releases = max(st.releases, releases)  # (never given back)
        for index, body in history.unfinished:
            self._resume_forget(index, body, latest)
        return {name: body["round"] for name, (_i, body) in latest.items()}

    def _resume_forget(self, index: int, body: Mapping[str, Any],
                       latest: Mapping[str, tuple[int, Mapping[str, Any]]]) -> None:
        """Carry on an unlearning the node was stopped in the middle of."""
        pending = set()
        for step in plan_resume(index, body, latest, self._states):
            if step.rollback is not None:
                load_checkpoint(self._states[step.name], self.blobs, step.rollback, self.peer_id)
            if step.until is not None:
                self._begin_replay(step.name, body["target"], body["mode"], body["start"],
                                   step.until, index, step.keep)
                pending.add(step.name)
        self._pending[body["target"]] = pending
        log.info("%s: resuming the unlearning of %s (%s)", self.peer_id[-8:],
                 body["target"][-8:], sorted(pending))

    # ---------------------------------------------------------------- unlearning
    def forgotten(self) -> frozenset[str]:
        return frozenset(self._forgotten)

    def unlearning(self) -> dict[str, list[str]]:
        """Forgotten members whose unlearning is under way: target -> components replaying."""
        return {t: sorted(cs) for t, cs in self._pending.items()}

    def replaying(self, component: str) -> tuple[int, int] | None:
        """(round, until) while ``component`` re-runs rounds for an unlearning, else None."""
        st = self._states[component]
        return (st.round, st.replay.until) if st.replay is not None else None

    def forget(self, target: str, mode: str, now_ms: int) -> list[Action]:
        """Remove ``target``'s influence from every component it reached (once per target).

        Components whose lineage holds ``target`` (with the components their training reads)
        roll back to the latest common checkpoint free of it and re-run the rounds since, in
        ``mode`` ("exact" or "fast"); the others are not touched.  The request is recorded
        durably first, so a node stopped half-way resumes it on restart.  In a driver with a
        training thread, call this with training paused.  The planner
        (:func:`~p2pfed.node._unlearning.plan_forget`) decides; this applies its plan.
        """
        if mode not in MODES:
            raise ValueError(f"unknown unlearning mode {mode!r}")
        if target in self._forgotten:
            return []
        plan = plan_forget(
            target, mode, self_id=self.peer_id,
            lineages={c: st.lineage for c, st in self._states.items()},
            rounds={c: st.round for c, st in self._states.items()},
            trains=self.config.trains, forward_deps=self.config.forward_deps,
            checkpoints=self.ledger.entries(kinds.CHECKPOINT), forgotten=self._forgotten)
        if not plan.feasible:  # (checkpoints lost, or payloads not kept): say so, change nothing
            log.error("%s: cannot forget %s: no checkpoint free of it for %s", self.peer_id[-8:],
                      target[-8:], sorted(plan.rerun))
            self.ledger.append(kinds.FORGET_FAILED, {"target": target, "mode": mode,
                                                 "components": sorted(plan.rerun)},
                               timestamp_ms=now_ms, durable=True)
            return []
        self._apply_forget(plan, now_ms)
        actions: list[Action] = [ForgetApplied(target)]
        actions += self._maybe_finish_forget(target, now_ms)
        for name in sorted(plan.rerun):
            if self._states[name].phase is Phase.IDLE:
                actions += self._start_round(name, now_ms)
        early, self._early = list(self._early), deque(maxlen=EARLY)
        for peer, data in early:  # announcements that waited for this epoch
            actions += self.receive(peer, data, now_ms)
        return actions

    def _apply_forget(self, plan: ForgetPlan, now_ms: int) -> None:
        """Record ``plan`` durably, then roll its components back and start their re-runs."""
        assert plan.start is not None
        # components re-run only to feed the others get their present state back afterwards
        keep = self.checkpoint(now_ms, plan.fed_only)
        self.epoch += 1
        entry = self.ledger.append(FORGET_ENTRY, forget_entry(plan, self.epoch, keep, self._states),
                                   timestamp_ms=now_ms, durable=True)
        self._forgotten.add(plan.target)
        self.set_topology(self._graph, self._holders)
        for name in sorted(plan.rerun):
            st = self._states[name]
            if st.phase in (Phase.TRAINING, Phase.COLLECTING):  # (a queued Train is dropped)
                transition(st, Event.ABANDON)
            st.deadline_ms = st.start_at_ms = st.origin = None
            load_checkpoint(st, self.blobs, plan.checkpoints[name], self.peer_id)
            if plan.rounds[name] > plan.start:
                self._begin_replay(name, plan.target, plan.mode, plan.start, plan.rounds[name],
                                   entry.index, keep.get(name))
        self._pending[plan.target] = {c for c in plan.rerun if self._states[c].replay is not None}
        log.info("%s: forgetting %s (%s): rolled back %s to round %d (%s re-run only)",
                 self.peer_id[-8:], plan.target[-8:], plan.mode, sorted(plan.influenced),
                 plan.start, plan.fed_only)

    def _begin_replay(self, name: str, target: str, mode: str, start: int, until: int,
                      forget_index: int, keep: Mapping[str, Any] | None = None) -> None:
        fast = mode == "fast" and name in self.config.trains
        self._states[name].replay = plan_replay(
            self.ledger.entries(kinds.CONTRIBUTION),
            self.ledger.entries(kinds.LOCAL_UPDATE) if fast else None,
            name, target, mode, start, until, forget_index, forgotten=self._forgotten,
            stride=self.config.fast_stride, keep=keep)

    def _stored_update(self, name: str, replay: Replay, round_: int) -> torch.Tensor | None:
        """This node's own training update of ``round_`` as it was made before the request."""
        return stored_update(self.blobs, name, replay, round_, self._states[name].comp.layout,
                             self.config.max_payload_bytes)

    def _put_back(self, name: str, keep: Mapping[str, Any]) -> None:
        """A component re-run only to feed others gets its state from before the request."""
        st = self._states[name]
        kept = self.blobs.get_tensors(keep["digest"])["flat"]
        if not torch.equal(kept, st.comp.flat):  # exact re-runs reproduce it bit for bit
            log.info("%s: re-run of %s ended %.3g away from its kept state; restoring it",
                     self.peer_id[-8:], name, float((kept - st.comp.flat).abs().max()))
        st.comp.load_(kept)
        st.lineage = set(keep["lineage"]) | {self.peer_id}
        st.memory = Memory.from_record(keep)

    def _maybe_finish_forget(self, target: str, now_ms: int) -> list[Action]:
        pending = self._pending.get(target)
        if pending is None or pending:
            return []
        del self._pending[target]
        forget = next(e for e in self.ledger.entries(FORGET_ENTRY)
                      if e.body["target"] == target)
        # the unlearned states are what a restart must load: checkpoint them first
        self.checkpoint(now_ms, sorted(c for c in forget.body["components"] if c in self._states))
        self.ledger.append(UNLEARNED_ENTRY, unlearned_entry(forget.body), timestamp_ms=now_ms,
                           durable=True)
        log.info("%s: unlearning of %s done", self.peer_id[-8:], target[-8:])
        return []

    def fast_forward(self, round_: int) -> None:
        """Move paused components to ``round_`` (a member rejoining a running federation)."""
        for st in self._states.values():
            if st.phase not in (Phase.PAUSED, Phase.IDLE):
                raise AssertionError("fast_forward needs every component paused")
            if round_ > st.round:
                st.round = round_
                st.inbox.clear()

    # ---------------------------------------------------------------- driver events
    def start(self, now_ms: int) -> list[Action]:
        if self._started:
            return []
        self._started = True
        if self.config.keep_payloads:  # a clean state to roll back to, should a member go
            # newest first, so that a long ledger is read only until every component has one
            missing = missing_checkpoints(self.ledger.entries(kinds.CHECKPOINT, reverse=True),
                                          self._states)
            if missing:
                self.checkpoint(now_ms, missing)
        actions: list[Action] = []
        for target in list(self._pending):
            actions += self._maybe_finish_forget(target, now_ms)
        for name in sorted(self._states):
            actions += self._start_round(name, now_ms)
        return actions

    def tick(self, now_ms: int) -> list[Action]:
        """Advance time: complete every round whose deadline has passed, start paced ones."""
        actions: list[Action] = []
        for name in sorted(self._states):
            st = self._states[name]
            if st.phase is Phase.IDLE and st.start_at_ms is not None and now_ms >= st.start_at_ms:
                actions += self._start_round(name, now_ms)
            elif (
                st.phase is Phase.COLLECTING
                and st.deadline_ms is not None
                and now_ms >= st.deadline_ms
            ):
                actions += self._complete_round(name, now_ms)
        return actions

    def local_update_done(self, component: str, round_: int, now_ms: int) -> list[Action]:
        """Local training of ``component`` for ``round_`` has written into its flat buffer."""
        st = self._states[component]
        if st.phase is not Phase.TRAINING or st.round != round_:
            raise AssertionError(f"unexpected training result for {component} round {round_}")
        origin, st.origin = st.origin, None
        if origin is not None and st.replay is not None and st.replay.mode == "fast":
            # fast unlearning: the calibration update takes the size of the stored update
            stored = self._stored_update(component, st.replay, st.round)
            if stored is not None:
                calibrate(st.comp.flat, origin, stored)
        policy = self.config.privacy.get(component)
        if origin is not None and policy is not None:
            if self._noise is None:
                self._noise = torch.Generator().manual_seed(self.config.noise_seed)
            privatize(origin, st.comp.flat, policy, self._noise)
            st.released = True
            st.releases += 1
        for dep in sorted(self.config.forward_deps.get(component, ())):
            if dep in self._states:
                st.lineage.update(self._states[dep].lineage)
        transition(st, Event.TRAINED)
        return self._publish(component, now_ms)

    def receive(self, peer: str, data: bytes, now_ms: int) -> list[Action]:
        """A control message arrived from ``peer``.  Bad input is rejected per peer."""
        try:
            return self._receive(peer, data, now_ms)
        except RemoteError as exc:
            return self._reject(peer, exc)

    def payload_received(
        self, peer: str, component: str, round_: int, dig: bytes, data: bytes, now_ms: int
    ) -> list[Action]:
        try:
            return self._payload_received(peer, component, round_, dig, data, now_ms)
        except RemoteError as exc:
            return self._reject(peer, exc)

    def payload_failed(
        self, peer: str, component: str, round_: int, reason: str, now_ms: int
    ) -> list[Action]:
        """The fetch failed; the round completes without this peer at the deadline."""
        log.info("%s: fetch of %s round %d from %s failed: %s",
                 self.peer_id[-8:], component, round_, peer[-8:], reason)
        return []

    def serve_payload(self, dig: bytes) -> bytes | None:
        """Answer a neighbour's fetch by digest (None when unknown)."""
        return self.blobs.get(dig) if self.blobs.has(dig) else None

    # ---------------------------------------------------------------- internals
    def _reject(self, peer: str, exc: RemoteError) -> list[Action]:
        self.rejected[exc.code] = self.rejected.get(exc.code, 0) + 1
        log.debug("rejected message from %s: %s (%s)", peer[-8:], exc, exc.code)
        return [PeerRejected(peer, exc)]  # the driver logs it, a few lines per peer at most

    def _start_round(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        if self._round_limit is not None and st.round >= self._round_limit:
            transition(st, Event.LIMIT)
            return []
        if st.start_at_ms is not None and now_ms < st.start_at_ms:
            return []  # paced: tick() starts it
        interval = self.config.round_interval_ms
        st.start_at_ms = now_ms + interval if interval > 0 else None
        transition(st, Event.START)
        replay = st.replay
        trains = name in self.config.trains and (replay is None or replay.trains_at(st.round))
        policy = self.config.privacy.get(name)
        if trains and policy is not None and not policy.allows(st.releases):
            if not st.exhausted:
                log.warning("%s: the privacy budget of %s is spent (ε %.3g after %d updates); "
                            "it is no longer trained, only mixed", self.peer_id[-8:], name,
                            policy.spent(st.releases), st.releases)
            st.exhausted, trains = True, False
        if trains:
            st.trained, st.start_digest = True, b""
            if policy is not None or (replay is not None and replay.mode == "fast"):
                st.origin = st.comp.flat.clone()
            if self.config.keep_payloads:  # fast unlearning sizes its steps by these
                st.start_digest = self.blobs.put(bytes(encode_payload(
                    name, st.round, st.comp.flat, st.comp.layout)))
            return [Train(name, st.round)]
        st.trained, st.start_digest = False, b""
        if replay is not None and name in self.config.trains:
            # fast mode between calibrations: re-apply the update stored for this round
            stored = self._stored_update(name, replay, st.round)
            if stored is not None:
                st.comp.flat.add_(stored)
        transition(st, Event.TRAINED)
        return self._publish(name, now_ms)

    def _publish(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        st.deadline_ms = now_ms + self.config.round_timeout_ms
        state = self._outgoing(name, st.round, st.comp.flat)
        payload = bytes(encode_payload(name, st.round, state, st.comp.layout))
        st.own_digest = self.blobs.put(payload)
        policy = self.config.privacy.get(name)
        ann = Announcement(
            component=name,
            round=st.round,
            digest=st.own_digest,
            size=len(payload),
            degree=len(st.neighbours),
            lineage=tuple(sorted(st.lineage)),
            noise=policy.noise_std if policy is not None and st.released else 0.0,
            epoch=self.epoch,
        )
        body: dict[str, Any] = {
            "component": name, "round": st.round, "digest": st.own_digest,
            "trained": st.trained, "start": st.start_digest,
            "lineage": list(ann.lineage), "epoch": self.epoch}
        if policy is not None:
            body["dp"] = {"releases": st.releases, "epsilon": policy.spent(st.releases),
                          "delta": policy.delta, "sigma": policy.sigma, "clip": policy.clip,
                          "released": st.released}
        st.released = False
        st.noise = ann.noise
        # The ledger entry (with the privacy spent so far) precedes the send and is durable.
        self.ledger.append(kinds.LOCAL_UPDATE, body, timestamp_ms=now_ms, durable=True)
        env = seal(
            self.identity,
            kind=ANNOUNCE,
            federation_id=self.federation_id,
            seq=self._seq.next(),
            timestamp_ms=now_ms,
            body=ann.to_body(),
        )
        actions: list[Action] = []
        if st.neighbours:
            actions.append(Announce(st.neighbours, env.to_bytes()))
        if st.replay is not None:
            self._replay_history(name, st, now_ms)
        # Announcements that arrived early for this round can now be fetched.
        for (rnd, peer), rec in sorted(st.inbox.items()):
            if rnd == st.round and rec.flat is None:
                actions.append(self._fetch(peer, rec.announcement))
        return actions + self._maybe_complete(name, now_ms)

    def _outgoing(self, name: str, round_: int, state: torch.Tensor) -> torch.Tensor:
        """The update this node releases for ``round_``: its state (the simulator's Byzantine
        members, :mod:`p2pfed.sim.attacks`, send something else)."""
        return state

    def _replay_history(self, name: str, st: ComponentRound, now_ms: int) -> None:
        """Re-running a round: take the neighbours' clean updates from this node's store."""
        assert st.replay is not None
        for peer in st.neighbours:
            kept = st.replay.history.get((st.round, peer))
            rec = st.inbox.get((st.round, peer))
            if kept is None or (rec is not None and rec.flat is not None):
                continue
            data = self.blobs.get(kept.digest)
            ann = Announcement(name, st.round, kept.digest, len(data), 0, kept.lineage,
                               noise=kept.noise, epoch=self.epoch)
            st.inbox[(st.round, peer)] = Received(ann, stored_state(
                self.blobs, name, kept.digest, st.comp.layout, self.config.max_payload_bytes))
            self.ledger.append(
                kinds.CONTRIBUTION,
                {"sender": peer, "component": name, "round": st.round, "digest": kept.digest,
                 "weight": st.weights.get(peer, 0.0), "lineage": list(kept.lineage),
                 "noise": kept.noise, "kept": True},
                timestamp_ms=now_ms,
            )

    def _fetch(self, peer: str, ann: Announcement) -> Fetch:
        return Fetch(peer, ann.component, ann.round, ann.digest,
                     min(ann.size, self.config.max_payload_bytes))

    def _receive(self, peer: str, data: bytes, now_ms: int) -> list[Action]:
        env = open_envelope(
            data,
            federation_id=self.federation_id,
            now_ms=now_ms,
            max_skew_ms=self.config.max_skew_ms,
        )
        if env.sender_id != peer:
            raise NotAMemberError(f"envelope from {env.sender_id} relayed by {peer}", peer=peer)
        if env.kind != ANNOUNCE:
            return self._other_record(peer, env, now_ms)
        ann = Announcement.from_body(env.body)
        st = self._states.get(ann.component)
        if st is None or peer not in st.neighbours:
            raise NotAMemberError(
                f"{peer} is not a neighbouring holder of {ann.component!r}", peer=peer
            )
        if ann.epoch != self.epoch:
            if ann.epoch > self.epoch:  # the sender applied a forget we have not seen yet
                self._early.append((peer, data))
            return []  # an older epoch may carry a forgotten member's influence
        self._replay.check(env.sender, env.seq, env.timestamp_ms)
        if ann.size > self.config.max_payload_bytes:
            raise BadPayloadError(f"announced payload of {ann.size} bytes is over the cap")
        actions: list[Action] = []
        if ann.round > st.round + ROUND_WINDOW:
            if st.phase not in (Phase.IDLE, Phase.COLLECTING) or st.replay is not None:
                return []  # (an unlearning re-run is never cut short)
            actions += self._catch_up(ann.component, ann.round, now_ms)
        if ann.round < st.round:
            log.debug("dropping announcement of %s round %d (at %d)",
                      ann.component, ann.round, st.round)
            return actions
        key = (ann.round, peer)
        if key in st.inbox:
            return actions  # a second announcement for the same round: keep the first
        st.inbox[key] = Received(ann)
        if ann.round == st.round and st.phase is Phase.COLLECTING:
            actions.append(self._fetch(peer, ann))
        return actions

    def _other_record(self, peer: str, env: Envelope, now_ms: int) -> list[Action]:
        """Records other than announcements; subclasses (the federated node) handle more."""
        raise MalformedMessageError(f"unexpected record kind {env.kind!r}", peer=peer)

    def _catch_up(self, name: str, round_: int, now_ms: int) -> list[Action]:
        """A neighbour is well ahead (we restarted or were cut off): jump to its round."""
        st = self._states[name]
        log.info("%s: catching up from round %d to %d", name, st.round, round_)
        self.ledger.append(kinds.CATCH_UP, {"component": name, "from": st.round, "to": round_},
                           timestamp_ms=now_ms)
        st.inbox = {k: v for k, v in st.inbox.items() if k[0] >= round_}
        st.round = round_
        st.deadline_ms = None
        st.start_at_ms = None
        if st.phase is Phase.COLLECTING:
            transition(st, Event.ABANDON)
        return self._start_round(name, now_ms)

    def _payload_received(
        self, peer: str, name: str, round_: int, dig: bytes, data: bytes, now_ms: int
    ) -> list[Action]:
        st = self._states.get(name)
        rec = st.inbox.get((round_, peer)) if st is not None else None
        if st is not None and rec is None and round_ < st.round:
            # fetched in time, but the round ended before it came: late, not the sender's fault
            log.debug("dropping a late payload for %s round %d from %s (now at round %d)",
                      name, round_, peer[-8:], st.round)
            return []
        if st is None or rec is None or rec.announcement.digest != dig:
            raise BadPayloadError(f"unsolicited payload for {name} round {round_}", peer=peer)
        if len(data) > rec.announcement.size:
            raise BadPayloadError("payload is larger than announced", peer=peer)
        if digest(data) != dig:
            raise BadPayloadError("payload does not match the announced digest", peer=peer)
        decoded = decode_payload(
            data,
            max_bytes=self.config.max_payload_bytes,
            expected_component=name,
            expected_layout=st.comp.layout,
        )
        if decoded.round != round_:
            raise BadPayloadError("payload is for another round", peer=peer)
        if self.config.keep_payloads:
            self.blobs.put(data)
        rec.flat = decoded.flat
        self.ledger.append(
            kinds.CONTRIBUTION,
            {"sender": peer, "component": name, "round": round_, "digest": dig,
             "weight": st.weights.get(peer, 0.0), "lineage": list(rec.announcement.lineage),
             "noise": rec.announcement.noise},
            timestamp_ms=now_ms,
        )
        return self._maybe_complete(name, now_ms)

    def _maybe_complete(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        if st.phase is not Phase.COLLECTING:
            return []
        have = {p for (r, p), rec in st.inbox.items() if r == st.round and rec.flat is not None}
        if have.issuperset(st.neighbours):
            return self._complete_round(name, now_ms)
        return []

    def _complete_round(self, name: str, now_ms: int) -> list[Action]:
        st = self._states[name]
        present = {
            p: rec for (r, p), rec in st.inbox.items()
            if r == st.round and rec.flat is not None and p in st.neighbours
        }
        self_w, terms = effective_weights(self.peer_id, st.weights, present.keys())
        if st.scratch is None:
            st.scratch = torch.empty_like(st.comp.flat)
        if present:
            st.disagreement.append(
                _disagreement(st.comp.flat, [r.flat for r in present.values()])
            )
        neighbours = tuple(_neighbour(p, w, present[p]) for p, w in terms)
        mixed = self._rules[name].mix(MixInput(st.comp.flat, self_w, neighbours, st.memory,
                                               own_noise=st.noise, scratch=st.scratch))
        st.comp.flat.copy_(mixed.state)
        st.memory, self_w = mixed.memory, mixed.self_weight
        for p in present.values():
            st.lineage.update(p.announcement.lineage)
        st.lineage.update(st.weight_deps)
        missing = tuple(p for p in st.neighbours if p not in present)
        self.ledger.append(
            kinds.MIX,
            {"component": name, "round": st.round, "self_weight": self_w,
             "inputs": [[n.peer, w, present[n.peer].announcement.digest]
                        for n, w in zip(neighbours, mixed.weights, strict=True)],
             "missing": list(missing), "lineage": sorted(st.lineage), "epoch": self.epoch,
             "rule": self._rules[name].name, **mixed.audit},
            timestamp_ms=now_ms,
        )
        actions: list[Action] = []
        if self.config.report_mixes:
            actions.append(Mixed(name, st.round, self.epoch, st.comp.flat.detach().clone()))
        actions.append(RoundCompleted(name, st.round, tuple(sorted(present)), missing))
        st.inbox = {k: v for k, v in st.inbox.items() if k[0] > st.round}
        st.round += 1
        st.completed += 1
        st.deadline_ms = None
        every = self.config.checkpoint_every
        if every and st.round % every == 0:
            self.checkpoint(now_ms, [name])  # the state at the start of round st.round
        transition(st, Event.COMPLETE)
        if st.replay is not None and st.round >= st.replay.until:
            target, keep, st.replay = st.replay.target, st.replay.keep, None
            if keep is not None:
                self._put_back(name, keep)
            self._pending.get(target, set()).discard(name)
            actions += self._maybe_finish_forget(target, now_ms)
        return actions + self._start_round(name, now_ms)


def _neighbour(peer: str, weight: float, rec: Received) -> Neighbour:
    assert rec.flat is not None
    return Neighbour(peer, weight, rec.flat, rec.announcement.noise)


def _disagreement(own: torch.Tensor, others: list[torch.Tensor | None]) -> float:
    """Largest ‖x_j − x_i‖ / ‖x_i‖ over the neighbours' updates (a local consensus distance)."""
    scale = max(float(torch.linalg.vector_norm(own)), 1e-30)
    dists = [float(torch.linalg.vector_norm(o - own)) for o in others if o is not None]
    return max(dists, default=0.0) / scale
