"""The daemon: one institution's node on the network, run by ``p2pfed run``.

Start-up order is explicit (``nursery.start``): the home's lock is taken (a second daemon on
the same home is refused: :func:`p2pfed.home.locked_home`), the listen ports are checked free
(:mod:`p2pfed.runtime.ports`), the key is loaded (and refused when others can read it), the
ledger is opened (refused when a member's ledger is missing) and the entries appended since
its last verification are verified, the federation and checkpoints are loaded, the libp2p host
listens, the control socket answers — and only then is systemd told READY=1.
Start-up reads only the recent end of the ledger (what follows the verified mark, the newest
checkpoints), so it takes about as long at 100,000 entries as at 100 (a ledger from before the
mark is verified in full once).
While running, the daemon verifies the new entries every ``VERIFY_EVERY_S`` and ``status``
reports what it found, from memory.  SIGTERM (or SIGINT) lets the current ledger write finish
(writes are synchronous in the event loop), checkpoints every component, verifies what is left
and exits 0.  A full disk is a ``DiskFullError`` (exit code 6), never a traceback: the daemon
refuses to start when its disk cannot hold one more round, and stops when a round leaves too
little room or a write fails for lack of space (:mod:`p2pfed.runtime.diskspace`).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from gossip.envelope import Sequencer
from gossip.errors import LocalError, StorageError
from gossip.identity import Identity, load_identity
from p2pfed.config import Config
from p2pfed.federated import FederatedNode
from p2pfed.fedstore import FederationStore, next_boot_epoch
from p2pfed.home import (
    KEY_FILE,
    LEDGER_FILE,
    DiskFullError,
    MissingStateError,
    is_disk_full,
    locked_home,
    storage_error,
)
from p2pfed.ledger import Ledger, VerifyReport
from p2pfed.node import RoundCompleted
from p2pfed.profiles import resources_of
from p2pfed.runtime.control import SOCKET_NAME, catalogue_handlers, serve_control
from p2pfed.runtime.diskspace import (
    NoRoomError,
    disk_full_cause,
    disk_full_message,
    free_bytes,
    round_bytes,
    wal_room,
)
from p2pfed.runtime.driver import NodeDriver
from p2pfed.runtime.loading import (
    CHECKPOINT_EVERY,
    initial_components,
    load_node,
    needs_rebuild,
    node_config,
    reload_node,
)
from p2pfed.runtime.ports import check_listen_addresses
from p2pfed.runtime.profile import ResourceMonitor
from p2pfed.runtime.systemd import Notifier

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from gossip.membership import MembershipView
    from gossip.transport.libp2p import Libp2pTransport
    from p2pfed.model.train import LocalTrainer
    from p2pfed.runtime.metrics import MetricsServer

__all__ = ["CHECKPOINT_EVERY", "Daemon", "initial_components", "node_config", "wall_clock_ms"]

log = logging.getLogger(__name__)

VERIFY_EVERY_S = 30.0  # how often the entries appended since the last check are verified
UNLEARN_WAIT_S = 30.0  # the longest 'unlearn' waits for the node to apply the request
LEAVE_WAIT_S = 5.0  # the longest 'leave' waits for its record to go out


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Daemon:
    home: Path
    config: Config
    notifier: Notifier
    started_ms: int = 0
    metrics_port: int | None = None
    #: the bytes one more round may write (known once the node is loaded)
    round_bytes: int | None = None
    _stop: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    #: the catalogue gave the node components it lacks: rebuild it (see loading.py)
    _rebuild: trio.Event = field(default_factory=trio.Event, init=False, repr=False)
    _ready: bool = field(default=False, init=False, repr=False)
    #: why a full disk stopped the daemon (the line logged, and the error it exits with)
    _full: str | None = field(default=None, init=False, repr=False)
    #: a write failed inside a node call: its memory may be ahead of its ledger
    _torn: bool = field(default=False, init=False, repr=False)
    #: the profile's threads, memory cap and training rounds (runtime/profile.py)
    _monitor: ResourceMonitor = field(init=False, repr=False)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until SIGTERM/SIGINT (or cancelled); raises :class:`DiskFullError` with one
        clear line (a :class:`NoRoomError`) when its disk cannot hold one more round, at
        start-up or later."""
        self._stop, self._ready, self._full, self._torn = trio.Event(), False, None, False
        try:
            with locked_home(self.home):  # one daemon per home, for its whole life
                await self._run(task_status)
        except (Exception, BaseExceptionGroup) as exc:  # (a group may hold a Cancelled)
            cause = disk_full_cause(exc)
            if cause is None:
                raise
            if isinstance(cause, NoRoomError):
                raise cause from None
            outcome = "stopped" if self._ready else "refusing to start"
            raise NoRoomError(disk_full_message(self.home, self.round_bytes, outcome,
                                                failed=True)) from cause
        if self._full is not None:
            raise NoRoomError(self._full)
        log.info("stopped cleanly")

    async def _run(self, task_status: TaskStatus[None]) -> None:
        check_listen_addresses(self.config.node.listen)  # (py-libp2p would share a port)
        identity = load_identity(self.home / KEY_FILE)
        ledger_path = self.home / LEDGER_FILE
        store = FederationStore(self.home)
        member = store.exists()
        if member and not ledger_path.exists():
            raise MissingStateError(missing_ledger_message(self.home, ledger_path))
        self.started_ms = wall_clock_ms()
        self._monitor = ResourceMonitor(resources_of(self.config))
        self._monitor.start()
        with Ledger.open(ledger_path, identity, create=not member) as ledger:
            await _verify_at_start(ledger)
            view = store.view(ledger)
            node, trainer = await self._load_node(identity, ledger, view)
            self._monitor.loaded()
            self._check_room(node, "refusing to start")
            transport = _new_transport(identity, node, self.config)
            async with trio.open_nursery() as nursery:
                await self._serve(nursery, node, transport, trainer, store, task_status)
                nursery.cancel_scope.cancel()

    def _pace_gate(self, view: MembershipView) -> Callable[[int], bool] | None:
        return self._monitor.gate(max(int(self.config.rounds.interval_s * 1000),
                                      view.genesis.round_period_ms))  # (node_config's interval)

    async def _load_node(self, identity: Identity, ledger: Ledger,
                         view: MembershipView) -> tuple[FederatedNode, LocalTrainer | None]:
        """The node over the ledger (:func:`p2pfed.runtime.loading.load_node`)."""
        return await load_node(self.home, self.config, identity, ledger, view,
                               Sequencer(_boot_epoch(self.home)), self._pace_gate(view))

    async def _serve(self, nursery: trio.Nursery, node: FederatedNode, transport: Any,
                     trainer: LocalTrainer | None, store: FederationStore,
                     task_status: TaskStatus[None]) -> None:
        """Start the host, control socket and helpers, then run the node (READY=1 once it runs)
        until a signal, rebuilt whenever the task catalogue gives it new components."""
        await nursery.start(transport.run)
        handlers: dict[str, Any] = {}  # (filled for each node the daemon runs)
        nursery.start_soon(self._signalled)
        await nursery.start(serve_control, self.home / SOCKET_NAME, handlers)
        nursery.start_soon(self._verify_loop, node.ledger)
        while await self._run_node(node, transport, trainer, handlers, nursery,
                                   store if not self._ready else None, task_status):
            node, trainer, self.config = await reload_node(
                self.home, self.config, node.identity, node.ledger, node.view,
                lambda: Sequencer(_boot_epoch(self.home)), self._pace_gate(node.view))
            _bind_transport(transport, node)
            log.info("rebuilt the node: it holds %s", ", ".join(sorted(node.components)))

    async def _run_node(self, node: FederatedNode, transport: Any,
                        trainer: LocalTrainer | None, handlers: dict[str, Any],
                        outer: trio.Nursery, store: FederationStore | None,
                        task_status: TaskStatus[None]) -> bool:
        """Run one node until a signal (False) or until it should be rebuilt (True); then
        checkpoint it.  ``store``: given for the first node, which asks the bootstrap
        members in and makes the daemon ready."""
        self._rebuild = trio.Event()
        async with trio.open_nursery() as nursery:
            driver = NodeDriver(node, transport, clock_ms=wall_clock_ms,
                                trainer=self._monitor.wrap(trainer.run) if trainer else None,
                                on_actions=self._after_actions(node))
            handlers.clear()
            handlers.update(self._handlers(node, transport, driver, node.identity, trainer))
            await nursery.start(self._drive, driver)
            metrics = self._start_metrics(node, transport)
            if store is not None:
                await self._ready_now(node, transport, driver, store, outer, task_status)
            elif transport.connected_peers():  # (a rebuilt node: its view, to the neighbours)
                driver.call(node.introduce, sorted(transport.connected_peers()))
            try:
                await self._wait_for_stop()
            finally:
                if metrics is not None:
                    metrics.close()
            rebuild = self._rebuild.is_set() and not self._stop.is_set()
            if not rebuild:
                self.notifier.stopping()
            await self._checkpoint(node, driver)
            nursery.cancel_scope.cancel()
        return rebuild and not self._torn and self._full is None

    async def _ready_now(self, node: FederatedNode, transport: Any, driver: NodeDriver,
                         store: FederationStore, nursery: trio.Nursery,
                         task_status: TaskStatus[None]) -> None:
        bootstrap = store.bootstrap()
        if bootstrap:
            peers = transport.add_bootstrap(bootstrap)
            driver.call(node.introduce, peers)
        state = "member of" if node.is_member() else "asking to join"
        self.notifier.ready(f"{state} {node.view.genesis.name}; "
                            f"listening on {', '.join(transport.listen_addrs())}")
        nursery.start_soon(self.notifier.watchdog_loop)
        task_status.started()
        self._ready = True

    async def _checkpoint(self, node: FederatedNode, driver: NodeDriver) -> None:
        if self._torn:  # the ledger is whole, the node's memory may not be: no checkpoint
            log.info("not checkpointing: a restart resumes from the last checkpoint in the "
                     "ledger")
            return
        try:
            async with driver.training_paused():  # a training thread may be mid-step
                node.checkpoint(wall_clock_ms())
            _log_problem(node.ledger.verify_new())  # so that the next start has little to do
        except DiskFullError as exc:  # (each entry whole or absent: the last checkpoint holds)
            self._disk_full(exc, torn=False)

    # ---------------------------------------------------------------- a full disk
    def _need(self, node: FederatedNode) -> int:
        """The bytes one more round of ``node`` may write (see :func:`round_bytes`)."""
        neighbours = max((len(node.neighbours_of(c)) for c in node.components), default=0)
        self.round_bytes = round_bytes((c.flat.nbytes for c in node.components.values()),
                                       max(neighbours, self.config.overlay.degree),
                                       wal_room(self.home / LEDGER_FILE))
        return self.round_bytes

    def _check_room(self, node: FederatedNode, outcome: str) -> None:
        """Refuse to start when the disk cannot hold one more round."""
        if free_bytes(self.home) < self._need(node):
            raise NoRoomError(disk_full_message(self.home, self.round_bytes, outcome,
                                                failed=False))

    def _after_actions(self, node: FederatedNode) -> Callable[[Sequence[object]], None]:
        """The driver's hook: a log line per completed round; at a round boundary, rebuild the
        node if the catalogue gives it new components; stop the daemon if another round would
        not fit on the disk."""
        seen = [(node.catalogue, node.view.digest())]

        def check(actions: Sequence[object]) -> None:
            done = [a for a in actions if isinstance(a, RoundCompleted)]
            for a in done:
                total = len(a.mixed_with) + len(a.missing)
                late = f"; left out (late): {', '.join(p[-8:] for p in a.missing)}" \
                    if a.missing else ""
                log.info("round %d of %s done: mixed with %d of %d neighbour(s)%s", a.round,
                         a.component, len(a.mixed_with), total, late)
            key = (node.catalogue, node.view.digest())  # (checked once per change of these)
            if (done or key[0] is not seen[0][0]) and key != seen[0]:
                seen[0] = key
                new = needs_rebuild(node, self.config)
                if new:
                    log.info("the task catalogue gives this node %s: rebuilding it at this "
                             "round boundary", ", ".join(new))
                    self._rebuild.set()
            if self._full is None and done and free_bytes(self.home) < self._need(node):
                self._full = disk_full_message(self.home, self.round_bytes,
                                               "no new round starts, the daemon stops",
                                               failed=False)
                log.error("%s", self._full)
                self._stop.set()
        return check

    def _disk_full(self, exc: BaseException, *, torn: bool) -> None:
        """A write failed for lack of space: log it once and stop the daemon; ``torn``: it
        failed inside a node call (each ledger entry is whole or absent, but the node's memory
        may be ahead of its ledger, so it is not checkpointed)."""
        self._torn = self._torn or torn
        if self._full is None:
            self._full = disk_full_message(self.home, self.round_bytes,
                                           "rounds stopped, the daemon stops", failed=True)
            log.error("%s", self._full)
            log.debug("the write that failed: %s", exc)
        self._stop.set()

    async def _drive(self, driver: NodeDriver, *,
                     task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the driver; once it has started, a full disk in any of its tasks (a round, a
        neighbour's payload, a peer's record) stops the daemon instead of tearing it down."""
        status = _Started(task_status)
        try:
            await driver.run(task_status=status)
        except BaseExceptionGroup as group:
            cause = disk_full_cause(group)
            if cause is None or not status.done:
                raise
            self._disk_full(cause, torn=True)

    def _start_metrics(self, node: FederatedNode, transport: Any) -> MetricsServer | None:
        if not self.config.metrics.enabled:
            return None
        from p2pfed.runtime.metrics import MetricsServer

        cfg = self.config.metrics
        metrics = MetricsServer(node, lambda: len(transport.connected_peers()),
                                cfg.address, cfg.port)
        self.metrics_port = metrics.port
        return metrics

    async def _verify_loop(self, ledger: Ledger) -> None:
        """Verify the entries appended since the last check, read back from the file."""
        while ledger.problem is None:
            await trio.sleep(VERIFY_EVERY_S)
            try:
                _log_problem(await trio.to_thread.run_sync(ledger.verify_new))
            except DiskFullError as exc:  # (the verified mark could not be written)
                self._disk_full(exc, torn=False)
                return

    async def _wait_for_stop(self) -> None:
        """Return on SIGTERM or SIGINT, once a full disk stops the daemon, or when the node
        should be rebuilt."""
        async with trio.open_nursery() as nursery:
            for event in (self._stop, self._rebuild):
                nursery.start_soon(_cancel_when, event, nursery.cancel_scope)

    async def _signalled(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s: checkpointing and stopping", signal.Signals(signum).name)
                self._stop.set()
                return

    def _handlers(self, node: FederatedNode, transport: Any, driver: NodeDriver,
                  identity: Identity, trainer: LocalTrainer | None) -> dict[str, Any]:
        ledger = node.ledger

        async def status(_req: dict[str, Any]) -> dict[str, Any]:
            # from memory: the ledger is verified as it grows (start-up, _verify_loop)
            st = node.status()
            rounds = [node.completed_of(c) for c in node.components]
            connected = set(transport.connected_peers())
            st.update(
                rounds_completed=min(rounds, default=0),
                peers=len(connected & set(node.members())),
                connected=sorted(connected),
                ledger_ok=ledger.problem is None,
                ledger_entries=len(ledger),
                ledger_verified=ledger.verified,
                transport=dataclasses.asdict(transport.stats),
                listen=transport.listen_addrs(),
                uptime_s=(wall_clock_ms() - self.started_ms) / 1000,
            )
            if trainer is not None:
                st.update(training=dict(trainer.progress), model=dict(trainer.about))
            st["resources"] = self._monitor.status()
            return st

        async def peers(_req: dict[str, Any]) -> list[dict[str, Any]]:
            connected = set(transport.connected_peers())
            members = node.view.members()
            return [
                {"peer_id": m.peer_id, "connected": m.peer_id in connected,
                 "neighbour": m.peer_id in node.overlay_neighbours(),
                 "modules": sorted(m.modules), "addresses": list(m.addresses),
                 "admin": m.admin}
                for m in members.values() if m.public_key != identity.public_key
            ]

        async def unlearn(req: dict[str, Any]) -> dict[str, Any]:
            peer, mode = str(req.get("peer", "")), str(req.get("mode", "exact"))
            if node.forget_requested(peer):  # a second request would change nothing
                return {"already": True, "rolled_back": []}
            driver.call(node.request_forget, peer, mode, str(req.get("reason", ""))[:200])
            with trio.move_on_after(UNLEARN_WAIT_S):  # applied once the training thread lets go
                await driver.wait_forgotten(peer)
            applied = [u for u in node.unlearning_status() if u["target"] == peer]
            return {"rolled_back": applied[0]["rolled_back"] if applied else []}

        async def leave(req: dict[str, Any]) -> dict[str, Any]:
            if not node.is_member():  # left already (or never admitted): nothing to sign
                return {"left": False, "standing": node.standing()}
            reason = str(req.get("reason", ""))[:200]
            if req.get("forget"):
                await unlearn({"peer": node.peer_id, "mode": req.get("mode", "exact"),
                               "reason": reason})
            # the leave record is out (sent to the neighbours, gossiped) before we answer, so
            # that the operator may stop us at once
            with trio.move_on_after(LEAVE_WAIT_S):
                await driver.deliver(node.leave, reason)
            return {"left": True, "standing": node.standing()}

        return {"status": status, "peers": peers, **catalogue_handlers(node, driver, self._guarded),
                "leave": self._guarded(leave), "unlearn": self._guarded(unlearn)}

    def _guarded(self, handler: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
                 ) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
        """A control handler that drives the node: a full disk stops the daemon (the client
        gets the error)."""
        async def guarded(req: dict[str, Any]) -> dict[str, Any]:
            try:
                return await handler(req)
            except DiskFullError as exc:
                self._disk_full(exc, torn=True)
                raise
        return guarded


class _Started:
    """A task status that remembers whether the task has started."""

    def __init__(self, inner: TaskStatus[None]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self.inner.started(value)


def missing_ledger_message(home: Path, ledger_path: Path) -> str:
    return (
        f"the ledger {ledger_path} is missing, but {home} belongs to a federation "
        f"({home / 'federation'} exists). The ledger holds this node's history, its audit "
        "trail and the privacy budget it has spent: starting with a new one would lose them. "
        "Restore ledger.sqlite3 (and ledger.sqlite3-wal if there is one) from a backup; or, "
        f"to start over on purpose, move {home / 'federation'} aside and join again with a "
        "new invite ('p2pfed join TOKEN')."
    )


async def _verify_at_start(ledger: Ledger) -> None:
    """Verify the entries appended since the last verification; refuse to start on a bad one."""
    report = await trio.to_thread.run_sync(ledger.verify_new)
    if not report.ok:
        raise StorageError(
            f"ledger check failed at entry {report.first_bad_index}: {report.reason}; "
            "refusing to start (see 'p2pfed ledger verify')"
        )
    log.info("ledger: %d entries, %d verified since the last start", len(ledger),
             report.checked)


async def _cancel_when(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


def _bind_transport(transport: Any, node: FederatedNode) -> None:
    """The trust boundary: strangers get a join request's worth of the wire, no more."""
    transport.set_peer_policy(node.serves)
    transport.set_record_validator(
        lambda origin, data: node.accepts_broadcast(origin, data, wall_clock_ms()))


def _new_transport(identity: Identity, node: FederatedNode, cfg: Config) -> Libp2pTransport:
    """The libp2p host on the federation's topic, behind the node's trust boundary."""
    from gossip.transport.libp2p import Libp2pTransport

    transport = Libp2pTransport(
        identity,
        listen_addrs=list(cfg.node.listen),
        topic=f"/p2pfed/{node.federation_id.hex()}/records",
        mdns=cfg.node.mdns,
        bulk=cfg.node.bulk,
        bulk_port=cfg.node.bulk_port,
    )
    _bind_transport(transport, node)
    return transport


def _boot_epoch(home: Path) -> int:
    try:
        return next_boot_epoch(home)
    except OSError as exc:
        if is_disk_full(exc):
            raise storage_error(exc, f"cannot record the boot epoch in {home}") from exc
        raise LocalError(f"cannot record the boot epoch in {home}: {exc}") from exc


def _log_problem(report: VerifyReport) -> None:
    if not report.ok:
        log.error("ledger check failed at entry %s: %s (see 'p2pfed ledger verify')",
                  report.first_bad_index, report.reason)
