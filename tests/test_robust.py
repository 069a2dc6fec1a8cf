"""Robust aggregation rules and Byzantine members in the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.errors import LocalError
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.consensus import (
    NOISE_CAP,
    SHARE_CAP,
    clip_radius,
    clipped_gossip,
    heterogeneity,
    metropolis_hastings_weights,
    noise_aware_weights,
    noise_factor,
    trimmed_mean,
)
from p2pfed.ledger import Ledger
from p2pfed.privacy import Policy
from p2pfed.sim.education import EducationSettings
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from p2pfed.sim.topology import load_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"


def test_clipped_gossip_leaves_out_a_neighbour_beyond_the_radius() -> None:
    own = torch.zeros(4, dtype=torch.float64)
    near = [torch.full((4,), 0.1, dtype=torch.float64), torch.full((4,), -0.15,
                                                                  dtype=torch.float64)]
    liar = torch.full((4,), 1e6, dtype=torch.float64)
    # distances 0.2, 0.3 and 2e6: the radius is twice the median, 0.6, so the honest ones are
    # mixed whole and the liar not at all, however far it is
    out, tau, left_out = clipped_gossip(own, [(0.25, near[0]), (0.25, near[1]), (0.25, liar)])
    assert tau == pytest.approx(0.6) and left_out == [2]
    assert torch.allclose(out, 0.25 * near[0] + 0.25 * near[1])
    # a liar just inside the radius moves the node by at most its weight times the radius
    sly = torch.full((4,), 0.29, dtype=torch.float64)  # distance 0.58
    out, _, left_out = clipped_gossip(own, [(0.25, near[0]), (0.25, near[1]), (0.25, sly)])
    assert left_out == []
    pull = out - 0.25 * (near[0] + near[1])
    assert float(torch.linalg.vector_norm(pull)) <= 0.25 * 0.6
    assert torch.allclose(out, 0.25 * (near[0] + near[1] + sly))
    # a fixed radius; an empty neighbourhood leaves the node where it is
    assert torch.allclose(clipped_gossip(own, [(0.5, near[0])], radius=0.1)[0], own)
    assert torch.equal(clipped_gossip(own, [])[0], own)
    # a difference too large for float64 is left out and does not stretch the radius
    huge = torch.full((4,), 1e300, dtype=torch.float64)
    out, tau, left_out = clipped_gossip(own, [(0.25, near[0]), (0.25, huge), (0.25, huge)])
    assert left_out == [1, 2] and tau == pytest.approx(0.4) and torch.isfinite(out).all()


def test_the_radius_shrinks_at_most_five_percent_a_round() -> None:
    assert clip_radius([0.2, 0.3, 9.0]) == pytest.approx(0.6)
    # two neighbours agree with the node exactly: the median is 0, but last round's radius
    # keeps the third (an honest neighbour from another group) in
    assert clip_radius([0.0, 0.0, 0.5], previous=1.0) == pytest.approx(0.95)
    own = torch.zeros(2, dtype=torch.float64)
    other = torch.tensor([0.3, 0.4], dtype=torch.float64)
    out, tau, _ = clipped_gossip(own, [(0.25, own.clone()), (0.25, own.clone()),
                                       (0.25, other)], previous=1.0)
    assert tau == pytest.approx(0.95) and torch.allclose(out, 0.25 * other)
    assert clipped_gossip(own, [(0.25, own.clone()), (0.25, own.clone()), (0.25, other)])[1] == 0


def _spread_without_attackers(topology: str, rule: str) -> float:
    topo = load_topology(TOPOLOGIES / f"{topology}.toml")
    sim = Simulation(SimConfig(topo, rounds=60, seed=1, robust=rule))
    sim.run()
    end = torch.stack([sim.final_states()[(n, "backbone")].to(torch.float64)
                       for n in topo.nodes])
    return float((end - end.mean(0)).abs().max())


def test_clipped_gossip_without_attackers_agrees_as_plain_averaging_does() -> None:
    # (without the radius memory, small-world-32 froze about 0.6 apart, even after 150 rounds)
    plain = _spread_without_attackers("small-world-32", "mh")
    assert plain < 0.05
    assert _spread_without_attackers("small-world-32", "clipped") < 1.1 * plain


def test_trimmed_mean_drops_the_extremes_per_coordinate() -> None:
    states = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, 6.0]), torch.tensor([3.0, 7.0]),
              torch.tensor([1e9, -1e9])]
    assert torch.allclose(trimmed_mean(states, 1), torch.tensor([2.5, 5.5], dtype=torch.float64))
    assert torch.allclose(trimmed_mean(states[:2], 1),
                          torch.tensor([1.5, 5.5], dtype=torch.float64))  # too few to trim


def _honest_drift(rule: str) -> float:
    topo = load_topology(TOPOLOGIES / "ring-chords-16.toml")
    sim = Simulation(SimConfig(topo, rounds=60, seed=4, attack=("gaussian", 3), robust=rule))
    honest = [n for n in topo.nodes if n not in sim.byzantine]
    start = torch.stack([sim.nodes[n].node.components["backbone"].flat.to(torch.float64, copy=True)
                         for n in honest])  # (copies: the nodes' states change as they mix)
    sim.run()
    end = torch.stack([sim.final_states()[(n, "backbone")].to(torch.float64) for n in honest])
    return float((end.mean(0) - start.mean(0)).abs().max())  # how far the honest mean moved


def test_byzantine_neighbours_drag_plain_averaging_and_trimming_resists() -> None:
    sim = Simulation(SimConfig(load_topology(TOPOLOGIES / "ring-chords-16.toml"), rounds=1,
                               attack=("sign-flip", 3)))
    assert sim.byzantine == ["node-0", "node-10", "node-5"]
    # (states drawn at random per node: honest nodes start as far apart as the attackers, so
    # clipped gossip's radius lets them in at first; see the next test for a common start)
    mh = _honest_drift("mh")
    assert _honest_drift("trimmed-mean") < mh / 3
    # the Gaussian attackers draw their noise per component and round, so trio's scheduler
    # (which orders a node's components' rounds at random) cannot change the numbers
    assert _honest_drift("mh") == mh


def _gossip_under_attack(rule: str, attack: str, rounds: int = 60) -> tuple[float, float]:
    """Honest nodes near a common start on ring-chords-16, nodes 0, 5 and 10 Byzantine, the
    rule applied by the honest ones: (how far the honest mean moved, their final spread)."""
    graph = load_topology(TOPOLOGIES / "ring-chords-16.toml").graph
    weights = metropolis_hastings_weights(graph, graph.nodes)
    byzantine = {"node-0", "node-5", "node-10"}
    gen = torch.Generator().manual_seed(5)
    centre = torch.randn(64, generator=gen, dtype=torch.float64)
    x = {n: centre + 0.05 * torch.randn(64, generator=gen, dtype=torch.float64)
         for n in graph.nodes}
    honest = [n for n in graph.nodes if n not in byzantine]
    start = torch.stack([x[n] for n in honest]).mean(0)
    radius = dict.fromkeys(graph.nodes, 0.0)
    for _ in range(rounds):
        sent = {n: (-x[n] if attack == "sign-flip" else
                    x[n] + torch.randn(64, generator=gen, dtype=torch.float64))
                if n in byzantine else x[n] for n in graph.nodes}
        new = {}
        for n in graph.nodes:
            terms = [(w, sent[m]) for m, w in weights[n].items() if m != n]
            if rule == "clipped" and n not in byzantine:
                new[n], radius[n], _ = clipped_gossip(x[n], terms, previous=radius[n])
            else:
                new[n] = weights[n][n] * x[n] + sum(w * s for w, s in terms)
        x = new
    end = torch.stack([x[n] for n in honest])
    return float((end.mean(0) - start).abs().max()), float((end - end.mean(0)).abs().max())


@pytest.mark.parametrize("attack", ["sign-flip", "gaussian"])
def test_clipped_gossip_keeps_honest_nodes_together_where_they_were(attack: str) -> None:
    plain_drift, _ = _gossip_under_attack("mh", attack)
    drift, spread = _gossip_under_attack("clipped", attack)
    assert plain_drift > 0.5
    assert drift < 1e-6 and spread < 0.01  # (the attackers are never mixed in; start ~0.15)


def test_attack_report_compares_the_honest_nodes_with_a_run_without_attackers() -> None:
    settings = EducationSettings(rounds=3, steps=2, batch_size=8, questions=600, traces=300,
                                 text_model="tiny", lora_layers=(1,))
    report = simulate(SimConfig(load_topology(TOPOLOGIES / "ring-chords-16.toml"),
                                workload="education", rounds=3, seed=1, education=settings,
                                attack=("label-flip", 3), robust="trimmed-mean"))
    assert report["attack"] == {"kind": "label-flip", "count": 3, "robust": "trimmed-mean",
                                "nodes": ["node-0", "node-10", "node-5"]}
    assert set(report["honest_accuracy"]) == set(report["honest_accuracy_fault_free"]) == {
        "digits", "topic", "engagement"}


@pytest.mark.parametrize(("args", "code"), [
    (["--attack", "sign-flip"], exitcodes.USAGE),
    (["--attack", "teleport:2"], exitcodes.USAGE),  # no such kind: the argument is wrong
    (["--attack", "sign-flip:16"], exitcodes.CONFIG),  # more than the topology allows
    (["--robust", "krum"], exitcodes.USAGE),
])
def test_bad_attack_arguments_are_refused(args: list[str], code: int) -> None:
    assert main(["simulate", str(TOPOLOGIES / "ring-chords-16.toml"), "--rounds", "2", "-q",
                 *args]) == code


def test_noise_aware_weights_trust_quieter_members_up_to_a_cap() -> None:
    # equal declared noise: Metropolis–Hastings unchanged
    self_w, row = noise_aware_weights(0.25, 0.5, [(0.25, 0.5), (0.25, 0.5), (0.25, 0.5)])
    assert self_w == pytest.approx(0.25) and row == pytest.approx([0.25] * 3)
    # a neighbour adding 4x the noise gets (1/4)² of the weight before renormalising
    self_w, row = noise_aware_weights(0.25, 0.5, [(0.25, 0.5), (0.25, 0.5), (0.25, 2.0)])
    assert row[2] == pytest.approx(row[0] / 16) and self_w + sum(row) == pytest.approx(1.0)
    # a neighbour claiming no noise among noisy ones: its factor is at most NOISE_CAP, and it
    # ends with at most SHARE_CAP times its plain weight (0.5, not 4/7); the rest stays with self
    self_w, row = noise_aware_weights(0.25, 1.0, [(0.25, 1.0), (0.25, 1.0), (0.25, 0.0)])
    assert row == pytest.approx([1 / 7, 1 / 7, SHARE_CAP * 0.25])
    assert self_w == pytest.approx(1 - 2 / 7 - 0.5) and NOISE_CAP == 4.0
    # a noisy member among noise-free ones is not mixed in at all
    self_w, row = noise_aware_weights(0.25, 0.0, [(0.25, 0.0), (0.25, 0.0), (0.25, 3.0)])
    assert self_w == pytest.approx(1 / 3) and row == pytest.approx([1 / 3, 1 / 3, 0.0])
    # a noisy node takes its quieter neighbours' states (within SHARE_CAP each)
    self_w, row = noise_aware_weights(0.25, 3.0, [(0.25, 0.0), (0.25, 0.0), (0.25, 0.0)])
    assert self_w == pytest.approx(0.0) and row == pytest.approx([1 / 3] * 3)
    # a node that adds no noise and only mixes keeps its own weight's trust
    self_w, row = noise_aware_weights(0.25, 0.0, [(0.25, 1.0), (0.25, 1.0), (0.25, 1.0)])
    assert self_w == pytest.approx(0.25) and row == pytest.approx([0.25] * 3)
    # declarations too large for float64 squares, and states too far apart to measure
    self_w, row = noise_aware_weights(0.5, 1.0, [(0.5, 1e300)])  # median 5e299: factors 4, ¼
    assert row == pytest.approx([0.125 / 2.125]) and self_w == pytest.approx(2 / 2.125)
    assert noise_aware_weights(0.5, 1.0, [(0.5, 0.0)], between=float("inf")) == (0.5, [0.5])
    with pytest.raises(LocalError, match="finite"):
        noise_aware_weights(0.5, 0.0, [(0.5, float("nan"))])


def test_noise_counts_only_against_how_much_members_differ_anyway() -> None:
    # members whose states differ by far more than the noise: plain weights again
    self_w, row = noise_aware_weights(0.25, 0.01, [(0.25, 0.01), (0.25, 0.01), (0.25, 0.1)],
                                      between=1.0)
    assert row[2] == pytest.approx(row[0], rel=0.01) and self_w == pytest.approx(0.25, rel=0.01)
    assert noise_factor(0.1, 0.01, between=0.0) == pytest.approx(0.01)
    # heterogeneity: what the squared distances per coordinate hold beyond the declared noise
    own = torch.zeros(10_000, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    others = [(0.5, 0.3 + 0.5 * torch.randn(10_000, generator=gen, dtype=torch.float64))
              for _ in range(3)]
    assert heterogeneity(own, others, 0.0) == pytest.approx(0.3 ** 2 / 2, rel=0.1)
    assert heterogeneity(own, [(0.0, own.clone())], 1.0) == 0.0  # (never negative)


def test_noise_aware_mixing_gives_a_noisier_institution_less_weight(tmp_path: Path) -> None:
    from tests.test_education import TINY, school_topology

    sim = Simulation(SimConfig(school_topology(), workload="education", rounds=2, seed=3,
                               home=tmp_path, education=TINY, dp=Policy(clip=1.0, sigma=0.5),
                               dp_noisy=(1, 4.0), robust="noise-aware", baselines=False))
    assert sim.noisy == ["big-a"]
    report = sim.run()
    assert report["noisy"] == ["big-a"]
    assert report["privacy"]["big-a"]["backbone"]["noise_multiplier"] == 4.0
    assert report["privacy"]["big-b"]["backbone"]["noise_multiplier"] == 0.5

    def backbone_mixes(name: str) -> list[dict[str, Any]]:
        with Ledger.open(tmp_path / name / "ledger.sqlite3", sim.nodes[name].identity) as ledger:
            return [e.body for e in ledger.entries("mix") if e.body["component"] == "backbone"]

    noisy = sim.nodes["big-a"].identity.peer_id
    mixes = backbone_mixes("big-b")
    assert len(mixes) == 2
    for body in mixes:  # plain MH would give big-a 1/2; noise 4.0 against 0.5 leaves ~0.07
        (sender, weight, _), = body["inputs"]
        assert sender == noisy and weight < 0.1 and body["rule"] == "noise-aware"
        assert body["self_weight"] + weight == pytest.approx(1.0)
    for body in backbone_mixes("big-a"):  # the noisy one takes its quieter neighbour's state
        assert body["self_weight"] < 0.1
        assert body["noise"] == [4.0, 0.5] and body["heterogeneity"] >= 0.0


@pytest.mark.parametrize(("args", "code"), [
    (["--dp-noisy", "4:2.0"], exitcodes.USAGE),  # no --dp-sigma
    (["--dp-sigma", "0.5", "--dp-noisy", "4"], exitcodes.USAGE),
    (["--dp-sigma", "0.5", "--dp-noisy", "x:1"], exitcodes.USAGE),
    (["--dp-sigma", "0.5", "--dp-noisy", "4:-1"], exitcodes.USAGE),
    (["--dp-sigma", "0.5", "--dp-noisy", "4:0"], exitcodes.USAGE),
    (["--dp-sigma", "0.5", "--dp-noisy", "16:2"], exitcodes.CONFIG),
])
def test_bad_noise_arguments_are_refused(args: list[str], code: int) -> None:
    assert main(["simulate", str(TOPOLOGIES / "ring-chords-16.toml"), "--rounds", "2", "-q",
                 *args]) == code


def test_the_mixing_rule_per_component_comes_from_the_config() -> None:
    import tomllib

    from gossip.errors import ConfigError
    from p2pfed.config import Config

    config = Config.from_dict({"mixing": {"rule": "clipped",
                                          "components": {"head.topic": "noise-aware"}}})
    assert config.mixing.rules() == {"*": "clipped", "head.topic": "noise-aware"}
    assert Config.from_dict(tomllib.loads(config.to_toml())) == config
    assert Config().mixing.rules() == {"*": "mh"}
    with pytest.raises(ConfigError, match=r"mixing\.rule must be one of"):
        Config.from_dict({"mixing": {"rule": "krum"}})
    with pytest.raises(ConfigError, match=r"mixing\.components\.backbone must be one of"):
        Config.from_dict({"mixing": {"components": {"backbone": "median"}}})
    with pytest.raises(ConfigError, match=r"mixing\.components"):
        Config.from_dict({"mixing": {"components": {"nonsense!": "mh"}}})
    with pytest.raises(ConfigError, match="must map component names"):
        Config.from_dict({"mixing": {"components": {"backbone": 3}}})
    with pytest.raises(ConfigError, match="quote names with dots"):  # head.topic = "mh"
        Config.from_dict(tomllib.loads('[mixing.components]\nhead.topic = "mh"\n'))


def test_the_daemon_mixes_and_adds_noise_as_its_config_says() -> None:
    from p2pfed.config import Config
    from p2pfed.runtime.daemon import node_config

    config = Config.from_dict({
        "mixing": {"rule": "clipped", "components": {"head.topic": "noise-aware"}},
        "privacy": {"shared": {"clip": 0.5, "sigma": 2.0}},
    })
    node = node_config(config, frozenset({"head.topic"}), {})
    assert node.robust == {"*": "clipped", "head.topic": "noise-aware"}
    assert set(node.privacy) == {"head.topic"} and node.privacy["head.topic"].noise_std == 1.0
    assert node.noise_seed != node_config(config, frozenset(), {}).noise_seed  # (from the OS)
    # the federation's round period is a floor: a member may only lengthen it
    assert node.round_interval_ms == 5000
    assert node_config(config, frozenset(), {}, period_ms=60_000).round_interval_ms == 60_000
    assert node_config(config, frozenset(), {}, period_ms=1_000).round_interval_ms == 5000


def test_an_attack_that_reads_live_neighbour_states_repeats_with_the_seed() -> None:
    """ALIE attackers read their honest neighbours' states as they are at that moment, so the
    numbers depend on the order trio runs the nodes in; the simulator seeds that order."""
    def final() -> dict[tuple[str, str], torch.Tensor]:
        sim = Simulation(SimConfig(load_topology(TOPOLOGIES / "ring-chords-16.toml"), rounds=8,
                                   seed=2, attack=("alie", 3), robust="trimmed-mean"))
        sim.run()
        return sim.final_states()

    first, second = final(), final()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
