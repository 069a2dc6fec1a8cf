"""The education workload in the simulator (tiny text model, few rounds) and model lineage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from gossip.identity import load_identity
from p2pfed.ledger import Ledger, verify_ledger
from p2pfed.sim.education import EducationSettings
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from p2pfed.sim.topology import Topology, parse_topology

TINY = EducationSettings(rounds=3, steps=3, batch_size=8, questions=160, traces=96,
                         text_model="tiny", lora_layers=(1,))
HEAD_ONLY = ("encoder.text.lora", "head.topic")


def school_topology() -> Topology:
    """Two institutions hold everything; two small schools hold only the topic head and adapter."""
    everything = ["big-a", "big-b"]
    return parse_topology({
        "name": "schools",
        "graph": {"kind": "edges", "nodes": ["big-a", "big-b", "small-c", "small-d"],
                  "edges": [["big-a", "big-b"], ["big-a", "small-c"], ["big-b", "small-d"],
                            ["small-c", "small-d"]]},
        "components": {
            "encoder.text.lora": "all", "head.topic": "all",
            "encoder.image": everything, "head.digits": everything, "backbone": everything,
            "encoder.activity": everything, "head.engagement": everything,
        },
    })


def _config(home: Path | None = None, seed: int = 3) -> SimConfig:
    return SimConfig(school_topology(), workload="education", rounds=TINY.rounds, seed=seed,
                     home=home, education=TINY)


@pytest.fixture(scope="module")
def twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Simulation, dict[str, Any],
                                                             dict[str, Any], Path]:
    """The same seed run twice (the first with homes on disk)."""
    home = tmp_path_factory.mktemp("homes")
    sim = Simulation(_config(home, seed=5))
    first = sim.run()
    return sim, first, simulate(_config(seed=5)), home


def test_a_node_holding_a_head_and_an_adapter_builds_trains_and_sends_only_those(
        twice: tuple[Simulation, dict[str, Any], dict[str, Any], Path]) -> None:
    sim, report, _, tmp_path = twice
    topo = sim.topo
    for small in ("small-c", "small-d"):
        trainer = sim.trainers[small]
        assert sorted(trainer.model.modules) == list(HEAD_ONLY)  # nothing else was built
        assert sorted(trainer._trained) == list(HEAD_ONLY)  # ...or trained
        assert trainer._trained == {c: (0, TINY.rounds - 1) for c in HEAD_ONLY}
    peer_of = {n: load_identity(tmp_path / n / "identity.key").peer_id for n in topo.nodes}
    sent: dict[str, set[str]] = {n: set() for n in topo.nodes}
    for name in topo.nodes:
        ident = load_identity(tmp_path / name / "identity.key")
        with Ledger.open(tmp_path / name / "ledger.sqlite3", ident) as ledger:
            for entry in ledger.entries():
                if entry.kind == "local-update":
                    sent[name].add(entry.body["component"])
                if entry.kind == "contribution":  # what a neighbour sent us
                    sender = next(n for n, p in peer_of.items() if p == entry.body["sender"])
                    sent[sender].add(entry.body["component"])
        assert verify_ledger(tmp_path / name / "ledger.sqlite3", ident.public_key).ok
    assert sent["small-c"] == sent["small-d"] == set(HEAD_ONLY)
    assert sent["big-a"] == set(topo.holders)
    assert set(report["tasks"]) == {"digits", "topic", "engagement"}
    assert report["tasks"]["topic"]["holders"] == 4
    assert report["tasks"]["digits"]["holders"] == 2


def test_the_same_seed_gives_the_same_accuracies(
        twice: tuple[Simulation, dict[str, Any], dict[str, Any], Path]) -> None:
    _, first, second, _ = twice
    assert first["tasks"] == second["tasks"]
    for task in first["tasks"].values():
        for key in ("federated", "local_only", "centralized"):
            assert 0.0 <= task[key] <= 1.0 and not math.isnan(task[key])
    assert first["components"]["head.topic"]["consensus_distance"] == \
        second["components"]["head.topic"]["consensus_distance"]


def test_a_head_inherits_the_lineage_of_the_encoder_it_was_trained_on() -> None:
    """Line a - b - c: c holds only the text adapter, so c never mixes a head; but a's topic
    head is trained on a's adapter, which has mixed c's, so the head carries c's lineage."""
    pipeline = ["a", "b"]
    topo = parse_topology({
        "graph": {"kind": "edges", "nodes": ["a", "b", "c"], "edges": [["a", "b"], ["b", "c"]]},
        "components": {
            "encoder.text.lora": "all", "head.topic": pipeline, "encoder.image": pipeline,
            "head.digits": pipeline, "backbone": pipeline, "encoder.activity": pipeline,
            "head.engagement": pipeline,
        },
    })
    sim = Simulation(SimConfig(topo, workload="education", rounds=3, seed=1, education=TINY))
    sim.run()
    c = sim.nodes["c"].identity.peer_id
    a = sim.nodes["a"].node
    assert a.shaped_by("encoder.text.lora", c)
    assert a.shaped_by("head.topic", c)  # through the forward pass, not through mixing
    assert a.shaped_by("head.engagement", c)
    # the backbone is shared with engagement, so even the digits pipeline is reached
    assert a.shaped_by("backbone", c) and a.shaped_by("head.digits", c)


