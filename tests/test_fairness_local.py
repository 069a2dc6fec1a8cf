"""The fairness objective and measures on a member (the daemon's side of the group study):
``[fairness]`` in the config, the objective reaching the trainer, and held-out accuracy per
group in the trainer's progress (``status --json``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from gossip.errors import ConfigError
from p2pfed.config import Config, FairnessSection
from p2pfed.model.fairness import group_accuracy, heldout_groups
from p2pfed.model.local import build_trainer
from tests.test_status_schema import errors, load_schema

FED = bytes(range(32))
KEY = bytes(32)
TOPIC = ["encoder.text.lora", "head.topic"]


def write_questions(path: Path, groups: list[str] | None, n: int = 40) -> None:
    rows = [{"text": f"question {i} about topic {i % 3}", "label": i % 3,
             **({"school": groups[i % len(groups)]} if groups else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def config(tmp_path: Path, groups: list[str] | None, fairness: dict[str, object] | None = None,
           holdout: float = 0.5) -> Config:
    write_questions(tmp_path / "q.jsonl", groups)
    options = {"group_field": "school"} if groups else {}
    text = {"kind": "text-jsonl", "path": "q.jsonl", **options}
    return Config.from_dict({
        "components": {"hold": TOPIC},
        "model": {"kind": "m3t", "text_model": "tiny", "lora_layers": [1], "steps": 2,
                  "batch_size": 4, "holdout": holdout},
        "data": {"topic": {"text": text}},
        **({"fairness": fairness} if fairness is not None else {}),
    })


def test_heldout_groups_by_hand() -> None:
    correct = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0], dtype=bool)
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3])
    out = heldout_groups(correct, groups, ("north", "rural", "south", "tiny"))
    assert out["groups"] == {"north": 0.8, "rural": 0.2, "south": 1.0, "tiny": 0.0}
    assert out["group_counts"] == {"north": 5, "rural": 5, "south": 5, "tiny": 1}
    assert out["worst_group_gap"] == pytest.approx(0.8)  # south − rural; tiny (1 example) is out
    few = heldout_groups(correct[:9], groups[:9])  # unnamed groups: their codes; rural has 4
    assert few["groups"] == {"0": 0.8, "1": 0.25} and few["worst_group_gap"] is None


@pytest.mark.parametrize(("fairness", "message"), [
    ({"objective": "minimax"}, "fairness.objective must be one of erm, group-dro, not 'minimax'"),
    ({"tilt": -0.5}, r"fairness.tilt must be in \[0, 50\]"),
    ({"tilt": 51}, r"fairness.tilt must be in \[0, 50\]"),
    ({"tilt": "high"}, "fairness.tilt must be a number"),
    ({"weights": 1.0}, r"\[fairness\] has unknown key\(s\): weights"),
    ({"mixing": "loss-weighted"}, "fairness.mixing must be one of plain, loss, not"),
    ({"lean": 10.5}, r"fairness.lean must be in \(0, 10\]"),
    ({"lean": 0}, r"fairness.lean must be in \(0, 10\]"),
])
def test_bad_fairness_settings_are_refused(fairness: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"fairness": fairness})


def test_fairness_settings_round_trip_through_toml(tmp_path: Path) -> None:
    assert Config().fairness == FairnessSection("erm", 1.0, "plain", 3.0)
    cfg = Config.from_dict({"fairness": {"objective": "group-dro", "tilt": 0, "mixing": "loss",
                                         "lean": 3}})
    assert cfg.fairness == FairnessSection("group-dro", 0.0, "loss", 3.0)
    (tmp_path / "p2pfed.toml").write_text(cfg.to_toml(), encoding="utf-8")
    assert Config.from_toml(tmp_path / "p2pfed.toml") == cfg


def test_group_dro_from_the_config_reaches_the_trainer(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["east", "west"], {"objective": "group-dro", "tilt": 2.5})
    trainer = build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    assert (trainer.objective, trainer.tilt) == ("group-dro", 2.5)
    train, held = trainer.data["topic"], trainer.heldout["topic"]
    assert train.groups is not None and held.groups is not None
    assert train.group_names == held.group_names == ("east", "west")
    assert len(train) + len(held) == 40
    assert np.isfinite(trainer.train("head.topic", 0))


def test_group_dro_without_groups_trains_erm_and_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(tmp_path, None, {"objective": "group-dro"})
    with caplog.at_level(logging.WARNING, logger="p2pfed.model.local"):
        trainer = build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "topic" in warnings[0] and "erm" in warnings[0]
    assert trainer.data["topic"].groups is None  # the objective then falls back to the mean loss
    assert np.isfinite(trainer.train("head.topic", 0))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="p2pfed.model.local"):
        build_trainer(config(tmp_path, ["a", "b"], {"objective": "group-dro"}), TOPIC, FED, KEY,
                      tmp_path)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_progress_reports_heldout_accuracy_per_group(tmp_path: Path) -> None:
    cfg = config(tmp_path, ["east", "west"] * 18 + ["tiny"] * 4)  # (40 examples, 20 held out)
    trainer = build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    held = trainer.heldout["topic"]
    assert held.groups is not None
    correct = trainer.correct("topic", held)  # the model as round 0 begins
    expected = {held.group_names[g]: a for g, a in group_accuracy(correct, held.groups).items()}
    trainer.train("head.topic", 0)
    progress = trainer.progress["topic"]
    assert progress["accuracy"] == pytest.approx(correct.mean())
    assert progress["groups"] == pytest.approx(expected)
    counts = progress["group_counts"]
    assert counts == {n: int(np.sum(held.groups == held.group_names.index(n))) for n in expected}
    assert sum(counts.values()) == len(held) == 20
    assert counts["east"] >= 5 and counts["west"] >= 5 and counts["tiny"] < 5
    gap = abs(expected["east"] - expected["west"])  # tiny is too small to rank
    assert progress["worst_group_gap"] == pytest.approx(gap)
    schema = load_schema()
    training = {"$ref": "#/$defs/training", "$defs": schema["$defs"]}
    assert errors(json.loads(json.dumps(progress)), training) == []


def test_progress_without_groups_has_no_group_keys(tmp_path: Path) -> None:
    trainer = build_trainer(config(tmp_path, None), TOPIC, FED, KEY, tmp_path)
    trainer.train("head.topic", 0)
    progress = trainer.progress["topic"]
    assert progress["accuracy"] is not None and progress["accuracy_round"] == 0
    assert not {"groups", "group_counts", "worst_group_gap"} & set(progress)
    schema = load_schema()
    training = {"$ref": "#/$defs/training", "$defs": schema["$defs"]}
    assert errors(json.loads(json.dumps(progress)), training) == []
    assert errors({**progress, "groups": {"a": "high"}}, training)
    assert errors({**progress, "group_counts": {"a": 0}}, training)


def test_status_prints_the_worst_group_gap() -> None:
    from rich.console import Console

    from p2pfed.cli_daemon import training_table

    entry = {"round": 7, "loss": 0.4, "examples": 90, "heldout": 10, "accuracy": 0.8,
             "accuracy_round": 7}
    grouped = {**entry, "groups": {"a": 0.9, "b": 0.7}, "group_counts": {"a": 5, "b": 5},
               "worst_group_gap": 0.2}
    console = Console(width=160, record=True)
    console.print(training_table({"topic": grouped, "digits": entry}))
    text = console.export_text()
    assert "0.800 (worst-group gap 0.200)" in text and text.count("worst-group gap") == 1


def test_group_dro_with_subsampled_privacy_is_refused() -> None:
    """group-dro draws a small group's examples more often than the accountant's sampling
    rate says: with a rate below 1 the config is refused, naming both settings."""
    private = {"sample_rate": 0.5, "shared": {"clip": 1.0, "sigma": 1.0}}
    with pytest.raises(ConfigError, match=r"privacy\.sample_rate"):
        Config.from_dict({"fairness": {"objective": "group-dro"}, "privacy": private})
    Config.from_dict({"fairness": {"objective": "erm"}, "privacy": private})
    Config.from_dict({"fairness": {"objective": "group-dro"},
                      "privacy": {**private, "sample_rate": 1.0}})
