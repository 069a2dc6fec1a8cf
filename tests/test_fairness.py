"""Fairness: the group-aware objective, the measures, and the simulator's group study."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gossip.errors import ConfigError
from p2pfed import kinds
from p2pfed.cli import app
from p2pfed.ledger_entry import read_entries
from p2pfed.model.fairness import group_accuracy, group_batch, group_loss, summary
from p2pfed.privacy import Policy
from p2pfed.sim import groups
from p2pfed.sim.config import check_config
from p2pfed.sim.simulator import SimConfig, simulate
from p2pfed.sim.topology import load_topology
from tests.test_education import TINY, school_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def test_a_group_batch_draws_evenly_from_the_groups_present() -> None:
    g = np.array([0] * 97 + [1] * 3)
    index, drawn = group_batch(g, 16, np.random.default_rng(0))
    assert len(index) == 16 and list(drawn) == [0] * 8 + [1] * 8
    assert set(index[8:].tolist()) <= {97, 98, 99}  # (the 3 drawn again and again)
    index, drawn = group_batch(np.zeros(40, dtype=np.int64), 16, np.random.default_rng(0))
    assert len(set(index.tolist())) == 16 and not drawn.any()
    # more groups than the batch holds: one row of each of 16 groups, never a bigger batch
    many = np.repeat(np.arange(40), 3)
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for _ in range(20):
        index, drawn = group_batch(many, 16, rng)
        assert len(index) == 16 and len(set(drawn.tolist())) == 16
        assert (many[index] == drawn).all()
        seen |= set(drawn.tolist())
    assert seen == set(range(40))  # every group has its turn


def test_the_group_loss_lies_between_the_groups_mean_and_the_worst_group() -> None:
    losses = torch.tensor([1.0, 1.0, 1.0, 3.0], requires_grad=True)
    g = torch.tensor([0, 0, 0, 1])
    assert float(group_loss(losses, g, 0.0).detach()) == pytest.approx(2.0)  # not 1.5
    soft = group_loss(losses, g, 1.0)
    assert 2.0 < float(soft.detach()) < 3.0
    assert float(group_loss(losses, g, 50.0).detach()) == pytest.approx(3.0, abs=0.02)
    soft.backward()  # type: ignore[no-untyped-call]
    assert losses.grad is not None
    assert float(losses.grad[3]) > 3 * float(losses.grad[0]) > 0  # the worse group weighs more


def test_the_measures_weigh_groups_by_population_and_name_the_worst() -> None:
    correct = np.array([True, True, False, True, False, False])
    assert group_accuracy(correct, np.array([0, 0, 0, 1, 1, 1])) == {
        0: pytest.approx(2 / 3), 1: pytest.approx(1 / 3)}
    per_node = {"a": {0: 0.9, 1: 0.5}, "b": {0: 0.7, 1: 0.3}, "c": {0: 0.8, 1: 0.8}}
    m = summary(per_node, {0: 0.75, 1: 0.25}, groups.GROUPS)
    assert m["worst_node"] == pytest.approx(0.75 * 0.7 + 0.25 * 0.3)
    assert m["mean"] == pytest.approx((0.8 + 0.6 + 0.8) / 3)
    assert m["groups"] == {"majority": pytest.approx(0.8), "minority": pytest.approx(1.6 / 3)}
    assert m["worst_group"] == pytest.approx(1.6 / 3)
    assert m["worst_group_gap"] == pytest.approx(0.8 - 1.6 / 3)
    assert m["p10_node"] == m["worst_node"] and m["nodes"] == 3


def test_the_minority_s_inputs_are_shifted_as_documented() -> None:
    assert groups.shift_text("Solve the quadratic equations, then plot") == \
        "Slv the qdrtc eqtns, thn plt"
    images = np.ones((2, 1, 8, 8), dtype=np.float32)
    shifted = groups.shift_images(images)
    assert shifted[:, :, 0].sum() == 0 and shifted[:, :, :, 0].sum() == 0
    assert float(shifted[0, 0, 4, 4]) == pytest.approx(0.6)
    traces = np.ones((1, 24, 4), dtype=np.float32)
    assert groups.shift_activity(traces)[0, 0].tolist() == [1.5, 0.5, 1.0, 0.25]


def test_the_minority_s_region_is_one_institution_and_everyone_under_it() -> None:
    edu = load_topology(TOPOLOGIES / "hierarchical-edu.toml")
    rich = groups.region(edu, 1)
    roots = [n for n in rich if n.startswith("institution-")]
    assert len(roots) == 1 and len(rich) == 1 + 2 + 6
    k = roots[0].split("-")[1]
    assert all(n.split("-")[1] == k for n in rich)
    assert groups.region(edu, 1) == rich  # (seeded)
    assert len(groups.region(load_topology(TOPOLOGIES / "ring-16.toml"), 1)) == 4


def _config(**kw: object) -> SimConfig:
    config = SimConfig(school_topology(), workload="education", rounds=TINY.rounds, seed=3,
                       education=TINY, groups=True)
    return dataclasses.replace(config, **kw)  # type: ignore[arg-type]


def test_the_group_study_reports_every_run_and_the_rule_beside_the_default() -> None:
    report = simulate(_config(fairness="group-dro", tilt=2.0))
    f = report["fairness"]
    assert f["objective"] == "erm"  # (the default's run, with the baselines)
    for task, runs in f["tasks"].items():
        assert set(runs) == {"federated", "local_only", "centralized"}
        assert 0.0 < f["population"][task]["minority"] < 0.5  # under-represented
        for m in runs.values():
            assert set(m["groups"]) == {"majority", "minority"}
            assert m["worst_group_gap"] == pytest.approx(
                max(m["groups"].values()) - min(m["groups"].values()))
            assert m["worst_node"] <= m["p10_node"] <= m["mean"] + 1e-12
        assert runs["centralized"]["nodes"] == 1
    rule = f["rule"]
    assert rule["objective"] == "group-dro" and rule["tilt"] == 2.0
    assert set(rule["tasks"]) == set(f["tasks"])
    for task, m in rule["tasks"].items():
        assert rule["mean_change"][task] == pytest.approx(
            m["mean"] - f["tasks"][task]["federated"]["mean"])
    # the rule's members trained otherwise than the default's
    assert rule["tasks"] != {t: runs["federated"] for t, runs in f["tasks"].items()}
    # and the central server with the rule beside the central server without it
    pooled = rule["centralized"]
    assert set(pooled["tasks"]) == set(f["tasks"])
    for task, m in pooled["tasks"].items():
        assert m["nodes"] == 1
        assert pooled["mean_change"][task] == pytest.approx(
            m["mean"] - f["tasks"][task]["centralized"]["mean"])
    assert pooled["tasks"] != {t: runs["centralized"] for t, runs in f["tasks"].items()}


def test_exact_unlearning_with_the_group_objective_equals_the_retrain() -> None:
    report = simulate(_config(fairness="group-dro", baselines=False,
                              unlearn=("small-c", 2)))
    assert report["unlearning"]["max_abs_diff_vs_retrain"] == 0.0


def test_privacy_is_spent_and_accounted_as_without_the_group_objective() -> None:
    policy = Policy(clip=1.0, sigma=1.5)
    plain = simulate(_config(dp=policy, baselines=False, groups=False))
    fair = simulate(dataclasses.replace(_config(dp=policy, baselines=False),
                                        fairness="group-dro"))
    assert fair["privacy"] == plain["privacy"]  # the same releases, noise and epsilon


@pytest.mark.parametrize("kw, words", [
    ({"fairness": "group-dro", "groups": False}, "needs the group study"),
    ({"fairness": "minimax"}, "unknown fairness objective"),
    ({"tilt": -1.0}, "tilt"),
    ({"lean": 11.0}, "lean must be in"),
    ({"lean": 1.0, "groups": False}, "loss mixing is compared"),
])
def test_bad_fairness_settings_are_refused(kw: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        check_config(dataclasses.replace(_config(), **kw))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="education"):
        check_config(SimConfig(school_topology(), groups=True))


@pytest.mark.parametrize("args", [
    ["--fairness", "minimax", "--groups", "--workload", "education"],
    ["--fairness", "group-dro", "--workload", "education"],
    ["--groups"],
    ["--groups", "--workload", "education", "--fairness", "group-dro", "--continual",
     "topic@0"],
    ["--fairness", "loss-mixing", "--workload", "education"],
    ["--groups", "--workload", "education", "--fairness", "loss-mixing", "--lean", "11"],
    ["--groups", "--workload", "education", "--fairness", "loss-mixing", "--lean", "0"],
    ["--groups", "--workload", "education", "--lean", "2"],
    ["--groups", "--workload", "education", "--fairness", "loss-mixing+loss-mixing"],
    ["--groups", "--workload", "education", "--fairness", "group-dro+erm"],
    ["--groups", "--workload", "education", "--fairness", "group-dro+minimax"],
])
def test_the_cli_refuses_a_bad_group_study(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["simulate", str(TOPOLOGIES / "ring-16.toml"), *args])
    assert result.exit_code == 2, result.output


def test_a_round_trains_with_the_objective_the_node_asks_for() -> None:
    """The node asks each training for the objective its round records (a re-run: the one
    recorded then): a trainer set to the plain loss, asked for group-dro, trains exactly as a
    group-dro trainer does; an unknown objective is refused."""
    from p2pfed.sim.simulation import Simulation

    plain_sim, fair_sim = Simulation(_config()), Simulation(_config(fairness="group-dro", tilt=2.0))
    assert fair_sim.nodes["big-a"].node.config.objective == ("group-dro", 2.0)  # (the node asks)
    assert plain_sim.nodes["big-a"].node.config.objective[0] == "erm"
    plain, fair = plain_sim.trainers["big-a"], fair_sim.trainers["big-a"]
    comps = sorted(plain.trainable())
    assert comps == sorted(fair.trainable())
    plain.train_round(comps, 0, objective=("group-dro", 2.0))
    fair.train_round(comps, 0)
    for c in comps:
        assert torch.equal(plain.flats[c].flat, fair.flats[c].flat)
    fair.train_round(comps, 1, objective=("erm", 1.0))
    plain.train_round(comps, 1, objective=("group-dro", 2.0))
    assert any(not torch.equal(plain.flats[c].flat, fair.flats[c].flat)
               for c in comps)  # (it matters)
    with pytest.raises(ValueError, match="unknown local objective"):
        plain.train_round(comps, 2, objective=("minimax", 1.0))


def test_a_member_that_leans_on_its_loss_weighs_one_plus_lean_times_loss_in_the_consensus(
) -> None:
    """Leaning keeps each row convex and makes the consensus the mean weighted by
    ``1 + lean · loss``: loss mixing changes what the federation converges to, plain
    doubly-stochastic weights do not."""
    import networkx as nx

    from p2pfed.consensus import metropolis_hastings_weights
    from p2pfed.mixing import leaned_weights

    assert leaned_weights(0.5, [0.25, 0.25], 0.7, 0.0) == (0.5, [0.25, 0.25])  # (bit for bit)
    assert leaned_weights(0.5, [0.25, 0.25], 0.0, 3.0) == (0.5, [0.25, 0.25])
    own, kept = leaned_weights(0.5, [0.25, 0.25], 1.7, 3.0)  # (a loss is at most 1)
    assert kept == [0.0625, 0.0625] and own == pytest.approx(0.875)
    graph = nx.cycle_graph(5)
    mh = metropolis_hastings_weights(graph, graph.nodes)
    loss = [0.9, 0.1, 0.5, 0.0, 0.3]
    lean = 2.0
    w = np.zeros((5, 5))
    for i, row in mh.items():
        nbrs = [j for j in row if j != i]
        own, kept = leaned_weights(row[i], [row[j] for j in nbrs], loss[i], lean)
        w[i, i] = own
        w[i, nbrs] = kept
    assert np.allclose(w.sum(1), 1.0) and (w >= 0).all()
    x = np.arange(5.0) * 10
    for _ in range(2000):
        x = w @ x
    pi = 1 + lean * np.array(loss)
    assert x == pytest.approx(np.full(5, (pi * np.arange(5.0) * 10).sum() / pi.sum()))
    assert x[0] != pytest.approx(20.0)  # (the plain mean: what MH alone converges to)


def _mixes(home: Path, node: str = "*") -> list[dict[str, Any]]:
    return [e.body for path in sorted(home.glob(f"{node}/ledger.sqlite3"))
            for e in read_entries(path) if e.kind == kinds.MIX]


def test_loss_mixing_leans_where_the_member_trained_and_never_under_privacy(
        tmp_path: Path) -> None:
    """Members lean in the rounds they trained, by the loss their trainer measured: the mix
    record says so, and its neighbours' weights are the plain ones over ``1 + lean · loss``
    (the rest stays with self).  With differential privacy on, no member leans and the
    federation trains bit for bit as with plain mixing."""
    from p2pfed.sim.simulation import Simulation

    runs = {name: Simulation(_config(baselines=False, lean=lean, home=tmp_path / name))
            for name, lean in (("plain", 0.0), ("lean", 2.0))}
    reports = {name: sim.run() for name, sim in runs.items()}
    assert reports["lean"]["tasks"] != reports["plain"]["tasks"]  # (it changes the training)
    checked = 0
    for node in runs["lean"].nodes:
        plain = {m["component"]: m for m in _mixes(tmp_path / "plain", node) if m["round"] == 0}
        for m in _mixes(tmp_path / "lean", node):
            if m["round"] != 0:  # (the same states met in round 0 of both)
                continue
            assert m["lean"] == 2.0 and 0.0 < m["loss"] <= 1.0  # (every member trained)
            before = {peer: w for peer, w, *_ in plain[m["component"]]["inputs"]}
            assert {peer: w for peer, w, *_ in m["inputs"]} == pytest.approx(
                {peer: w / (1 + 2.0 * m["loss"]) for peer, w in before.items()})
            assert m["self_weight"] == pytest.approx(
                1 - sum(before.values()) / (1 + 2.0 * m["loss"]))
            checked += 1
    assert checked
    assert runs["lean"].trainers["big-a"].loss_of("head.topic", 0, 10_000) is None
    # the group study with loss mixing under differential privacy: plain mixing and loss
    # mixing train bit for bit alike (no member leans on a loss it does not release)
    study = simulate(_config(dp=Policy(clip=1.0, sigma=1.5), baselines=False, lean=2.0))
    rule, base = study["fairness"]["rule"], study["fairness"]["tasks"]
    assert (rule["mixing"], rule["lean"], rule["objective"]) == ("loss", 2.0, "erm")
    assert "centralized" not in rule  # (mixing has no central counterpart)
    assert rule["tasks"] == {t: r["federated"] for t, r in base.items()}


def test_exact_unlearning_with_loss_mixing_equals_the_retrain(tmp_path: Path) -> None:
    report = simulate(_config(lean=2.0, baselines=False, unlearn=("small-c", 2),
                              home=tmp_path))
    assert report["unlearning"]["max_abs_diff_vs_retrain"] == 0.0
    leaned = [m for m in _mixes(tmp_path) if "lean" in m]
    assert leaned and {m["epoch"] for m in leaned} == {0, 1}  # (live and re-run rounds lean)


def test_a_round_leans_only_where_it_may() -> None:
    """A trained round leans by the loss its trainer measured, clamped to [0, 1]; not under
    differential privacy, in a catch-up, with a rule that ignores weights, without a finite
    loss, or without a lean; a re-run leans by the lean its live round recorded."""
    from gossip.catalog import ComponentSpec
    from p2pfed.components import FlatComponent
    from p2pfed.mixing import rule
    from p2pfed.node import NodeConfig
    from p2pfed.node._mix import lean_of
    from p2pfed.node._replay import Replay
    from p2pfed.node._state import ComponentRound

    losses = {3: 0.4, 4: float("nan"), 5: 1.7}
    config = NodeConfig(lean=2.0, loss_of=lambda c, e, r: losses.get(r))
    mh = rule("mh")
    comp = FlatComponent.from_params(ComponentSpec.from_name("backbone"),
                                     {"w": torch.zeros(2)})
    st = ComponentRound(comp, round=3, trained=True)
    assert lean_of(config, "backbone", st, 0, False, mh) == (2.0, 0.4)
    assert lean_of(config, "backbone", st, 0, True, mh) is None  # (privacy)
    assert lean_of(config, "backbone", st, 0, False, rule("trimmed-mean")) is None
    assert lean_of(dataclasses.replace(config, lean=0.0), "backbone", st, 0, False, mh) is None
    assert lean_of(dataclasses.replace(config, loss_of=None), "backbone", st, 0, False,
                   mh) is None
    for changed in ({"trained": False}, {"age": 2}, {"round": 4}, {"round": 6}):
        assert lean_of(config, "backbone", dataclasses.replace(st, **changed), 0, False,
                       mh) is None, changed  # type: ignore[arg-type]
    assert lean_of(config, "backbone", dataclasses.replace(st, round=5), 0, False,
                   mh) == (2.0, 1.0)
    replay = Replay("x", "exact", 0, 9, 0, leans={3: 0.5})
    assert lean_of(config, "backbone", dataclasses.replace(st, replay=replay), 1, False,
                   mh) == (0.5, 0.4)  # (what the live round recorded, not the settings')
    assert lean_of(config, "backbone", dataclasses.replace(st, replay=replay, round=5), 1,
                   False, mh) is None  # (the live round did not lean)


def test_a_round_records_its_loss_unless_it_diverged() -> None:
    from p2pfed.sim.simulation import Simulation

    trainer = Simulation(_config()).trainers["big-a"]
    comps = sorted(trainer.trainable())
    trainer.train_round(comps, 0)
    for c in comps:
        loss = trainer.loss_of(c, 0, 0)
        assert loss is not None and 0.0 < loss <= 1.0
    assert trainer.loss_of(comps[0], 1, 0) is None  # (another epoch)

    def diverged(*args: object) -> torch.Tensor:
        return torch.tensor(float("nan"), requires_grad=True)

    trainer._loss = diverged  # type: ignore[method-assign]
    trainer.train_round(comps, 1)
    assert all(trainer.loss_of(c, 0, 1) is None for c in comps)  # (no lean on a NaN)


def test_the_fairness_rule_names_an_objective_and_loss_mixing() -> None:
    from p2pfed.cli_sim import fairness_rule
    from p2pfed.cli_sim_print import _rule_label

    assert fairness_rule("erm") == ("erm", False)
    assert fairness_rule("group-dro") == ("group-dro", False)
    assert fairness_rule("loss-mixing") == ("erm", True)
    assert fairness_rule("group-dro+loss-mixing") == fairness_rule("loss-mixing+group-dro") == (
        "group-dro", True)
    assert _rule_label({"objective": "group-dro", "mixing": "loss"}) == "group-dro+loss-mixing"
    assert _rule_label({"objective": "erm", "mixing": "loss"}) == "loss-mixing"
    assert _rule_label({"objective": "group-dro", "mixing": "plain"}) == "group-dro"
