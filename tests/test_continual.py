"""Continual learning: the schedule, the rehearsal buffer, consensus-anchored EWC, the study."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from gossip.errors import ConfigError
from p2pfed.model.continual import Continual, ContinualSettings, Schedule
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from tests.test_education import TINY, school_topology

TASKS = ["digits", "topic", "engagement"]
SCHEDULE = "topic@0,engagement@2,digits@4,retire:topic@4"


def test_a_schedule_parses_and_says_which_tasks_train_when() -> None:
    s = Schedule.parse(SCHEDULE, TASKS)
    assert s.boundaries() == [2, 4]
    assert s.phases(6) == [(0, 2), (2, 4), (4, 6)]
    assert [s.active("topic", r) for r in range(6)] == [True] * 4 + [False] * 2
    assert [s.active("digits", r) for r in range(6)] == [False] * 4 + [True] * 2
    assert s.retired("topic", 4) and not s.retired("topic", 3)
    assert Schedule.parse(s.text(), TASKS) == s
    assert s.joint() == Schedule({"topic": 0, "engagement": 0, "digits": 0})


@pytest.mark.parametrize(("text", "words"), [
    ("", "empty"), ("topic", "TASK@ROUND"), ("topic@x", "TASK@ROUND"),
    ("maths@0", "unknown task 'maths'"), ("topic@0,topic@3", "starts twice"),
    ("topic@3,retire:topic@3", "must retire after"), ("retire:digits@2", "never starts"),
    ("topic@99999999", "round above"),
])
def test_a_bad_schedule_is_refused_naming_the_item(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        Schedule.parse(text, TASKS)


def test_bad_settings_are_refused() -> None:
    for bad in ({"method": "magic"}, {"sampling": "first"}, {"buffer": 0},
                {"ewc_lambda": float("nan")}, {"fisher_batches": 0}, {"catch_up": 0},
                {"catch_up": 11}, {"catch_up_rounds": 0}, {"catch_up_lr": 0.0},
                {"catch_up_lr": 1.5}, {"catch_up_lr": float("nan")}):
        with pytest.raises(ConfigError):
            ContinualSettings(**bad)  # type: ignore[arg-type]


def test_the_rehearsal_buffer_is_bounded_seeded_and_class_balanced() -> None:
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    schedule = Schedule.parse("topic@0,retire:topic@3", TASKS)
    c = Continual(schedule, ContinualSettings(buffer=12), node_seed=7)
    rows = c.rows("topic", 3, labels)
    assert rows is not None and len(rows) == 12 and len(set(rows.tolist())) == 12
    assert np.bincount(labels[rows]).tolist() == [5, 5, 2]  # (the rare classes all kept)
    again = Continual(schedule, ContinualSettings(buffer=12), node_seed=7).rows("topic", 5, labels)
    assert again is not None and again.tolist() == rows.tolist()
    assert c.rows("topic", 2, labels) is None  # active: all of its data
    naive = Continual(schedule, ContinualSettings(method="naive"), node_seed=7)
    retired = naive.rows("topic", 3, labels)
    assert retired is not None and len(retired) == 0 and not naive.trains("topic", 3)
    uniform = Continual(schedule, ContinualSettings(buffer=12, sampling="uniform"), 7)
    kept = uniform.rows("topic", 3, labels)
    assert kept is not None and len(kept) == 12


def _fixture() -> tuple[Continual, dict[str, Any], torch.nn.Linear]:
    from gossip.catalog import ComponentSpec
    from p2pfed.components import FlatComponent

    layer = torch.nn.Linear(3, 2)
    params = dict(layer.named_parameters())
    flat = FlatComponent.from_params(ComponentSpec.from_name("head.topic"),
                                     {k: p.detach() for k, p in params.items()})
    flat.bind(params)
    schedule = Schedule.parse("topic@0,engagement@2", TASKS)
    c = Continual(schedule, ContinualSettings(method="ewc", ewc_lambda=2.0), node_seed=1)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(1))

    def loss_of(task: str, round_: int, rng: np.random.Generator) -> torch.Tensor:
        index = torch.from_numpy(rng.choice(16, size=8))
        return torch.nn.functional.cross_entropy(layer(x[index]), y[index])

    return c, {"flat": flat, "loss_of": loss_of, "params": lambda _n: params}, layer


def test_ewc_anchors_at_the_boundary_and_pulls_back_towards_it() -> None:
    c, f, layer = _fixture()
    comps = {"head.topic": f["flat"]}
    c.prepare(comps, 1, 0, ["topic"], f["loss_of"], f["params"])
    assert c.anchors() == {} and c.penalty(comps, f["params"]) is None  # before the boundary
    c.prepare(comps, 2, 0, ["topic"], f["loss_of"], f["params"])
    assert c.anchors() == {"head.topic": [2]}
    penalty = c.penalty(comps, f["params"])
    assert penalty is not None and float(penalty.detach()) == 0.0  # at the anchor
    with torch.no_grad():
        layer.weight.add_(0.5)
    moved = c.penalty(comps, f["params"])
    assert moved is not None and float(moved.detach()) > 0.0
    moved.backward()  # type: ignore[no-untyped-call]
    assert layer.weight.grad is not None and float(layer.weight.grad.sum()) > 0.0
    c.prepare(comps, 3, 0, ["topic"], f["loss_of"], f["params"])
    assert c.anchors() == {"head.topic": [2]}  # one anchor per boundary


def test_an_unlearning_rerun_recaptures_the_anchors_it_passes_again() -> None:
    c, f, layer = _fixture()
    comps = {"head.topic": f["flat"]}
    c.prepare(comps, 2, 0, ["topic"], f["loss_of"], f["params"])
    before = f["flat"].flat.clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    c.prepare(comps, 3, 1, ["topic"], f["loss_of"], f["params"])  # re-run starts after it
    assert c.anchors() == {"head.topic": [2]}
    c.prepare(comps, 1, 2, ["topic"], f["loss_of"], f["params"])  # re-run from round 1
    assert c.anchors() == {}
    c.prepare(comps, 2, 2, ["topic"], f["loss_of"], f["params"])
    assert c.anchors() == {"head.topic": [2]}
    assert not torch.equal(c._anchors["head.topic"][0].theta, before)


def _study(method: str, catch_up: int = 1, catch_up_lr: float = 0.5, **extra: Any) -> SimConfig:
    """The SCHEDULE study on the tiny school (``catch_up`` 1: off, as these tests were first
    written; the catch-up tests turn it on)."""
    settings = dataclasses.replace(TINY, rounds=6)
    schedule = Schedule.parse(SCHEDULE, TASKS)
    return SimConfig(school_topology(), workload="education", rounds=6, seed=2,
                     education=settings,
                     continual=(schedule, ContinualSettings(method=method, catch_up=catch_up,
                                                            catch_up_lr=catch_up_lr)),
                     **extra)


def test_a_late_task_catches_up_the_rounds_it_missed() -> None:
    s = Schedule.parse("topic@0,digits@15,engagement@3,retire:engagement@5", TASKS)
    # factor 2: one extra round's steps per round, 15 missed -> rounds 15..29
    assert [r for r in range(60) if s.catching_up("digits", r, 2)] == list(range(15, 30))
    # factor 3: two extra per round -> 8 rounds (the last one overshoots by one)
    assert [r for r in range(60) if s.catching_up("digits", r, 3)] == list(range(15, 23))
    assert not any(s.catching_up("topic", r, 3) for r in range(60))  # (never missed one)
    assert not any(s.catching_up("digits", r, 1) for r in range(60))  # (off)
    assert [r for r in range(60) if s.catching_up("engagement", r, 4)] == [3]  # retired at 5
    assert [r for r in range(60) if s.catching_up("engagement", r, 2)] == [3, 4]
    assert [r for r in range(60) if s.catching_up("digits", r, 2, limit=4)] == [15, 16, 17, 18]
    assert ContinualSettings().catch_up == 3  # (the default, by measurement)


def test_the_trainer_runs_more_steps_while_a_task_catches_up() -> None:
    """digits starts at round 4 of SCHEDULE: with catch_up 3 its rounds 4 and 5 run three
    times the steps, for every task trained with it; round 6 and catch_up 1 run the usual."""
    counts: dict[tuple[int, int, str], int] = {}
    for factor in (1, 3):
        trainer = Simulation(_study("rehearsal", catch_up=factor)).trainers["big-a"]
        loss = trainer._loss

        def counted(task: str, round_: int, rng: Any, loss: Any = loss,
                    factor: int = factor) -> Any:
            counts[factor, round_, task] = counts.get((factor, round_, task), 0) + 1
            return loss(task, round_, rng)

        trainer._loss = counted  # type: ignore[method-assign]
        for round_ in (3, 4, 5, 6):
            trainer.train_round(["backbone", "encoder.image", "head.digits"], round_)
    steps = TINY.steps
    for task in ("digits", "engagement"):  # (engagement trains the backbone with it)
        assert [counts.get((1, r, task)) for r in (4, 5, 6)] == [steps] * 3
        assert [counts.get((3, r, task)) for r in (4, 5, 6)] == [3 * steps] * 2 + [steps]
    assert counts[1, 3, "engagement"] == counts[3, 3, "engagement"] == steps
    assert (3, 3, "digits") not in counts  # (not yet active)


def test_a_round_that_catches_up_takes_its_steps_at_a_fraction_of_the_rate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The extra steps of a catching-up round are smaller (``catch_up_lr``): digits catches up
    in rounds 4 and 5 of SCHEDULE, so the optimiser of those rounds (not round 3's) runs at
    ``catch_up_lr`` times the round's rate; with catch-up off no round does."""
    from p2pfed.model import train

    seen: dict[tuple[float, int], float] = {}
    for factor, fraction in ((3, 0.5), (3, 0.25), (1, 0.5)):
        trainer = Simulation(_study("rehearsal", catch_up=factor, catch_up_lr=fraction)
                             ).trainers["big-a"]
        for round_ in (3, 4, 5):
            made: list[float] = []
            real = torch.optim.Adam

            def spy(params: Any, lr: float, made: list[float] = made, real: Any = real) -> Any:
                made.append(lr)
                return real(params, lr=lr)

            monkeypatch.setattr(train.torch.optim, "Adam", spy)
            trainer.train_round(["backbone", "encoder.image", "head.digits"], round_)
            monkeypatch.setattr(train.torch.optim, "Adam", real)
            seen[fraction if factor > 1 else 1.0, round_] = made[0] / trainer.lr_at(round_)
    assert [seen[0.5, r] for r in (3, 4, 5)] == pytest.approx([1.0, 0.5, 0.5])
    assert [seen[0.25, r] for r in (3, 4, 5)] == pytest.approx([1.0, 0.25, 0.25])
    assert [seen[1.0, r] for r in (3, 4, 5)] == pytest.approx([1.0] * 3)  # (catch-up off)
    assert ContinualSettings().catch_up_lr == 0.5  # (the default, by measurement)


