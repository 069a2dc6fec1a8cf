"""The ``p2pfed`` command line: thin, it parses, calls the layers below and reports.

``main(argv) -> int`` is the entry point (testable without a subprocess); exit codes live in
:mod:`p2pfed.exitcodes`.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gossip.errors import ConfigError, KeyFileError, P2PFedError, StorageError
from p2pfed import cli_bench, cli_daemon, cli_localfed, cli_model, cli_service, exitcodes
from p2pfed.cli_bench import write_json as _write_json
from p2pfed.cli_help import PlainHelpGroup
from p2pfed.home import is_disk_full, storage_error

if TYPE_CHECKING:  # (the simulator loads torch: imported only to simulate)
    from p2pfed.node import RetentionPolicy
    from p2pfed.sim.config import SimConfig

app = typer.Typer(
    name="p2pfed",
    help="Serverless federated learning among institutions, over libp2p.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=PlainHelpGroup,  # plain help for every command: flags, values, defaults
)
ledger_app = typer.Typer(help="Inspect and verify a node's ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
privacy_app = typer.Typer(help="Plan differential-privacy budgets.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")

out = Console()
err = Console(stderr=True)


class CommandFailedError(Exception):
    """Raised by commands to exit with a code after printing their own message."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


@app.callback()
def _root(
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error")
    ] = "warning",
) -> None:
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ------------------------------------------------------------------------------- simulate
@app.command()
def simulate(
    topology: Annotated[Path, typer.Argument(help="Topology file (topologies/*.toml).")],
    workload: Annotated[
        str, typer.Option(help="consensus (random values, mixing only) or education.")
    ] = "consensus",
    rounds: Annotated[
        int | None,
        typer.Option(min=1, max=100_000,
                     help="Rounds (default: 200; education: 40 with --quick, else 48)."),
    ] = None,
    quick: Annotated[bool, typer.Option(help="Education workload: the few-minute run.")]
    = False,
    seed: Annotated[int, typer.Option(min=0, help="Same seed, same numbers.")] = 0,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the report here (default: not written; a missing folder is "
                       "created).")] = None,
    home: Annotated[
        Path | None, typer.Option(help="Keep each node's identity and ledger in HOME/<node>/ "
                                       "(default: in memory only).")
    ] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write a PNG (default: none; a missing folder is created): consensus distance per "
             "round, or for the education workload accuracy per round per task.")] = None,
    dim: Annotated[int, typer.Option(min=1, max=1 << 24, help="Parameters per component.")] = 32,
    dtype: Annotated[str, typer.Option(
        help="Consensus workload: float64, or float32 as a model's parameters.")] = "float64",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    unlearn: Annotated[
        str | None,
        typer.Option(metavar="NODE@ROUND",
                     help="Forget NODE after ROUND rounds; compare with a run without it "
                          "(education: NODE's topic data carries a backdoor)."),
    ] = None,
    mode: Annotated[str, typer.Option(help="Unlearning mode: exact or fast.")] = "exact",
    dp_sigma: Annotated[float | None, typer.Option(
        min=0.0, help="Education: DP noise multiplier for every trained component "
                      "(default: no DP).")] = None,
    dp_clip: Annotated[float, typer.Option(min=0.0, help="DP clipping norm.")] = 1.0,
    dp_delta: Annotated[float, typer.Option(min=0.0, max=1.0, help="DP delta.")] = 1e-5,
    dp_budget: Annotated[float, typer.Option(min=0.0, help="ε cap per component (0: none).")]
    = 0.0,
    dp_noisy: Annotated[str | None, typer.Option(
        metavar="COUNT:SIGMA", help="COUNT evenly spaced nodes use noise multiplier SIGMA "
                                    "instead (heterogeneous budgets; needs --dp-sigma).")] = None,
    attack: Annotated[str | None, typer.Option(
        metavar="KIND:COUNT", help="COUNT Byzantine nodes: sign-flip, gaussian, alie, ipm or "
                                   "label-flip (compared with a run without them).")] = None,
    robust: Annotated[str, typer.Option(
        help="Aggregation at honest nodes: mh, clipped, trimmed-mean or noise-aware.")] = "mh",
    storage: Annotated[str | None, typer.Option(
        metavar="HORIZON:MB", help="Keep HORIZON rounds of history and at most MB megabytes per "
                                   "node (checkpoints every 5 rounds); the report gains storage.")]
    = None,
) -> None:
    """Run every node of TOPOLOGY in this process over the in-memory transport."""
    from p2pfed.sim.simulator import plot_report

    # (every argument is checked before the run: a bad path must not cost a finished run)
    if json_path is not None:
        _check_output(json_path, "--json")
    if plot is not None:
        _check_output(plot, "--plot")
    config = _sim_config(topology, workload=workload, rounds=rounds, quick=quick, seed=seed,
                         home=home, dim=dim, dtype=dtype, unlearn=unlearn, mode=mode,
                         dp_sigma=dp_sigma, dp_clip=dp_clip, dp_delta=dp_delta,
                         dp_budget=dp_budget,
                         dp_noisy=dp_noisy, attack=attack, robust=robust, storage=storage)
    report = _simulate_with_progress(config, quiet)
    if json_path is not None:
        _write_json(json_path, report)
    if plot is not None:
        plot_report(report, plot)
    _print_sim_summary(report)
    for what, path in (("report", json_path), ("plot", plot)):
        if path is not None:
            out.print(f"{what}: {path}")


