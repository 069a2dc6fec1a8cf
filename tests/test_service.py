"""The systemd unit: the repository's copy is the rendered template, and systemd accepts it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from p2pfed.cli import main
from p2pfed.runtime.service import render_unit

ROOT = Path(__file__).resolve().parent.parent


def test_repository_unit_is_the_rendered_template() -> None:
    assert (ROOT / "bin" / "p2pfed.service").read_text() == render_unit()


def test_unit_has_the_hardening_the_issue_asks_for() -> None:
    unit = render_unit()
    for line in ("Type=notify", "WatchdogSec=60", "DynamicUser=yes", "StateDirectory=p2pfed",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=\n",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert line in unit


def test_service_install_renders_with_the_executable(tmp_path: Path) -> None:
    out = tmp_path / "p2pfed.service"
    assert main(["service", "install", "--output", str(out), "--exec-path", "/opt/p/bin/p2pfed",
                 "--watchdog", "30"]) == 0
    text = out.read_text()
    assert "ExecStart=/opt/p/bin/p2pfed run --home /var/lib/p2pfed" in text
    assert "WatchdogSec=30" in text
    assert main(["service", "install", "--output", str(out), "--exec-path", "relative"]) == 3


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze absent")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "p2pfed"
    unit = tmp_path / "p2pfed.service"
    unit.write_text(render_unit(str(exe)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
