"""The client-stack benchmark (bench/clients.py): opt-in, quick mode, today's stack and redis-py."""

from __future__ import annotations

import pytest

from bench.clients import main, parse_args

pytestmark = pytest.mark.bench


def test_candidates_are_checked() -> None:
    assert parse_args(["--candidates", "scrapeq,redis-py"]).candidates == ["scrapeq", "redis-py"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--candidates", "scrapeq,nonesuch"])
    assert exit_info.value.code == 2


def test_quick_run_fills_the_table_with_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--quick", "--candidates", "scrapeq,redis-py"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [row.split("|")[1].strip()[:3] for row in rows] == ["(a)", "(b)"], out
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        assert len(cells) == 7, row
        assert "n/a" not in row, out  # every workload measured, the ratio column too
        numbers = [float(cell.split()[0].replace(",", "").rstrip("×")) for cell in cells]
        assert all(number > 0 for number in numbers), row
    assert "1.00× / 1.00×" in rows[0]
