"""What a simulation runs: :class:`SimConfig`, and the checks it must pass before any node starts.

The checks raise :class:`~gossip.errors.ConfigError` for a setting that names something the
topology or the code does not have (a node, a mixing rule, an attack) or a count out of range.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gossip.errors import ConfigError
from p2pfed import mixing
from p2pfed.config_sections import MAX_LEAN
from p2pfed.continual import ContinualSettings, Schedule
from p2pfed.model.fairness import OBJECTIVES
from p2pfed.node import RetentionPolicy
from p2pfed.privacy import Policy
from p2pfed.sim.attacks import ATTACKS
from p2pfed.sim.education import EducationSettings
from p2pfed.sim.topology import Topology

WORKLOADS = ("consensus", "education")
#: the simulator's compute model per hardware profile: a round's training takes this many
#: times ``train_s`` (a phone trains five times slower than a server)
SLOWDOWN = {"server": 1.0, "laptop": 2.0, "phone": 5.0}
#: the consensus workload's parameter types
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class SimConfig:
    topology: Topology
    workload: str = "consensus"
    rounds: int = 100
    seed: int = 0
    home: Path | None = None
    #: parameters per component in the consensus workload
    dim: int = 32
    #: consensus workload: the parameters' type (float32 as a model's; float64 by default)
    dtype: str = "float64"
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
    #: checkpoint every this many rounds (0: only at the start), and what history each node
    #: keeps (None: everything; see p2pfed.node._retention)
    checkpoint_every: int = 0
    retention: RetentionPolicy | None = None
    #: education: tasks start and retire on this schedule, with this method against forgetting
    #: (continual learning; :func:`~p2pfed.sim.simulator.simulate` compares it with naive
    #: sequential and joint training)
    continual: tuple[Schedule, ContinualSettings] | None = None
    #: node -> the fraction of rounds it trains (the others train every round)
    participation: dict[str, float] = field(default_factory=dict)
    #: simulated seconds a round's training takes (the compute model; 0: none)
    train_s: float = 0.0
    #: a node starts a round at most this often (simulated seconds; 0: as soon as the last
    #: one is mixed), as ``[rounds] interval_s`` paces a daemon
    round_interval_s: float = 0.0
    #: education: every node pauses after every round (train, exchange, mix, repeat); else
    #: rounds run freely, each node paced only by its neighbours' updates (the participation
    #: study: so a node's rounds per simulated minute measure who waits for whom)
    lockstep: bool = True
    #: consensus: (node, K): every holder starts from zeros and every round adds a seeded unit
    #: vector to each component it holds, K times as long at ``node``, through the node's
    #: training path (so it credits provenance mass); :func:`~p2pfed.sim.simulator.simulate`
    #: then relates each member's share to how far removing it moves the others' states
    updates: tuple[str, float] | None = None
    #: with ``updates``: these nodes' updates are zero from the start, but they mix and relay
    #: as before (the run the study measures a member's contribution against)
    silent: frozenset[str] = frozenset()
    #: education: explain this many held-out examples per task at the end and check the
    #: explanations' faithfulness (report ``explain``; :mod:`p2pfed.sim.explain`); 0: none
    explain: int = 0
    #: education: the group study (:mod:`p2pfed.sim.groups`; the report gains ``fairness``)
    groups: bool = False
    #: the members' local objective (:data:`p2pfed.model.fairness.OBJECTIVES`; other than
    #: "erm": compared with "erm" in the same study) and its tilt
    fairness: str = "erm"
    tilt: float = 1.0
    #: ``[fairness] mixing = "loss"`` with this lean (0: plain mixing; other than 0: compared
    #: with plain mixing in the same study, like an objective)
    lean: float = 0.0
    #: node -> hardware profile (:mod:`p2pfed.profiles`; the others: server): what it trains,
    #: and with ``train_s`` how long its training takes (:data:`SLOWDOWN`)
    profiles: dict[str, str] = field(default_factory=dict)


def check_config(config: SimConfig) -> None:
    """Raise ValueError for an unknown workload, ConfigError for any other bad setting."""
    if config.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {config.workload!r}")
    nodes = config.topology.nodes
    unknown = sorted((config.absent | config.silent) - set(nodes))
    if config.unlearn is not None and config.unlearn[0] not in nodes:
        unknown.append(config.unlearn[0])
    if unknown:
        raise ConfigError(f"no node {', '.join(unknown)} in topology "
                          f"{config.topology.name}")
    if config.updates is not None:
        check_updates(config)
    elif config.silent:
        raise ConfigError("silent members need synthetic updates (the consensus workload's "
                          "update scale)")
    if isinstance(config.explain, bool) or not isinstance(config.explain, int) \
            or config.explain < 0:
        raise ConfigError(f"examples to explain must be a count >= 0, not {config.explain!r}")
    if config.explain and config.workload != "education":
        raise ConfigError("explaining predictions needs the education workload (nothing "
                          "predicts in the consensus workload)")
    check_fairness(config)
    for name, profile in sorted(config.profiles.items()):
        if name not in nodes or profile not in SLOWDOWN:
            raise ConfigError(f"profile {name}:{profile}: no such node, or not one of "
                              f"{', '.join(SLOWDOWN)}")
    if config.profiles and config.workload != "education":
        raise ConfigError("profiles need the education workload (nothing trains in the "
                          "consensus workload)")
    if config.dtype not in DTYPES:
        raise ConfigError(f"unknown parameter type {config.dtype!r}; "
                          f"choose from {', '.join(DTYPES)}")
    if config.robust not in mixing.names():
        raise ConfigError(f"unknown aggregation rule {config.robust!r}; "
                          f"choose from {', '.join(mixing.names())}")
    if config.dp_noisy is not None:
        count, sigma = config.dp_noisy
        if config.dp is None or not 0 < count < len(nodes) or not (
                math.isfinite(sigma) and sigma > 0.0):
            raise ConfigError(f"bad noisy nodes {count}:{sigma}: needs a DP level, a count "
                              f"in 1..{len(nodes) - 1} and a sigma > 0")
    if config.continual is not None and config.workload != "education":
        raise ConfigError("a continual schedule needs the education workload")
    for name, share in sorted(config.participation.items()):
        if name not in nodes:
            raise ConfigError(f"participation: no node {name} in topology {config.topology.name}")
        if not 0.0 < share <= 1.0:
            raise ConfigError(f"participation of {name} must be in (0, 1], not {share}")
    if config.participation and config.workload != "education":
        raise ConfigError("participation needs the education workload (nothing trains in "
                          "the consensus workload)")
    if not (0.0 <= config.round_interval_s <= 3600.0):
        raise ConfigError(f"round interval must be in 0..3600 s, not {config.round_interval_s}")
    if not (0.0 <= config.train_s <= 3600.0):
        raise ConfigError("the simulated training time must be in 0..3600 s")
    if config.attack is not None:
        kind, count = config.attack
        if kind not in ATTACKS or not 0 < count < len(nodes):
            raise ConfigError(f"bad attack {kind}:{count}; kinds: {', '.join(ATTACKS)}, "
                              f"count in 1..{len(nodes) - 1}")


def check_updates(config: SimConfig) -> None:
    """The synthetic updates need the consensus workload, a node of the topology and a finite
    scale > 0; Byzantine nodes would forge them (the study compares runs without a member)."""
    assert config.updates is not None
    name, scale = config.updates
    if config.workload != "consensus":
        raise ConfigError("synthetic updates need the consensus workload (the education "
                          "workload trains for real)")
    if name not in config.topology.nodes:
        raise ConfigError(f"update scale: no node {name} in topology {config.topology.name}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) \
            or not (math.isfinite(scale) and scale > 0.0):
        raise ConfigError(f"update scale of {name} must be finite and > 0, not {scale!r}")
    if config.attack is not None:
        raise ConfigError("synthetic updates with an attack: run the provenance study without "
                          "Byzantine nodes")


def check_fairness(config: SimConfig) -> None:
    """The group study needs the education workload; an objective other than the default
    needs the group study (without groups it would change nothing); a tilt in 0..50; loss
    mixing (a lean in 0..10) the group study."""
    if config.groups and config.workload != "education":
        raise ConfigError("the group study needs the education workload")
    if config.fairness not in OBJECTIVES:
        raise ConfigError(f"unknown fairness objective {config.fairness!r}; "
                          f"choose from {', '.join(OBJECTIVES)}")
    if config.fairness != "erm" and not config.groups:
        raise ConfigError(f"the {config.fairness} objective needs the group study (--groups): "
                          "without groups it trains as erm")
    if not (math.isfinite(config.tilt) and 0.0 <= config.tilt <= 50.0):
        raise ConfigError(f"tilt must be in 0..50, not {config.tilt}")
    if not (math.isfinite(config.lean) and 0.0 <= config.lean <= MAX_LEAN):
        raise ConfigError(f"lean must be in 0..{MAX_LEAN:g}, not {config.lean}")
    if config.lean and not config.groups:
        raise ConfigError("loss mixing is compared with plain mixing in the group study "
                          "(--groups)")
