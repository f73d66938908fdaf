"""Bad input (catalog G6): corrupt task records, unknown scripts, bad results, bad ids, bad configs.

Whatever comes in, the answer is a clear error or a dead letter naming what was
wrong; no process dies (the worker pids stay the same) and the other tasks complete.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import admin, wait_for

from actors.exceptions import InvalidTaskException
from actors.models import ScrapingRequest, TaskStatus
from actors.queue import RedisQueue, TaskManager
from config.settings import Settings
from faults.cluster import Cluster
from faults.workload import FaultRun, with_sections
from supervisor.cli import run as cli

MISBEHAVING = "faults.misbehaving"
BAD_IDS = ["a:b", "task*", "two words", "x" * 10240, ""]


async def plant(queue: RedisQueue, request_id: str, **fields: str | int) -> None:
    """Write a task record straight into Redis, as a bug or an intruder could, and queue it."""
    record: dict[str, str | int] = {
        "status": "pending",
        "score": 0,
        "attempt": 0,
        "max_retries": 3,
        "enqueued_at": 0,
        **fields,
    }
    pairs = [part for pair in record.items() for part in pair]
    await admin(queue).hset(queue.keys.task(request_id), items=pairs)
    await admin(queue).zadd(queue.keys.pending, {request_id: int(record["score"])})


async def test_corrupt_records_unknown_scripts_and_bad_results_end_as_clear_dead_letters(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_sections(settings, worker={"scripts": (MISBEHAVING,)})
    corrupt = {
        "bad-json": "{not json",
        "bad-types": '{"script_name": 5, "parameters": "none"}',
        "bad-shape": "[1, 2, 3]",
    }
    async with FaultRun("G6 bad input", settings, tmp_path) as run:
        with Cluster(settings, tmp_path, workers=2, concurrency=4) as cluster:
            before = cluster.worker_pids()
            first = await run.submit(run.tasks(10, seconds=0.05))
            for request_id, request in corrupt.items():
                await plant(run.queue, request_id, request=request)
            await admin(run.queue).zadd(run.queue.keys.pending, {"no-record": 0})
            (unknown,) = run.tasks(1, script="no-such-script")
            (not_json,) = run.tasks(1, script="not-json")
            await run.submit([unknown, not_json])
            rest = await run.submit(run.tasks(10, seconds=0.05))
            outcomes = await run.outcomes()
            planted = await run.outcomes(corrupt)
            manager = TaskManager(run.queue)
            records = {rid: await manager.get_task(rid) for rid in [*corrupt, "no-record"]}
            dead = {letter["request_id"]: letter for letter in await manager.list_dead_letters()}
            pending = await admin(run.queue).zcard(run.queue.keys.pending)
            await run.judge(worker_pids=before, restarts=0)
            after = cluster.worker_pids()
    assert after == before, "a worker process died"
    assert {rid: outcomes[rid] for rid in [*first, *rest]} == dict.fromkeys(
        [*first, *rest], TaskStatus.COMPLETED
    )
    assert planted == dict.fromkeys(corrupt, TaskStatus.FAILED)
    for request_id in corrupt:
        assert "invalid task record" in dead[request_id]["error"], records[request_id]
    assert records["no-record"] is None
    assert pending == 0, "an id without a record stayed queued"
    assert outcomes[unknown.request_id] is TaskStatus.FAILED
    assert "unknown script 'no-such-script'" in dead[unknown.request_id]["error"]
    assert dead[unknown.request_id]["attempt"] == 1, "an unknown script was retried"
    assert outcomes[not_json.request_id] is TaskStatus.FAILED
    assert "not JSON" in dead[not_json.request_id]["error"]


async def test_record_with_a_non_integer_attempt_is_dead_lettered_without_harm(
    settings: Settings, tmp_path: Path
) -> None:
    async with FaultRun("G6 attempt field 'abc'", settings, tmp_path) as run:
        with Cluster(settings, tmp_path, workers=2, concurrency=4) as cluster:
            before = cluster.worker_pids()
            queued = run.tasks(10)
            await plant(  # no wake-up: the workers claim it with the batch below
                run.queue,
                "bad-attempt",
                request=ScrapingRequest(
                    script_name="echo", request_id="bad-attempt"
                ).model_dump_json(),
                attempt="abc",
                score=-1,  # first in line, just ahead of the batch
            )
            await run.submit_batch(queued)

            manager = TaskManager(run.queue)

            async def settled() -> bool:
                if cluster.worker_pids() != before:
                    return True  # no point waiting: the test fails on it below
                statuses = [await manager.get_task_status(r.request_id) for r in queued]
                return all(status is not None and status.is_terminal for status in statuses)

            await wait_for(settled, 15, interval=0.2)
            after = cluster.worker_pids()
            outcomes = await run.outcomes(timeout=1)
            status = await manager.get_task_status("bad-attempt")
    assert after == before, "a worker process died"
    assert set(outcomes.values()) == {TaskStatus.COMPLETED}
    assert status is TaskStatus.FAILED


async def test_oversized_payloads_and_bad_ids_are_refused_by_name_and_never_stored(
    settings: Settings, tmp_path: Path
) -> None:
    async with FaultRun("G6 refused requests", settings, tmp_path) as run:
        stored_before = await admin(run.queue).dbsize()
        huge = {"blob": "x" * (settings.tasks.max_payload_bytes + 1)}
        with pytest.raises(InvalidTaskException, match="max_payload_bytes") as oversized:
            await run.queue.enqueue_task(ScrapingRequest(script_name="echo", parameters=huge))
        refused: dict[str, str] = {}
        for bad_id in BAD_IDS:
            with pytest.raises(InvalidTaskException) as caught:
                ScrapingRequest(script_name="echo", request_id=bad_id)
            refused[bad_id[:20]] = caught.value.field
        stored_after = await admin(run.queue).dbsize()
    assert oversized.value.field == "parameters"
    assert set(refused.values()) == {"request_id"}
    assert stored_after == stored_before


@pytest.mark.parametrize("bad_id", BAD_IDS[:4])
def test_cli_lookup_of_a_malformed_id_answers_not_found(
    settings: Settings, tmp_path: Path, bad_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "scrapeq.toml"
    config.write_text(
        f'[redis]\nurl = "{settings.redis.url}"\nkey_prefix = "{settings.redis.key_prefix}"\n'
        'embedded = "never"\n'
    )
    assert cli(["task", bad_id, "--config", str(config)]) == 1
    assert "not found" in capsys.readouterr().err


CONFIGS: dict[str, tuple[str, str]] = {
    "unknown key": ("[worker]\nprocesses = 2\nprocesess = 3\n", "worker.procesess"),
    "unknown section": ("[workers]\nprocesses = 2\n", "workers"),
    "wrong type": ('[worker]\nprocesses = "two"\n', "worker.processes"),
    "wrong nested type": ("[heartbeat]\ninterval = 5\ntimeout = 1\n", "heartbeat.timeout"),
    "broken TOML": ("[worker\nprocesses = 2\n", "invalid TOML"),
}


@pytest.mark.parametrize("case", list(CONFIGS))
@pytest.mark.parametrize("command", [["start"], ["status", "--json"]])
def test_bad_config_file_exits_2_naming_the_key_and_the_file(
    tmp_path: Path, case: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    text, named = CONFIGS[case]
    config = tmp_path / "scrapeq.toml"
    config.write_text(text)
    assert cli([*command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert named in err
    assert str(config) in err


@pytest.mark.parametrize("command", [["start"], ["status", "--json"]])
def test_missing_config_file_exits_2_naming_the_file(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "scrapeq.toml"
    assert cli([*command, "--config", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
