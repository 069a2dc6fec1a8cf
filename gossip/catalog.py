"""The module catalog: which model components a federation trains, as plain data (no torch).

A component is named ``<kind>.<rest>`` (``encoder.text.lora``, ``backbone``, ``head.topic``,
``prompt.essay``).  Its spec names its kind, the modality and/or task it serves and a fingerprint
of the base weights it applies to, so two nodes only ever mix updates for the same base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from gossip.errors import MalformedMessageError

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9][a-z0-9_-]*)*$")
MAX_NAME_CHARS = 128


class ComponentKind(StrEnum):
    ENCODER = "encoder"
    BACKBONE = "backbone"
    HEAD = "head"
    ADAPTER = "adapter"
    PROMPT = "prompt"


@dataclass(frozen=True, order=True)
class ComponentSpec:
    """What a component is; identical on every node that holds it."""

    name: str
    kind: ComponentKind
    modality: str = ""
    task: str = ""
    base_fingerprint: str = ""

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME_CHARS or not NAME_RE.match(self.name):
            raise ValueError(f"invalid component name {self.name!r}")

    def to_record(self) -> list[str]:
        return [self.name, self.kind.value, self.modality, self.task, self.base_fingerprint]

    @classmethod
    def from_record(cls, record: Any) -> ComponentSpec:
        if (
            not isinstance(record, list)
            or len(record) != 5
            or not all(isinstance(x, str) for x in record)
        ):
            raise MalformedMessageError("component spec must be a list of 5 strings")
        name, kind, modality, task, fingerprint = record
        try:
            return cls(name, ComponentKind(kind), modality, task, fingerprint)
        except ValueError as exc:
            raise MalformedMessageError(str(exc)) from exc

    @classmethod
    def from_name(cls, name: str, *, base_fingerprint: str = "") -> ComponentSpec:
        """Infer kind, modality and task from a conventional name.

        ``encoder.<modality>[.lora]``, ``adapter.<modality>``, ``head.<task>``,
        ``prompt.<task>``, ``backbone[.<anything>]``.
        """
        parts = name.split(".")
        try:
            kind = ComponentKind(parts[0])
        except ValueError as exc:
            raise ValueError(
                f"component {name!r} must start with one of "
                f"{', '.join(k.value for k in ComponentKind)}"
            ) from exc
        second = parts[1] if len(parts) > 1 else ""
        modality = second if kind in (ComponentKind.ENCODER, ComponentKind.ADAPTER) else ""
        task = second if kind in (ComponentKind.HEAD, ComponentKind.PROMPT) else ""
        return cls(name, kind, modality, task, base_fingerprint)
