"""The screen of ``supervisor status --watch``: a status snapshot as lines of bounded width.

:func:`render` is pure (the ``status --json`` object and a clock in, lines
out), so the layout can be checked with a fixed state. Every line it returns
fits ``width`` terminal columns: names too long for their column (hosts,
worker ids, domains) are shortened in the middle, and any line still too
long is cut, never wrapped. Names come from Redis and, for domains, from
submitted URLs, so control characters in them are replaced before they can
reach a terminal.

:func:`frame`, :data:`ENTER` and :data:`LEAVE` are the escape codes that draw
those lines in place on a terminal; they are used only when stdout is one.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

ELLIPSIS = "…"
#: Switch to the alternate screen and hide the cursor; :data:`LEAVE` restores both.
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"
#: Paused or throttled domains listed at most (``status --json`` has them all).
DOMAINS_SHOWN = 5
#: A name column never gets narrower than this; a line that then overflows is cut.
MIN_NAME = 12
#: The label column of the throughput and latency tables (their numbers stay near it).
LABEL = 20

_FLOW = ("started", "completed", "failed", "retried")
_PERCENTILES = ("p50", "p95", "p99")
#: Columns right of the name in the domain and worker tables: headers and widths.
_DOMAIN_HEADERS = ("in flight", "rate/s", "limit/s", "429s/min", "paused")
_DOMAIN_WIDTHS = (10, 9, 9, 9, 8)
_WORKER_HEADERS = ("state", "pid", "in flight", "done", "rss", "cpu")
_WORKER_WIDTHS = (9, 8, 10, 8, 8, 7)


def render(
    state: Mapping[str, Any], *, now: float, width: int = 80, height: int | None = None
) -> list[str]:
    """The view of ``state`` (a ``status --json`` object) at ``now`` (Unix seconds).

    With ``height``, the lines that do not fit are left out and the last line
    says how many.
    """
    lines = [
        *_heading(state, now),
        "",
        *_throughput(state["throughput"], width),
        "",
        *_latency(state["latency"], width),
        *_domains(state["domains"], state["paused_keys"], width),
        "",
        *_workers(state["workers"], width),
    ]
    return _clip([fit(line, width) for line in lines], width, height)


def frame(lines: Sequence[str]) -> str:
    """Redraw the screen with ``lines`` from its top-left corner, in place (no flicker).

    Each line erases what an earlier, longer frame left to its right, and the
    end erases the rows below; no newline follows the last line, so a frame
    as tall as the screen does not scroll it.
    """
    return "\x1b[H" + "\x1b[K\r\n".join(lines) + "\x1b[K\x1b[J"


def display_width(text: str) -> int:
    """Terminal columns ``text`` takes (East Asian wide characters take two)."""
    return sum(_char_width(char) for char in text)


def fit(text: str, width: int) -> str:
    """``text`` with control characters replaced, cut to ``width`` columns with an ellipsis."""
    text = "".join("?" if unicodedata.category(char).startswith("C") else char for char in text)
    if display_width(text) <= width:
        return text
    return _take(text, width - 1) + ELLIPSIS


def elide(name: str, width: int) -> str:
    """``name`` in ``width`` columns, shortened in the middle: both ends tell names apart."""
    if display_width(name) <= width:
        return name
    tail = _take(name[::-1], (width - 1) // 2)[::-1]
    return _take(name, width - 1 - display_width(tail)) + ELLIPSIS + tail


def format_seconds(seconds: float | None) -> str:
    """A latency for people: ``-``, ``850ms``, ``2.5s``, ``3.2m``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _take(text: str, width: int) -> str:
    """The longest start of ``text`` that fits ``width`` columns."""
    used = 0
    for index, char in enumerate(text):
        used += _char_width(char)
        if used > width:
            return text[:index]
    return text


def _clip(lines: list[str], width: int, height: int | None) -> list[str]:
    if height is None or len(lines) <= height:
        return lines
    kept = max(height - 1, 0)
    note = f"{ELLIPSIS} {len(lines) - kept} more lines: enlarge the terminal, or status --json"
    return [*lines[:kept], fit(note, width)]


def _heading(state: Mapping[str, Any], now: float) -> list[str]:
    queue, pressure = state["queue"], state["backpressure"]
    throttled = pressure["state"] == "throttled" and "rate" in pressure
    rate = f", {pressure['rate']:g}/s" if throttled else ""
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    return [
        f"scrapeq status {clock}   backpressure: {pressure['state']} "
        f"(depth {pressure['depth']}{rate})",
        f"queue  pending {queue['pending']}   running {queue['running']}   "
        f"retrying {queue['retrying']}   dead letter {queue['dead_letter']}",
        f"total  completed {queue['completed']}   failed {queue['failed']}   "
        f"cancelled {queue['cancelled']}   enqueued {queue['enqueued']}",
    ]


def _throughput(flow: Mapping[str, float], width: int) -> list[str]:
    widths = [11] * len(_FLOW)
    width = min(width, LABEL + sum(widths))
    return [
        _row("throughput /s", _FLOW, widths, width),
        _row("  last minute", [_rate(flow[f"{name}_per_s"]) for name in _FLOW], widths, width),
        _row("  last 5 min", [_rate(flow[f"{name}_per_s_5m"]) for name in _FLOW], widths, width),
    ]


