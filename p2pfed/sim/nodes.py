"""Building the simulated nodes: identities from the seed, storage, starting states, roles.

Every simulated node is a real :class:`~p2pfed.node.Node` (or, for an attacker, a
:class:`~p2pfed.sim.attacks.ByzantineNode`) with its own ledger and blob store, in memory or
under ``SimConfig.home``.  Identities, starting values, noise seeds and synthetic updates are
derived from the seed and the node's name, so the same seed builds the same federation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import trio

from gossip.catalog import ComponentSpec
from gossip.envelope import digest
from gossip.identity import Identity, create_identity
from p2pfed.blobs import BlobStore
from p2pfed.components import FlatComponent
from p2pfed.ledger import Ledger
from p2pfed.model.train import LocalTrainer, TrainRequest
from p2pfed.node import KeepPace, Node, NodeConfig
from p2pfed.privacy import Policy
from p2pfed.runtime.driver import NodeDriver
from p2pfed.sim.attacks import ByzantineNode, forgery
from p2pfed.sim.config import DTYPES, SLOWDOWN, SimConfig
from p2pfed.sim.topology import Topology


@dataclass
class SimNode:
    """A simulated node, its storage, and its driver while it runs."""

    name: str
    identity: Identity
    node: Node
    ledger: Ledger
    driver: NodeDriver | None = None
    scope: trio.CancelScope | None = None
    live: bool = False


@dataclass(frozen=True)
class NodeStart:
    """What a node starts with: its components, those it trains and their forward dependencies."""

    components: dict[str, FlatComponent]
    trains: frozenset[str] = frozenset()
    forward_deps: dict[str, frozenset[str]] = field(default_factory=dict)


def sim_identity(seed: int, name: str) -> Identity:
    """A deterministic identity for a simulated node (never use this for a real node)."""
    return Identity.from_seed(digest(f"p2pfed-sim/{seed}/{name}".encode()))


def sim_federation_id(topology: Topology, seed: int) -> bytes:
    return digest(f"p2pfed-sim-federation/{topology.name}/{seed}".encode())


def initial_values(seed: int, node_index: int, comp_index: int, dim: int,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A node's starting values of a component (float32: the float64 draw, rounded)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + node_index * 1009 + comp_index)
    return torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)


def synthetic_update(seed: int, name: str, component: str, round_: int, dim: int,
                     scale: float = 1.0) -> torch.Tensor:
    """What ``name`` adds to ``component`` in ``round_`` (consensus with synthetic updates): a
    standard normal draw of ``dim`` values, seeded by the seed, the node, the component and
    the round (not the forget epoch: a re-run adds it again), of norm ``scale``."""
    key = digest(f"p2pfed-sim-update/{seed}/{name}/{component}/{round_}".encode())
    gen = torch.Generator().manual_seed(int.from_bytes(key[:7], "little"))
    draw = torch.randn(dim, generator=gen, dtype=torch.float64)
    return draw * (scale / float(torch.linalg.vector_norm(draw)))


def synthetic_trainer(cfg: SimConfig, sn: SimNode) -> Callable[[TrainRequest], None]:
    """The trainer of ``sn`` under ``cfg.updates``: adds :func:`synthetic_update` to the
    component's state in place, as a real trainer writes into the node's buffers (nothing at a
    node of ``cfg.silent``: it trains, adding zero, and credits no mass)."""
    assert cfg.updates is not None
    scaled, k = cfg.updates
    scale = float(k) if sn.name == scaled else 1.0

    def train(request: TrainRequest) -> None:
        if sn.name in cfg.silent:
            return
        flat = sn.node.components[request.component].flat
        step = synthetic_update(cfg.seed, sn.name, request.component, request.round,
                                flat.numel(), scale)
        flat.add_(step.to(flat.dtype))

    return train


def trainer_trains_steps(cfg: SimConfig) -> bool:
    """Do the nodes' trainers train steps (education), rather than add synthetic updates?"""
    return cfg.workload == "education" and cfg.updates is None