def _check_output(path: Path, option: str) -> None:
    """Make sure ``path`` can be written once the run is done: its folder is created when
    missing; BadParameter (exit 2) for a folder, or a place that cannot be written."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give a file name", param_hint=option)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot create the folder {folder}: {exc.strerror or exc}",
                                 param_hint=option) from exc
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists()
                                                     and not os.access(path, os.W_OK)):
        raise typer.BadParameter(f"cannot write {path}: permission denied", param_hint=option)


def _sim_config(topology: Path, *, workload: str, rounds: int | None, quick: bool, seed: int,
                home: Path | None, dim: int, unlearn: str | None, mode: str,
                dtype: str = "float64",
                dp_sigma: float | None, dp_clip: float, dp_delta: float, dp_budget: float,
                dp_noisy: str | None, attack: str | None, robust: str,
                storage: str | None = None) -> SimConfig:
    """The simulation ``simulate``'s options ask for (BadParameter for a malformed one)."""
    from p2pfed.sim.simulator import WORKLOADS, SimConfig
    from p2pfed.sim.topology import load_topology

    if workload not in WORKLOADS:
        raise typer.BadParameter(
            f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}",
            param_hint="--workload",
        )
    from p2pfed.sim.config import DTYPES

    if dtype not in DTYPES:
        raise typer.BadParameter(f"unknown type {dtype!r}; choose from {', '.join(DTYPES)}",
                                 param_hint="--dtype")
    if mode not in ("exact", "fast"):
        raise typer.BadParameter(f"unknown mode {mode!r}; choose exact or fast",
                                 param_hint="--mode")
    from p2pfed.config import MIXING_RULES

    if robust not in MIXING_RULES:
        raise typer.BadParameter(f"unknown rule {robust!r}; choose from "
                                 f"{', '.join(MIXING_RULES)}", param_hint="--robust")
    target = _parse_unlearn(unlearn) if unlearn is not None else None
    attackers = _parse_attack(attack) if attack is not None else None
    dp = None
    if dp_sigma is not None:
        from p2pfed.privacy import Policy

        dp = Policy(dp_clip, dp_sigma, dp_delta, 1.0, dp_budget)
    noisy = _parse_noisy(dp_noisy) if dp_noisy is not None else None
    if noisy is not None and dp is None:
        raise typer.BadParameter("needs --dp-sigma (the other nodes' level)",
                                 param_hint="--dp-noisy")
    if topology.is_dir():
        raise typer.BadParameter(f"{topology} is a folder; give a topology file such as "
                                 f"{topology / 'ring-16.toml'}", param_hint="TOPOLOGY")
    topo = load_topology(topology)
    if rounds is None:
        from p2pfed.sim.education import FULL, QUICK

        rounds = (QUICK if quick else FULL).rounds if workload == "education" else 200
    retention = _parse_storage(storage) if storage is not None else None
    return SimConfig(topo, workload=workload, rounds=rounds, seed=seed, home=home, dim=dim,
                     dtype=dtype,
                     quick=quick, unlearn=target, unlearn_mode=mode, dp=dp, dp_noisy=noisy,
                     attack=attackers, robust=robust, retention=retention,
                     checkpoint_every=5 if retention is not None else 0)


