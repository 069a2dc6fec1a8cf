"""The sections of ``p2pfed.toml`` (:class:`p2pfed.config.Config` reads them): one frozen record
per table, with its defaults and the checks that need only the section itself."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gossip.catalog import ComponentSpec
from gossip.errors import ConfigError

if TYPE_CHECKING:
    from p2pfed.privacy import Policy

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
#: ``[model] kind``
MODEL_KINDS = ("consensus", "m3t")
#: aggregation rules a component can use (``[mixing]``; each is implemented in
#: :mod:`p2pfed.consensus`, whose ``RULES`` a test keeps equal to this)
MIXING_RULES = ("mh", "clipped", "trimmed-mean", "noise-aware")
#: kinds of local data file (``[data.<task>.<modality>] kind``; read by :mod:`p2pfed.model.data`)
SOURCE_KINDS = ("text-jsonl", "image-npz", "series-csv")
#: the local objectives (``[fairness] objective``; :mod:`p2pfed.model.fairness`, whose
#: ``OBJECTIVES`` a test keeps equal to this)
OBJECTIVES = ("erm", "group-dro")
#: ``[model] precision``: float32 throughout, or bfloat16 autocast (parameters stay float32)
PRECISIONS = ("fp32", "bf16")
#: the largest ``[fairness] tilt`` (past it the soft maximum is the worst group's loss anyway)
MAX_TILT = 50.0
#: ``[fairness] mixing``: the plain weights, or leaning on the member's own loss
FAIRNESS_MIXING = ("plain", "loss")
#: the largest ``[fairness] lean``: a member that fits its data no better than a guess weighs
#: at most this plus one times as much as one that fits it perfectly
MAX_LEAN = 10.0
#: ... and its default: of 1 and 3, the one that met docs/fairness.md's line more often (with
#: group-dro)
DEFAULT_LEAN = 3.0


@dataclass(frozen=True)
class NodeSection:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    announce: tuple[str, ...] = ()
    mdns: bool = False
    #: carry payloads over a TCP port of their own, keyed through libp2p (see security.md)
    bulk: bool = True
    #: that port (0: one the system picks; a fixed one for firewalls)
    bulk_port: int = 0
    #: what this machine may spend: server | laptop | phone (:mod:`p2pfed.profiles`)
    profile: str = "server"
    #: train nothing (still mix and predict), whatever the profile
    inference_only: bool = False
    #: torch's CPU threads (0: the profile's)
    threads: int = 0
    #: peak resident memory (MB) past which training stops (0: the profile's)
    max_memory_mb: int = 0


@dataclass(frozen=True)
class ComponentsSection:
    hold: tuple[str, ...] = ("backbone",)
    train: tuple[str, ...] = ()
    dim: int = 256


@dataclass(frozen=True)
class ModelSection:
    kind: str = "consensus"
    #: "minilm" (bundled), "tiny" (tests) or a local Hugging Face model directory
    text_model: str = "minilm"
    #: the text model's layers that get LoRA (-1: the top one; []: all of them)
    lora_layers: tuple[int, ...] = (-1,)
    #: the projections that get LoRA ([]: the architecture's query and value ones)
    lora_targets: tuple[str, ...] = ()
    steps: int = 8
    batch_size: int = 16
    lr: float = 0.01
    #: share of each task's local examples kept aside, never trained on, to measure the
    #: model's accuracy (``status``); 0: train on everything, no accuracy
    holdout: float = 0.0
    #: where the model runs: "auto" (CUDA when torch sees it, else the CPU), "cpu", "cuda" or
    #: "cuda:N"; whether torch sees that device is checked when the daemon builds the model
    device: str = "auto"
    #: "fp32", or "bf16": the forward pass under bfloat16 autocast (parameters, optimiser
    #: state and what is mixed and sent stay float32)
    precision: str = "fp32"

    def check_device(self) -> None:
        """ConfigError unless ``device`` and ``precision`` are values these settings take (not
        whether this machine has the device: that is known only with torch, at start-up)."""
        index = self.device.removeprefix("cuda:")
        if self.device not in ("auto", "cpu", "cuda") and not (
                self.device.startswith("cuda:") and index.isdecimal() and index.isascii()):
            raise ConfigError(f'model.device must be "auto", "cpu", "cuda" or "cuda:N" (N: a '
                              f"CUDA device's index, from 0), not {self.device!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"model.precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {self.precision!r}")


@dataclass(frozen=True)
class DataSource:
    """One modality of a task's local data: a file of a known kind, with its options."""

    kind: str
    path: str
    options: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RoundsSection:
    interval_s: float = 5.0
    timeout_s: float = 20.0
    participation: float = 1.0  # the share of rounds it trains in; in the others it only mixes
    train_hours: str = ""  # local hours it trains in, "22-6" wrapping midnight ("": any hour)
    #: with participation below 1: train 1 + the rounds skipped just before times the
    #: steps, at most this many times (1: off; docs/continual.md)
    make_up: int = 5

    def check(self) -> tuple[int, int] | None:
        """ConfigError if out of range, else ``train_hours`` as (start, end excluded) or None."""
        if self.interval_s < 0 or self.timeout_s <= 0:
            raise ConfigError("rounds.interval_s must be >= 0 and rounds.timeout_s > 0")
        if not 0 < self.participation <= 1:
            raise ConfigError(f"rounds.participation must be in (0, 1], not {self.participation}")
        if not 1 <= self.make_up <= 100:
            raise ConfigError(f"rounds.make_up must be in 1..100, not {self.make_up}")
        start, dash, end = (part.strip() for part in self.train_hours.partition("-"))
        if self.train_hours.strip() and not (dash and start.isdecimal() and end.isdecimal()
                                             and int(start) != int(end) < 24 > int(start)):
            raise ConfigError(f'rounds.train_hours must be "H-H", two different local hours '
                              f'0 to 23 ("22-6": 22:00 to 5:59), not {self.train_hours!r}')
        return (int(start), int(end)) if self.train_hours.strip() else None


