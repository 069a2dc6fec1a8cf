"""The ``p2pfed`` command line: thin, it parses, calls the layers below and reports.

``main(argv) -> int`` is the entry point (testable without a subprocess); exit codes live in
:mod:`p2pfed.exitcodes`.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from gossip.errors import ConfigError, KeyFileError, P2PFedError, StorageError
from p2pfed import (
    cli_bench,
    cli_daemon,
    cli_explain,
    cli_localfed,
    cli_model,
    cli_provenance,
    cli_service,
    cli_sim,
    cli_task,
    exitcodes,
)
from p2pfed.cli_help import PlainHelpGroup
from p2pfed.home import is_disk_full, storage_error

if TYPE_CHECKING:  # (the simulator loads torch: imported only to simulate)
    pass

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
cli_sim.register(app)
cli_daemon.register(app)
cli_model.register(app)
cli_localfed.register(app)
cli_service.register(app)
cli_bench.register(app)
cli_task.register(app)
cli_provenance.register(app)
cli_explain.register(app)


# ------------------------------------------------------------------------------- entry point
#: what a file that cannot be read or written raises (a socket's errors are not among them: one
#: that escapes is a bug, and keeps its traceback)
_FILE_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR,
                          errno.ENOTDIR, errno.EIO, errno.EEXIST, errno.ENAMETOOLONG})


def _as_p2pfed_error(exc: BaseException) -> P2PFedError | None:
    """``exc`` as one of our errors: itself, or a file that could not be read or written (a
    raw OSError or sqlite3 error: the storage error, a full disk included); None for anything
    else (a bug: its traceback is shown)."""
    if isinstance(exc, P2PFedError):
        return exc
    if isinstance(exc, OSError | sqlite3.Error) and is_disk_full(exc):
        return storage_error(exc, "a write failed")
    if isinstance(exc, OSError) and (exc.filename or exc.errno in _FILE_ERRNOS):
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
