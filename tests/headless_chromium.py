"""Drive a real headless Chromium from a test, over the DevTools protocol, with no dependency.

``--remote-debugging-pipe`` makes Chromium read protocol commands on its fd 3
and write replies and events on its fd 4, each a JSON object ended by a NUL
byte: two pipes stand in for the websocket a CDP library would open. A
:class:`Page` clicks and types with real input events (``Input.*``), so the
page's own handlers run as they do for a person.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

#: Names Chromium's binary goes by (Debian's package, other distributions, Chrome).
BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Reply size limit: a full-page screenshot arrives as one base64 message.
MESSAGE_LIMIT = 64 * 1024 * 1024


def find_chromium() -> str | None:
    for name in BINARIES:
        path = shutil.which(name)
        if path is not None:
            return path
    return None


class ProtocolError(RuntimeError):
    """Chromium answered a command with an error, or a page's script threw."""


class Browser:
    """One Chromium process and its protocol pipe."""

    def __init__(self, process: asyncio.subprocess.Process, commands: int, replies: int) -> None:
        self._process = process
        self._commands = commands
        self._replies = replies
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def launched(
        cls, binary: str, profile: Path, log: Path, size: tuple[int, int] = (1280, 1600)
    ) -> AsyncIterator[Browser]:
        """Chromium, headless, with its own profile directory; closed on the way out."""
        to_browser, commands = os.pipe()
        replies, from_browser = os.pipe()
        flags = [
            "--headless",
            "--remote-debugging-pipe",
            "--no-sandbox",  # containers (and root) have no user namespaces for the sandbox
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            f"--window-size={size[0]},{size[1]}",
            f"--user-data-dir={profile}",
            "about:blank",
        ]
        # bash moves the pipe ends to fds 3 and 4, where Chromium expects them (dash
        # cannot name an fd above 9).
        script = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser}'
        with log.open("wb") as output:
            process = await asyncio.create_subprocess_exec(
                "bash",
                "-c",
                script,
                binary,
                *flags,
                pass_fds=(to_browser, from_browser),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )
        os.close(to_browser)
        os.close(from_browser)
        browser = cls(process, commands, replies)
        try:
            await browser._start_reading()
            yield browser
        finally:
            await browser._close()

    async def _start_reading(self) -> None:
        reader = asyncio.StreamReader(limit=MESSAGE_LIMIT)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(self._replies, "rb", 0)
        )
        self._reader = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await reader.readuntil(b"\0")
            except asyncio.IncompleteReadError:  # Chromium exited
                for future in self._waiting.values():
                    if not future.done():
                        future.set_exception(ProtocolError("Chromium closed the protocol pipe"))
                return
            message = json.loads(raw[:-1])
            future = self._waiting.pop(message.get("id", -1), None)
            if future is None:
                self.events.append(message)
            elif future.done():  # its command timed out
                continue
            elif "error" in message:
                future.set_exception(ProtocolError(json.dumps(message["error"])))
            else:
                future.set_result(message.get("result", {}))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session: str | None = None
    ) -> dict[str, Any]:
        """One protocol command; its result."""
        command_id = next(self._ids)
        message: dict[str, Any] = {"id": command_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future = asyncio.get_running_loop().create_future()
        self._waiting[command_id] = future
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        return await asyncio.wait_for(future, 30)

    async def new_page(self) -> Page:
        target = await self.send("Target.createTarget", {"url": "about:blank"})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        page = Page(self, attached["sessionId"])
        for domain in ("Page", "Runtime"):
            await page.send(f"{domain}.enable")
        return page

    async def _close(self) -> None:
        with contextlib.suppress(ProtocolError, TimeoutError, OSError):
            await asyncio.wait_for(self.send("Browser.close"), 5)
        try:
            await asyncio.wait_for(self._process.wait(), 10)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        os.close(self._commands)


class Page:
    """One tab, reached through its flat protocol session."""

    def __init__(self, browser: Browser, session: str) -> None:
        self._browser = browser
        self._session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._browser.send(method, params, self._session)

    def script_errors(self) -> list[str]:
        """Uncaught exceptions the page's scripts threw so far."""
        return [
            json.dumps(event["params"]["exceptionDetails"])
            for event in self._browser.events
            if event.get("sessionId") == self._session
            and event.get("method") == "Runtime.exceptionThrown"
        ]

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})
        await self.wait_until("document.readyState === 'complete'", timeout=15)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page (awaited when it is a promise)."""
        reply = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in reply:
            raise ProtocolError(f"{expression}: {json.dumps(reply['exceptionDetails'])}")
        return reply["result"].get("value")

    async def wait_until(self, expression: str, timeout: float = 20) -> Any:
        """Poll ``expression`` until it is truthy; its value. AssertionError after ``timeout``."""
        return await poll(lambda: self.evaluate(expression), timeout, expression)

    async def text(self, selector: str) -> str | None:
        """The text of the first element ``selector`` matches; None when there is none."""
        found = await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent ?? null"
        )
        return None if found is None else str(found)

    async def click(self, selector: str) -> None:
        """A real left click (mouse events) at the middle of the element, scrolled into view."""
        box = await self.evaluate(
            f"""(() => {{
                const node = document.querySelector({json.dumps(selector)});
                if (!node) return null;
                node.scrollIntoView({{block: "center"}});
                const r = node.getBoundingClientRect();
                return {{x: r.x + r.width / 2, y: r.y + r.height / 2}};
            }})()"""
        )
        if box is None:
            raise AssertionError(f"nothing to click: {selector}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    async def type(self, selector: str, text: str) -> None:
        """Click into the field, select what it holds and type ``text`` over it."""
        await self.click(selector)
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        await self.send("Input.insertText", {"text": text})

    async def screenshot(self) -> bytes:
        """The whole page, beyond the viewport, as a PNG."""
        shot = await self.send(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
        )
        return base64.b64decode(shot["data"])


async def poll(read: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await read()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not true within {timeout} s: {what} (last: {value!r})")
        await asyncio.sleep(0.1)
