"""Runs every node of a topology in one process, over the memory transport, on trio's MockClock.

The nodes are the real :class:`~p2pfed.node.Node` objects driven by the real
:class:`~p2pfed.runtime.driver.NodeDriver`; only the transport (memory) and the clock (mock)
differ from the daemon.  Identities are derived from the seed, so the same seed gives the same
peer ids, the same summation order and therefore the same numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np
import torch
import trio
import trio.testing

from gossip.catalog import ComponentSpec
from gossip.envelope import digest
from gossip.errors import ConfigError
from gossip.identity import Identity, create_identity
from gossip.transport.memory import MemoryNetwork
from p2pfed import mixing
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.consensus import (
    metropolis_hastings_weights,
    rounds_to_epsilon_bound,
    slem,
    weight_matrix,
)
from p2pfed.ledger import Ledger
from p2pfed.model.train import LocalTrainer, TrainRequest
from p2pfed.node import Mixed, Node, NodeConfig, status_of
from p2pfed.privacy import Policy
from p2pfed.runtime.driver import NodeDriver
from p2pfed.sim.attacks import ATTACKS, ByzantineNode, forgery
from p2pfed.sim.education import FULL, QUICK, EducationSettings, EducationWorkload
from p2pfed.sim.topology import ChurnEvent, Topology
from p2pfed.unlearning import FORGET_ENTRY

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own types
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

EPSILON = 1e-6
WORKLOADS = ("consensus", "education")


@dataclass
class SimConfig:
    topology: Topology
    workload: str = "consensus"
    rounds: int = 100
    seed: int = 0
    home: Path | None = None
    #: parameters per component in the consensus workload
    dim: int = 32
    round_timeout_ms: int = 10_000
    progress: Callable[[int, int], None] | None = None
    #: education workload: the quick settings (a few minutes) instead of the full ones
    quick: bool = False
    education: EducationSettings | None = None
    #: (node, round): run with the node, ask to forget it once ``round`` rounds are done, and
    #: compare with the same federation run without it from the start
    unlearn: tuple[str, int] | None = None
    unlearn_mode: str = "exact"
    #: nodes left out from the start (the run an unlearning is compared with)
    absent: frozenset[str] = frozenset()
    #: education: also train the local-only and centralized baselines
    baselines: bool = True
    #: differential privacy for every trained component (education)
    dp: Policy | None = None
    #: (count, sigma): that many evenly spaced nodes add more noise, multiplier sigma instead of
    #: ``dp``'s (heterogeneous budgets; needs ``dp``)
    dp_noisy: tuple[int, float] | None = None
    #: (kind, count): that many evenly spaced nodes are Byzantine (see ATTACKS)
    attack: tuple[str, int] | None = None
    #: the mixing rule of every component at the honest nodes (a name in p2pfed.mixing)
    robust: str = "mh"


@dataclass
class _SimNode:
    name: str
    identity: Identity
    node: Node
    ledger: Ledger
    driver: NodeDriver | None = None
    scope: trio.CancelScope | None = None
    live: bool = False


@dataclass
class _Trace:
    """States after each round, per component: round -> node name -> float64 vector."""

    initial: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    rounds: dict[str, dict[int, dict[str, np.ndarray]]] = field(default_factory=dict)


def sim_identity(seed: int, name: str) -> Identity:
    """A deterministic identity for a simulated node (never use this for a real node)."""
    return Identity.from_seed(digest(f"p2pfed-sim/{seed}/{name}".encode()))


def sim_federation_id(topology: Topology, seed: int) -> bytes:
    return digest(f"p2pfed-sim-federation/{topology.name}/{seed}".encode())


def _initial_values(seed: int, node_index: int, comp_index: int, dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + node_index * 1009 + comp_index)
    return torch.randn(dim, generator=gen, dtype=torch.float64)


def _spaced(nodes: Sequence[str], count: int) -> list[str]:
    """``count`` nodes evenly spaced in ``nodes``' order (the first among them), sorted."""
    return sorted({nodes[i * len(nodes) // count] for i in range(count)})


class Simulation:
    def __init__(self, config: SimConfig, edu: EducationWorkload | None = None) -> None:
        if config.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {config.workload!r}")
        unknown = sorted(config.absent - set(config.topology.nodes))
        if config.unlearn is not None and config.unlearn[0] not in config.topology.nodes:
            unknown.append(config.unlearn[0])
        if unknown:
            raise ConfigError(f"no node {', '.join(unknown)} in topology "
                              f"{config.topology.name}")
        if config.robust not in mixing.names():
            raise ConfigError(f"unknown aggregation rule {config.robust!r}; "
                              f"choose from {', '.join(mixing.names())}")
        if config.dp_noisy is not None:
            count, sigma = config.dp_noisy
            if config.dp is None or not 0 < count < len(config.topology.nodes) or not (
                    math.isfinite(sigma) and sigma > 0.0):
                raise ConfigError(f"bad noisy nodes {count}:{sigma}: needs a DP level, a count "
                                  f"in 1..{len(config.topology.nodes) - 1} and a sigma > 0")
        if config.attack is not None:
            kind, count = config.attack
            if kind not in ATTACKS or not 0 < count < len(config.topology.nodes):
                raise ConfigError(f"bad attack {kind}:{count}; kinds: {', '.join(ATTACKS)}, "
                                  f"count in 1..{len(config.topology.nodes) - 1}")
        self.config = config
        self.topo = config.topology
        self.network = MemoryNetwork()
        self.trace = _Trace()
        self.federation_id = sim_federation_id(self.topo, config.seed)
        self.nodes: dict[str, _SimNode] = {}
        self.by_peer: dict[str, str] = {}
        self._progress = trio.Event()
        self._graph = self.topo.graph.copy()
        self._absent = set(self.topo.initially_absent()) | config.absent
        self.edu = edu
        self.trainers: dict[str, LocalTrainer] = {}
        if config.workload == "education" and edu is None:
            settings = config.education or (QUICK if config.quick else FULL)
            settings = dataclasses.replace(settings, rounds=config.rounds)
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
        #: Byzantine nodes, evenly spaced in the node order
        self.byzantine = _spaced(self.topo.nodes, config.attack[1] if config.attack else 0)
        #: nodes that add the larger DP noise
        self.noisy = _spaced(self.topo.nodes, config.dp_noisy[0] if config.dp_noisy else 0)
        if self.edu is not None and config.attack and config.attack[0] == "label-flip":
            for name in self.byzantine:
                self.edu.flip_labels(name)
        comps = sorted(self.topo.holders)
        for index, name in enumerate(self.topo.nodes):
            self.nodes[name] = self._make_node(index, name, comps)

    # ---------------------------------------------------------------- set-up
    def _make_node(self, index: int, name: str, all_components: list[str]) -> _SimNode:
        cfg = self.config
        identity = sim_identity(cfg.seed, name)
        home = cfg.home / name if cfg.home is not None else None
        if home is not None:
            home.mkdir(parents=True, exist_ok=True)
            key = home / "identity.key"
            if not key.exists():
                create_identity(key, identity)
        ledger = Ledger.open(home / "ledger.sqlite3" if home else None, identity)
        blobs = BlobStore(home / "blobs" if home else None)
        components: dict[str, FlatComponent] = {}
        trains: frozenset[str] = frozenset()
        deps: dict[str, frozenset[str]] = {}
        if self.edu is not None:
            trainer = self.trainers[name] = self.edu.trainer(name, index)
            components = trainer.components()
            trains = frozenset(trainer.trainable())
            deps = trainer.model.spec.forward_deps(trainer.model.held)
        else:  # consensus: each holder starts from its own random values
            for ci, comp in enumerate(all_components):
                if name in self.topo.holders[comp]:
                    components[comp] = FlatComponent.from_params(
                        ComponentSpec.from_name(comp),
                        {"weight": _initial_values(cfg.seed, index, ci, cfg.dim)})
        for comp, flat in components.items():
            self.trace.initial.setdefault(comp, {})[name] = (
                flat.flat.detach().to(torch.float64).numpy().copy())
        config = NodeConfig(
            round_timeout_ms=cfg.round_timeout_ms, trains=trains, forward_deps=deps,
            privacy={c: self._policy(name) for c in trains} if cfg.dp is not None else {},
            noise_seed=int.from_bytes(digest(f"{cfg.seed}/{name}".encode())[:7], "little"),
            robust={} if name in self.byzantine else {"*": cfg.robust},
            report_mixes=True)  # (the trace records each mixed state)
        node: Node
        if name in self.byzantine and cfg.attack and cfg.attack[0] != "label-flip":
            send = forgery(cfg.attack[0], cfg.seed * 7919 + len(name),
                           lambda component: self._honest_states(name, component))
            node = ByzantineNode(identity, self.federation_id, components, ledger, blobs, config,
                                 send=send)
        else:
            node = Node(identity, self.federation_id, components, ledger, blobs, config)
        self.by_peer[identity.peer_id] = name
        return _SimNode(name, identity, node, ledger)

    def _policy(self, name: str) -> Policy:
        assert self.config.dp is not None
        if self.config.dp_noisy is not None and name in self.noisy:
            return dataclasses.replace(self.config.dp, sigma=self.config.dp_noisy[1])
        return self.config.dp

    def _honest_states(self, name: str, component: str) -> list[torch.Tensor]:
        """The states of ``name``'s honest neighbours that hold ``component`` (what some
        attackers read)."""
        return [self.nodes[n].node.components[component].flat
                for n in self._graph.neighbors(name)
                if n not in self.byzantine and component in self.nodes[n].node.components]

    def _observe(self, name: str, actions: Sequence[object]) -> None:
        """Every batch of a node's actions: record its mixed states, wake the run loop."""
        for action in actions:
            if isinstance(action, Mixed):
                if self.edu is None:
                    self.work[self._phase].add((name, action.epoch, action.round))
                per_round = self.trace.rounds.setdefault(action.component, {})
                per_round.setdefault(action.round, {})[name] = (
                    action.state.to(torch.float64).numpy().copy())
        self._progress.set()

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
    async def _run_node(self, sn: _SimNode, *, task_status: TaskStatus[None]) -> None:
        transport = self.network.attach(sn.identity.peer_id)
        trainer = self.trainers.get(sn.name)

        def train(request: TrainRequest) -> None:
            assert trainer is not None
            if not math.isnan(trainer.run(request)):
                self.work[self._phase].add((sn.name, request.epoch, request.round))

        sn.driver = NodeDriver(sn.node, transport,
                               on_actions=lambda actions: self._observe(sn.name, actions),
                               trainer=train if trainer is not None else None,
                               train_inline=True)
        with trio.CancelScope() as scope:
            sn.scope = scope
            await sn.driver.run(task_status=task_status)

    async def _start(self, nursery: trio.Nursery, sn: _SimNode) -> None:
        sn.live = True
        await nursery.start(self._run_node, sn)

    def _stop(self, sn: _SimNode) -> None:
        sn.live = False
        if sn.scope is not None:
            sn.scope.cancel()
        self.network.detach(sn.identity.peer_id)

    async def _wait_all_paused(self) -> None:
        while not all(sn.node.idle() for sn in self.nodes.values() if sn.live):
            self._progress = trio.Event()
            await self._progress.wait()

    def _apply(self, event: ChurnEvent, now_round: int) -> list[_SimNode]:
        """Apply one churn event; returns nodes to (re)start."""
        to_start: list[_SimNode] = []
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
            stops = sorted({e.round for e in self.topo.churn if 0 < e.round < cfg.rounds})
            if self.edu is not None:
                stops = list(range(1, cfg.rounds))  # lockstep: train, exchange, mix, repeat
            if cfg.unlearn is not None and 0 < cfg.unlearn[1] < cfg.rounds:
                stops = sorted({*stops, cfg.unlearn[1]})
            done = 0
            for limit in [*stops, cfg.rounds]:
                # rounds before `limit` run freely; then everyone pauses for the churn events
                for sn in self.nodes.values():
                    if sn.live and sn.driver is not None:
                        sn.driver.call(sn.node.set_round_limit, limit)
                await self._report_progress_until(limit, done)
                done = limit
                if cfg.unlearn is not None and cfg.unlearn[1] == limit:
                    await self._unlearn(*cfg.unlearn)
                restart: list[_SimNode] = []
                for event in self.topo.churn:
                    if event.round == limit and limit < cfg.rounds:
                        restart += self._apply(event, limit)
                for sn in restart:
                    sn.live = True
                self._push_topology()
                for sn in restart:
                    sn.node.set_round_limit(limit, 0)
                    await self._start(nursery, sn)
            for sn in self.nodes.values():
                if sn.live:
                    self._stop(sn)
            nursery.cancel_scope.cancel()

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

    async def _report_progress_until(self, limit: int, done: int) -> None:
        progress = self.config.progress
        while True:
            live = [sn.node for sn in self.nodes.values() if sn.live]
            if progress is not None and live:
                current = min(min((n.round_of(c) for c in n.components), default=limit)
                              for n in live)
                progress(max(current, done), self.config.rounds)
            if all(n.idle() for n in live):
                return
            self._progress = trio.Event()
            await self._progress.wait()

    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        trio.run(self._main, clock=trio.testing.MockClock(autojump_threshold=0))
        for sn in self.nodes.values():
            for entry in sn.node.ledger.entries(FORGET_ENTRY):
                self.rolled_back[sn.name] = entry.body["influenced"]
            sn.ledger.close()
        tasks = None
        if self.edu is not None:
            per_node = self.edu.per_node_accuracy(self.final_trainers())
            tasks = {
                t: {"federated": float(np.mean(list(accs.values()))),
                    "holders": len(self.topo.holders[f"head.{t}"]),
                    "federated_per_node": accs}
                for t, accs in per_node.items()
            }
            if self.config.baselines:
                local = self.edu.local_only()
                central = self.edu.centralized()
                for t, row in tasks.items():
                    row.update(local_only=local[t], centralized=central[t])
        report = self._report(time.perf_counter() - start)
        if tasks is not None:
            report["tasks"] = tasks
        return report

    def final_trainers(self) -> dict[str, LocalTrainer]:
        """The trainers of the nodes that end the run as members (not left out, not forgotten)."""
        gone = self.config.absent | self.forgotten()
        return {n: t for n, t in self.trainers.items() if n not in gone}

    def final_states(self) -> dict[tuple[str, str], torch.Tensor]:
        gone = self.config.absent | self.forgotten()
        return {(n, c): flat.flat for n, sn in self.nodes.items() if n not in gone
                for c, flat in sn.node.components.items()}

    # ---------------------------------------------------------------- report
    def _report(self, wall_s: float) -> dict[str, Any]:
        comps: dict[str, Any] = {}
        for comp, holders in sorted(self.topo.holders.items()):
            initial_holders = [h for h in holders if h not in self._absent]
            comps[comp] = self._component_report(comp, initial_holders)
        stats = self.network.stats
        status = {name: status_of(sn.node) for name, sn in self.nodes.items()}
        return {
            "topology": self.topo.name,
            "workload": self.config.workload,
            "nodes": len(self.topo.nodes),
            "rounds": self.config.rounds,
            "seed": self.config.seed,
            "wall_s": wall_s,
            "components": comps,
            "network": {
                "messages": stats.messages,
                "message_bytes": stats.message_bytes,
                "fetches": stats.fetches,
                "fetch_bytes": stats.fetch_bytes,
                "dropped": stats.dropped,
            },
            "rejected": {name: st["rejected"] for name, st in status.items() if st["rejected"]},
            **({"noisy": self.noisy} if self.noisy else {}),
            "privacy": {
                name: {c: p for c, cs in status[name]["components"].items()
                       if (p := cs["privacy"]) is not None}
                for name, sn in self.nodes.items() if sn.node.config.privacy
            },
        }

    def _component_report(self, comp: str, holders: list[str]) -> dict[str, Any]:
        sub = self.topo.graph.subgraph(holders)
        weights = metropolis_hastings_weights(sub, holders)
        lam = slem(weight_matrix(weights, holders))
        x0 = np.stack([self.trace.initial[comp][h] for h in holders])
        mean0 = x0.mean(axis=0)
        scale = float(np.linalg.norm(x0 - mean0)) or 1.0
        distances: list[float] = []
        drift = 0.0
        per_round = self.trace.rounds.get(comp, {})
        for r in range(self.config.rounds):
            states = per_round.get(r, {})
            if not states:
                break
            x = np.stack([states[n] for n in sorted(states)])
            mean = x.mean(axis=0)
            distances.append(float(np.linalg.norm(x - mean)) / scale)
            if r == self.config.rounds - 1 or not per_round.get(r + 1):
                drift = float(np.abs(mean - mean0).max())
        reached = next((i + 1 for i, d in enumerate(distances) if d <= EPSILON), None)
        bound = rounds_to_epsilon_bound(lam, EPSILON)
        return {
            "holders": len(holders),
            "slem": lam,
            "consensus_distance": distances,
            "rounds_to_1e-6": reached,
            "bound_rounds_to_1e-6": bound,
            "mean_drift": drift,
        }


def simulate(config: SimConfig) -> dict[str, Any]:
    """Run a simulation and return its JSON-friendly report.

    With ``config.unlearn`` the report gains ``unlearning``: the run that forgets the node is
    compared with the same federation run without it from the start.
    """
    if config.unlearn is not None:
        return _unlearning_study(config)
    if config.attack is not None:
        return _attack_study(config)
    return Simulation(config).run()


def _attack_study(config: SimConfig) -> dict[str, Any]:
    """The attacked run, and the same seed and topology with the attackers left out (plain
    MH): what the honest nodes reach together, the best a defence can give them."""
    sim = Simulation(dataclasses.replace(config, baselines=False))
    report = sim.run()
    kind, count = config.attack or ("", 0)
    report["attack"] = {"kind": kind, "count": count, "nodes": sim.byzantine,
                        "robust": config.robust}
    if sim.edu is None:
        return report
    clean = Simulation(dataclasses.replace(config, attack=None, robust="mh", baselines=False,
                                           progress=None, absent=frozenset(sim.byzantine)),
                       edu=sim.edu)  # (the attackers' data, flipped or not, is unused)
    clean.run()
    honest = [n for n in sim.trainers if n not in sim.byzantine]
    report["honest_accuracy"] = sim.edu.accuracy({n: sim.trainers[n] for n in honest})
    assert clean.edu is not None
    report["honest_accuracy_fault_free"] = clean.edu.accuracy(
        {n: clean.trainers[n] for n in honest})
    return report


def _unlearning_study(config: SimConfig) -> dict[str, Any]:
    name, round_ = config.unlearn or ("", 0)
    if not 0 < round_ <= config.rounds:
        raise ConfigError(f"the unlearning round must be in 1..{config.rounds}, not {round_}")
    config = dataclasses.replace(config, baselines=False)
    sim = Simulation(config)
    report = sim.run()
    retrain = Simulation(dataclasses.replace(config, unlearn=None, absent=frozenset({name}),
                                             progress=None), edu=sim.edu)
    base = retrain.run()
    ours, theirs = sim.final_states(), retrain.final_states()
    diff = max(float((ours[k].to(torch.float64) - theirs[k].to(torch.float64)).abs().max())
               for k in theirs)
    per_node = sim.rolled_back
    rolled = sorted({c for cs in per_node.values() for c in cs})
    work = {phase: len(v) for phase, v in sim.work.items()}
    study: dict[str, Any] = {
        "node": name,
        "mode": config.unlearn_mode,
        **sim.unlearning,
        "max_abs_diff_vs_retrain": diff,
        "cost_fraction": work["unlearn"] / max(work["run"], 1),
        "node_rounds": {"run": work["run"], "unlearning": work["unlearn"],
                        "retrain": len(retrain.work["run"])},
        "components_rolled_back": rolled,
        "components_untouched": sorted(set(sim.topo.holders) - set(rolled)),
        "rolled_back_per_node": per_node,
        "retrain_wall_s": base["wall_s"],
    }
    if sim.edu is not None and sim.edu.triggered is not None:
        study["backdoor_success_after"] = sim.edu.backdoor_success(sim.final_trainers())
        study["backdoor_success_retrain"] = sim.edu.backdoor_success(retrain.final_trainers())
        task = sim.edu.backdoor_task
        study["backdoor_task"] = task
        study["clean_accuracy_after"] = report["tasks"][task]["federated"]
        study["clean_accuracy_retrain"] = base["tasks"][task]["federated"]
        study["tasks_retrain"] = {t: v["federated"] for t, v in base["tasks"].items()}
    report["unlearning"] = study
    return report


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Consensus distance per component per round, on a log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for comp, data in report["components"].items():
        ys = [max(d, 1e-17) for d in data["consensus_distance"]]
        ax.semilogy(range(1, len(ys) + 1), ys, label=f"{comp} ({data['holders']} holders)")
        bound = data.get("bound_rounds_to_1e-6")
        if bound is not None and bound <= len(ys) and math.isfinite(bound):
            ax.axvline(bound, linestyle=":", linewidth=0.8, color=ax.lines[-1].get_color())
    ax.axhline(EPSILON, color="grey", linewidth=0.6)
    ax.set_xlabel("round")
    ax.set_ylabel("consensus distance (relative)")
    ax.set_title(f"{report['topology']} — {report['nodes']} nodes, seed {report['seed']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
