"""``docs/status.schema.json``: the schema of ``p2pfed status --json``, and a small validator.

The validator covers the subset of JSON Schema (draft 2020-12) the schema uses; a test pins that
subset, so a keyword it does not know cannot be ignored silently.  The daemon's real output is
validated in ``tests/test_daemon.py``; here, the node's part as the one builder makes it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pfed.node import component_status, status_of
from p2pfed.privacy import Policy
from tests.test_mixing import node_with

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "status.schema.json"
#: the keywords :func:`errors` understands (annotations included)
KEYWORDS = frozenset({"$schema", "$id", "$defs", "$ref", "title", "description", "type",
                      "enum", "properties", "required", "additionalProperties", "items",
                      "minimum", "pattern", "oneOf"})
TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def load_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return schema


def _is(value: object, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool) \
            and math.isfinite(value)
    return isinstance(value, TYPES[kind])


def errors(value: object, schema: dict[str, Any], root: dict[str, Any] | None = None,
           where: str = "$") -> list[str]:
    """What in ``value`` breaks ``schema`` (empty: valid)."""
    root = schema if root is None else root
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/"), ref
        return errors(value, root["$defs"][ref.removeprefix("#/$defs/")], root, where)
    out: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{where}: {value!r} is not of type {' or '.join(kinds)}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if "oneOf" in schema:
        fits = sum(not errors(value, s, root, where) for s in schema["oneOf"])
        if fits != 1:
            out.append(f"{where}: {value!r} fits {fits} of oneOf, not exactly 1")
    if "minimum" in schema and _is(value, "number") and value < schema["minimum"]:  # type: ignore[operator]
        out.append(f"{where}: {value!r} is below {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        out.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: {key!r} is missing" for key in schema.get("required", ())
                if key not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                out += errors(item, props[key], root, f"{where}.{key}")
            elif extra is False:
                out.append(f"{where}: {key!r} is not allowed")
            elif isinstance(extra, dict):
                out += errors(item, extra, root, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += errors(item, schema["items"], root, f"{where}[{i}]")
    return out


def _subschemas(schema: object) -> Iterator[dict[str, Any]]:
    if isinstance(schema, dict):
        yield schema
        for key, sub in schema.items():
            if key in ("properties", "$defs"):
                for each in sub.values():
                    yield from _subschemas(each)
            elif key in ("items", "additionalProperties"):
                yield from _subschemas(sub)
            elif key == "oneOf":
                for each in sub:
                    yield from _subschemas(each)


def test_the_schema_uses_only_what_the_validator_checks() -> None:
    schema = load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    used = {key for sub in _subschemas(schema) for key in sub}
    assert used <= KEYWORDS, used - KEYWORDS


def test_the_validator_finds_what_is_wrong() -> None:
    schema = load_schema()
    component = {"$ref": "#/$defs/component", "$defs": schema["$defs"]}
    good = {"round": 3, "phase": "idle", "neighbours": ["a"], "mixing": "mh",
            "consensus_distance": [0.5], "privacy": None, "rounds_since_view_change": 1}
    assert errors(good, component) == []
    bad = {**good, "round": -1, "phase": "dozing", "neighbours": 2, "extra": True}
    del bad["mixing"]
    found = errors(bad, component)
    assert any("'mixing' is missing" in e for e in found)
    assert any("below 0" in e for e in found) and any("'dozing'" in e for e in found)
    assert any("$.neighbours" in e for e in found) and any("'extra'" in e for e in found)
    assert errors({**good, "privacy": {"clip": 1.0}}, component)  # neither null nor privacy
    assert errors({**good, "consensus_distance": [True]}, component)  # (a bool is no number)
    assert errors({**good, "consensus_distance": [math.inf]}, component)  # (nor is inf)


@pytest.mark.parametrize("rule", ["mh", "clipped"])
def test_the_node_status_fits_the_component_schema(rule: str) -> None:
    schema = load_schema()
    node = node_with(1.0, rule)
    status = status_of(node)
    assert status["components"]["backbone"] == component_status(node, "backbone")
    assert status["components"]["backbone"]["mixing"] == rule
    component = {"$ref": "#/$defs/component", "$defs": schema["$defs"]}
    for value in status["components"].values():
        assert errors(json.loads(json.dumps(value)), component) == []


def test_a_privacy_status_fits_the_schema() -> None:
    schema = load_schema()
    policy = Policy(clip=1.0, sigma=1.0, delta=1e-5, budget=8.0)
    node = node_with(1.0, "mh", privacy={"backbone": policy})
    privacy = status_of(node)["components"]["backbone"]["privacy"]
    assert privacy is not None and privacy["releases"] == 0
    assert errors(privacy, {"$ref": "#/$defs/privacy", "$defs": schema["$defs"]}) == []


@pytest.mark.parametrize("profile", ["server", "phone"])
def test_a_resources_status_fits_the_schema(profile: str) -> None:
    from p2pfed.config import Config
    from p2pfed.profiles import resources_of
    from p2pfed.runtime.profile import ResourceMonitor

    schema = load_schema()
    res = resources_of(Config().with_overrides(node__profile=profile))
    status = ResourceMonitor(res, rss_mb=lambda: 321.0).status()  # (no round yet: nulls)
    assert status["round_s"] == {"rounds": 0, "last": None, "mean": None}
    assert errors(json.loads(json.dumps(status)),
                  {"$ref": "#/$defs/resources", "$defs": schema["$defs"]}) == []
    assert errors({**status, "training": "paused"},
                  {"$ref": "#/$defs/resources", "$defs": schema["$defs"]})


def test_a_training_entry_with_groups_fits_the_schema() -> None:
    training = {"$ref": "#/$defs/training", "$defs": load_schema()["$defs"]}
    entry = {"round": 3, "loss": 0.5, "examples": 90, "heldout": 10, "accuracy": 0.7,
             "accuracy_round": 3}
    assert errors(entry, training) == []
    grouped = {**entry, "groups": {"north": 0.8, "south": 0.6, "tiny": 1.0},
               "group_counts": {"north": 5, "south": 4, "tiny": 1}, "worst_group_gap": None}
    assert errors(grouped, training) == []
    assert errors({**grouped, "worst_group_gap": 0.2}, training) == []
    assert errors({**grouped, "worst_group_gap": -0.2}, training)
    assert errors({**grouped, "groups": {"north": "high"}}, training)
    assert errors({**grouped, "group_counts": {"north": 0.5}}, training)
