"""CLI commands of the system service (registered by :mod:`p2pfed.cli`)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from gossip.errors import ConfigError, LocalError

out = Console()
err = Console(stderr=True)


def service_install(
    output: Annotated[Path, typer.Option(help="Where to write the unit.")]
    = Path("/etc/systemd/system/p2pfed.service"),
    exec_path: Annotated[str | None, typer.Option(help="p2pfed executable (absolute).")] = None,
    watchdog: Annotated[int, typer.Option(min=1, max=3600, help="WatchdogSec.")] = 60,
) -> None:
    """Render the systemd unit (Type=notify, sandboxed, DynamicUser) and say what to run next."""
    from p2pfed.runtime.service import install_unit

    exe = exec_path or shutil.which("p2pfed") or os.path.abspath(sys.argv[0])
    try:
        path = install_unit(output, exe, watchdog)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise LocalError(f"cannot write {output}: {exc.strerror} (try sudo, or --output)") from exc
    out.print(f"wrote {path}\nnext: systemctl daemon-reload && systemctl enable --now p2pfed")


def register(app: typer.Typer) -> None:
    service = typer.Typer(help="Install the systemd unit.", no_args_is_help=True)
    service.command("install")(service_install)
    app.add_typer(service, name="service")
