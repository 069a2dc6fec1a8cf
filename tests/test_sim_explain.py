"""The simulator's ``--explain N``: held-out predictions explained at the end of an education
run, and the faithfulness checks of the report's ``explain`` section (tiny text model)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from p2pfed.model.explain import explain
from p2pfed.model.faithfulness import masked_probabilities, word_positions
from p2pfed.sim.explain import explainer, held_out_examples
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from tests.test_education import TINY, school_topology

N = 5
TASKS = ("digits", "topic", "engagement")


def _config(seed: int = 3, explain: int = N) -> SimConfig:
    return SimConfig(school_topology(), workload="education", rounds=TINY.rounds, seed=seed,
                     education=TINY, baselines=False, explain=explain)


@pytest.fixture(scope="module")
def run() -> tuple[Simulation, dict[str, Any]]:
    sim = Simulation(_config())
    return sim, sim.run()


def _fraction(value: Any) -> bool:
    return value is None or (isinstance(value, float) and 0.0 <= value <= 1.0)


def test_the_section_has_its_keys_and_ranges(run: tuple[Simulation, dict[str, Any]]) -> None:
    _, report = run
    e = report["explain"]
    assert e["examples"] == N and e["token_share"] == 0.2
    assert e["provenance_max_error"] == report["provenance"]["provenance_max_error"]
    assert e["provenance_max_error"] <= 1e-9
    assert e["provenance_spearman"] is None  # (no provenance study in an education run)
    f = e["faithfulness"]
    assert set(f["per_task"]) == set(TASKS)
    for row in [*f["per_task"].values(), f["overall"]]:
        assert _fraction(row["modality_top_beats_least"])
        text = row["text_top_vs_random"]
        assert text is None or (set(text) == {"top", "random"}
                                and all(math.isfinite(v) for v in text.values()))
    assert f["overall"]["examples"] == N * len(TASKS)
    assert f["overall"]["multi_modal_examples"] + f["overall"]["modality_ties"] == N
    assert f["overall"]["text_examples"] == 2 * N  # topic and engagement notes


def test_each_task_is_explained_on_its_first_holder_with_n_examples(
        run: tuple[Simulation, dict[str, Any]]) -> None:
    sim, report = run
    per_task = report["explain"]["faithfulness"]["per_task"]
    for task in TASKS:
        holders = sorted(n for n, t in sim.final_trainers().items() if task in t.model.tasks())
        assert per_task[task]["node"] == report["explain"]["nodes"][task] == holders[0]
        assert per_task[task]["examples"] == N
        shares = per_task[task]["mean_modality_shares"]
        assert sum(shares.values()) == pytest.approx(1.0)


def test_a_text_task_compares_top_words_with_random_ones(
        run: tuple[Simulation, dict[str, Any]]) -> None:
    topic = run[1]["explain"]["faithfulness"]["per_task"]["topic"]
    assert topic["text_examples"] == N and topic["text_top_vs_random"] is not None
    assert topic["modality_top_beats_least"] is None and topic["multi_modal_examples"] == 0
    digits = run[1]["explain"]["faithfulness"]["per_task"]["digits"]
    assert digits["text_top_vs_random"] is None and digits["modality_top_beats_least"] is None


def test_the_multimodal_task_compares_its_modalities(
        run: tuple[Simulation, dict[str, Any]]) -> None:
    row = run[1]["explain"]["faithfulness"]["per_task"]["engagement"]
    assert set(row["mean_modality_shares"]) == {"activity", "text"}
    assert row["multi_modal_examples"] + row["modality_ties"] == N
    assert row["multi_modal_examples"] > 0 and _fraction(row["modality_top_beats_least"])
    assert row["text_top_vs_random"] is not None  # its notes are texts too


def test_the_same_seed_gives_the_same_section(run: tuple[Simulation, dict[str, Any]]) -> None:
    assert simulate(_config())["explain"] == run[1]["explain"]


def test_masking_nothing_and_everything_matches_the_explanation(
        run: tuple[Simulation, dict[str, Any]]) -> None:
    sim, _ = run
    trainers = sim.final_trainers()
    assert sim.edu is not None
    for task in TASKS:
        model = trainers[explainer(trainers, task) or ""].model
        example = held_out_examples(sim.edu, task, 1)[0]
        e = explain(model, task, example)
        assert masked_probabilities(model, task, example) == pytest.approx(e.probabilities,
                                                                           abs=1e-6)
        everything = masked_probabilities(model, task, example,
                                          modalities=model.spec.task(task).modalities)
        assert everything[e.predicted] == pytest.approx(e.baseline_probability, abs=1e-6)
        if "text" in example:  # every word deleted one by one is the whole text deleted
            words = word_positions(model, example["text"])
            assert e.tokens is not None and len(words) == len(e.tokens) - 2
            assert masked_probabilities(model, task, example, tokens=words) == pytest.approx(
                masked_probabilities(model, task, example, modalities=("text",)), abs=1e-9)
    with pytest.raises(ValueError, match="not words"):
        masked_probabilities(model, "engagement", example, tokens=[0])  # [CLS]


def test_the_held_out_texts_are_the_workloads(run: tuple[Simulation, dict[str, Any]]) -> None:
    sim, _ = run
    assert sim.edu is not None
    encoder = sim.trainers["big-a"].model.modules["encoder.text.lora"]
    for task in ("topic", "engagement"):
        examples = held_out_examples(sim.edu, task, 3)
        cached = encoder.encode_prefix([x["text"] for x in examples])  # type: ignore[operator]
        ours = sim.edu.test[task].inputs["text"]
        width = cached.hidden.shape[1]
        assert (cached.mask == ours.mask[:3, :width]).all()
        assert (cached.hidden - ours.hidden[:3, :width]).abs().max() <= 1e-5
    assert len(held_out_examples(sim.edu, "digits", 10_000)) == len(sim.edu.test["digits"])


def test_the_comparison_runs_of_a_study_do_not_explain() -> None:
    from p2pfed.sim import simulator

    seen: list[int] = []
    real = Simulation.__init__

    def spy(self: Simulation, config: SimConfig, *args: Any, **kwargs: Any) -> None:
        seen.append(config.explain)
        real(self, config, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simulator.Simulation, "__init__", spy)
        report = simulate(dataclasses.replace(_config(explain=1), attack=("sign-flip", 1)))
    assert seen == [1, 0] and report["explain"]["examples"] == 1


@pytest.mark.parametrize(("args", "words"), [
    (["--explain", "-1"], "greater than or equal to 0"),
    (["--explain", "3"], "needs --workload education"),
    (["--explain", "many"], "--explain"),
])
def test_bad_explain_values_are_refused(args: list[str], words: str) -> None:
    from typer.testing import CliRunner

    from p2pfed.cli import app

    result = CliRunner().invoke(app, ["simulate", "topologies/ring-16.toml", "--rounds", "2",
                                      *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())


def test_the_config_check_refuses_them_too() -> None:
    from gossip.errors import ConfigError

    with pytest.raises(ConfigError, match="count >= 0"):
        Simulation(_config(explain=-1))
    with pytest.raises(ConfigError, match="education workload"):
        Simulation(SimConfig(school_topology(), rounds=2, explain=2))


def test_the_summary_prints_the_faithfulness_table(
        run: tuple[Simulation, dict[str, Any]], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfed.cli_sim import _print_sim_summary

    monkeypatch.setenv("COLUMNS", "200")
    _print_sim_summary(run[1])
    text = capsys.readouterr().out
    assert "explaining 5 held-out examples" in text and "overall" in text
    assert "attributions are not causes" in text