def spaced(nodes: Sequence[str], count: int) -> list[str]:
    """``count`` nodes evenly spaced in ``nodes``' order (the first among them), sorted."""
    return sorted({nodes[i * len(nodes) // count] for i in range(count)})


def node_start(cfg: SimConfig, index: int, name: str, trainer: LocalTrainer | None) -> NodeStart:
    """The trainer's components (education), or else each held component's random values
    (with synthetic updates: zeros on every holder, each component trained)."""
    if trainer is not None:
        return NodeStart(trainer.components(), frozenset(trainer.trainable()),
                         trainer.model.spec.forward_deps(trainer.model.held))
    components: dict[str, FlatComponent] = {}
    holders = cfg.topology.holders
    for ci, comp in enumerate(sorted(holders)):
        if name in holders[comp]:
            values = (torch.zeros(cfg.dim, dtype=DTYPES[cfg.dtype]) if cfg.updates is not None
                      else initial_values(cfg.seed, index, ci, cfg.dim, DTYPES[cfg.dtype]))
            components[comp] = FlatComponent.from_params(ComponentSpec.from_name(comp),
                                                         {"weight": values})
    return NodeStart(components, frozenset(components) if cfg.updates is not None
                     else frozenset())


def _storage(cfg: SimConfig, name: str, identity: Identity) -> tuple[Ledger, BlobStore]:
    home = cfg.home / name if cfg.home is not None else None
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        key = home / "identity.key"
        if not key.exists():
            create_identity(key, identity)
    ledger = Ledger.open(home / "ledger.sqlite3" if home else None, identity)
    return ledger, BlobStore(home / "blobs" if home else None)


def _policy(cfg: SimConfig, noisy: bool) -> Policy:
    assert cfg.dp is not None
    if cfg.dp_noisy is not None and noisy:
        return dataclasses.replace(cfg.dp, sigma=cfg.dp_noisy[1])
    return cfg.dp


def _pace(cfg: SimConfig, name: str) -> KeepPace | None:
    """A profiled node whose training takes longer than a round keeps pace (:class:`KeepPace`):
    it trains only when its last training is a round interval behind it."""
    train_ms = 1000 * cfg.train_s * SLOWDOWN[cfg.profiles.get(name, "server")]
    interval_ms = round(cfg.round_interval_s * 1000)
    if name not in cfg.profiles or train_ms <= interval_ms:
        return None
    return KeepPace(lambda: train_ms, interval_ms)


def build_node(cfg: SimConfig, name: str, federation_id: bytes, start: NodeStart, *,
               byzantine: bool, noisy: bool,
               honest: Callable[[str], list[torch.Tensor]],
               loss_of: Callable[[str, int, int], float | None] | None = None) -> SimNode:
    """Node ``name`` with its storage; a Byzantine one forges its updates (``honest(component)``
    gives its honest neighbours' states), except a label flipper, which only has bad data.
    ``loss_of``: its trainer's (loss mixing)."""
    identity = sim_identity(cfg.seed, name)
    ledger, blobs = _storage(cfg, name, identity)
    config = NodeConfig(
        round_timeout_ms=cfg.round_timeout_ms, trains=start.trains,
        round_interval_ms=round(cfg.round_interval_s * 1000),
        forward_deps=start.forward_deps,
        privacy={c: _policy(cfg, noisy) for c in start.trains} if cfg.dp is not None else {},
        noise_seed=int.from_bytes(digest(f"{cfg.seed}/{name}".encode())[:7], "little"),
        robust={} if byzantine else {"*": cfg.robust},
        checkpoint_every=cfg.checkpoint_every, retention=cfg.retention,
        participation=cfg.participation.get(name, 1.0), schedule=_pace(cfg, name),
        objective=(cfg.fairness, cfg.tilt), lean=cfg.lean, loss_of=loss_of,
        # (the education trainer trains more steps to make up skipped rounds)
        make_up_by="steps" if trainer_trains_steps(cfg) else "update",
        report_mixes=True)  # (the trace records each mixed state)
    node: Node
    if byzantine and cfg.attack and cfg.attack[0] != "label-flip":
        # (seeded by the node's name: two attackers never send the same noise)
        send = forgery(cfg.attack[0], int.from_bytes(
            digest(f"{cfg.seed}/attack/{name}".encode())[:7], "little"), honest)
        node = ByzantineNode(identity, federation_id, start.components, ledger, blobs, config,
                             send=send)
    else:
        node = Node(identity, federation_id, start.components, ledger, blobs, config)
    return SimNode(name, identity, node, ledger)
