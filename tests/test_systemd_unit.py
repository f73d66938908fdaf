"""deploy/scrapeq.service: systemd accepts every line of it, hardening included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "scrapeq.service"

#: Hardening a worker can live with (issue #13); each must stay in the unit.
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "CapabilityBoundingSet=",
    "SystemCallFilter=@system-service",
    "ProtectProc=invisible",
    "IPAddressDeny=169.254.169.254",
)


def test_the_unit_keeps_its_hardening() -> None:
    lines = UNIT.read_text().splitlines()
    for directive in HARDENING:
        assert any(line.startswith(directive) for line in lines), directive


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """Unknown keys, bad values and misplaced lines are warnings systemd would ignore:
    any output at all fails. ExecStart points at this checkout's console script,
    since verify checks that the binary exists."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (.ci/run installs Debian's systemd)")
    supervisor = Path(sys.executable).parent / "supervisor"
    text = UNIT.read_text().replace("/opt/scrapeq/.venv/bin/supervisor", str(supervisor))
    unit = tmp_path / "scrapeq.service"
    unit.write_text(text)

    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout + done.stderr == "", done.stdout + done.stderr
