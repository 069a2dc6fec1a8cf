"""The simulator's hardware study: phones train only their heads, slowly, and the round
timeout keeps the others' pace."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gossip.errors import ConfigError
from p2pfed.cli import app
from p2pfed.sim.config import check_config
from p2pfed.sim.simulator import SimConfig, Simulation, simulate
from tests.test_education import TINY, school_topology

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
PHONES = {"small-c": "phone", "small-d": "phone"}


def test_phones_train_only_their_heads_and_the_study_reports_both_runs() -> None:
    config = SimConfig(school_topology(), workload="education", rounds=6, seed=3,
                       education=TINY, profiles=PHONES, train_s=1.0, round_interval_s=2.0,
                       round_timeout_ms=1000)
    h = simulate(config)["hardware"]
    assert h["trained"] == {"small-c": ["head.topic"], "small-d": ["head.topic"]}
    assert h["slowdown"] == {"phone": 5.0} and h["round_timeout_s"] == 1.0
    fast, servers = h["with_profiles"], h["everyone_server"]
    # the phones publish a round's head 5 s after it starts; their neighbours wait 1 s after
    # their own (1 s of training) and go on: no one waits beyond its 2 s pace ...
    assert fast["rounds_per_min_slowest_component"]["nodes"] > 0
    assert servers["profiled_states_mixed"] == 1.0
    assert fast["profiled_states_mixed"] < 1.0  # ... so a phone's late states are missed
    assert set(fast["accuracy"]) == {"digits", "topic", "engagement"}


def test_a_phone_s_trainer_never_trains_its_adapter() -> None:
    sim = Simulation(SimConfig(school_topology(), workload="education", rounds=2, seed=3,
                               education=TINY, profiles=PHONES, baselines=False))
    sim.run()
    assert sorted(sim.trainers["small-c"]._trained) == ["head.topic"]
    assert sorted(sim.trainers["big-a"]._trained) != ["head.topic"]


def test_bad_profiles_are_refused() -> None:
    with pytest.raises(ConfigError, match="no such node"):
        check_config(SimConfig(school_topology(), workload="education",
                               profiles={"small-c": "tablet"}))
    with pytest.raises(ConfigError, match="education"):
        check_config(SimConfig(school_topology(), profiles={"small-c": "phone"}))
    result = CliRunner().invoke(app, ["simulate", str(TOPOLOGIES / "hierarchical-edu.toml"),
                                      "--workload", "education", "--profile", "pupil:phone"])
    assert result.exit_code == 2 and "NODES:PROFILE" in result.output
    result = CliRunner().invoke(app, ["simulate", str(TOPOLOGIES / "hierarchical-edu.toml"),
                                      "--workload", "education", "--profile", "student:phone",
                                      "--participation", "1/3:0.3"])
    assert result.exit_code == 2 and "--participation" in result.output


def test_make_up_scales_the_update_when_the_accountant_counts_examples() -> None:
    """More steps would draw more examples behind one release than a sampling rate below 1
    says: the daemon's node then makes up by scaling its update."""
    from p2pfed.config import Config
    from p2pfed.runtime.loading import node_config

    private = {"sample_rate": 0.5, "shared": {"clip": 1.0, "sigma": 1.0}}
    assert node_config(Config(), frozenset(), {}).make_up_by == "steps"
    assert node_config(Config.from_dict({"privacy": private}), frozenset(),
                       {}).make_up_by == "update"
    whole = {**private, "sample_rate": 1.0}
    assert node_config(Config.from_dict({"privacy": whole}), frozenset(),
                       {}).make_up_by == "steps"


def test_a_slow_member_trains_only_once_its_last_training_is_a_round_behind_it() -> None:
    from p2pfed.node import KeepPace

    pace = KeepPace(lambda: 5000.0, 2000)
    assert [pace(t) for t in (0, 3000, 6999, 7000, 8000, 13_999, 14_000)] == [
        True, False, False, True, False, False, True]
