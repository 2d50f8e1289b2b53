"""A minimal HTTP/1.1 client for load generators on a small box: keep-alive connections from a
pool, pre-encoded requests, Content-Length bodies only (what the gateway answers). A general
client (httpx) costs about a millisecond of CPU per request in Python, which on 2 cores starves
the server it measures; this one costs a fraction of that."""

from __future__ import annotations

import asyncio


class Pool:
    def __init__(self, host: str, port: int, size: int = 256, timeout_s: float = 10.0) -> None:
        self.host, self.port, self.size, self.timeout_s = host, port, size, timeout_s
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._open = 0
        self._slot = asyncio.Semaphore(size)

    async def post(
        self, path: str, body: bytes, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """(status, body); raises on a timeout or a dropped connection. A pooled connection the
        server closed while it sat idle (uvicorn's keep-alive timeout) is replaced and the
        request sent again: no byte of it was read, as HTTP clients do."""
        head = (
            f"POST {path} HTTP/1.1\r\nhost: {self.host}\r\ncontent-type: {content_type}\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode()
        async with self._slot:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                return await self._exchange(conn, head + body)
            except _Stale:
                if not reused:
                    raise ConnectionError("connection closed before an answer") from None
                return await self._exchange(await self._connect(), head + body)

    async def _exchange(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, bytes]:
        reader, writer = conn
        try:
            async with asyncio.timeout(self.timeout_s):
                writer.write(request)
                status, payload, keep = await _response(reader)
        except BaseException:
            writer.close()
            self._open -= 1
            raise
        if keep:
            self._idle.append(conn)
        else:
            writer.close()
            self._open -= 1
        return status, payload

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._open += 1
        return reader, writer

    async def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _Stale(ConnectionError):
    """The server had closed the connection: nothing of the request was answered."""


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    try:
        status_line = await reader.readline()
    except ConnectionResetError:
        raise _Stale from None
    if not status_line:
        raise _Stale
    status = int(status_line.split(b" ", 2)[1])
    length, keep = 0, True
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
    return status, await reader.readexactly(length), keep
