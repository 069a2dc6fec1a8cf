"""Runs every node of a topology in one process, over the memory transport, on trio's MockClock.

The nodes are the real :class:`~p2pfed.node.Node` objects driven by the real
:class:`~p2pfed.runtime.driver.NodeDriver`; only the transport (memory) and the clock (mock)
differ from the daemon.  Identities are derived from the seed, so the same seed gives the same
peer ids, the same summation order and therefore the same numbers.

:class:`Simulation` owns the scenario: rounds run freely up to the next pause point (a churn
event, the unlearning request, or every round in the lockstep education workload); there every
node waits, the events apply, and the next stretch starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch
import trio
import trio.testing

from gossip.transport.memory import MemoryNetwork
from p2pfed.journal import Forget, read
from p2pfed.model.train import LocalTrainer, TrainRequest
from p2pfed.node import Mixed, RoundCompleted
from p2pfed.profiles import PROFILES
from p2pfed.runtime.driver import NodeDriver
from p2pfed.sim.config import SLOWDOWN, SimConfig, check_config
from p2pfed.sim.education import FULL, QUICK, EducationWorkload
from p2pfed.sim.nodes import (
    SimNode,
    build_node,
    node_start,
    sim_federation_id,
    spaced,
    synthetic_trainer,
)
from p2pfed.sim.provenance import provenance_report
from p2pfed.sim.report import PhaseProgress, build_report, fairness_report, task_report
from p2pfed.sim.topology import ChurnEvent
from p2pfed.sim.trace import Trace

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own types
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)


def pause_rounds(config: SimConfig, education: bool, also: Iterable[int] = ()) -> list[int]:
    """The rounds before which every node pauses (the last stretch ends at ``config.rounds``);
    ``also``: where the run measures something (free-running education)."""
    stops = sorted({e.round for e in config.topology.churn if 0 < e.round < config.rounds}
                   | {r for r in also if 0 < r < config.rounds})
    if education and config.lockstep:
        stops = list(range(1, config.rounds))  # lockstep: train, exchange, mix, repeat
    if config.unlearn is not None and 0 < config.unlearn[1] < config.rounds:
        stops = sorted({*stops, config.unlearn[1]})
    return stops


@contextlib.contextmanager
def seeded_scheduler(seed: int) -> Iterator[None]:
    """Trio's scheduler, seeded: trio runs each batch of ready tasks forwards or backwards at
    random (to shake out ordering bugs), from a module-level generator that only Hypothesis
    seeds.  The simulator seeds it for the run, so the order in which nodes act, and what an
    attacker reading its neighbours' live states sees, repeat with the seed."""
    # (the generator trio's Hypothesis plugin registers; private, hence looked up with care)
    generator = getattr(importlib.import_module("trio._core._run"), "_r", None)
    if not isinstance(generator, random.Random):
        log.warning("trio's scheduler cannot be seeded here: task order may vary between runs")
        yield
        return
    saved = generator.getstate()
    generator.seed(f"p2pfed-sim-scheduler/{seed}")
    try:
        yield
    finally:
        generator.setstate(saved)


