"""A tiny asyncio HTTP/1.1 server for GET /metrics, /status and /healthz.

Scrapers send one small GET at a time; this answers it and closes, with bounded
request size and a read timeout so a stuck client cannot pile up.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

log = logging.getLogger("sniproxy")

MAX_REQUEST_HEAD = 8192          # a scrape request is a few hundred bytes
READ_TIMEOUT_S = 5.0

Handler = Callable[[], tuple[int, str, bytes]]


def json_body(obj) -> tuple[int, str, bytes]:
    return 200, "application/json", (json.dumps(obj, indent=2, default=str) + "\n").encode()


class StatusServer:
    def __init__(self, routes: dict[str, Handler]):
        self.routes = routes
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            writer.close()
            return
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split()
        status, ctype, body = 400, "text/plain", b"bad request\n"
        if len(parts) == 3 and len(head) <= MAX_REQUEST_HEAD:
            method, target = parts[0], parts[1].split("?", 1)[0]
            handler = self.routes.get(target)
            if method not in ("GET", "HEAD"):
                status, body = 405, b"only GET\n"
            elif handler is None:
                status, body = 404, ("not found; try " + ", ".join(self.routes) + "\n").encode()
            else:
                try:
                    status, ctype, body = handler()
                except Exception as exc:  # a broken handler must not kill the server
                    log.exception("status handler %s failed", target)
                    status, ctype, body = 500, "text/plain", f"internal error: {exc}\n".encode()
                if method == "HEAD":
                    body = b""
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "OK")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
