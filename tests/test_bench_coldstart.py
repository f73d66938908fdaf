"""The cold-start benchmark: its options, and one quick run end to end (opt-in)."""

from __future__ import annotations

import re

import pytest

from bench.coldstart import main, parse_args

_NUMBER = re.compile(r"^\d+\.\d+")


def test_quick_means_one_launch_unless_runs_is_given() -> None:
    assert parse_args([]).runs == 5
    assert parse_args(["--quick"]).runs == 1
    assert parse_args(["--quick", "--runs", "3"]).runs == 3


def test_runs_must_be_positive() -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--runs", "0"])
    assert exit_info.value.code == 2


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_quick_run_prints_a_number_in_every_cell(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--quick"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "as-is" in header
    assert "with bytecode cache" in header
    names = [row.split("|")[1].strip() for row in body]
    for wanted in (
        "first task",
        "status --json",
        "--help",
        "worker",
        "heartbeat",
        "reaper",
        "governor",
    ):
        assert any(wanted in name for name in names), (wanted, out)
    for row in body:
        as_is, cached = (cell.strip() for cell in row.split("|")[2:4])
        assert _NUMBER.match(as_is), row
        assert _NUMBER.match(cached), row
