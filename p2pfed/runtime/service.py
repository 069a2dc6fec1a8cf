"""The systemd unit: one template, rendered by ``p2pfed service install``.

``bin/p2pfed.service`` in the repository is this template rendered with the defaults (a test
keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path

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

DEFAULT_EXEC = "/usr/local/bin/p2pfed"
DEFAULT_WATCHDOG_S = 60


def render_unit(exec_path: str = DEFAULT_EXEC, watchdog_s: int = DEFAULT_WATCHDOG_S) -> str:
    if not exec_path.startswith("/") or any(c.isspace() for c in exec_path):
        raise ValueError("the executable path must be absolute and contain no spaces")
    if not 1 <= watchdog_s <= 3600:
        raise ValueError("the watchdog interval must be 1..3600 seconds")
    return TEMPLATE.format(exec_path=exec_path, watchdog_s=watchdog_s)


def install_unit(path: Path, exec_path: str, watchdog_s: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_unit(exec_path, watchdog_s), encoding="utf-8")
    path.chmod(0o644)
    return path
