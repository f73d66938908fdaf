"""One log format for the supervisor and the actors; every record is one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import pytest

from supervisor.logs import OneLineFormatter, configure_logging, escape_controls


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger's handlers and level after a test configured them."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_a_message_with_a_newline_and_an_escape_is_one_line_with_them_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", source="worker-1")
    page = "<p>ok</p>\n2024-01-01 00:00:00 ERROR [supervisor] fake\x1b[2J\r\x07"

    logging.getLogger("scraper").warning("페이지 오류: %s", page)

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(
        " WARNING [worker-1] 페이지 오류: <p>ok</p>\\n2024-01-01 00:00:00 ERROR [supervisor] "
        "fake\\x1b[2J\\r\\x07"
    )


@pytest.mark.usefixtures("root_logging")
def test_the_supervisor_names_the_process_and_a_second_setup_replaces_the_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO", source="worker-1")
    configure_logging("INFO")

    logging.getLogger("supervisor").info("시작됨")

    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" INFO [MainProcess] 시작됨")


def test_a_traceback_keeps_its_lines_but_loses_its_escapes() -> None:
    try:
        raise ValueError("bad\x1b[31m page")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "실패", (), sys.exc_info())
    text = OneLineFormatter("w").format(record)

    assert text.splitlines()[0].endswith(" ERROR [w] 실패")
    assert text.splitlines()[1] == "Traceback (most recent call last):"
    assert "ValueError: bad\\x1b[31m page" in text
    assert "\x1b" not in text


def test_escape_controls_escapes_c0_del_and_c1_and_nothing_else() -> None:
    assert escape_controls("a\tb\x00c\x7fd\x9be é 한") == "a\\tb\\x00c\\x7fd\\x9be é 한"
