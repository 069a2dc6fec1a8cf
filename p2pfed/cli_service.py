"""CLI commands of the system service (registered by :mod:`p2pfed.cli`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated

import typer
from rich.console import Console

import p2pfed
from gossip.errors import ConfigError, LocalError

out = Console()
err = Console(stderr=True)


def _running_executable() -> str:
    """The ``p2pfed`` script of the installation running this command: not the first one on
    PATH, which under sudo (secure_path) may be another installation or none."""
    argv0 = Path(sys.argv[0])
    for candidate in (argv0 if argv0.name == "p2pfed" else None,
                      Path(sys.executable).parent / "p2pfed"):
        if candidate is not None and candidate.is_file():
            return os.path.abspath(candidate)
    raise ConfigError("cannot tell where this p2pfed is installed; pass --exec-path")


def service_install(
    output: Annotated[Path, typer.Option(help="Where to write the unit.")]
    = Path("/etc/systemd/system/p2pfed.service"),
    exec_path: Annotated[str | None, typer.Option(
        help="p2pfed executable (absolute; default: this installation's). It must lie where the "
        "unit's sandbox lets the service read it: not under /home, /root, /run/user, /tmp or "
        "/var/tmp.")] = None,
    watchdog: Annotated[int, typer.Option(min=1, max=3600, help="WatchdogSec.")] = 60,
    profile: Annotated[str | None, typer.Option(
        help="Hardware profile (server, laptop, phone): with a memory cap, the unit gets "
        "MemoryMax= (the cap and a quarter) and CPUQuota= (its threads). Default: the "
        "service home's p2pfed.toml where it has one ([node] profile, threads, max_memory_mb), "
        "else server.")] = None,
) -> None:
    """Render the systemd unit (Type=notify, sandboxed, DynamicUser) and say what to run next."""
    from p2pfed.cli_daemon import check_profile
    from p2pfed.config import Config
    from p2pfed.profiles import resources_of
    from p2pfed.runtime import service
    from p2pfed.runtime.profile import unit_limits

    started = (service.FS_ROOT / "var/lib/private/p2pfed").exists()
    home_config = service.FS_ROOT / ("var/lib/private/p2pfed" if started
                                     else service.STATE_DIR.lstrip("/")) / "p2pfed.toml"
    source = ""
    if profile is None and home_config.is_file():  # (a re-install: the home says)
        config = Config.from_toml(home_config)
        profile, source = config.node.profile, f", from {home_config}"
    else:
        profile = profile or "server"
        check_profile(profile)
        config = Config().with_overrides(node__profile=profile)
    limits = unit_limits(resources_of(config))
    try:
        if exec_path is None:
            exec_path = _running_executable()
            service.check_package_dir(PurePosixPath(Path(p2pfed.__file__).resolve().parent))
        path = service.install_unit(output, exec_path, watchdog, limits)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise LocalError(f"cannot write {output}: {exc.strerror} (try sudo, or --output)") from exc
    out.print(f"wrote {path}: the service runs {exec_path} run --home {service.STATE_DIR} as a "
              "dynamic user (DynamicUser=yes; systemd makes its home, StateDirectory=p2pfed)",
              soft_wrap=True, highlight=False)
    if limits:
        out.print(f"resource limits ({profile}{source}): {' '.join(limits)}", highlight=False)
    out.print(service.next_steps(exec_path, started, profile), soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    service = typer.Typer(help="Install the systemd unit.", no_args_is_help=True)
    service.command("install")(service_install)
    app.add_typer(service, name="service")