def _latency(latency: Mapping[str, Mapping[str, float | None]], width: int) -> list[str]:
    widths = [11] * len(_PERCENTILES)
    width = min(width, LABEL + sum(widths))
    lines = [_row("latency, last 5 min", _PERCENTILES, widths, width)]
    for name, shown in (("queue_wait", "queue wait"), ("execution", "execution")):
        cells = [format_seconds(latency[name][p]) for p in _PERCENTILES]
        lines.append(_row(f"  {shown}", cells, widths, width))
    return lines


def _domains(
    domains: Sequence[Mapping[str, Any]], paused_keys: Mapping[str, float], width: int
) -> Iterator[str]:
    """Domains paused or answering 429/503, and paused rate keys that are not domains."""
    held = [d for d in domains if d["paused_for"] or d["throttled_last_minute"]]
    others = {key: left for key, left in paused_keys.items() if not key.startswith("domain:")}
    if not domains and not others:
        return
    paused = sum(1 for d in domains if d["paused_for"])
    throttled = sum(1 for d in domains if d["throttled_last_minute"])
    yield ""
    yield (
        f"domains: {len(domains)} seen, {paused} paused, "
        f"{throttled} answered 429/503 in the last minute"
    )
    if held:
        widths = _DOMAIN_WIDTHS
        yield _row("domain", _DOMAIN_HEADERS, widths, width)
        for domain in held[:DOMAINS_SHOWN]:
            cells = [
                str(domain["in_flight"]),
                _rate(domain["rate"]),
                _rate(domain["limit"]),
                str(domain["throttled_last_minute"]),
                f"{domain['paused_for']:.0f}s" if domain["paused_for"] else "-",
            ]
            yield _row(f"  {domain['domain']}", cells, widths, width)
        if len(held) > DOMAINS_SHOWN:
            yield f"  {ELLIPSIS} {len(held) - DOMAINS_SHOWN} more in status --json"
    if others:
        yield "paused: " + ", ".join(f"{key} {left:.0f}s" for key, left in sorted(others.items()))


def _workers(workers: Sequence[Mapping[str, Any]], width: int) -> Iterator[str]:
    """One line per host (the load of its active workers added up), then one per worker."""
    hosts: dict[str, list[Mapping[str, Any]]] = {}
    for worker in workers:
        hosts.setdefault(worker.get("host") or "(no host)", []).append(worker)
    active = sum(1 for w in workers if w.get("status") == "active")
    yield (
        f"workers: {active} active, {len(workers) - active} inactive, "
        f"on {len(hosts)} host{'' if len(hosts) == 1 else 's'}"
    )
    if not workers:
        return
    widths = _WORKER_WIDTHS
    yield _row("host / worker", _WORKER_HEADERS, widths, width)
    for host, group in sorted(hosts.items()):
        up = [w for w in group if w.get("status") == "active"]
        cells = [
            f"{len(up)}/{len(group)} up",
            "",
            _in_flight(_total(up, "running"), _total(up, "concurrency")),
            *_vitals(
                _total(group, "tasks_processed"), _total(up, "rss_bytes"), _total(up, "cpu_percent")
            ),
        ]
        yield _row(host, cells, widths, width)
        for worker in sorted(group, key=lambda w: str(w.get("worker_id"))):
            yield _row(f"  {_short_id(worker, host)}", _worker_cells(worker), widths, width)


def _worker_cells(worker: Mapping[str, Any]) -> list[str]:
    return [
        str(worker.get("status", "-")),
        str(worker.get("pid") or "-"),
        _in_flight(_number(worker.get("running")), _number(worker.get("concurrency"))),
        *_vitals(
            *(_number(worker.get(f)) for f in ("tasks_processed", "rss_bytes", "cpu_percent"))
        ),
    ]


def _vitals(done: float | None, rss: float | None, cpu: float | None) -> list[str]:
    """The done, rss and cpu cells; ``-`` for what was not reported."""
    return [
        "-" if done is None else f"{done:.0f}",
        "-" if rss is None else _memory(rss),
        "-" if cpu is None else _percent(cpu),
    ]


def _in_flight(running: float | None, concurrency: float | None) -> str:
    """``running/concurrency``, or what of it was reported."""
    if running is None:
        return "-"
    return f"{running:.0f}" if concurrency is None else f"{running:.0f}/{concurrency:.0f}"


def _short_id(worker: Mapping[str, Any], host: str) -> str:
    """The worker id without its host (ids are ``<host>-<supervisor pid>-<slot>-<n>``)."""
    return str(worker.get("worker_id", "?")).removeprefix(f"{host}-")


def _row(name: str, cells: Sequence[str], widths: Sequence[int], width: int) -> str:
    """``name`` left in the columns ``cells`` leave over, then each cell right-aligned."""
    room = max(MIN_NAME, width - sum(widths))
    shown = elide(name, room)
    padding = " " * (room - display_width(shown))
    right = "".join(cell.rjust(w) for cell, w in zip(cells, widths, strict=True))
    return f"{shown}{padding}{right}".rstrip()


def _number(value: Any) -> float | None:
    """A vital as stored (a string in the worker's hash), or None when absent or damaged."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _total(workers: Sequence[Mapping[str, Any]], field: str) -> float | None:
    """The sum of a vital over ``workers``; None when none of them reported it."""
    values = [v for w in workers if (v := _number(w.get(field))) is not None]
    return sum(values) if values else None


def _rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 10 else f"{rate:.2f}"


def _memory(size: float) -> str:
    return f"{size / 2**30:.1f}G" if size >= 2**30 else f"{size / 2**20:.0f}M"


def _percent(cpu: float) -> str:
    return f"{cpu:.0f}%" if cpu >= 10 else f"{cpu:.1f}%"
