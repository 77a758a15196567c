"""A bare HTTP/1.1 keep-alive client on asyncio streams.

The load generator shares the machine's two cores with the server it measures; a
full client library costs more per request than the baseline server does, so the
generator would measure itself. This one writes a request and reads one response,
with Content-Length or chunked bodies, and streams server-sent events.
"""

import asyncio
import socket
from collections.abc import AsyncIterator


class HttpError(Exception):
    """The server answered something we cannot read, or closed the connection."""


class BareHttp:
    """One keep-alive connection to one host."""

    def __init__(self, host: str, port: int) -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._reader, self._writer

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}:{self._port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body).

        A kept-alive connection the server closed meanwhile (uvicorn closes idle ones
        after 5 s) is reopened and the request sent again, as browsers do.
        """
        reused = self._writer is not None and not self._writer.is_closing()
        request = self._request(method, path, body, headers or {})
        reader, writer = await self._open()
        writer.write(request)
        try:
            status, response_headers = await _read_head(reader)
        except (HttpError, ConnectionError):
            if not reused:
                raise
            await self.close()
            reader, writer = await self._open()
            writer.write(request)
            status, response_headers = await _read_head(reader)
        if response_headers.get("transfer-encoding") == "chunked":
            chunks = [chunk async for chunk in _chunks(reader)]
            content = b"".join(chunks)
        else:
            content = await reader.readexactly(int(response_headers.get("content-length", "0")))
        if response_headers.get("connection") == "close":
            await self.close()
        return status, content

    async def stream(
        self, path: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """GET a streamed (chunked) response and yield its chunks as they come."""
        reader, writer = await self._open()
        writer.write(self._request("GET", path, b"", headers or {}))
        status, response_headers = await _read_head(reader)
        if status != 200 or response_headers.get("transfer-encoding") != "chunked":
            raise HttpError(f"GET {path}: status {status}, {response_headers}")
        async for chunk in _chunks(reader):
            yield chunk

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise HttpError("connection closed before a response") from exc
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip().lower()
    return status, headers


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        chunk = await reader.readexactly(size)
        await reader.readexactly(2)
        yield chunk