@pytest.fixture(scope="module")
def study() -> dict[str, Any]:
    return simulate(_study("rehearsal+ewc", catch_up=2))


def test_the_continual_study_reports_each_method_beside_naive_and_joint(
        study: dict[str, Any]) -> None:
    c = study["continual"]
    assert c["schedule"] == Schedule.parse(SCHEDULE, TASKS).text()
    assert c["phases"] == [[0, 2], [2, 4], [4, 6]]
    assert c["method"] == "rehearsal+ewc+catch-up" and c["settings"]["catch_up"] == 2
    assert set(c["runs"]) == {"rehearsal+ewc+catch-up", "naive", "joint"}
    for name, run in c["runs"].items():
        assert [p["end_round"] for p in run["phase_accuracy"]] == [2, 4, 6]
        assert set(run["final"]) == set(TASKS)
        assert set(run["forgetting"]) == {"topic", "engagement"}  # started before the last
        for task, drop in run["forgetting"].items():
            seen = [p["accuracy"][task] for p in run["phase_accuracy"]
                    if p["end_round"] > Schedule.parse(SCHEDULE, TASKS).starts[task]]
            assert drop == pytest.approx(max(seen) - run["final"][task]) and drop >= 0.0
        if name != "joint":
            assert run["new_task_gap"] == {
                t: pytest.approx(run["final"][t] - c["runs"]["joint"]["final"][t])
                for t in TASKS}
    assert c["runs"]["rehearsal+ewc+catch-up"] != c["runs"]["naive"]


