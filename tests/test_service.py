"""The systemd unit: the repository's copy is the rendered template, systemd accepts it, and
``service install`` refuses an executable the unit's own sandbox would hide from the service.

The installation checks run against a fake filesystem root under tmp_path (``FS_ROOT``), with
a virtualenv laid out as ``python3 -m venv`` and pip lay it out: never the real /opt or /etc.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from p2pfed.cli import main
from p2pfed.runtime import service
from p2pfed.runtime.service import HIDDEN_BY, check_exec_path, check_package_dir, render_unit

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def _put(root: Path, path: str, text: str = "", mode: int = 0o755) -> Path:
    real = root / path.lstrip("/")
    real.parent.mkdir(parents=True, exist_ok=True)
    for folder in [real.parent, *real.parent.parents]:
        if folder == root:
            break
        folder.chmod(0o755)
    real.write_text(text)
    real.chmod(mode)
    return real


def _link(root: Path, path: str, target: str) -> None:
    real = root / path.lstrip("/")
    real.parent.mkdir(parents=True, exist_ok=True)
    real.parent.chmod(0o755)
    real.symlink_to(target)


def _system(root: Path, python: str = SYSTEM_PYTHON) -> None:
    """A merged-/usr Debian: /bin -> usr/bin, python3 -> python3.11, /usr/bin/sh."""
    root.chmod(0o755)
    _put(root, "/usr/bin/python3.11", "\x7fELF")
    _put(root, "/usr/bin/dash", "\x7fELF")
    _link(root, "/usr/bin/python3", "python3.11")
    _link(root, "/usr/bin/sh", "dash")
    _link(root, "/bin", "usr/bin")
    if python != SYSTEM_PYTHON:
        _put(root, python, "\x7fELF")


def _venv(root: Path, prefix: str, python: str = SYSTEM_PYTHON) -> str:
    """``python -m venv PREFIX && PREFIX/bin/pip install p2pfed``: the p2pfed script."""
    _system(root, python)
    _link(root, f"{prefix}/bin/python3", python)
    _link(root, f"{prefix}/bin/python", "python3")
    script = f"{prefix}/bin/p2pfed"
    _put(root, script, f"#!{prefix}/bin/python3\nimport sys\nfrom p2pfed.cli import main\n")
    return script


@pytest.fixture
def fs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setattr(service, "FS_ROOT", root)
    return root


def test_repository_unit_is_the_rendered_template() -> None:
    assert (ROOT / "bin" / "p2pfed.service").read_text() == render_unit()


def test_unit_has_the_hardening_the_issue_asks_for() -> None:
    unit = render_unit()
    for line in ("Type=notify", "WatchdogSec=60", "DynamicUser=yes", "StateDirectory=p2pfed",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=\n",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert line in unit


def test_the_hidden_folders_are_those_the_unit_hides() -> None:
    unit = render_unit()
    for directive in set(HIDDEN_BY.values()):
        assert f"\n{directive}\n" in unit
    assert {"/home", "/root", "/run/user"} <= set(HIDDEN_BY)  # ProtectHome=yes
    assert {"/tmp", "/var/tmp"} <= set(HIDDEN_BY)  # PrivateTmp=yes
    assert "DynamicUser=yes" in unit and "User=" not in unit.replace("DynamicUser=", "")


@pytest.mark.parametrize("prefix", ["/opt/p2pfed", "/usr/local/p2pfed", "/srv/p2pfed-venv"])
def test_a_venv_the_service_can_read_is_accepted(tmp_path: Path, prefix: str) -> None:
    check_exec_path(_venv(tmp_path, prefix), tmp_path)


def test_a_link_on_the_path_to_a_readable_venv_is_accepted(tmp_path: Path) -> None:
    _venv(tmp_path, "/opt/p2pfed")
    _link(tmp_path, "/usr/local/bin/p2pfed", "/opt/p2pfed/bin/p2pfed")
    check_exec_path("/usr/local/bin/p2pfed", tmp_path)


@pytest.mark.parametrize(("prefix", "folder", "directive"), [
    ("/home/ana/p2pfed/.venv", "/home", "ProtectHome=yes"),
    ("/root/venv", "/root", "ProtectHome=yes"),
    ("/run/user/1000/venv", "/run/user", "ProtectHome=yes"),
    ("/tmp/p2pfed", "/tmp", "PrivateTmp=yes"),
    ("/var/tmp/p2pfed", "/var/tmp", "PrivateTmp=yes"),
])
def test_a_venv_the_sandbox_hides_is_refused(tmp_path: Path, prefix: str, folder: str,
                                            directive: str) -> None:
    with pytest.raises(ValueError, match=f"under {folder}, hidden from the service by the "
                       f"unit's {directive}: install p2pfed where"):
        check_exec_path(_venv(tmp_path, prefix), tmp_path)


def test_a_venv_of_a_python_under_home_is_refused(tmp_path: Path) -> None:
    """python3 -m venv /opt/p2pfed, run by a pyenv Python: bin/python3 links into /home."""
    pyenv = "/home/ana/.pyenv/versions/3.11.9/bin/python3.11"
    exe = _venv(tmp_path, "/opt/p2pfed", python=pyenv)
    with pytest.raises(ValueError, match=re.escape(
            f"interpreter /opt/p2pfed/bin/python3 leads to {pyenv}, which is under /home")):
        check_exec_path(exe, tmp_path)


def test_a_link_into_home_is_refused(tmp_path: Path) -> None:
    _venv(tmp_path, "/home/ana/venv")
    _link(tmp_path, "/usr/local/bin/p2pfed", "/home/ana/venv/bin/p2pfed")
    with pytest.raises(ValueError, match="ExecStart /usr/local/bin/p2pfed leads to "
                       "/home/ana/venv/bin/p2pfed, which is under /home"):
        check_exec_path("/usr/local/bin/p2pfed", tmp_path)


def test_a_link_through_tmp_is_refused_even_if_it_ends_in_opt(tmp_path: Path) -> None:
    """The service's own /tmp is empty: a link that goes through the host's /tmp is broken."""
    _venv(tmp_path, "/opt/p2pfed")
    _link(tmp_path, "/tmp/p2pfed", "/opt/p2pfed/bin/p2pfed")
    _link(tmp_path, "/usr/local/bin/p2pfed", "/tmp/p2pfed")
    with pytest.raises(ValueError, match="leads to /tmp/p2pfed, which is under /tmp"):
        check_exec_path("/usr/local/bin/p2pfed", tmp_path)


def test_pips_sh_launcher_is_followed_to_its_python(tmp_path: Path) -> None:
    """pip writes a /bin/sh launcher when the interpreter's path is too long for #!."""
    for python, ok in (("/opt/p2pfed/bin/python3", True), ("/home/ana/venv/bin/python3", False)):
        root = tmp_path / str(ok)
        root.mkdir()
        _venv(root, "/opt/p2pfed")
        _put(root, "/home/ana/venv/bin/python3", "\x7fELF")
        _put(root, "/opt/p2pfed/bin/p2pfed-long",
                   f"#!/bin/sh\n\'\'\'exec\' \"{python}\" \"$0\" \"$@\"\n\' \'\'\'\n")
        if ok:
            check_exec_path("/opt/p2pfed/bin/p2pfed-long", root)
        else:
            with pytest.raises(ValueError, match="p2pfed-long's interpreter /home/ana/venv"):
                check_exec_path("/opt/p2pfed/bin/p2pfed-long", root)


