"""The systemd unit: one template, rendered by ``p2pfed service install``.

``bin/p2pfed.service`` in the repository is this template rendered with the defaults (a test
keeps the two equal).

The unit's own sandbox decides where p2pfed may be installed: ``ProtectHome=yes`` hides
``/home``, ``/root`` and ``/run/user`` from the service, ``PrivateTmp=yes`` gives it an empty
``/tmp`` and ``/var/tmp`` of its own, and ``DynamicUser=yes`` runs it as an unprivileged user
that reads only what "others" may read.  :func:`check_exec_path` refuses an executable the
service could not start for any of these reasons, so that ``service install`` says so instead
of the unit failing with ``status=203/EXEC`` at its first start.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

TEMPLATE = """\
# p2pfed daemon: one institution's node of a serverless learning federation.
# Rendered by `p2pfed service install`; edit the settings there, not here.
[Unit]
Description=p2pfed federated learning daemon
Documentation=https://example.invalid/p2pfed
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_path} run --home /var/lib/p2pfed
Environment=P2PFED_HOME=/var/lib/p2pfed
WatchdogSec={watchdog_s}
TimeoutStartSec=120
TimeoutStopSec=60
KillSignal=SIGTERM
Restart=on-failure
RestartSec=5
{limits}
DynamicUser=yes
StateDirectory=p2pfed
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
CapabilityBoundingSet=
AmbientCapabilities=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""

DEFAULT_EXEC = "/usr/local/bin/p2pfed"  # the repository's copy; install uses the running one
STATE_DIR = "/var/lib/p2pfed"  # StateDirectory=p2pfed; ExecStart's --home
DEFAULT_WATCHDOG_S = 60


#: Where the unit's sandbox hides files from the service, and the directive that hides them.
HIDDEN_BY = {
    "/home": "ProtectHome=yes",
    "/root": "ProtectHome=yes",
    "/run/user": "ProtectHome=yes",
    "/tmp": "PrivateTmp=yes",
    "/var/tmp": "PrivateTmp=yes",
    "/dev/shm": "PrivateDevices=yes",
}

#: The documented installation (docs/operating.md, "The systemd service"), for error messages.
INSTALL_HINT = ("install p2pfed where the service can read it: sudo python3 -m venv /opt/p2pfed "
                "&& sudo /opt/p2pfed/bin/pip install ./p2pfed (a clone, without -e), then "
                "sudo /opt/p2pfed/bin/p2pfed service install")

#: The filesystem the checks look at: the machine's root (tests point it at a folder).
FS_ROOT = Path("/")

_MAX_HOPS = 40  # symlinks followed before giving up, as the kernel does
_PIP_SH_LAUNCHER = re.compile(rb"^'''exec' \"?([^\"\s]+)", re.MULTILINE)  # pip, long paths


def hidden_by(path: PurePosixPath) -> tuple[str, str] | None:
    """The hidden folder ``path`` lies in and the unit directive hiding it; None if visible."""
    for folder, directive in HIDDEN_BY.items():
        if path == PurePosixPath(folder) or PurePosixPath(folder) in path.parents:
            return folder, directive
    return None


def _hops(path: PurePosixPath, root: Path) -> list[PurePosixPath]:
    """``path``, every path its symlinks lead through, and last the real path (which may not
    exist).  Links are read below ``root`` and absolute targets stay below it, as in a chroot."""
    hops = [path]
    parts = list(path.parts[1:])
    done = PurePosixPath("/")
    while parts:
        part = parts.pop(0)
        if part == "..":
            done = done.parent
            continue
        here = done / part
        if not (root / here.relative_to("/")).is_symlink():
            done = here
            continue
        if len(hops) > _MAX_HOPS:
            raise ValueError(f"{path}: too many levels of symbolic links")
        target = PurePosixPath(os.readlink(root / here.relative_to("/")))
        hop = (target if target.is_absolute() else done / target).joinpath(*parts)
        hops.append(hop)
        parts = list(hop.parts[1:])
        done = PurePosixPath("/")
    if hops[-1] != done:
        hops.append(done)
    return hops


def _interpreter(head: bytes) -> PurePosixPath | None:
    """The interpreter a file's first bytes name (``#!``, or pip's ``/bin/sh`` launcher)."""
    if not head.startswith(b"#!"):
        return None
    first = head[2:].split(b"\n", 1)[0].split()
    if not first:
        return None
    launcher = _PIP_SH_LAUNCHER.search(head) if first[0] in (b"/bin/sh", b"/usr/bin/sh") else None
    return PurePosixPath(os.fsdecode(launcher.group(1) if launcher else first[0]))


def _check_runnable(path: PurePosixPath, root: Path) -> PurePosixPath | None:
    """Check that the service's unprivileged user can run the real file ``path``; return the
    interpreter it names, if it is a script."""
    real = root / path.relative_to("/")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist: {INSTALL_HINT}") from None
    except PermissionError:
        raise ValueError(f"cannot look at {path} to check it (run as root)") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a file")
    try:
        with real.open("rb") as f:
            interpreter = _interpreter(f.read(4096))
    except PermissionError:  # not root: a binary others may run but not read
        interpreter = None
    need = stat.S_IXOTH | (stat.S_IROTH if interpreter is not None else 0)
    if mode & need != need:
        raise ValueError(f"the service's user (DynamicUser=yes: neither owner nor group) cannot "
                         f"run {path} (mode {stat.S_IMODE(mode):04o}): chmod o+rx it, or "
                         "reinstall with umask 022")
    for folder in path.parents:
        if folder != PurePosixPath("/") and not (
                (root / folder.relative_to("/")).stat().st_mode & stat.S_IXOTH):
            raise ValueError(f"the service's user (DynamicUser=yes) cannot enter {folder}, which "
                             f"holds {path}: chmod o+rx {folder}, or reinstall with umask 022")
    return interpreter