def test_a_task_trains_only_in_its_phase_and_a_retired_one_only_on_its_buffer() -> None:
    sim = Simulation(_study("rehearsal"))
    trainer = sim.trainers["big-a"]
    assert trainer.trained_tasks("head.digits", 3) == []
    assert trainer.trained_tasks("head.digits", 4) == ["digits"]
    assert trainer.trained_tasks("head.topic", 5) == ["topic"]  # rehearsed
    kept = trainer.round_data("topic", 5)
    assert len(kept) == min(64, len(trainer.data["topic"])) < len(trainer.data["topic"]) + 1
    naive = Simulation(_study("naive")).trainers["big-a"]
    assert naive.trained_tasks("head.topic", 5) == []


def test_exact_unlearning_after_a_phase_change_equals_the_retrain() -> None:
    """A member forgotten after two phase boundaries: every anchor, Fisher and buffer is
    recomputed by the re-run (and the catch-up steps run again), and the states equal the run
    without the member bit for bit."""
    report = simulate(_study("rehearsal+ewc", catch_up=2, unlearn=("small-c", 5)))
    u = report["unlearning"]
    assert u["max_abs_diff_vs_retrain"] == 0.0
    assert "encoder.text.lora" in u["components_rolled_back"]


def test_a_schedule_follows_the_catalogue_from_the_round_it_took_effect() -> None:
    s = Schedule({"topic": 0, "engagement": 0})
    retired = s.follow({"topic": {"phase": "retired"}, "maths": {"phase": "retired"}}, 9)
    assert retired == Schedule({"topic": 0, "engagement": 0}, {"topic": 9})
    assert retired.follow({"topic": {"phase": "retired"}}, 20) == retired  # (once)
    assert s.follow({"digits": {"phase": "active"}}, 4).starts["digits"] == 4
    assert Schedule({"topic": 3}).follow({"topic": {"phase": "retired"}}, 0).retires == {
        "topic": 4}  # (never before it started)


