"""What a new operator meets first: the help, and `simulate`'s checks of its arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer

from p2pfed import exitcodes
from p2pfed.cli import main
from p2pfed.cli_help import PlainHelpGroup
from p2pfed.sim.report import consensus_groups, plot_report

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
COMMANDS = [[], ["simulate"], ["local-federation"], ["init"], ["ledger", "verify"],
            ["privacy", "epsilon"], ["bench"], ["run"], ["export"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "p2pfed")
def test_help_shows_flags_values_and_defaults_plainly(
        command: list[str], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main([*command, "--help"]) == exitcodes.OK
    text = capsys.readouterr().out
    assert "--help" in text
    for typer_type in ("<bool>", "<path>", "<str>", "<int", "<float", "list[", "{"):
        assert typer_type not in text, typer_type


def test_help_names_arguments_values_and_none_defaults(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["simulate", "--help"]) == exitcodes.OK
    text = capsys.readouterr().out
    assert "Usage: p2pfed simulate [OPTIONS] TOPOLOGY" in text
    quiet = next(line for line in text.splitlines() if "--quiet" in line)
    assert "BOOLEAN" not in quiet  # a flag takes no value
    rounds = next(line for line in text.splitlines() if "--rounds" in line)
    assert "INTEGER" in rounds and "default: 200" in rounds


def test_plain_help_names_values_repeats_and_none_defaults(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer(cls=PlainHelpGroup, add_completion=False)

    @app.command()
    def one(name: Annotated[str, typer.Argument(help="A name.")],
            hold: Annotated[list[str] | None, typer.Option(help="Held.")] = None,
            home: Annotated[Path | None, typer.Option(help="Home (default: ~/h).")] = None,
            dry: Annotated[bool, typer.Option("--dry", help="Only say.")] = False) -> None:
        """One."""

    @app.command()
    def two() -> None:
        """Two."""

    with pytest.raises(SystemExit):
        app(["one", "--help"], prog_name="x")
    lines = capsys.readouterr().out.splitlines()
    assert any("Usage: x one [OPTIONS] NAME" in line for line in lines)
    hold = next(line for line in lines if "--hold" in line)
    assert "TEXT (repeatable)" in hold and "[default: none]" in hold
    home = next(line for line in lines if "--home" in line)
    assert "PATH" in home and "[default: none]" not in home  # (its help says the default)
    dry = next(line for line in lines if "--dry" in line)
    assert "BOOLEAN" not in dry and "<bool>" not in dry


@pytest.mark.parametrize("bad", ["plot-in-a-file", "json-is-a-folder", "topology-folder"])
def test_simulate_refuses_bad_paths_before_it_runs(
        bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import p2pfed.sim.simulator

    def never(*_args: object, **_kwargs: object) -> dict[str, Any]:
        raise AssertionError("the simulation ran")

    monkeypatch.setattr(p2pfed.sim.simulator, "simulate", never)
    (tmp_path / "file").write_text("x")
    topology = str(TOPOLOGIES / "complete-8.toml")
    argv = {
        "plot-in-a-file": [topology, "--plot", str(tmp_path / "file" / "p.png")],
        "json-is-a-folder": [topology, "--json", str(tmp_path)],
        "topology-folder": [str(TOPOLOGIES)],
    }[bad]
    assert main(["simulate", *argv, "-q"]) == exitcodes.USAGE
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("Error")]
    assert len(errors) == 1 and ("folder" in errors[0] or "create" in errors[0])


def test_simulate_creates_the_folders_of_its_outputs(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    plot, report = tmp_path / "a" / "b" / "p.png", tmp_path / "c" / "r.json"
    assert main(["simulate", str(TOPOLOGIES / "complete-8.toml"), "--rounds", "2",
                 "--plot", str(plot), "--json", str(report), "-q"]) == exitcodes.OK
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert json.loads(report.read_text())["rounds"] == 2
    out = capsys.readouterr().out
    assert f"report: {report}" in out and f"plot: {plot}" in out


def _component(holders: int, slem: float, distances: list[float]) -> dict[str, Any]:
    return {"holders": holders, "slem": slem, "consensus_distance": distances,
            "rounds_to_1e-6": None, "bound_rounds_to_1e-6": 3, "mean_drift": 0.0}


def test_the_consensus_plot_tells_overlapping_components_apart_and_labels_bounds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [1.0, 0.1, 0.01, 0.001]
    report = {"topology": "t", "nodes": 9, "seed": 1, "components": {
        "a": _component(9, 0.5, curve), "b": _component(9, 0.5, curve),
        "c": _component(3, 0.25, curve)}}
    assert consensus_groups(report["components"]) == [["a", "b"], ["c"]]
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", figures.append)  # (keep the figure to look at)
    plot_report(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG")
    ax = figures[0].axes[0]
    curves = {line.get_label(): (line.get_color(), line.get_linestyle(), line.get_marker())
              for line in ax.get_lines() if line.get_label() in ("a (9 holders)",
                                                                 "b (9 holders)",
                                                                 "c (3 holders)")}
    assert len(curves) == 3 and len(set(curves.values())) == 3  # none drawn alike
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert sum(label.startswith("bound: 3 rounds") for label in labels) == 2  # one per group
