"""`p2pfed privacy epsilon`: the RDP accountant's ε for budget planning."""

from __future__ import annotations

import json

import pytest

from gossip.errors import ConfigError
from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.privacy import epsilon


def test_the_documented_example_matches_opacus_rdp(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["privacy", "epsilon", "--sigma", "1.5", "--sample-rate", "0.04", "--steps", "2250",
            "--delta", "1e-5", "--json"]
    assert main(args) == exitcodes.OK
    report = json.loads(capsys.readouterr().out)
    assert report["epsilon"] == pytest.approx(7.3291, abs=0.01)
    assert main(args[:-1]) == exitcodes.OK
    assert "ε = 7.329" in capsys.readouterr().out


def test_more_noise_fewer_steps_or_rarer_sampling_spend_less() -> None:
    base = epsilon(1.5, 0.04, 2250, 1e-5).epsilon
    assert epsilon(3.0, 0.04, 2250, 1e-5).epsilon < base
    assert epsilon(1.5, 0.04, 500, 1e-5).epsilon < base
    assert epsilon(1.5, 0.01, 2250, 1e-5).epsilon < base
    assert epsilon(1.5, 0.04, 2250, 1e-3).epsilon < base
    assert epsilon(1.5, 0.04, 0, 1e-5).epsilon == 0.0


@pytest.mark.parametrize("args", [
    ["--sigma", "0", "--sample-rate", "0.1", "--steps", "10"],
    ["--sigma", "1", "--sample-rate", "1.5", "--steps", "10"],
    ["--sigma", "1", "--sample-rate", "0.1", "--steps", "-1"],
    ["--sigma", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0.9"],
    ["--sigma", "one", "--sample-rate", "0.1", "--steps", "10"],
    ["--sample-rate", "0.1", "--steps", "10"],
])
def test_wrong_arguments_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "epsilon", *args]) == exitcodes.USAGE
    assert capsys.readouterr().err


def test_the_library_call_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match="sample rate"):
        epsilon(1.0, 0.0, 10, 1e-5)
    with pytest.raises(ConfigError, match="delta"):
        epsilon(1.0, 0.5, 10, 1.0)
