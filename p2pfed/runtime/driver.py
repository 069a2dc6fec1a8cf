"""Drives a sans-IO :class:`~p2pfed.node.Node` over a transport with trio.

This is the only place where node actions meet I/O, and it is shared by the daemon and the
simulator, so the two cannot drift apart: the simulator passes a memory transport and a clock
read from trio's (mock) clock, the daemon a libp2p transport and the wall clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from gossip.errors import P2PFedError, RemoteError
from gossip.transport.base import Transport
from gossip.transport.limits import LogLimiter, LogVerdict
from p2pfed.model.train import TrainRequest
from p2pfed.node import (
    Action,
    Announce,
    ApplyForget,
    Broadcast,
    Connect,
    Fetch,
    ForgetApplied,
    Node,
    PeerRejected,
    RoundCompleted,
    Train,
)

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own types
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

#: payload fetches from one peer at once (its later rounds queue behind the one in flight)
FETCHES_PER_PEER = 1
MAX_PEER_LIMITERS = 4096
#: refused messages logged per peer a minute (the node counts all of them in ``rejected``)
REJECT_LOG_LINES = 5
#: what no honest peer sends (a late or duplicate message, or an announcement of a member we
#: have not heard of yet, can come from an honest one: not counted)
MISBEHAVIOUR = frozenset({"malformed", "oversized", "forged", "tampered", "wrong-federation",
                          "unauthorized", "bad-payload"})

#: payload fetches one driver runs at once (the rest wait their turn)
MAX_FETCHES = 8

#: Carries out one request of the node's to train (in a worker thread, in the daemon), writing
#: into the flat buffers; everything it needs from the node is in the request.
Trainer = Callable[[TrainRequest], object]


def trio_clock_ms() -> int:
    """Milliseconds on trio's clock (a MockClock in simulations)."""
    return int(trio.current_time() * 1000)


