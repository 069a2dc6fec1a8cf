"""A member's model from p2pfed.toml: data files per task, clear errors, training, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.errors import ConfigError
from p2pfed.config import Config
from p2pfed.model.local import build_trainer
from p2pfed.model.train import TrainRequest

FED = bytes(range(32))
KEY = bytes(32)


def write_questions(path: Path, n: int = 24, bad_line: str | None = None) -> None:
    lines = [json.dumps({"text": f"question {i} about topic {i % 3}", "label": i % 3})
             for i in range(n)]
    if bad_line is not None:
        lines.insert(1, bad_line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_activity(path: Path, labels: list[int], steps: int = 4) -> None:
    rows = ["sample_id,step,logins,hours,submissions,posts,label"]
    for i, label in enumerate(labels):
        rows += [f"s{i},{t},{i % 5},{t * 0.5},1,0,{label}" for t in range(steps)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def config(data: dict[str, object], hold: list[str]) -> Config:
    return Config.from_dict({
        "components": {"hold": hold},
        "model": {"kind": "m3t", "text_model": "tiny", "lora_layers": [1], "steps": 2,
                  "batch_size": 4},
        "data": data,
    })


TOPIC = ["encoder.text.lora", "head.topic"]


def test_a_member_trains_on_the_files_its_config_names(tmp_path: Path) -> None:
    write_questions(tmp_path / "q.jsonl")
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "q.jsonl"}}}, TOPIC)
    trainer = build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    assert trainer.trainable() == TOPIC
    before = {c: f.flat.clone() for c, f in trainer.flats.items()}
    loss = trainer.train("head.topic", 0)  # nothing aligned: the head alone
    assert np.isfinite(loss)
    assert torch.equal(before["encoder.text.lora"], trainer.flats["encoder.text.lora"].flat)
    assert not torch.equal(before["head.topic"], trainer.flats["head.topic"].flat)
    # both aligned: trained together
    trainer.run(TrainRequest("head.topic", 1, ready=frozenset({"encoder.text.lora"})))
    assert not torch.equal(before["encoder.text.lora"], trainer.flats["encoder.text.lora"].flat)
    after = {c: f.flat.clone() for c, f in trainer.flats.items()}
    its_turn = TrainRequest("encoder.text.lora", 1, ready=frozenset({"head.topic"}))
    assert np.isnan(trainer.run(its_turn))  # already done
    assert all(torch.equal(after[c], f.flat) for c, f in trainer.flats.items())
    # after a rollback (the next forget epoch) the same round is trained again
    assert np.isfinite(trainer.run(TrainRequest("encoder.text.lora", 1, epoch=1)))
    assert not torch.equal(after["encoder.text.lora"], trainer.flats["encoder.text.lora"].flat)


def test_the_same_federation_gives_the_same_start_and_another_does_not(tmp_path: Path) -> None:
    write_questions(tmp_path / "q.jsonl")
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "q.jsonl"}}}, TOPIC)
    one = build_trainer(cfg, TOPIC, FED, KEY, tmp_path).flats["head.topic"].flat
    two = build_trainer(cfg, TOPIC, FED, bytes([1]) * 32, tmp_path).flats["head.topic"].flat
    other = build_trainer(cfg, TOPIC, bytes(32), KEY, tmp_path).flats["head.topic"].flat
    assert torch.equal(one, two) and not torch.equal(one, other)


def test_a_bad_line_is_named_with_file_and_line(tmp_path: Path) -> None:
    write_questions(tmp_path / "q.jsonl", bad_line="{not json")
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "q.jsonl"}}}, TOPIC)
    with pytest.raises(ConfigError, match=r"q\.jsonl:2: invalid JSON"):
        build_trainer(cfg, TOPIC, FED, KEY, tmp_path)


def test_a_missing_file_and_an_out_of_range_label_are_named(tmp_path: Path) -> None:
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "absent.jsonl"}}}, TOPIC)
    with pytest.raises(ConfigError, match=r"absent\.jsonl"):
        build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    (tmp_path / "q.jsonl").write_text('{"text": "x", "label": 0}\n{"text": "y", "label": 99}\n',
                                      encoding="utf-8")
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "q.jsonl"}}}, TOPIC)
    with pytest.raises(ConfigError, match=r"q\.jsonl: sample 2 has label 99"):
        build_trainer(cfg, TOPIC, FED, KEY, tmp_path)


ENGAGEMENT = ["backbone", "encoder.activity", "encoder.text.lora", "head.engagement"]


def test_a_multimodal_task_joins_its_files_by_order_and_checks_labels(tmp_path: Path) -> None:
    labels = [0, 1, 2, 1, 0, 2]
    write_activity(tmp_path / "a.csv", labels)
    notes = [json.dumps({"text": f"note {i}", "label": y}) for i, y in enumerate(labels)]
    (tmp_path / "n.jsonl").write_text("\n".join(notes), encoding="utf-8")
    data = {"engagement": {"activity": {"kind": "series-csv", "path": "a.csv"},
                           "text": {"kind": "text-jsonl", "path": "n.jsonl"}}}
    trainer = build_trainer(config(data, ENGAGEMENT), ENGAGEMENT, FED, KEY, tmp_path)
    assert sorted(trainer.trainable()) == sorted(ENGAGEMENT)
    assert len(trainer.data["engagement"]) == 6
    write_activity(tmp_path / "a.csv", [0, 1, 2, 1, 1, 2])
    with pytest.raises(ConfigError, match=r"sample 5 is labelled 0 but 1"):
        build_trainer(config(data, ENGAGEMENT), ENGAGEMENT, FED, KEY, tmp_path)


def test_data_for_a_task_not_held_and_wrong_modalities_are_refused(tmp_path: Path) -> None:
    write_questions(tmp_path / "q.jsonl")
    cfg = config({"digits": {"image": {"kind": "image-npz", "path": "d.npz"}}}, TOPIC)
    with pytest.raises(ConfigError, match="digits whose pipeline this member does not hold"):
        build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    cfg = config({"topic": {"image": {"kind": "image-npz", "path": "d.npz"}}}, TOPIC)
    with pytest.raises(ConfigError, match="needs exactly the modalities text"):
        build_trainer(cfg, TOPIC, FED, KEY, tmp_path)


@pytest.mark.parametrize("data, message", [
    ({"topic": "q.jsonl"}, "one table per modality"),
    ({"topic": {"text": {"kind": "pdf", "path": "q"}}}, "kind must be one of"),
    ({"topic": {"text": {"kind": "text-jsonl"}}}, "path must be a file path"),
    ({"topic": {"text": {"kind": "text-jsonl", "path": "q", "text_field": 3}}}, "strings"),
])
def test_bad_data_tables_are_refused(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config.from_dict({"data": data})


def test_model_and_data_sections_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "my questions.jsonl",
                                     "text_field": "question"}}}, TOPIC)
    (tmp_path / "p2pfed.toml").write_text(cfg.to_toml(), encoding="utf-8")
    again = Config.from_toml(tmp_path / "p2pfed.toml")
    assert again == cfg
    assert again.data["topic"]["text"].options == (("text_field", "question"),)
    with pytest.raises(ConfigError, match=r"model\.kind must be one of"):
        Config.from_dict({"model": {"kind": "gpt"}})
    with pytest.raises(ConfigError, match="list of integers"):
        Config.from_dict({"model": {"lora_layers": ["5"]}})


def test_training_reads_a_snapshot_of_what_it_does_not_train(tmp_path: Path) -> None:
    """In the daemon the event loop may mix the encoder while the head trains in a thread."""
    write_questions(tmp_path / "q.jsonl")
    cfg = config({"topic": {"text": {"kind": "text-jsonl", "path": "q.jsonl"}}}, TOPIC)
    trainer = build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
    live = trainer.flats["encoder.text.lora"]

    def proj() -> float:
        return float(trainer.model.parameters_of("encoder.text.lora")["proj.weight"][0, 0].detach())

    start = proj()
    seen: list[float] = []

    def concurrent_mix(_module: object, _args: object) -> None:
        live.flat.add_(1.0)  # what a mix on the event loop would do meanwhile
        seen.append(proj())

    handle = trainer.model.modules["encoder.text.lora"].register_forward_pre_hook(concurrent_mix)
    try:
        trainer.train("head.topic", 0)
    finally:
        handle.remove()
    assert seen == [start] * trainer.steps  # every step read the snapshot
    assert proj() == pytest.approx(start + trainer.steps)  # and now the live buffer again


def test_adapter_layers_beyond_the_text_model_are_a_config_error(tmp_path: Path) -> None:
    write_questions(tmp_path / "q.jsonl")
    data = {"topic": {"text": {"kind": "text-jsonl", "path": "q.jsonl"}}}
    cfg = Config.from_dict({"components": {"hold": TOPIC}, "data": data,
                            "model": {"kind": "m3t", "text_model": "tiny", "lora_layers": [5]}})
    with pytest.raises(ConfigError, match=r"lora_layers \[5\]: this text model has layers 0\.\.1"):
        build_trainer(cfg, TOPIC, FED, KEY, tmp_path)