def check_exec_path(exec_path: str, root: Path | None = None) -> None:
    """Raise ValueError (one line) unless the unit's service can run ``exec_path``.

    The executable, every symlink on the way to it, and the interpreter of its ``#!`` line (a
    virtualenv's ``bin/python`` and the Python it links to) must lie outside the folders of
    :data:`HIDDEN_BY`, and others (the service's dynamic user) must be able to run them.
    ``root`` (default :data:`FS_ROOT`) is the filesystem the paths are looked up in.
    """
    root = FS_ROOT if root is None else root
    path: PurePosixPath | None = PurePosixPath(exec_path)
    if not exec_path.startswith("/") or any(c.isspace() for c in exec_path):
        raise ValueError("the executable path must be absolute and contain no spaces")
    what = "ExecStart"
    for _ in range(4):  # the script, its interpreter, and an interpreter's own #! line
        if path is None:
            return
        if not path.is_absolute():
            raise ValueError(f"{what} {path} is a relative path")
        hops = _hops(path, root)
        for hop in hops:
            if (hidden := hidden_by(hop)) is not None:
                where = f"{what} {hop}" if hop == hops[0] else \
                    f"{what} {hops[0]} leads to {hop}, which"
                raise ValueError(f"{where} is under {hidden[0]}, hidden from the service by "
                                 f"the unit's {hidden[1]}: {INSTALL_HINT}")
        what, path = f"{hops[-1]}'s interpreter", _check_runnable(hops[-1], root)
    raise ValueError(f"{exec_path}: too many nested #! interpreters")


def check_package_dir(package_dir: PurePosixPath) -> None:
    """Raise ValueError unless the service can read the p2pfed package this command runs from
    (an editable install of a clone under /home, ``pip install -e``, it cannot)."""
    if (hidden := hidden_by(package_dir)) is not None:
        raise ValueError(f"this p2pfed runs from {package_dir}, under {hidden[0]}, hidden from "
                         f"the service by the unit's {hidden[1]} (pip install -e of a clone?): "
                         f"{INSTALL_HINT}")


def render_unit(exec_path: str = DEFAULT_EXEC, watchdog_s: int = DEFAULT_WATCHDOG_S,
                limits: Sequence[str] = ()) -> str:
    """The unit; ``limits``: resource directives of a hardware profile
    (:func:`p2pfed.runtime.profile.unit_limits`: ``MemoryMax=``, ``CPUQuota=``)."""
    if not exec_path.startswith("/") or any(c.isspace() for c in exec_path):
        raise ValueError("the executable path must be absolute and contain no spaces")
    if not 1 <= watchdog_s <= 3600:
        raise ValueError("the watchdog interval must be 1..3600 seconds")
    return TEMPLATE.format(exec_path=exec_path, watchdog_s=watchdog_s,
                           limits="".join(f"{line}\n" for line in limits))


def install_unit(path: Path, exec_path: str, watchdog_s: int,
                 limits: Sequence[str] = ()) -> Path:
    """Write the unit for ``exec_path`` to ``path``; ValueError if the service could not run
    ``exec_path`` (:func:`check_exec_path`), OSError if ``path`` cannot be written."""
    check_exec_path(exec_path)
    text = render_unit(exec_path, watchdog_s, limits)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    path.chmod(0o644)
    return path


def as_service_user(exec_path: str) -> str:
    """The command line that runs ``exec_path`` as the service's dynamic user, with its state
    directory, for commands that write the home once the service has started."""
    return ("systemd-run --pty --wait --collect --quiet -p DynamicUser=yes -p User=p2pfed "
            f"-p StateDirectory=p2pfed -p UMask=0077 {exec_path}")


def next_steps(exec_path: str, started_before: bool, profile: str = "server") -> str:
    """What to run after ``service install``, as root.  Before the service's first start,
    plain root commands: at that start systemd moves :data:`STATE_DIR` to
    ``/var/lib/private/p2pfed``, links it back and hands it to the dynamic user.  Once it has
    started (``started_before``), a root-owned file would stay root's, so the commands that
    write the home run as the service's user (:func:`as_service_user`)."""
    run = as_service_user(exec_path) if started_before else exec_path
    home = f"--home {STATE_DIR}"
    init = f"{home} --profile {profile}" if profile != "server" else home
    return "\n".join([
        "next, as root:",
        f"  {run} init {init} --listen /ip4/0.0.0.0/tcp/4001 --announce /dns4/HOST/tcp/4001",
        f"  {run} join TOKEN {home}    (or: federation create NAME {home})",
        "  systemctl daemon-reload && systemctl enable --now p2pfed",
        f"  {exec_path} status {home}    (and: journalctl -u p2pfed)",
    ])