def test_the_daemons_trainer_retires_a_task_when_the_catalogue_does() -> None:
    """``CatalogueFollower``: each catalogue applied since the start, at the round its entry
    names, and those before it (a restart) the same way."""
    from p2pfed.journal import CatalogueApplied
    from p2pfed.model.local import CatalogueFollower
    from p2pfed.model.train import TrainRequest

    def trainer() -> Any:
        t = Simulation(_study("naive")).trainers["big-a"]
        t.continual.schedule = Schedule(dict.fromkeys(TASKS, 0))
        return t

    live = trainer()
    applied: list[CatalogueApplied] = []
    live.before_run = CatalogueFollower(live, lambda: tuple(applied))
    live.run(TrainRequest("head.topic", 3))
    assert live.trained_tasks("head.topic", 5) == ["topic"]

    def row(phase: str) -> dict[str, Any]:
        return {"phase": phase, "modalities": ["text"], "classes": 10,
                "components": ["encoder.text.lora", "head.topic"], "data_version": ""}

    applied.append(CatalogueApplied(2, b"\x00" * 32, {"topic": row("active")}, round=4))
    applied.append(CatalogueApplied(3, b"\x01" * 32, {"topic": row("retired")}, round=5))
    live.run(TrainRequest("head.topic", 7))  # (both arrived since the last training)
    assert live.trained_tasks("head.topic", 4) == ["topic"]
    assert live.trained_tasks("head.topic", 5) == []  # naive: nothing trains it now
    restarted = trainer()
    CatalogueFollower(restarted, tuple, applied)
    assert restarted.continual.schedule == live.continual.schedule