def _simulate_with_progress(config: SimConfig, quiet: bool) -> dict[str, Any]:
    """Run the simulation with a progress bar on stderr (none if ``quiet``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from p2pfed.sim.simulator import simulate as run_simulation

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=err, disable=quiet, transient=True,
    )
    rounds = f"{config.topology.name}: rounds"
    with progress:
        task = progress.add_task(rounds, total=config.rounds)

        def update(done: int, total: int) -> None:
            progress.update(task, description=rounds, completed=done, total=total)

        def phase(name: str, done: int, total: int) -> None:
            progress.update(task, description=name, completed=done, total=total)

        config.progress = update
        return run_simulation(config, on_phase=phase)


def _parse_noisy(value: str) -> tuple[int, float]:
    count, sep, sigma = value.partition(":")
    try:
        parsed = int(count), float(sigma)
    except ValueError:
        parsed = (0, -1.0)
    if not sep or parsed[0] < 1 or not math.isfinite(parsed[1]) or parsed[1] <= 0:
        raise typer.BadParameter(f"expected COUNT:SIGMA (a count ≥ 1, a sigma > 0), got "
                                 f"{value!r}", param_hint="--dp-noisy")
    return parsed


def _parse_attack(value: str) -> tuple[str, int]:
    from p2pfed.sim.attacks import ATTACKS

    kind, sep, count = value.rpartition(":")
    if not sep or not kind or not count.isdigit():
        raise typer.BadParameter(f"expected KIND:COUNT, got {value!r}", param_hint="--attack")
    if kind not in ATTACKS:
        raise typer.BadParameter(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}",
                                 param_hint="--attack")
    return kind, int(count)


def _parse_storage(value: str) -> RetentionPolicy:
    from p2pfed.node import RetentionPolicy

    horizon, sep, mb = value.partition(":")
    if not sep or not horizon.isdigit() or not mb.isdigit() or int(horizon) < 1:
        raise typer.BadParameter(f"expected HORIZON:MB with HORIZON >= 1, got {value!r}",
                                 param_hint="--storage")
    return RetentionPolicy(int(horizon), int(mb) * 1_000_000)


def _parse_unlearn(value: str) -> tuple[str, int]:
    node, sep, rnd = value.rpartition("@")
    if not sep or not node or not rnd.isdigit() or int(rnd) < 1:
        raise typer.BadParameter(f"expected NODE@ROUND with ROUND >= 1, got {value!r}",
                                 param_hint="--unlearn")
    return node, int(rnd)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "—" if value is None else format(value, spec)


def _print_sim_summary(report: dict[str, Any]) -> None:
    title = (f"{report['topology']}: {report['nodes']} nodes, {report['rounds']} rounds, "
             f"seed {report['seed']}, {report['wall_s']:.1f} s")
    components = report["components"]
    # a trained component's holders train apart between mixes: its consensus distance says
    # nothing about quality (the JSON report keeps it); its tasks' accuracy does
    trained = {n: c for n, c in components.items() if c.get("tasks")}
    mixed = {n: c for n, c in components.items() if n not in trained}
    if mixed:
        table = Table(title=title)
        for col in ("component", "holders", "SLEM", "to 1e-6", "bound", "distance", "drift"):
            table.add_column(col, justify="left" if col == "component" else "right",
                             no_wrap=True)
        for name, c in mixed.items():
            dist = c["consensus_distance"]
            table.add_row(
                name, str(c["holders"]), _fmt(c["slem"], ".4f"),
                str(c["rounds_to_1e-6"] or "—"), str(c["bound_rounds_to_1e-6"] or "—"),
                _fmt(dist[-1] if dist else None, ".2e"), _fmt(c["mean_drift"], ".1e"),
            )
        out.print(table)
    if trained:
        tasks = report.get("tasks", {})
        table = Table(title=title if not mixed else "trained components")
        for col in ("component", "holders", "SLEM", "trained for", "federated accuracy"):
            table.add_column(col, justify="right" if col in ("holders", "SLEM") else "left")
        for name, c in trained.items():
            accs = ", ".join(f"{t} {tasks[t]['federated']:.3f}" for t in c["tasks"]
                             if t in tasks)
            table.add_row(name, str(c["holders"]), _fmt(c["slem"], ".4f"),
                          ", ".join(c["tasks"]), accs or "—")
        out.print(table)
    if "tasks" in report:
        tasks = Table(title="test accuracy, mean over the holders of each task")
        for col in ("task", "holders", "federated", "local only", "centralized"):
            tasks.add_column(col, justify="left" if col == "task" else "right")
        for name, t in report["tasks"].items():
            tasks.add_row(name, str(t["holders"]), f"{t['federated']:.3f}",
                          _fmt(t.get("local_only"), ".3f"), _fmt(t.get("centralized"), ".3f"))
        out.print(tasks)
    if "honest_accuracy" in report:
        a = report["attack"]
        table = Table(title=f"{a['count']} × {a['kind']} ({', '.join(a['nodes'])}), "
                            f"defence {a['robust']}: accuracy of the honest nodes")
        for col in ("task", "attacked", "without attackers"):
            table.add_column(col, justify="left" if col == "task" else "right")
        for task, acc in report["honest_accuracy"].items():
            table.add_row(task, f"{acc:.3f}", f"{report['honest_accuracy_fault_free'][task]:.3f}")
        out.print(table)
    if "unlearning" in report:
        u = report["unlearning"]
        table = Table(title=f"unlearning {u['node']} after round {u['requested_at_round']} "
                            f"({u['mode']})")
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in u.items():
            if isinstance(value, float):
                table.add_row(key, format(value, ".3g"))
            elif isinstance(value, list):
                table.add_row(key, ", ".join(value) or "—")
        out.print(table)
    if mixed:
        out.print("to 1e-6: rounds until the consensus distance fell below 1e-6 (— not yet)\n"
                  "bound: ⌈ln 1e-6 / ln SLEM⌉; drift: largest change of the holders' mean")
    if trained:
        out.print("trained components: federated accuracy is the test accuracy of each task "
                  "that trains the component, mean over the task's holders (SLEM: how fast "
                  "its holders' mixing alone would agree)")
    net = report["network"]
    out.print(
        f"network: {net['messages']} signed announcements, {net['fetches']} payload fetches "
        f"({net['fetch_bytes'] / 1e6:.1f} MB), {net['dropped']} dropped"
    )


# ------------------------------------------------------------------------------- ledger
def _home_option() -> Any:
    return typer.Option(help="Node home (default: $P2PFED_HOME or ~/.local/share/p2pfed).")


@ledger_app.command("verify")
def ledger_verify(
    home: Annotated[Path | None, _home_option()] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check the ledger's hash chain, signatures and head; name the first bad entry."""
    from gossip.identity import load_identity, peer_id_from_public_key
    from p2pfed.home import resolve_home
    from p2pfed.journal import schema_problems
    from p2pfed.ledger import read_entries, verify_ledger
    from p2pfed.unlearning import FORGET_ENTRY, check_unlearning

    root = resolve_home(home)
    path = root / "ledger.sqlite3"
    if not path.exists():
        raise ConfigError(f"no ledger at {path}")
    key = root / "identity.key"
    try:
        public_key = load_identity(key).public_key
    except KeyFileError:
        if key.exists():
            raise
        public_key = None
    report = verify_ledger(path, public_key)
    owner = peer_id_from_public_key(public_key) if public_key is not None else None
    entries = read_entries(path) if report.ok else []
    unreadable = schema_problems(entries)
    problems = check_unlearning(entries, owner)
    forgotten = sum(e.kind == FORGET_ENTRY for e in entries)
    if as_json:
        out.print_json(data={"ok": report.ok and not problems and not unreadable,
                             "entries": report.entries,
                             "first_bad_index": report.first_bad_index, "reason": report.reason,
                             "schema_problems": unreadable, "unlearning_problems": problems})
    elif not report.ok:
        where = (f"at entry {report.first_bad_index}" if report.first_bad_index is not None
                 else "(no readable entries)")
        err.print(f"[red]ledger broken {where}[/red]: {report.reason}")
    elif problems or unreadable:
        for problem in unreadable:
            err.print(f"[red]entry not readable[/red]: {problem}")
        for problem in problems:
            err.print(f"[red]unlearning not kept[/red]: {problem}")
    else:
        unlearned = (f"; {forgotten} member(s) forgotten, no later state or mix uses them"
                     if forgotten else "")
        out.print(f"[green]ok[/green]: {report.entries} entries, chain and signatures "
                  f"intact{unlearned}")
    if not report.ok or problems or unreadable:
        raise CommandFailedError(exitcodes.LEDGER_BROKEN)


