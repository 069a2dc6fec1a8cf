"""How a node runs: round timing, what it trains, keeps and checkpoints, privacy, mixing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gossip.errors import ConfigError
from p2pfed.config_sections import MAX_LEAN
from p2pfed.journal import MAX_MAKE_UP
from p2pfed.node._retention import RetentionPolicy
from p2pfed.privacy import Policy
from p2pfed.unlearning import FAST_STRIDE


@dataclass(frozen=True)
class NodeConfig:
    round_timeout_ms: int = 30_000
    #: a new round starts no sooner than this after the previous one started (0: at once)
    round_interval_ms: int = 0
    #: ... and no sooner than this when the component has no neighbour (None: the round
    #: timeout): a node alone neither spins nor starves its networking with lone rounds
    lone_interval_ms: int | None = None
    max_payload_bytes: int = 1 << 30
    #: keep and announce each state's mass vector (:mod:`p2pfed.provenance`); off, the node
    #: announces what older versions read (their parsers refuse a 10th element)
    provenance: bool = True
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
    #: what history is kept (the unlearning horizon) and the byte budget (None: everything)
    retention: RetentionPolicy | None = None
    #: the share of rounds this node trains in, in (0, 1]: a deterministic draw per (node,
    #: round), the same for all its components (:mod:`p2pfed.node._participation`); in the
    #: other rounds it publishes its current state and mixes, as for a component not trained
    participation: float = 1.0
    #: a round this node trains after skipping some (by the share's draw) is made up: by
    #: 1 + the rounds skipped just before, at most this (1: off), as ``make_up_by`` says;
    #: over the rounds, a part-time member's data then weighs about as much as a full-time
    #: member's
    make_up: int = 5
    #: how a round is made up: ``"steps"``, the trainer trains that factor times its steps
    #: (:attr:`~p2pfed.model.train.TrainRequest.make_up`; the daemon's and the simulator's
    #: trainer), or ``"update"``, the round's update is scaled by it (a trainer that cannot
    #: train more steps).  Training more steps re-reads the gradient as it goes; scaling one
    #: round's update extrapolates it, noise included (docs/continual.md)
    make_up_by: str = "update"
    #: the local objective and its tilt its trainer trains with (``[fairness]``): asked of the
    #: trainer in each training and recorded in its ``local-update``, so a re-run trains with
    #: what the live round did
    objective: tuple[str, float] = ("erm", 1.0)
    #: ``[fairness] mixing = "loss"``: in a round it trained, this node keeps more of its own
    #: state the worse its model fitted its data (:func:`p2pfed.mixing.leaned_weights`; 0:
    #: off).  Never for a component under differential privacy (the loss is not released)
    lean: float = 0.0
    #: (component, epoch, round) -> how badly the model fitted the local data when it trained
    #: then, in [0, 1] (:meth:`p2pfed.model.train.LocalTrainer.loss_of`); None: unknown
    loss_of: Callable[[str, int, int], float | None] | None = None
    #: may this node train at ``now_ms`` (the time its driver passes in)?  None: at any time.
    #: The daemon's ``[rounds] train_hours``; a simulation may pass its own
    schedule: Callable[[int], bool] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.participation <= 1.0:
            raise ConfigError(f"participation must be in (0, 1], not {self.participation!r}")
        if not 1 <= self.make_up <= MAX_MAKE_UP:
            raise ConfigError(f"make_up must be in 1..{MAX_MAKE_UP}, not {self.make_up!r}")
        if not 0.0 <= self.lean <= MAX_LEAN:
            raise ConfigError(f"lean must be in [0, {MAX_LEAN:g}], not {self.lean!r}")
        if self.make_up_by not in ("steps", "update"):
            raise ConfigError(f"make_up_by must be steps or update, not {self.make_up_by!r}")

    def interval(self, *, alone: bool) -> int:
        """How long after a round's start the next may start; for a component with no
        neighbour at least :attr:`lone_interval_ms` (by default the round timeout)."""
        if not alone:
            return self.round_interval_ms
        lone = self.round_timeout_ms if self.lone_interval_ms is None else self.lone_interval_ms
        return max(self.round_interval_ms, lone)
