"""CLI command of the local demo federation (registered by :mod:`p2pfed.cli`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gossip.errors import LocalError

out = Console()
err = Console(stderr=True)


def local_federation(
    nodes: Annotated[int, typer.Option(min=2, max=16, help="Daemons to start.")] = 4,
    rounds: Annotated[int, typer.Option(
        min=1, max=1000, help="Rounds every daemon must mix after it saw the last member "
                              "join, before they stop (they mix on their own clock: most "
                              "mix more).")] = 3,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the summary here (default: not written).")] = None,
    base: Annotated[Path | None, typer.Option(
        help="Folder for the homes, kept afterwards (default: a temporary folder, removed "
             "after a clean stop unless --keep).")] = None,
    keep: Annotated[bool, typer.Option(
        help="Keep the temporary folder of homes (their daemon.log, ledgers).")] = False,
    timeout: Annotated[float, typer.Option(min=10, help="Give up after this many seconds.")]
    = 240.0,
) -> None:
    """Start N real daemons on 127.0.0.1 with the real CLI, wait for R rounds, report, stop."""
    from p2pfed.runtime.localfed import run_local_federation

    err.print(f"starting {nodes} daemons on 127.0.0.1 …")
    summary = run_local_federation(nodes, rounds, base, timeout, keep=keep,
                                   on_step=lambda text: err.print(f"  {text}"))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = Table("node", "peer id", "rounds mixed", "since last join", "peers", "ledger",
                  "consensus distance",
                  title=f"local federation: {nodes} daemons, {summary['wall_s']:.1f} s "
                        f"({summary['setup_s']:.1f} s to set up)")
    for i, n in enumerate(summary["nodes"]):
        hist = n["consensus_distance"]
        trend = f"{hist[0]:.2e} → {hist[-1]:.2e}" if hist else "—"
        table.add_row(f"node-{i}", n["peer_id"][-12:], str(n["rounds_completed"]),
                      str(n["rounds_since_membership_change"]), str(n["peers"]),
                      "ok" if n["ledger_ok"] else "BROKEN", trend)
    out.print(table)
    out.print(f"waited until every daemon had mixed {rounds} rounds since it saw the last member "
              f"join; they mix on their own clock, so most mixed more meanwhile (rounds mixed: "
              f"since the daemon started; since last join: since its membership last changed, "
              f"the rounds of its consensus distance)")
    where = (f"homes removed ({summary['base']}; --keep or --base keeps them)"
             if summary["base_removed"] else
             f"homes kept in {summary['base']} (each has daemon.log)")
    out.print(f"{where}; daemons exited with {summary['exit_codes']}")
    if json_path is not None:
        out.print(f"summary: {json_path}")
    if any(code != 0 for code in summary["exit_codes"]):
        raise LocalError("a daemon did not stop cleanly")


def register(app: typer.Typer) -> None:
    app.command("local-federation")(local_federation)