def test_the_participation_study_measures_rounds_per_simulated_minute() -> None:
    """Two of four nodes train in 30 % of the rounds: each still completes every round, and
    the others' pace is measured beside the run where everyone trains every round."""
    settings = dataclasses.replace(TINY, rounds=4)
    config = SimConfig(school_topology(), workload="education", rounds=4, seed=2,
                       education=settings, participation={"small-c": 0.3, "small-d": 0.3})
    study = simulate(config)["participation"]
    assert study["nodes"] == {"small-c": 0.3, "small-d": 0.3} and study["train_s"] == 1.0
    fast, full = study["rounds_per_min"]["fast"], study["rounds_per_min_everyone_trains"]["fast"]
    assert fast == pytest.approx(full, rel=1e-9)  # (nobody waits for the part-time ones)
    assert study["round_interval_s"] == 2.0  # (paced as a daemon: twice the training time)
    assert fast == pytest.approx(60.0 / study["round_interval_s"], rel=0.05)  # (one a pace)
    assert set(study["gap"]) == set(TASKS)
    assert study["rounds_completed"] == dict.fromkeys(school_topology().nodes, 4)
    trained = study["rounds_trained"]
    assert trained["big-a"] == trained["big-b"] == 4
    assert 0 < trained["small-c"] + trained["small-d"] < 8


def test_the_summary_prints_the_continual_table(study: dict[str, Any],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from p2pfed.cli_sim import _print_sim_summary

    _print_sim_summary(study)
    text = capsys.readouterr().out
    assert "continual" in text and "joint" in text and "naive" in text and "engagement" in text


@pytest.mark.parametrize(("args", "words"), [
    (["--continual", "topic@0"], "needs --workload education"),
    (["--workload", "education", "--continual", "maths@0"], "unknown task 'maths'"),
    (["--workload", "education", "--continual", "topic@0", "--method", "magic"],
     "unknown method"),
    (["--workload", "education", "--participation", "ring-3:2"], "P in (0, 1]"),
    (["--workload", "education", "--participation", "nobody:0.5"], "neither a node"),
    (["--participation", "ring-3:0.5"], "needs --workload education"),
    (["--method", "ewc"], "needs --continual"),
    (["--catch-up", "2"], "needs --continual"),
    (["--workload", "education", "--continual", "topic@0", "--catch-up", "11"],
     "less than or equal to 10"),
    (["--catch-up-lr", "0.5"], "needs --continual"),
    (["--workload", "education", "--continual", "topic@0", "--catch-up-lr", "0"],
     "must be in (0, 1]"),
    (["--workload", "education", "--continual", "topic@0", "--catch-up-lr", "1.5"],
     "must be in (0, 1]"),
    (["--round-interval", "3"], "needs --participation"),
    (["--workload", "education", "--participation", "ring-3:0.5", "--attack", "sign-flip:1"],
     "a study of its own"),
])
def test_bad_continual_options_are_refused(args: list[str], words: str) -> None:
    from typer.testing import CliRunner

    from p2pfed.cli import app

    result = CliRunner().invoke(app, ["simulate", "topologies/ring-16.toml", "--rounds", "2",
                                      *args])
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split())


def test_simulate_passes_the_catch_up_settings_on() -> None:
    from p2pfed.cli_sim import _continual_options

    config = SimConfig(school_topology(), workload="education", rounds=6, seed=2,
                       education=TINY)
    for given, expected in (({}, (3, 0.5)), ({"catch_up": 2, "catch_up_lr": 1.0}, (2, 1.0))):
        out = _continual_options(config, continual="topic@0,digits@3", method="rehearsal",
                                 participation=None, train_s=1.0, **given)  # type: ignore[arg-type]
        assert out.continual is not None
        settings = out.continual[1]
        assert (settings.catch_up, settings.catch_up_lr) == expected