@privacy_app.command("epsilon")
def privacy_epsilon(
    sigma: Annotated[float, typer.Option(min=1e-6, help="Noise multiplier (noise std / C).")],
    sample_rate: Annotated[float, typer.Option(min=1e-12, max=1.0, help="Sampling rate q.")],
    steps: Annotated[int, typer.Option(min=0, help="Noisy releases.")],
    delta: Annotated[float, typer.Option(min=1e-300, max=0.5, help="Target δ.")] = 1e-5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Print the ε that the RDP accountant (opacus') gives for these settings."""
    from p2pfed.privacy import epsilon

    spent = epsilon(sigma, sample_rate, steps, delta)
    if as_json:
        out.print_json(data={"epsilon": spent.epsilon, "delta": spent.delta,
                             "best_order": spent.best_order, "sigma": sigma,
                             "sample_rate": sample_rate, "steps": steps})
    else:
        out.print(f"ε = {spent.epsilon:.4f} at δ = {spent.delta:g} "
                  f"(σ = {sigma:g}, q = {sample_rate:g}, {steps} steps; RDP order "
                  f"{spent.best_order:g})")


# ------------------------------------------------------------------------------- bench
cli_daemon.register(app)
cli_model.register(app)
cli_localfed.register(app)
cli_service.register(app)
cli_bench.register(app)


# ------------------------------------------------------------------------------- entry point
def _as_p2pfed_error(exc: BaseException) -> P2PFedError | None:
    """``exc`` as one of our errors: itself, or a file that could not be read or written (a
    raw OSError or sqlite3 error: the storage error, a full disk included); None for anything
    else (a bug: its traceback is shown)."""
    if isinstance(exc, P2PFedError):
        return exc
    if isinstance(exc, OSError | sqlite3.Error) and is_disk_full(exc):
        return storage_error(exc, "a write failed")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return StorageError(f"{where}{exc.strerror or exc}")
    if isinstance(exc, sqlite3.Error):
        return StorageError(f"a database file cannot be used: {exc}")
    return None


def _only_p2pfed_errors(group: BaseExceptionGroup[BaseException]) -> list[P2PFedError] | None:
    """The P2PFedErrors in a group, or None if it holds anything else."""
    found: list[P2PFedError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            inner = _only_p2pfed_errors(exc)
            if inner is None:
                return None
            found += inner
        elif (ours := _as_p2pfed_error(exc)) is not None:
            found.append(ours)
        else:
            return None
    return found or None


def _print_error(error: P2PFedError) -> None:
    """One line on stderr; the message is printed as it is (``[rounds]`` is not markup)."""
    err.print(f"[red]error[/red]: {escape(str(error))}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code instead of exiting (for tests and embedding)."""
    try:
        result = app(args=argv, prog_name="p2pfed", standalone_mode=False)
    except CommandFailedError as exc:
        return exc.code
    except (P2PFedError, OSError, sqlite3.Error) as exc:  # (a full disk wherever it was hit)
        error = _as_p2pfed_error(exc)
        if error is None:
            raise
        _print_error(error)
        return exitcodes.for_error(error)
    except BaseExceptionGroup as group:  # errors from inside the daemon's nurseries
        ours = _only_p2pfed_errors(group)
        if ours is None:
            raise
        for error in ours:
            _print_error(error)
        return exitcodes.for_error(ours[0])
    except typer.Exit as exc:  # --help and friends
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return exitcodes.INTERRUPTED
    except typer.TyperException as exc:  # usage errors (click's, as vendored by typer)
        show = getattr(exc, "show", None)
        if callable(show):
            show(file=sys.stderr)
        else:
            err.print(f"error: {exc}")
        return exitcodes.USAGE
    return result if isinstance(result, int) else exitcodes.OK