class Simulation:
    def __init__(self, config: SimConfig, edu: EducationWorkload | None = None,
                 on_phase: PhaseProgress | None = None, curve: bool = True) -> None:
        """``on_phase(phase, done, total)`` hears of the phases that are not rounds of the run
        (loading the education data; the baselines), for a progress display; ``curve``:
        measure the education accuracy curve (a study's comparison run need not)."""
        check_config(config)
        self.config = config
        self.on_phase = on_phase
        self.curve = curve
        self.topo = config.topology
        self.network = MemoryNetwork()
        self.trace = Trace(self.topo.holders)
        #: nothing settles before the unlearning: its re-run replaces the rounds before it
        self.trace.hold = config.unlearn is not None
        self.federation_id = sim_federation_id(self.topo, config.seed)
        self.nodes: dict[str, SimNode] = {}
        self.by_peer: dict[str, str] = {}
        self._progress = trio.Event()
        self._graph = self.topo.graph.copy()
        self._absent = set(self.topo.initially_absent()) | config.absent
        self.edu = edu
        self.trainers: dict[str, LocalTrainer] = {}
        #: continual learning: the members' mean test accuracy per task at the end of each
        #: phase, as (the phase's last round + 1, accuracy per task)
        self.phase_accuracy: list[tuple[int, dict[str, float]]] = []
        #: the rounds those are measured at (a study may set the ends of another schedule)
        self.phase_ends: set[int] = set() if config.continual is None else {
            end for _, end in config.continual[0].phases(config.rounds)}
        #: per node: rounds completed (of its furthest component) and the simulated time of
        #: its last mix
        self.completed: dict[str, tuple[int, float]] = {}
        #: per node: the simulated time its first round completed
        self.first_completed: dict[str, float] = {}
        #: per (node, component): rounds completed, and the simulated times of its first and
        #: last completed round (the pace of each component, not only the furthest)
        self.component_pace: dict[tuple[str, str], tuple[int, float, float]] = {}
        #: per (node, neighbour): rounds whose mix used the neighbour's state, and rounds that
        #: went on without it
        self.heard: dict[tuple[str, str], list[int]] = {}
        #: education: the members' mean test accuracy per task after each of the settings'
        #: curve rounds
        self.accuracy_curve: list[dict[str, float]] = []
        if config.workload == "education" and edu is None:
            if on_phase is not None:
                on_phase("education: loading data and models", 0, 1)
            settings = config.education or (QUICK if config.quick else FULL)
            settings = dataclasses.replace(settings, rounds=config.rounds, groups=config.groups,
                                           objective=config.fairness, tilt=config.tilt)
            self.edu = EducationWorkload(self.topo, config.seed, settings,
                                         backdoor=config.unlearn[0] if config.unlearn else None)
        #: node-rounds of work per phase ("run", "unlearn"): training, or mixing when the
        #: workload does not train
        self._phase = "run"
        self.work: dict[str, set[tuple[str, int, int]]] = {"run": set(), "unlearn": set()}
        self.unlearning: dict[str, Any] = {}
        self._forgotten: str | None = None
        #: per node, the components its unlearning rolled back (after run())
        self.rolled_back: dict[str, list[str]] = {}
        #: per node, the most bytes its ledger and blobs held after a round (with retention)
        self.peak_bytes: dict[str, int] = {}
        #: Byzantine nodes, evenly spaced in the node order
        self.byzantine = spaced(self.topo.nodes, config.attack[1] if config.attack else 0)
        #: nodes that add the larger DP noise
        self.noisy = spaced(self.topo.nodes, config.dp_noisy[0] if config.dp_noisy else 0)
        if self.edu is not None and config.attack and config.attack[0] == "label-flip":
            for name in self.byzantine:
                self.edu.flip_labels(name)
        for index, name in enumerate(self.topo.nodes):
            self.nodes[name] = self._make_node(index, name)

    # ---------------------------------------------------------------- set-up
    def _make_node(self, index: int, name: str) -> SimNode:
        trainer = None
        if self.edu is not None:
            trainer = self.trainers[name] = self.edu.trainer(
                name, index, continual=self.config.continual,
                objective=(self.config.fairness, self.config.tilt))
            allowed = PROFILES[self.config.profiles.get(name, "server")].trains
            if allowed is not None:  # (the profile's: a phone trains heads and prompts only)
                trainer.only = frozenset(c for c in trainer.model.held if c.startswith(allowed))
        start = node_start(self.config, index, name, trainer)
        if name not in self._absent:  # (the starting mean and spread are the present holders')
            for comp, flat in start.components.items():
                self.trace.record_initial(comp, flat.flat)
        sn = build_node(self.config, name, self.federation_id, start,
                        byzantine=name in self.byzantine, noisy=name in self.noisy,
                        loss_of=trainer.loss_of if trainer is not None else None,
                        honest=lambda component: self._honest_states(name, component))
        self.by_peer[sn.identity.peer_id] = name
        return sn

    def _honest_states(self, name: str, component: str) -> list[torch.Tensor]:
        """The states of ``name``'s honest neighbours that hold ``component`` (what some
        attackers read)."""
        return [self.nodes[n].node.components[component].flat
                for n in self._graph.neighbors(name)
                if n not in self.byzantine and component in self.nodes[n].node.components]

    def _observe(self, name: str, actions: Sequence[object]) -> None:
        """Every batch of a node's actions: record its mixed states, wake the run loop."""
        for action in actions:
            if isinstance(action, RoundCompleted):
                now = trio.current_time()
                done, first, _ = self.component_pace.get((name, action.component), (0, now, now))
                self.component_pace[name, action.component] = (max(done, action.round + 1),
                                                               first, now)
                for peers, k in ((action.mixed_with, 0), (action.missing, 1)):
                    for peer in peers:
                        self.heard.setdefault((name, self.by_peer.get(peer, peer)), [0, 0])[k] += 1
            if isinstance(action, Mixed):
                done, _ = self.completed.get(name, (0, 0.0))
                self.first_completed.setdefault(name, trio.current_time())
                self.completed[name] = (max(done, action.round + 1), trio.current_time())
                if self.edu is None:
                    self.work[self._phase].add((name, action.epoch, action.round))
                if self.trace.record(action.component, action.round, name, action.state):
                    self.trace.settle(action.component, self._live_names())
                if self.config.retention is not None:  # (the peak: just before a pruning)
                    used = self.nodes[name].node.storage()["bytes"]
                    self.peak_bytes[name] = max(self.peak_bytes.get(name, 0), used)
        self._progress.set()

    def _live_names(self) -> list[str]:
        return [n for n, sn in self.nodes.items() if sn.live]

    def _peer(self, name: str) -> str:
        return self.nodes[name].identity.peer_id

    def _push_topology(self) -> None:
        """Give every live node the current overlay and holder sets (instant membership gossip)."""
        live = {n for n, sn in self.nodes.items() if sn.live}
        sub = self._graph.subgraph(live)
        graph = nx.relabel_nodes(nx.Graph(sub), {n: self._peer(n) for n in sub.nodes})
        holders = {
            c: [self._peer(n) for n in hs if n in live] for c, hs in self.topo.holders.items()
        }
        for sn in self.nodes.values():
            if sn.live:
                sn.node.set_topology(graph, holders)

    # ---------------------------------------------------------------- running
    async def _run_node(self, sn: SimNode, *, task_status: TaskStatus[None]) -> None:
        transport = self.network.attach(sn.identity.peer_id)
        trainer = self.trainers.get(sn.name)

        def train(request: TrainRequest) -> None:
            assert trainer is not None
            if not math.isnan(trainer.run(request)):
                self.work[self._phase].add((sn.name, request.epoch, request.round))

        run: Callable[[TrainRequest], None] | None = train if trainer is not None else None
        if self.config.updates is not None:  # (consensus: counted as mixing, as without)
            run = synthetic_trainer(self.config, sn)
        sn.driver = NodeDriver(sn.node, transport,
                               on_actions=lambda actions: self._observe(sn.name, actions),
                               trainer=run,
                               train_inline=True, train_delay_s=self.config.train_s
                               * SLOWDOWN[self.config.profiles.get(sn.name, "server")])
        with trio.CancelScope() as scope:
            sn.scope = scope
            await sn.driver.run(task_status=task_status)

    async def _start(self, nursery: trio.Nursery, sn: SimNode) -> None:
        sn.live = True
        await nursery.start(self._run_node, sn)

    def _stop(self, sn: SimNode) -> None:
        sn.live = False
        if sn.scope is not None:
            sn.scope.cancel()
        self.network.detach(sn.identity.peer_id)

    def _apply(self, event: ChurnEvent, now_round: int) -> list[SimNode]:
        """Apply one churn event; returns nodes to (re)start."""
        to_start: list[SimNode] = []
        if event.action == "leave":
            sn = self.nodes[event.node]
            if sn.live:
                self._stop(sn)
        elif event.action == "join":
            sn = self.nodes[event.node]
            if not sn.live and event.node not in self.config.absent | self.forgotten():
                sn.node.fast_forward(now_round)
                to_start.append(sn)
        elif event.action == "fail-link":
            a, b = event.link
            self._graph.remove_edge(a, b)
            self.network.fail_link(self._peer(a), self._peer(b))
        elif event.action == "restore-link":
            a, b = event.link
            self._graph.add_edge(a, b)
            self.network.restore_link(self._peer(a), self._peer(b))
        log.info("round %d: %s %s%s", now_round, event.action, event.node, event.link)
        return to_start

    async def _main(self) -> None:
        cfg = self.config
        async with trio.open_nursery() as nursery:
            for name, sn in self.nodes.items():
                if name not in self._absent:
                    sn.live = True
            self._push_topology()
            for sn in self.nodes.values():
                if sn.live:
                    sn.node.set_round_limit(0, 0)
                    await self._start(nursery, sn)
            done = 0
            measured = self.phase_ends | set(self.edu.settings.curve_rounds() if self.edu
                                             and self.curve else ())
            for limit in [*pause_rounds(cfg, self.edu is not None, measured), cfg.rounds]:
                # rounds before `limit` run freely; then everyone pauses for the churn events
                for sn in self.nodes.values():
                    if sn.live and sn.driver is not None:
                        sn.driver.call(sn.node.set_round_limit, limit)
                await self._report_progress_until(limit, done)
                done = limit
                if cfg.unlearn is not None and cfg.unlearn[1] == limit:
                    await self._unlearn(*cfg.unlearn)
                await self._churn(nursery, limit)
                if self.curve and self.edu is not None \
                        and limit in self.edu.settings.curve_rounds():
                    self.accuracy_curve.append(self.edu.accuracy(self.final_trainers()))
                if self.edu is not None and limit in self.phase_ends:
                    self.phase_accuracy.append((limit, self.edu.accuracy(self.final_trainers())))
            for sn in self.nodes.values():
                if sn.live:
                    self._stop(sn)
            nursery.cancel_scope.cancel()

    async def _churn(self, nursery: trio.Nursery, limit: int) -> None:
        """Apply the churn events of round ``limit`` (none at the end of the run)."""
        restart: list[SimNode] = []
        events = [e for e in self.topo.churn if e.round == limit and limit < self.config.rounds]
        if not events:
            return  # (every node recomputes its placement on a push: O(nodes) each)
        for event in events:
            restart += self._apply(event, limit)
        for sn in restart:
            sn.live = True
        self._push_topology()
        for sn in restart:
            sn.node.set_round_limit(limit, 0)
            await self._start(nursery, sn)

    def forgotten(self) -> set[str]:
        return {self._forgotten} if self._forgotten is not None else set()

    async def _unlearn(self, name: str, round_: int) -> None:
        """The member ``name`` leaves and every node forgets it, in lockstep (exact replay)."""
        live = [sn for sn in self.nodes.values() if sn.live and sn.name != name]
        if self.edu is not None and self.edu.triggered is not None:
            self.unlearning["backdoor_success_before"] = self.edu.backdoor_success(
                {sn.name: self.trainers[sn.name] for sn in live})
        self._forgotten = name
        if self.nodes[name].live:
            self._stop(self.nodes[name])
        self._push_topology()
        self._phase = "unlearn"
        self.unlearning["requested_at_round"] = round_
        target = self._peer(name)
        for sn in live:
            assert sn.driver is not None
            sn.driver.call(sn.node.forget, target, self.config.unlearn_mode)
        replays = [sn.node.replaying(c) for sn in live for c in sn.node.components]
        first = min((r[0] for r in replays if r is not None), default=round_)
        for limit in range(first + 1, round_ + 1):
            for sn in live:
                assert sn.driver is not None
                sn.driver.call(sn.node.set_round_limit, limit)
            await self._report_progress_until(limit, limit - 1)
        self._phase = "run"
        unfinished = [sn.name for sn in live if sn.node.unlearning()]
        if unfinished:
            raise AssertionError(f"unlearning did not finish at {unfinished}")
        self.trace.hold = False
        self.trace.settle_all(self._live_names())

    async def _report_progress_until(self, limit: int, done: int) -> None:
        progress = self.config.progress
        while True:
            live = [sn.node for sn in self.nodes.values() if sn.live]
            if progress is not None and live:
                current = min(min((n.round_of(c) for c in n.components), default=limit)
                              for n in live)
                progress(max(current, done), self.config.rounds)
            if all(n.idle() for n in live):
                self.trace.settle_all(self._live_names())
                return
            self._progress = trio.Event()
            await self._progress.wait()

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        self.trace.begin()
        with seeded_scheduler(self.config.seed):
            trio.run(self._main, clock=trio.testing.MockClock(autojump_threshold=0))
        self.trace.hold = False
        self.trace.settle_all()
        for sn in self.nodes.values():
            for entry in read(sn.node.ledger.entries(Forget.KIND), Forget):
                self.rolled_back[sn.name] = list(entry.record.influenced)
        tasks = None
        if self.edu is not None:
            tasks = task_report(self.edu, self.topo, self.final_trainers(),
                                self.config.baselines,
                                self.accuracy_curve if self.curve else None, self.on_phase)
        storage = None if self.config.retention is None else {
            "peak_bytes": max(self.peak_bytes.values(), default=0),
            "peak_bytes_per_node": dict(sorted(self.peak_bytes.items())),
            "final": {n: sn.node.storage() for n, sn in sorted(self.nodes.items())}}
        report = build_report(self.config, self.trace, absent=self._absent, storage=storage,
                              network=self.network, noisy=self.noisy,
                              nodes={name: sn.node for name, sn in self.nodes.items()},
                              wall_s=time.perf_counter() - start)
        prov = provenance_report(self.nodes, set(self.nodes) - self.config.absent
                                 - self.forgotten())
        if prov is not None:
            report["provenance"] = prov
        for sn in self.nodes.values():  # (the report reads each node's storage status)
            sn.ledger.close()
        if tasks is not None:
            report["tasks"] = tasks
        if self.edu is not None and self.edu.settings.groups:
            report["fairness"] = fairness_report(self.edu, self.final_trainers(), self.config)
        if self.edu is not None and self.config.explain:
            from p2pfed.sim.explain import explain_report  # (captum: only when asked)

            if self.on_phase is not None:
                self.on_phase(f"explaining {self.config.explain} examples per task", 0, 1)
            report["explain"] = explain_report(self.edu, self.final_trainers(),
                                               self.config.explain, self.config.seed, prov)
        if self.edu is not None:  # (what each component is trained for: the summary's columns)
            for comp, row in report["components"].items():
                row["tasks"] = [t.name for t in self.edu.spec.tasks_using(comp)]
        return report

    def final_trainers(self) -> dict[str, LocalTrainer]:
        """The trainers of the nodes that end the run as members (not left out, not forgotten)."""
        gone = self.config.absent | self.forgotten()
        return {n: t for n, t in self.trainers.items() if n not in gone}

    def final_states(self) -> dict[tuple[str, str], torch.Tensor]:
        gone = self.config.absent | self.forgotten()
        return {(n, c): flat.flat for n, sn in self.nodes.items() if n not in gone
                for c, flat in sn.node.components.items()}