@dataclass(frozen=True)
class StorageSection:
    #: rounds of history kept so that a member who joined within them can be forgotten exactly
    #: (0: keep everything)
    unlearn_horizon_rounds: int = 100
    #: ledger and blob bytes the node may use; over it, no new round starts (0: no cap)
    max_bytes: int = 0


@dataclass(frozen=True)
class OverlaySection:
    degree: int = 4


@dataclass(frozen=True)
class MetricsSection:
    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class NoiseLevel:
    clip: float
    sigma: float


@dataclass(frozen=True)
class PrivacySection:
    """``[privacy]``: δ, the ε budget per component (0: none), the sampling rate, and per
    modality a ``[privacy.<modality>]`` table with ``clip`` and ``sigma``.  Components with no
    modality (backbone, heads, prompts) use ``[privacy.shared]``, else the strictest level set,
    so a head trained on private text is never released without noise."""

    delta: float = 1e-5
    budget: float = 0.0
    sample_rate: float = 1.0
    levels: tuple[tuple[str, NoiseLevel], ...] = ()

    def level_of(self, component: str) -> NoiseLevel | None:
        if not self.levels:
            return None
        levels = dict(self.levels)
        modality = ComponentSpec.from_name(component).modality or "shared"
        if modality in levels:
            return levels[modality]
        if modality == "shared":
            return max(levels.values(), key=lambda lv: lv.sigma)
        return levels.get("shared")

    def check(self) -> None:
        """Raise ConfigError unless δ, the sampling rate and the budget are in range."""
        if not 0 < self.delta < 1 or not 0 < self.sample_rate <= 1 or self.budget < 0:
            raise ConfigError("delta must be in (0, 1), sample_rate in (0, 1], budget >= 0")

    def policies(self, components: Iterable[str]) -> dict[str, Policy]:
        """The DP policy of each of ``components`` that has a noise level (imports torch)."""
        from p2pfed.privacy import Policy

        out = {}
        for c in components:
            level = self.level_of(c)
            if level is not None:
                out[c] = Policy(level.clip, level.sigma, self.delta, self.sample_rate,
                                self.budget)
        return out


@dataclass(frozen=True)
class MixingSection:
    """``[mixing]``: the aggregation rule of every component (``rule``) and, in
    ``[mixing.components]``, overrides per component (one of :data:`MIXING_RULES`)."""

    rule: str = "mh"
    components: tuple[tuple[str, str], ...] = ()
    #: keep and announce provenance shares (docs/explain.md); off only while members of an
    #: older version remain (they refuse an announcement that carries them)
    provenance: bool = True

    def rules(self) -> dict[str, str]:
        """``NodeConfig.robust``: ``"*"`` for the default, then the overrides."""
        return {"*": self.rule, **dict(self.components)}


@dataclass(frozen=True)
class FairnessSection:
    """``[fairness]``: the local objective and the mixing.  ``group-dro`` needs a group per
    example in the member's data (docs/data.md); a task without groups trains with ``erm``.
    ``mixing = "loss"``: in a round it trains, the member keeps more of its own state the
    worse its model fits its data, so its data weighs more in the consensus
    (:func:`p2pfed.mixing.leaned_weights`)."""

    objective: str = "erm"
    #: group-dro: how hard the soft maximum over the groups' losses leans on the worst group
    #: (0: the groups' mean)
    tilt: float = 1.0
    mixing: str = "plain"
    #: mixing = "loss": a member that fits its data no better than a guess counts this plus
    #: one times as much as one that fits it perfectly
    lean: float = DEFAULT_LEAN

    def lean_of(self) -> float:
        """``NodeConfig.lean``: :attr:`lean` with ``mixing = "loss"``, else 0 (off)."""
        return self.lean if self.mixing == "loss" else 0.0

    def check(self) -> None:
        """Raise ConfigError unless the objective is known and the tilt in range."""
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"fairness.objective must be one of {', '.join(OBJECTIVES)}, "
                              f"not {self.objective!r}")
        if not 0 <= self.tilt <= MAX_TILT:
            raise ConfigError(f"fairness.tilt must be in [0, {MAX_TILT:g}] (0: the groups' "
                              f"mean loss; 1: the default), not {self.tilt}")
        if self.mixing not in FAIRNESS_MIXING:
            raise ConfigError(f"fairness.mixing must be one of {', '.join(FAIRNESS_MIXING)}, "
                              f"not {self.mixing!r}")
        if not 0 < self.lean <= MAX_LEAN:
            raise ConfigError(f"fairness.lean must be in (0, {MAX_LEAN:g}] ({DEFAULT_LEAN:g}: the "
                              f"default), not {self.lean}")
