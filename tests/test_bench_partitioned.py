"""The partitioned-queue benchmark: its options, its cluster join, and a tiny run end to end."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from bench.partitioned import main, parse_args, slot_ranges, started_masters


def test_cluster_sizes_are_sorted_and_deduplicated_and_the_defaults_fit_two_cores() -> None:
    args = parse_args([])
    assert (args.masters, args.tasks, args.processes, args.repeats) == ([1, 2, 3], 20_000, 2, 3)
    assert parse_args(["--masters", "3,1,2,3"]).masters == [1, 2, 3]


@pytest.mark.parametrize("masters", ["0,2", "two", ","])
def test_cluster_sizes_that_are_not_positive_numbers_are_refused(masters: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--masters", masters])
    assert exit_info.value.code == 2


def test_slots_are_split_as_redis_cli_splits_them() -> None:
    assert slot_ranges(1) == [(0, 16383)]
    assert slot_ranges(3) == [(0, 5460), (5461, 10922), (10923, 16383)]
    for size in (2, 4, 5):
        ranges = slot_ranges(size)
        assert ranges[0][0] == 0
        assert ranges[-1][1] == 16383
        assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(ranges))


def test_two_masters_joined_without_redis_cli_serve_half_the_slots_each(tmp_path: Path) -> None:
    with started_masters(tmp_path / "cluster", 2) as topology:
        assert topology.serving(0) is topology.masters[0]
        assert topology.serving(16383) is topology.masters[1]


def test_a_tiny_run_completes_every_task_once_in_every_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = 300
    results = main(
        [
            "--masters=1,2",
            f"--tasks={tasks}",
            "--processes=1",
            "--repeats=1",
            "--json",
            str(tmp_path / "partitioned.json"),
        ]
    )

    assert [r.config for r in results] == ["baseline", "1 master", "2 masters"]
    for result in results:
        assert result.error is None, result
        assert result.stats["completed"] == tasks, result.stats
        assert result.stats["enqueued"] == tasks, result.stats
        left = ("pending", "running", "retrying", "failed", "dead_letter")
        assert not any(result.stats[state] for state in left), result.stats
        assert result.metrics["steady_tps"] > 0
        assert len(result.master_us) == result.masters
        assert all(us > 0 for us in result.master_us), result.master_us
        busiest = max(result.master_us)
        assert result.metrics["busiest_us"] == busiest
        assert result.metrics["redis_us"] == pytest.approx(sum(result.master_us))
        assert result.metrics["ceiling_tps"] == pytest.approx(1e6 / busiest)
        assert result.metrics["cmds"] > 5  # a claim, a completion, their writes
    assert results[0].metrics["bus_publish"] == 0  # a plain server has no cluster bus
    two = results[-1]
    assert two.partitions_per_master == [1, 1]  # each partition on a master of its own
    assert min(two.master_us) / sum(two.master_us) > 0.1  # both masters did some of the work
    out = capsys.readouterr().out
    assert "| baseline (plain server, 1 partition) |" in out
    assert "| 2 masters (cluster, 2 partitions) |" in out
    assert "rep 1:" not in out, out  # no measurement failed
    assert (tmp_path / "partitioned.json").read_text().count('"config"') == 3
