"""``p2pfed provenance COMPONENT``: each member's share of a component's state, read from a
home's ledger (read-only, without torch).

The homes are real: a tiny education simulation with its homes on disk (two rounds; small-c
forgotten, exactly, after the first), and hand-written ledgers for the cases a simulation does
not reach (a ledger written before provenance, a checkpoint only, no mix yet)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from gossip.identity import Identity, create_identity
from p2pfed import exitcodes
from p2pfed.cli import app, main
from p2pfed.journal import Checkpoint, LocalUpdate, Mix, Record, write
from p2pfed.ledger import Ledger
from p2pfed.lineage import Lineage, tag
from p2pfed.provenance import PARTIAL, Provenance, shares_by_peer
from p2pfed.sim.simulator import SimConfig, Simulation
from tests.test_cli_start import assert_light, run_commands
from tests.test_education import TINY, school_topology

SIM_ROUNDS = 2


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Simulation, Path]:
    """A tiny school federation, run with its homes on disk."""
    home = tmp_path_factory.mktemp("homes")
    cfg = SimConfig(school_topology(), workload="education", rounds=SIM_ROUNDS, seed=3,
                    home=home, unlearn=("small-c", 1),
                    education=dataclasses.replace(TINY, rounds=SIM_ROUNDS))
    sim = Simulation(cfg)
    sim.run()
    return sim, home


def _json(home: Path, component: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, ["provenance", component, "--json", "--home", str(home)])
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.output)
    return out


@pytest.mark.parametrize(("node", "component"), [("big-a", "encoder.text.lora"),
                                                 ("big-b", "backbone"),
                                                 ("small-d", "head.topic")])
def test_the_json_shares_are_the_nodes_own(sim: tuple[Simulation, Path], node: str,
                                           component: str) -> None:
    simulation, home = sim
    rep = _json(home / node, component)
    prov = simulation.nodes[node].node.provenance_of(component)
    me = simulation.nodes[node].identity.peer_id
    everyone = [n.identity.peer_id for n in simulation.nodes.values()]
    assert rep["component"] == component and rep["source"] == "mix"
    assert rep["round"] == SIM_ROUNDS - 1 and rep["rule"] == "mh"
    assert rep["flags"] == "exact" and rep["flags_text"] == "exact" and rep["prov_flags"] == 0
    assert rep["self"] == me
    assert rep["total_mass"] == pytest.approx(prov.total(), rel=1e-12)
    assert sum(m["share"] for m in rep["members"]) == pytest.approx(1.0, abs=1e-9)
    by_tag = {t.hex(): s for t, s in prov.shares().items()}
    by_peer = shares_by_peer(prov, everyone)
    for m in rep["members"]:
        assert m["share"] == pytest.approx(by_tag.get(m["tag"], 0.0), abs=1e-12)
        if not m["peer_id"].startswith("unknown:"):  # (a named member is named rightly)
            assert tag(m["peer_id"]).hex() == m["tag"]
            assert m["share"] == pytest.approx(by_peer.get(m["peer_id"], 0.0), abs=1e-12)
    mine = next(m for m in rep["members"] if m["self"])
    assert mine["peer_id"] == me and mine["share"] > 0.0 and mine["first_round"] == 0
    assert mine["credited_rounds"] == SIM_ROUNDS  # (it trains every component it holds)
    assert all(m["credited_rounds"] is None for m in rep["members"] if not m["self"])


def test_a_forgotten_member_is_listed_with_no_share(sim: tuple[Simulation, Path]) -> None:
    simulation, home = sim
    forgotten = simulation.nodes["small-c"].identity.peer_id
    rep = _json(home / "small-d", "head.topic")
    (gone,) = [m for m in rep["members"] if m["forgotten"]]
    assert gone["peer_id"] == forgotten and gone["share"] == 0.0 and gone["mass"] == 0.0
    assert rep["epoch"] >= 1  # (the re-run's mixes: the newest forget epoch wins)


def test_members_two_hops_away_are_unknown_without_a_federation_store(
        sim: tuple[Simulation, Path]) -> None:
    """A simulated home has no federation/ folder: big-a knows the peers its mixes name, so
    small-d (two hops away) shows as its tag."""
    simulation, home = sim
    rep = _json(home / "big-a", "encoder.text.lora")
    far = tag(simulation.nodes["small-d"].identity.peer_id).hex()
    assert {m["peer_id"] for m in rep["members"] if m["tag"] == far} == {f"unknown:{far}"}
    near = simulation.nodes["big-b"].identity.peer_id
    assert near in {m["peer_id"] for m in rep["members"]}


def test_the_table_names_the_members(sim: tuple[Simulation, Path]) -> None:
    simulation, home = sim
    result = CliRunner().invoke(app, ["provenance", "backbone", "--home", str(home / "big-a")])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "backbone at round 1, epoch" in text and "rule mh: exact; total mass" in text
    a, b = (simulation.nodes[n].identity.peer_id for n in ("big-a", "big-b"))
    assert f"…{a[-8:]} (this node)" in text and f"…{b[-8:]}" in text
    assert "%" in text and f"{SIM_ROUNDS} rounds" in text


def test_an_unknown_component_lists_the_components(sim: tuple[Simulation, Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _, home = sim
    assert main(["provenance", "head.nothing", "--home", str(home / "small-c")]) \
        == exitcodes.FAILURE
    err = capsys.readouterr().err
    assert "no entries of 'head.nothing'" in err
    assert "encoder.text.lora" in err and "head.topic" in err and "backbone" not in err


def test_it_imports_no_torch(sim: tuple[Simulation, Path]) -> None:
    _, home = sim
    (result,) = run_commands(["provenance", "head.topic", "--json", "--home",
                              str(home / "small-d")])
    assert_light([result])
    assert result["code"] == exitcodes.OK
    assert json.loads(result["out"])["component"] == "head.topic"


# ------------------------------------------------------------------ hand-written ledgers
def _home(tmp_path: Path, *records: Record) -> Path:
    home = tmp_path / "h"
    identity = create_identity(home / "identity.key", Identity.generate())
    with Ledger.open(home / "ledger.sqlite3", identity) as ledger:
        for record in records:
            write(ledger, record, 0)
    return home


def _mix(round_: int, lineage: Lineage, prov: Provenance | None) -> Mix:
    mass = None if prov is None else prov.encode(lineage)
    return Mix("backbone", round_, 1.0, (), (), lineage, 0, "mh",
               mass=mass, prov_flags=None if prov is None else prov.flags)


def test_no_home_and_no_ledger_are_clear_errors(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["provenance", "backbone", "--home", str(tmp_path / "none")]) == exitcodes.CONFIG
    assert "no node home at" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["provenance", "backbone", "--home", str(tmp_path / "empty")]) \
        == exitcodes.CONFIG
    assert "no ledger at" in capsys.readouterr().err


def test_a_ledger_from_before_provenance_says_so(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    home = _home(tmp_path, _mix(1, Lineage.of(["x"]), None))
    assert main(["provenance", "backbone", "--home", str(home)]) == exitcodes.FAILURE
    assert "carry no provenance (written by an older p2pfed)" in capsys.readouterr().err


def test_no_mix_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = Provenance.empty()
    home = _home(
        tmp_path, LocalUpdate("backbone", 0, b"d" * 32, True, b"", Lineage(), 0),
        Checkpoint("backbone", 0, b"d" * 32, Lineage(), mass=empty.encode(Lineage()),
                   prov_flags=0))
    assert main(["provenance", "backbone", "--home", str(home)]) == exitcodes.FAILURE
    assert "no mixes of backbone yet" in capsys.readouterr().err


def test_a_checkpoint_serves_when_there_is_no_mix(tmp_path: Path) -> None:
    """(A ledger whose mixes were pruned keeps its checkpoint's vector.)  A member the home
    knows nothing of is named by its tag; partial flags are said in words."""
    other = "12D3KooWsomeoneelse"
    home = tmp_path / "h"
    identity = create_identity(home / "identity.key", Identity.generate())
    lineage = Lineage.of([identity.peer_id, other])
    mine_first = tag(identity.peer_id) < tag(other)  # (masses follow the lineage's order)
    prov = Provenance(lineage, np.array([3.0, 1.0] if mine_first else [1.0, 3.0]), PARTIAL)
    with Ledger.open(home / "ledger.sqlite3", identity) as ledger:
        write(ledger, LocalUpdate("backbone", 4, b"d" * 32, True, b"", lineage, 0, credit=3.0),
              0)
        write(ledger, Checkpoint("backbone", 5, b"d" * 32, lineage, mass=prov.encode(lineage),
                                 prov_flags=PARTIAL), 0)
    rep = _json(home, "backbone")
    assert (rep["source"], rep["round"], rep["epoch"], rep["rule"]) == ("checkpoint", 5, None,
                                                                         None)
    assert rep["flags"] == "partial" and rep["flags_text"].startswith("partial: some mass")
    shares = {m["peer_id"]: m["share"] for m in rep["members"]}
    assert shares == {identity.peer_id: 0.75, f"unknown:{tag(other).hex()}": 0.25}
    assert rep["members"][0]["credited_rounds"] == 1 and rep["members"][0]["self"]
    table = CliRunner().invoke(app, ["provenance", "backbone", "--home", str(home)]).output
    assert "from its checkpoint" in table and "partial: some mass not attributed" in table
    assert "75.00%" in table and f"unknown:{tag(other).hex()[:8]}" in table
