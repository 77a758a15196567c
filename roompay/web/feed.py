"""`GET /api/v1/feed`: the live consumption feed as server-sent events.

Each order step is one event (`id:` the step's id, `event: order`, `data:` JSON). The
feed is read from the database, so it works with several server processes behind a
load balancer; a client resumes with `Last-Event-ID` (what `EventSource` sends on its
own) or `?after=`; without either it starts from now. A stream ends after `STREAM_MAX_S`
and the client reconnects, which re-checks its token and caps how long a proxy holds it.

One `FeedHub` per process polls the database for every subscriber: a hundred open
dashboards cost one query every `HUB_POLL_S`, not a hundred, and each sees a new step
within one poll. The hot path (payments, accepted starts, run events) also pokes the
hub when it commits steps, so those are read at once; the poll finds the rest (staff
actions, refunds, re-sent commands, other server processes) within a quarter second. Each
step is rendered once for every stream, and a stream sends what it has as one chunk.
A stream first catches up from the database on its own, then follows the hub; one that
falls behind the hub's buffer catches up from the database again.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import SQLAlchemyError

from roompay.services import feed
from roompay.services.auth import Principal, read_token
from roompay.services.context import ServiceContext
from roompay.services.dashboard import ORDER_ROLES, require_role
from roompay.services.errors import ErrorKind, ServiceError, invalid
from roompay.web.deps import get_ctx

HUB_POLL_S = 0.25
HUB_BUFFER = 2000
# Ids re-read behind the newest seen: a transaction that took an id earlier may commit
# after a later one, and its step must still reach the feed.
HUB_LOOKBACK_IDS = 200
HEARTBEAT_S = 15.0
STREAM_MAX_S = 600.0
RETRY_MS = 1000
COOKIE = "roompay_token"

router = APIRouter(prefix="/api/v1", tags=["staff"])
log = logging.getLogger(__name__)


class FeedHub:
    """The process's one poller of order steps, fanned out to every open stream."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._buffer: deque[tuple[int, feed.FeedItem]] = deque(maxlen=HUB_BUFFER)
        self._frames: dict[int, str] = {}
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()
        self._seq = 0
        self._newest_id: int | None = None
        self._changed = asyncio.Event()
        self._subscribers = 0
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._poked = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def position(self) -> int:
        """The sequence number of the last step the hub has taken in."""
        return self._seq

    def subscribe(self) -> None:
        """Count a stream in, starting the poller on first use."""
        self._subscribers += 1
        self._wanted.set()
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._ctx.on_steps_written = self.poke
            self._task = self._loop.create_task(self._run())

    def unsubscribe(self) -> None:
        """Count a stream out; the poller rests while nobody listens."""
        self._subscribers -= 1
        if self._subscribers == 0:
            self._wanted.clear()

    def poke(self) -> None:
        """New steps are committed: read them now (callable from any thread)."""
        loop = self._loop
        if loop is not None and self._subscribers > 0:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(self._poked.set)

    def frame(self, item: feed.FeedItem) -> str:
        """The item as an SSE frame, rendered once for every stream."""
        return self._frames.get(item.id) or _frame(item)

    def since(self, position: int) -> list[feed.FeedItem] | None:
        """Steps taken in after `position`, oldest first; None if the buffer lost some."""
        if self._buffer and self._buffer[0][0] > position + 1:
            return None
        # Sequence numbers are consecutive: the newest `self._seq - position` entries.
        newer = min(len(self._buffer), max(0, self._seq - position))
        return [item for _, item in itertools.islice(self._buffer, len(self._buffer) - newer, None)]

    def recent_after(self, event_id: int) -> list[feed.FeedItem]:
        """Buffered steps with an id above `event_id` (a stream joining the hub)."""
        return [item for _, item in self._buffer if item.id > event_id]

    async def wait(self, timeout: float) -> None:
        """Wait until the hub takes in new steps, or `timeout` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._changed.wait()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            try:
                items = await run_in_threadpool(self._read)
            except SQLAlchemyError:
                log.exception("feed poll failed; retrying")
                await asyncio.sleep(1.0)
                continue
            fresh = [item for item in items if item.id not in self._seen]
            for item in fresh:
                self._take(item)
            if fresh:
                self._changed.set()
                self._changed = asyncio.Event()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poked.wait(), HUB_POLL_S)
                self._poked.clear()

    def _read(self) -> list[feed.FeedItem]:
        with self._ctx.sessions() as session:
            if self._newest_id is None:
                self._newest_id = feed.latest_event_id(session)
            ids = feed.event_ids_after(session, self._newest_id - HUB_LOOKBACK_IDS, limit=500)
            fresh = [event_id for event_id in ids if event_id not in self._seen]
            return feed.feed_items(session, fresh) if fresh else []

    def _take(self, item: feed.FeedItem) -> None:
        self._seq += 1
        if len(self._buffer) == HUB_BUFFER:
            self._frames.pop(self._buffer[0][1].id, None)
        self._buffer.append((self._seq, item))
        self._frames[item.id] = _frame(item)
        self._seen.add(item.id)
        self._seen_order.append(item.id)
        if len(self._seen_order) > 4 * HUB_BUFFER:
            self._seen.discard(self._seen_order.popleft())
        self._newest_id = max(self._newest_id or 0, item.id)


def feed_hub(request: Request) -> FeedHub:
    """The app's hub, made on first use."""
    hub: FeedHub | None = getattr(request.app.state, "feed_hub", None)
    if hub is None:
        hub = FeedHub(get_ctx(request))
        request.app.state.feed_hub = hub
    return hub


