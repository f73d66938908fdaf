"""The scraping script of the politeness tests: a real HTTP GET to tests/origin.py.

Parameters: ``url`` (its host is the site, sent as the Host header) and
``origin`` (``host:port`` the request actually goes to, the loopback server).
A 429 or 503 raises ``RateLimited`` with the site's Retry-After, as a real
script would.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from actors.exceptions import RateLimited
from actors.scripts import script


@script("fetch")
async def fetch(parameters: dict[str, Any]) -> dict[str, Any]:
    url = urlsplit(parameters["url"])
    host, port = str(parameters["origin"]).rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(f"GET {url.path or '/'} HTTP/1.0\r\nHost: {url.hostname}\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.read()
    finally:
        writer.close()
    if status in (429, 503):
        raise RateLimited.from_header(headers.get("retry-after"), status)
    if status != 200:
        raise RuntimeError(f"HTTP {status} from {url.hostname}")
    return {"status": status, "bytes": len(body)}