def test_what_the_dynamic_user_cannot_read_or_enter_is_refused(tmp_path: Path) -> None:
    exe = _venv(tmp_path, "/opt/p2pfed")
    (tmp_path / "opt/p2pfed/bin/p2pfed").chmod(0o750)  # installed under umask 027
    with pytest.raises(ValueError, match=r"cannot run /opt/p2pfed/bin/p2pfed \(mode 0750\)"):
        check_exec_path(exe, tmp_path)
    (tmp_path / "opt/p2pfed/bin/p2pfed").chmod(0o755)
    (tmp_path / "opt/p2pfed").chmod(0o700)
    with pytest.raises(ValueError, match="cannot enter /opt/p2pfed, which holds"):
        check_exec_path(exe, tmp_path)
    (tmp_path / "opt/p2pfed").chmod(0o755)
    check_exec_path(exe, tmp_path)


def test_a_missing_or_relative_executable_is_refused(tmp_path: Path) -> None:
    _system(tmp_path)
    with pytest.raises(ValueError, match="/opt/p2pfed/bin/p2pfed does not exist"):
        check_exec_path("/opt/p2pfed/bin/p2pfed", tmp_path)
    with pytest.raises(ValueError, match="must be absolute"):
        check_exec_path("p2pfed", tmp_path)


def test_an_editable_install_from_home_is_refused() -> None:
    with pytest.raises(ValueError, match="pip install -e of a clone"):
        check_package_dir(PurePosixPath("/home/ana/src/p2pfed/p2pfed"))
    check_package_dir(PurePosixPath("/opt/p2pfed/lib/python3.11/site-packages/p2pfed"))