def test_a_topology_missing_a_task_is_refused() -> None:
    from gossip.errors import ConfigError

    topo = parse_topology({"graph": {"kind": "complete", "n": 2},
                           "components": {"encoder.text.lora": "all", "head.topic": "all"}})
    with pytest.raises(ConfigError, match="no holders for tasks"):
        simulate(SimConfig(topo, workload="education", rounds=1, education=TINY))


def test_the_report_has_an_accuracy_curve_for_each_task_and_baseline(
        twice: tuple[Simulation, dict[str, Any], dict[str, Any], Path]) -> None:
    _, report, _, _ = twice
    for task in report["tasks"].values():
        assert task["curve_rounds"] == list(range(1, TINY.rounds + 1))  # (3 rounds: each)
        for kind in ("federated", "local_only", "centralized"):
            curve = task[f"{kind}_curve"]
            assert len(curve) == TINY.rounds and all(0.0 <= a <= 1.0 for a in curve)
            assert curve[-1] == task[kind]  # the last round's is the final figure
    assert report["components"]["head.topic"]["tasks"] == ["topic"]


def test_the_education_plot_draws_accuracy_per_task(
        twice: tuple[Simulation, dict[str, Any], dict[str, Any], Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from p2pfed.sim.report import plot_report

    _, report, _, _ = twice
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)  # (keep the figure to look at)
    plot_report(report, tmp_path / "edu.png")
    assert (tmp_path / "edu.png").read_bytes().startswith(b"\x89PNG")
    axes = figures[0].axes
    assert [ax.get_title().split(" (")[0] for ax in axes] == list(report["tasks"])
    for ax, task in zip(axes, report["tasks"].values(), strict=True):
        assert [list(line.get_ydata()) for line in ax.get_lines()] == [
            task["federated_curve"], task["local_only_curve"], task["centralized_curve"]]
        assert all(list(line.get_xdata()) == task["curve_rounds"] for line in ax.get_lines())
    assert "accuracy" in axes[0].get_ylabel()


def test_the_summary_shows_accuracy_not_consensus_for_trained_components(
        twice: tuple[Simulation, dict[str, Any], dict[str, Any], Path],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from p2pfed.cli_sim import _print_sim_summary

    monkeypatch.setenv("COLUMNS", "200")
    _, report, _, _ = twice
    _print_sim_summary(report)
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "component" in line)
    assert "federated accuracy" in header and "trained for" in header
    assert "distance" not in header and "drift" not in header
    topic = next(line for line in out.splitlines() if line.strip("│ ").startswith("head.topic"))
    assert f"topic {report['tasks']['topic']['federated']:.3f}" in topic


def test_every_phase_reports_progress() -> None:
    phases: dict[str, list[tuple[int, int]]] = {}
    rounds: list[int] = []
    config = _config(seed=4)
    config.progress = lambda done, _total: rounds.append(done)
    simulate(config, on_phase=lambda name, done, total: phases.setdefault(name, []).append(
        (done, total)))
    assert rounds[-1] == TINY.rounds
    assert [p for p in phases if "baseline" in p] == ["local-only baseline: rounds",
                                                     "centralized baseline: rounds"]
    for name, steps in phases.items():
        if "baseline" in name:
            assert steps == [(r, TINY.rounds) for r in range(1, TINY.rounds + 1)], name
    assert any("loading" in p for p in phases)


@pytest.mark.parametrize(("rounds", "points", "measured"), [
    (40, 8, [5, 10, 15, 20, 25, 30, 35, 40]),
    (48, 8, [6, 12, 18, 24, 30, 36, 42, 48]),
    (41, 8, [6, 12, 18, 24, 30, 36, 41]),
    (3, 8, [1, 2, 3]),
    (5, 1, [5]),
])
def test_the_accuracy_curve_is_measured_at_evenly_spaced_rounds_and_the_last(
        rounds: int, points: int, measured: list[int]) -> None:
    settings = EducationSettings(rounds=rounds, steps=1, curve_points=points)
    assert settings.curve_rounds() == measured


def test_the_simulator_trains_topic_on_a_local_llama_like_model(tmp_path: Path) -> None:
    """--text-model with a decoder: LoRA on its top layer, last-token pooling, topic trained."""
    import dataclasses

    from tests.tiny_hf import save_tiny

    settings = dataclasses.replace(TINY, text_model=str(save_tiny(tmp_path / "llama", "llama")),
                                   lora_layers=EducationSettings.lora_layers)
    sim = Simulation(SimConfig(school_topology(), workload="education", rounds=settings.rounds,
                               seed=3, education=settings, baselines=False))
    report = sim.run()
    encoder = sim.trainers["small-c"].model.modules["encoder.text.lora"]
    assert (encoder.family.model_type, encoder.family.pooling) == ("llama", "last")
    b = {n: p for n, p in encoder.peft.named_parameters() if "lora_B" in n}
    assert b and all(".layers.1." in n for n in b)  # the top of its two layers only
    assert all(float(p.detach().abs().sum()) > 0 for p in b.values())  # trained from zero
    assert 0.0 <= report["tasks"]["topic"]["federated"] <= 1.0
    assert report["tasks"]["topic"]["holders"] == 4
