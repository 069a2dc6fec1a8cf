"""A school's own data and model: example files, init's config from --data specs, predict, and
the exported pipeline loaded with peft from another directory."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from gossip.errors import ConfigError
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.config import Config
from p2pfed.model.data import MODALITY_FILES
from p2pfed.model.samples import sample_path, write_samples
from p2pfed.model.sources import data_sources, with_model_data
from p2pfed.model.tasks import LABELS, TASKS, load_task_data, task_by_name
from tests.test_daemon import run_daemon_rounds

TINY = {"model__text_model": "tiny", "model__lora_layers": (1,), "model__steps": 2,
        "model__batch_size": 4}


def specs(task: str, folder: Path) -> list[str]:
    return [f"{task}:{m}:{sample_path(folder, task, m)}" for m in task_by_name(task).modalities]


@pytest.mark.parametrize("task", [t.name for t in TASKS])
def test_sample_files_are_what_the_loaders_read_and_repeat_exactly(task: str,
                                                                   tmp_path: Path) -> None:
    one = write_samples(task, tmp_path / "one", count=30, seed=3)
    two = write_samples(task, tmp_path / "two", count=30, seed=3)
    other = write_samples(task, tmp_path / "other", count=30, seed=4)
    spec = task_by_name(task)
    assert [p.name for p in one] == [
        *(f"{task}-{m}{MODALITY_FILES[m][1]}" for m in spec.modalities), "README.md"]
    for a, b, c in zip(one[:-1], two[:-1], other[:-1], strict=True):
        assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    data = load_task_data(data_sources(specs(task, tmp_path / "one"), tmp_path), tmp_path)
    labels = data[task].labels
    assert len(labels) == 30 and labels.max() < spec.classes and len(set(labels.tolist())) > 1
    readme = one[-1].read_text(encoding="utf-8")
    assert all(f"| {i} | {name} |" in readme for i, name in enumerate(LABELS[task]))
    assert len(LABELS[task]) == spec.classes
    # the config lines in the README are a working [data] section
    toml = readme.split("```toml\n")[1].split("```")[0]
    config = Config.from_dict(tomllib.loads(toml))
    assert config.data == data_sources(specs(task, tmp_path / "one"), tmp_path)
    assert list(config.components.hold) == spec.pipeline()


def test_data_sample_refuses_an_unknown_task_and_a_used_place_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "sample", "maths", str(tmp_path / "new")]) == exitcodes.CONFIG
    err = capsys.readouterr().err
    assert "unknown task 'maths'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine", encoding="utf-8")
    (tmp_path / "file").write_text("mine", encoding="utf-8")
    for place in (used, tmp_path / "file"):
        assert main(["data", "sample", "topic", str(place)]) == exitcodes.FAILURE
        err = capsys.readouterr().err
        assert "name a new or empty directory" in " ".join(err.split())
        assert "Traceback" not in err
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    assert main(["data", "sample", "topic", str(tmp_path / "new"), "--count", "12"]) == 0
    assert "wrote 12 topic examples" in capsys.readouterr().out


def test_init_config_from_data_specs_is_a_working_p2pfed_toml(tmp_path: Path) -> None:
    from p2pfed.model.local import build_trainer

    write_samples("engagement", tmp_path / "school", count=12)
    relative = [f"engagement:{m}:school/{sample_path(Path(), 'engagement', m)}"
                for m in ("text", "activity")]
    config = with_model_data(Config(), model="m3t", data=relative, cwd=tmp_path)
    assert config.model.kind == "m3t"
    assert sorted(config.components.hold) == sorted(task_by_name("engagement").pipeline())
    paths = {m: Path(s.path) for m, s in config.data["engagement"].items()}
    assert paths == {m: (tmp_path / "school" / f"engagement-{m}{MODALITY_FILES[m][1]}").resolve()
                     for m in ("text", "activity")}
    written = tmp_path / "p2pfed.toml"
    written.write_text(config.to_toml(), encoding="utf-8")
    again = Config.from_toml(written)
    assert again.data == config.data and again.components == config.components
    trainer = build_trainer(again.with_overrides(**TINY), list(again.components.hold),
                            bytes(32), bytes(32), tmp_path / "elsewhere")
    assert sorted(trainer.trainable()) == sorted(config.components.hold)
    # nothing asked, nothing changed; a given --hold that covers the pipeline is kept
    assert with_model_data(config, model=None, data=[]) is config
    held = ("encoder.text.lora", "head.topic", "backbone", "encoder.image", "head.digits")
    write_samples("topic", tmp_path / "q", count=10)
    both = with_model_data(Config(), model="m3t", data=specs("topic", tmp_path / "q"), hold=held)
    assert both.components.hold == held and list(both.data) == ["topic"]


@pytest.mark.parametrize(("data", "model", "hold", "message"), [
    (["topic:text"], "m3t", None, "expected TASK:MODALITY:PATH"),
    (["maths:text:q/topic-text.jsonl"], "m3t", None, "unknown task 'maths'"),
    (["topic:audio:q/topic-text.jsonl"], "m3t", None, "unknown modality 'audio'"),
    (["topic:image:q/topic-text.jsonl"], "m3t", None, "task topic takes text, not image"),
    (["topic:text:q/none.jsonl"], "m3t", None, "no file at"),
    (["topic:text:q/topic-text.jsonl"] * 2, "m3t", None, "topic:text is already given"),
    (["engagement:text:q/topic-text.jsonl"], "m3t", None,
     "also needs engagement:activity:PATH"),
    (["topic:text:q/bad.jsonl"], "m3t", None, "bad.jsonl:2: invalid JSON"),
    (["topic:text:q/high.jsonl"], "m3t", None, "task topic has classes 0..9"),
    (["topic:text:q/topic-text.jsonl"], "consensus", None, "needs --model m3t"),
    ([], "m4t", None, "expected one of consensus, m3t"),
    (["topic:text:q/topic-text.jsonl"], "m3t", ("backbone",),
     "needs --hold encoder.text.lora --hold head.topic"),
])
def test_a_bad_data_spec_is_a_config_error_that_names_it(
        tmp_path: Path, data: list[str], model: str, hold: tuple[str, ...] | None,
        message: str) -> None:
    write_samples("topic", tmp_path / "q", count=10)
    (tmp_path / "q" / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{oops\n')
    (tmp_path / "q" / "high.jsonl").write_text('{"text": "a", "label": 12}\n')
    with pytest.raises(ConfigError, match=message):
        with_model_data(Config(), model=model, data=data, hold=hold, cwd=tmp_path)


def m3t_home(tmp_path: Path, task: str, *listen: str) -> tuple[Path, Path]:
    """A home made by init, its p2pfed.toml from --data specs for sample data, in a federation."""
    samples = tmp_path / "samples"
    assert main(["data", "sample", task, str(samples), "--count", "24"]) == 0
    home = tmp_path / "home"
    data = [arg for spec in specs(task, samples) for arg in ("--data", spec)]
    assert main(["init", "--home", str(home), "--interval", "0.1", "--timeout", "1",
                 *listen, *data]) == 0  # --data alone: the m3t model, a tenth held out
    config = Config.from_toml(home / "p2pfed.toml")
    assert config.model.kind == "m3t" and config.model.holdout == 0.1
    assert set(config.data) == {task}
    config = config.with_overrides(**TINY)  # (the bundled MiniLM is too slow for a test)
    (home / "p2pfed.toml").write_text(config.to_toml(), encoding="utf-8")
    assert main(["federation", "create", "school", "--home", str(home)]) == 0
    return home, samples


def test_predict_before_any_checkpoint_says_so(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    home, samples = m3t_home(tmp_path, "topic")
    capsys.readouterr()
    code = main(["predict", "topic", "--input", str(samples / "topic-text.jsonl"),
                 "--home", str(home)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == exitcodes.FAILURE
    assert "no checkpoint of encoder.text.lora, head.topic yet" in err and "Traceback" not in err
    code = main(["predict", "topic", "--input", str(samples / "README.md"), "--home", str(home)])
    assert code == exitcodes.CONFIG
    assert "task topic reads text (.jsonl)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.network
@pytest.mark.slow
def test_sample_data_to_prediction_to_a_peft_model_loaded_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    from p2pfed.model.textbase import _tiny_bert, load_text_base

    home, samples = m3t_home(tmp_path, "topic", "--listen", "/ip4/127.0.0.1/tcp/0")
    run_daemon_rounds(home, 6)  # the daemon checkpoints every 5 rounds
    capsys.readouterr()
    example = ["--input", str(samples / "topic-text.jsonl"), "--index", "3"]
    assert main(["predict", "topic", *example, "--home", str(home), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["probabilities"]) == list(LABELS["topic"])
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-9
    assert result["prediction"] == LABELS["topic"][result["label"]] and result["round"] >= 5
    assert main(["predict", "topic", *example, "--home", str(home)]) == 0
    assert f"topic: {result['prediction']} (class {result['label']}" in capsys.readouterr().out

    out = tmp_path / "export"
    assert main(["export", "head.topic", str(out), "--home", str(home)]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert f"exported head.topic (round {result['round']})" in said
    assert {"adapter_config.json", "adapter_model.safetensors", "projection.safetensors",
            "head.topic.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    adapter_config = json.loads((out / "adapter_config.json").read_text(encoding="utf-8"))
    assert adapter_config["base_model_name_or_path"] == "p2pfed-tiny-bert"
    assert str(Path.cwd()) not in json.dumps(adapter_config) and ".venv" not in json.dumps(
        adapter_config)
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text(encoding="utf-8")
    assert main(["export", "head.topic", str(out), "--home", str(home)]) == exitcodes.FAILURE
    assert "add --force" in " ".join(capsys.readouterr().err.split())

    # what a school does with the export, somewhere else: the README's recipe
    elsewhere = tmp_path / "elsewhere" / "model"
    shutil.copytree(out, elsewhere)
    shutil.rmtree(out)
    _base, tokenizer = load_text_base("tiny")
    text = PeftModel.from_pretrained(_tiny_bert(), str(elsewhere)).eval()
    proj = load_file(str(elsewhere / "projection.safetensors"))
    head = load_file(str(elsewhere / "head.topic.safetensors"))
    question = json.loads((samples / "topic-text.jsonl").read_text().splitlines()[3])["text"]
    batch = tokenizer([question], padding=True, truncation=True, max_length=32,
                      return_tensors="pt")

    def probabilities(hidden: torch.Tensor) -> torch.Tensor:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        x = pooled @ proj["proj.weight"].T + proj["proj.bias"]
        return torch.softmax((x @ head["weight"].T + head["bias"]).double(), -1)[0]

    with torch.no_grad():
        probs = probabilities(text(**batch).last_hidden_state)
        with text.disable_adapter():
            without = probabilities(text(**batch).last_hidden_state)
    node = torch.tensor(list(result["probabilities"].values()), dtype=torch.float64)
    assert torch.allclose(probs, node, atol=1e-6)
    assert not torch.allclose(without, node, atol=1e-4)  # the adapter counts
    trained = load_file(str(elsewhere / "adapter_model.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)