class NodeDriver:
    """Owns the tasks of one node: receiving, timers, sends, fetches, training."""

    def __init__(
        self,
        node: Node,
        transport: Transport,
        *,
        clock_ms: Callable[[], int] = trio_clock_ms,
        trainer: Trainer | None = None,
        train_inline: bool = False,
        train_delay_s: float = 0.0,
        on_actions: Callable[[Sequence[object]], None] | None = None,
        max_fetches: int = MAX_FETCHES,
    ) -> None:
        self.node = node
        self.transport = transport
        self.clock_ms = clock_ms
        self.trainer = trainer
        #: run training in the event loop, in action order (the simulator: deterministic);
        #: otherwise in a worker thread, one at a time (the daemon: the loop never blocks)
        self.train_inline = train_inline
        #: inline training: the seconds (on trio's clock) a training takes before its update
        #: is done (the simulator's compute model; 0: at once)
        self.train_delay_s = train_delay_s
        self._train_lock = trio.Lock()
        self.training_failures = 0
        self.on_actions = on_actions
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        #: a flood of announcements queues its fetches here instead of opening them all; each
        #: peer first takes its own slot, so a slow (or hostile) neighbour holds at most one of
        #: the shared ones and never starves the others
        self.fetch_limiter = trio.CapacityLimiter(max_fetches)
        self._peer_fetches: dict[str, trio.CapacityLimiter] = {}
        #: who waits for a member to be forgotten (see :meth:`wait_forgotten`)
        self._forgetting: dict[str, trio.Event] = {}
        self._reject_log = LogLimiter(lines=REJECT_LOG_LINES, period_s=60.0)
        transport.set_payload_server(node.serve_payload)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._timer_loop)
            self.call(self.node.start)
            task_status.started()

    def call(self, method: Callable[..., Sequence[Any]], *args: object) -> Sequence[Any]:
        """Call a node method with the current time appended, then carry out its actions."""
        actions = method(*args, self.clock_ms())
        self._execute(actions)
        return actions

    async def deliver(self, method: Callable[..., Sequence[Any]], *args: object) -> Sequence[Any]:
        """Like :meth:`call`, but returns once the messages the call sends are out (delivered,
        or failed): a member that leaves tells its neighbours before it is stopped."""
        actions = method(*args, self.clock_ms())
        sends = [a for a in actions if isinstance(a, Announce | Broadcast)]
        self._execute([a for a in actions if not isinstance(a, Announce | Broadcast)])
        async with trio.open_nursery() as nursery:
            self._start_sends(nursery, sends)
        return actions

    async def wait_forgotten(self, target: str) -> None:
        """Return once the node has applied the forgetting of ``target`` (at once if it has)."""
        if target in self.node.forgotten():
            return
        await self._forgetting.setdefault(target, trio.Event()).wait()

    # ---------------------------------------------------------------- internals
    def _start_sends(self, nursery: trio.Nursery, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Announce):
                for peer in action.recipients:
                    nursery.start_soon(self._send, peer, action.data)
            elif isinstance(action, Broadcast):
                nursery.start_soon(self._broadcast, action.data)

    def _execute(self, actions: Sequence[Action]) -> None:
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("driver is not running")
        for action in actions:
            if isinstance(action, Announce | Broadcast):
                self._start_sends(nursery, [action])
            elif isinstance(action, Fetch):
                nursery.start_soon(self._fetch, action)
            elif isinstance(action, Train):
                if self.train_inline:
                    self._train_now(action)
                else:
                    nursery.start_soon(self._train, action)
            elif isinstance(action, Connect):  # the members changed
                self.transport.set_wanted_peers(dict(action.peers))
                self.transport.membership_changed()
            elif isinstance(action, ApplyForget):
                if self.train_inline:
                    self.call(self.node.forget, action.target, action.mode)
                else:
                    nursery.start_soon(self._forget, action)
            elif isinstance(action, ForgetApplied):
                waiting = self._forgetting.pop(action.target, None)
                if waiting is not None:
                    waiting.set()
            elif isinstance(action, PeerRejected):
                self._rejected(action)
            elif isinstance(action, RoundCompleted):
                log.debug("%s round %d done (missing %s)",
                          action.component, action.round, action.missing)
        self._wake.set()
        if self.on_actions is not None:
            self.on_actions(actions)

    def _rejected(self, action: PeerRejected) -> None:
        """Log a peer's refused message (a few lines per peer a minute) and tell the transport
        of bad input no honest peer sends, so that a peer that keeps at it is cut off."""
        if action.error.code in MISBEHAVIOUR:
            self.transport.misbehaved(action.peer, action.error.code)
        verdict, suppressed = self._reject_log.check(action.peer, self.clock_ms() / 1000)
        if verdict is LogVerdict.DROP:
            return
        if suppressed:
            log.warning("(%d more messages from %s were refused)", suppressed, action.peer[-8:])
        log.warning("refused a message from %s: %s (%s)", action.peer[-8:], action.error,
                    action.error.code)

    async def _send(self, peer: str, data: bytes) -> None:
        try:
            await self.transport.send(peer, data)
        except RemoteError as exc:
            log.info("send to %s failed: %s", peer[-8:], exc)
            self.call(self.node.send_failed, peer, data)  # (sent again when it is back)

    async def _broadcast(self, data: bytes) -> None:
        try:
            await self.transport.broadcast(data)
        except RemoteError as exc:
            log.info("broadcast failed: %s", exc)

    def _peer_limiter(self, peer: str) -> trio.CapacityLimiter:
        limiter = self._peer_fetches.get(peer)
        if limiter is None:
            if len(self._peer_fetches) >= MAX_PEER_LIMITERS:  # forget idle ones
                self._peer_fetches = {p: lim for p, lim in self._peer_fetches.items()
                                      if lim.borrowed_tokens or lim.statistics().tasks_waiting}
            limiter = self._peer_fetches[peer] = trio.CapacityLimiter(FETCHES_PER_PEER)
        return limiter

    async def _fetch(self, fetch: Fetch) -> None:
        try:
            async with self._peer_limiter(fetch.peer), self.fetch_limiter:
                data = await self.transport.fetch(fetch.peer, fetch.digest, fetch.max_bytes)
        except RemoteError as exc:
            self.call(self.node.payload_failed, fetch.peer, fetch.component, fetch.round,
                      str(exc))
            return
        self._execute(self.node.payload_received(
            fetch.peer, fetch.component, fetch.round, fetch.digest, data, self.clock_ms()
        ))

    def _trainer(self, train: Train) -> Trainer:
        if self.trainer is None:
            raise P2PFedError(f"{train.component} is set to train but no trainer is configured")
        return self.trainer

    def _request(self, train: Train) -> TrainRequest:
        """The request for ``train``, with what the node says now: which other components wait
        for their update of the same round (so may train with it), and its forget count."""
        node = self.node
        ready = frozenset(c for c in node.config.trains
                          if c != train.component and node.awaiting_update(c, train.round))
        return TrainRequest(train.component, train.round, ready, node.epoch, train.steps,
                            train.objective)

    def _train_now(self, train: Train) -> None:
        self._trainer(train)(self._request(train))
        if self.train_delay_s > 0.0 and self._nursery is not None:
            self._nursery.start_soon(self._done_after, train, self.train_delay_s)
        else:
            self.call(self.node.local_update_done, train.component, train.round)

    async def _done_after(self, train: Train, seconds: float) -> None:
        await trio.sleep(seconds)
        if self.node.awaiting_update(train.component, train.round):  # (not rolled back)
            self.call(self.node.local_update_done, train.component, train.round)

    @asynccontextmanager
    async def training_paused(self) -> AsyncIterator[None]:
        """No training thread writes into a buffer while this is held (consistent checkpoints)."""
        async with self._train_lock:
            yield

    async def _forget(self, action: ApplyForget) -> None:
        async with self.training_paused():  # rolling back under a training thread would tear
            self.call(self.node.forget, action.target, action.mode)

    async def _train(self, train: Train) -> None:
        trainer = self._trainer(train)
        async with self._train_lock:
            if not self.node.awaiting_update(train.component, train.round):
                log.info("dropping training of %s for round %d: rolled back meanwhile",
                         train.component, train.round)
                return
            request = self._request(train)  # read on the event loop, never from the thread
            try:
                await trio.to_thread.run_sync(trainer, request)
            except Exception:  # a bad batch or a model bug must not stop the daemon
                log.exception("training %s for round %d failed; publishing its state as it is",
                              train.component, train.round)
                self.training_failures += 1
        self.call(self.node.local_update_done, train.component, train.round)

    async def _receive_loop(self) -> None:
        async for peer, data in self.transport.incoming:
            self.call(self.node.receive, peer, data)

    async def _timer_loop(self) -> None:
        while True:
            wake = self._wake = trio.Event()
            deadline = self.node.next_deadline()
            delay = math.inf if deadline is None else max(0, deadline - self.clock_ms()) / 1000
            with trio.move_on_after(delay):
                await wake.wait()
            deadline = self.node.next_deadline()
            if deadline is not None and self.clock_ms() >= deadline:
                self.call(self.node.tick)
