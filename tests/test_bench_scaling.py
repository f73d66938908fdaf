"""The benchmark's scaling workload: opt-in, one column per process count, runs end to end."""

from __future__ import annotations

import pytest

from bench.run import main, parse_args


def test_scaling_is_opt_in_and_its_process_counts_are_sorted_and_deduplicated() -> None:
    assert "scaling" not in parse_args([]).workloads
    args = parse_args(["--workloads", "scaling", "--processes", "4,1,2,4"])
    assert args.workloads == ["scaling"]
    assert args.processes == [1, 2, 4]


@pytest.mark.parametrize("counts", ["0,2", "two", ","])
def test_scaling_rejects_process_counts_that_are_not_positive_numbers(counts: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--processes", counts])
    assert exit_info.value.code == 2


def test_scaling_measures_scrapeq_at_each_process_count(capsys: pytest.CaptureFixture[str]) -> None:
    main(
        [
            "--systems=scrapeq",
            "--workloads=scaling",
            "--processes=1,2",
            "--tasks=400",
            "--repeats=1",
        ]
    )
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| system"))
    assert "1 proc tasks/s" in header
    assert "2 proc tasks/s" in header
    row = next(line for line in out.splitlines() if line.startswith("| scrapeq"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    rates = [float(cells[1].replace(",", "")), float(cells[3].replace(",", ""))]
    assert all(rate > 0 for rate in rates), row
    assert "rep 1:" not in out, out  # no measurement failed