def test_service_install_renders_with_the_executable(
        fs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exe = _venv(fs_root, "/opt/p2pfed")
    out = tmp_path / "p2pfed.service"
    assert main(["service", "install", "--output", str(out), "--exec-path", exe,
                 "--watchdog", "30"]) == 0
    text = out.read_text()
    assert "ExecStart=/opt/p2pfed/bin/p2pfed run --home /var/lib/p2pfed" in text
    assert "WatchdogSec=30" in text
    assert os.stat(out).st_mode & 0o777 == 0o644
    said = capsys.readouterr().out
    assert "/opt/p2pfed/bin/p2pfed init --home /var/lib/p2pfed" in said
    assert "/opt/p2pfed/bin/p2pfed join TOKEN --home /var/lib/p2pfed" in said
    assert "systemctl daemon-reload && systemctl enable --now p2pfed" in said
    assert "systemd-run" not in said
    assert said.index(" init ") < said.index(" join ") < said.index("enable --now")


def test_service_install_with_a_profile_limits_memory_and_cpu(
        fs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exe = _venv(fs_root, "/opt/p2pfed")
    out = tmp_path / "p2pfed.service"
    assert main(["service", "install", "--output", str(out), "--exec-path", exe,
                 "--profile", "phone"]) == 0
    assert "\nMemoryMax=1920M\nCPUQuota=100%\n" in out.read_text()
    said = capsys.readouterr().out
    assert "init --home /var/lib/p2pfed --profile phone --listen" in said
    assert "join TOKEN --home /var/lib/p2pfed    (" in said
    assert main(["service", "install", "--output", str(tmp_path / "x"), "--exec-path", exe,
                 "--profile", "tablet"]) == 2
    assert not (tmp_path / "x").exists()


def test_a_reinstall_takes_the_limits_from_the_service_homes_config(
        fs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exe = _venv(fs_root, "/opt/p2pfed")
    home = fs_root / "var/lib/private/p2pfed"
    home.mkdir(parents=True)
    (home / "p2pfed.toml").write_text('[node]\nprofile = "laptop"\nmax_memory_mb = 1000\n'
                                      'threads = 3\n')
    out = tmp_path / "p2pfed.service"
    assert main(["service", "install", "--output", str(out), "--exec-path", exe]) == 0
    assert "\nMemoryMax=1250M\nCPUQuota=300%\n" in out.read_text()
    said = " ".join(capsys.readouterr().out.split())
    assert "resource limits (laptop, from " in said and "p2pfed.toml): MemoryMax" in said
    # an explicit --profile still wins
    assert main(["service", "install", "--output", str(out), "--exec-path", exe,
                 "--profile", "phone"]) == 0
    assert "\nMemoryMax=1920M\nCPUQuota=100%\n" in out.read_text()


def test_once_the_service_has_run_the_steps_run_as_its_user(
        fs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """After the first start /var/lib/p2pfed is the dynamic user's: a file root made there
    would stay root's, so init and join go through systemd-run as that user."""
    exe = _venv(fs_root, "/opt/p2pfed")
    (fs_root / "var/lib/private/p2pfed").mkdir(parents=True)
    assert main(["service", "install", "--output", str(tmp_path / "u"), "--exec-path", exe]) == 0
    said = capsys.readouterr().out
    assert ("systemd-run --pty --wait --collect --quiet -p DynamicUser=yes -p User=p2pfed "
            "-p StateDirectory=p2pfed -p UMask=0077 /opt/p2pfed/bin/p2pfed init --home "
            "/var/lib/p2pfed") in said


@pytest.mark.parametrize("exe", ["/home/ana/.venv/bin/p2pfed", "/tmp/venv/bin/p2pfed",
                                 "relative", "/opt/p2pfed/bin/p2pfed"])
def test_service_install_refuses_what_the_service_cannot_run(
        fs_root: Path, tmp_path: Path, exe: str, capsys: pytest.CaptureFixture[str]) -> None:
    if exe.startswith(("/home", "/tmp")):  # there, and runnable, but hidden from the service
        _venv(fs_root, exe.rsplit("/bin/", 1)[0])
    out = tmp_path / "p2pfed.service"
    assert main(["service", "install", "--output", str(out), "--exec-path", exe]) == 3
    assert not out.exists()
    assert "error" in capsys.readouterr().err


def _systemd_root(tmp_path: Path) -> Path:
    """A root systemd-analyze --root can load units from: the system's units, a venv in /opt
    and the unit that `service install` wrote to its /etc/systemd/system."""
    units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                 if p.is_dir())
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    return root


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          check=False, timeout=60)


needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze absent (apt install systemd)")


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_installed_unit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _systemd_root(tmp_path)
    monkeypatch.setattr(service, "FS_ROOT", root)
    exe = _venv(root, "/opt/p2pfed")
    unit = root / "etc/systemd/system/p2pfed.service"
    assert main(["service", "install", "--output", str(unit), "--exec-path", exe]) == 0
    done = _analyze("verify", f"--root={root}", "p2pfed.service")
    assert done.returncode == 0, done.stderr
    (root / exe.lstrip("/")).unlink()  # and it would notice a missing executable
    done = _analyze("verify", f"--root={root}", "p2pfed.service")
    assert done.returncode != 0 and "/opt/p2pfed/bin/p2pfed is not executable" in done.stderr


@needs_systemd_analyze
def test_systemd_analyze_security_exposure_is_at_most_3_2(tmp_path: Path) -> None:
    """The score docs/operating.md quotes; a loosened sandbox fails this test."""
    unit = tmp_path / "p2pfed.service"
    unit.write_text(render_unit())
    done = _analyze("security", "--offline=true", "--threshold=32", str(unit))
    assert done.returncode == 0, done.stdout[-2000:]
    assert "Overall exposure level for p2pfed.service: 3.2" in done.stdout
    unit.write_text(render_unit().replace("CapabilityBoundingSet=\n", ""))
    assert _analyze("security", "--offline=true", "--threshold=32", str(unit)).returncode != 0