def request_principal(request: Request) -> Principal:
    """The caller from a bearer token, else from the dashboard's cookie; 401 otherwise."""
    ctx = get_ctx(request)
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    token = credentials if scheme.lower() == "bearer" and credentials else None
    token = token or request.cookies.get(COOKIE)
    if not token:
        raise ServiceError(ErrorKind.UNAUTHORIZED, "invalid_token", "sign in first")
    return read_token(token, ctx.settings.secret_key, ctx.clock.now())


def _start_after(last_event_id: str | None, after: int | None, ctx: ServiceContext) -> int:
    if last_event_id is not None:
        if not last_event_id.isdigit() or len(last_event_id) > 18:
            raise invalid("invalid_request", "Last-Event-ID must be a non-negative integer")
        return int(last_event_id)
    if after is not None:
        return after
    with ctx.sessions() as session:
        return feed.latest_event_id(session)


def _read(ctx: ServiceContext, scope: int | None, after: int) -> list[feed.FeedItem]:
    with ctx.sessions() as session:
        return feed.read_feed(session, scope, after)


def _frame(item: feed.FeedItem) -> str:
    data = json.dumps(item.as_json(), ensure_ascii=False, separators=(",", ":"))
    return f"id: {item.id}\nevent: order\ndata: {data}\n\n"


def _ours(item: feed.FeedItem, scope: int | None) -> bool:
    return scope is None or item.hotel_id == scope


async def _catch_up(
    ctx: ServiceContext, scope: int | None, after: int, sent: set[int]
) -> AsyncIterator[feed.FeedItem]:
    """Read from the database until a page comes back empty."""
    while True:
        items = await run_in_threadpool(_read, ctx, scope, after)
        for item in items:
            sent.add(item.id)
            after = item.id
            yield item
        if not items:
            return


async def _events(
    ctx: ServiceContext, hub: FeedHub, scope: int | None, after: int
) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    hub.subscribe()
    try:
        started = last_sent = time.monotonic()
        sent: set[int] = set()  # ids this stream sent, so a late-committed step goes once
        position = hub.position
        async for item in _catch_up(ctx, scope, after, sent):
            yield _frame(item)
        pending = hub.recent_after(max(sent, default=after))
        while time.monotonic() - started < STREAM_MAX_S:
            chunk = []
            for item in pending:
                if item.id not in sent and _ours(item, scope):
                    sent.add(item.id)
                    chunk.append(hub.frame(item))
            if chunk:
                yield "".join(chunk)
                last_sent = time.monotonic()
            if time.monotonic() - last_sent >= HEARTBEAT_S:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            await hub.wait(HEARTBEAT_S)
            newer = hub.since(position)
            position = hub.position
            if newer is None:  # this stream fell behind the hub's buffer
                newest = max(sent, default=after)
                newer = [item async for item in _catch_up(ctx, scope, newest, set())]
            pending = newer
            if len(sent) > 4 * HUB_BUFFER:
                sent = set(sorted(sent)[-HUB_BUFFER:])
    finally:
        hub.unsubscribe()


@router.get("/feed", response_class=StreamingResponse)
async def consumption_feed(
    request: Request,
    after: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Every step of every order of the caller's hotels, live, as server-sent events."""
    principal = request_principal(request)
    require_role(principal, ORDER_ROLES)
    ctx = get_ctx(request)
    start = await run_in_threadpool(_start_after, last_event_id, after, ctx)
    return StreamingResponse(
        _events(ctx, feed_hub(request), principal.hotel_scope(), start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
