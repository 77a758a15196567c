"""`GET /api/v1/feed`: the live consumption feed as server-sent events.

Each order step is one event (`id:` the step's id, `event: order`, `data:` JSON). The
stream polls the database, so it works with several server processes behind a load
balancer; a client resumes with `Last-Event-ID` (what `EventSource` sends on its own)
or `?after=`; without either it starts from now. A stream ends after `STREAM_MAX_S`
and the client reconnects, which re-checks its token and caps how long a proxy holds it.
"""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from roompay.services import feed
from roompay.services.auth import Principal, read_token
from roompay.services.context import ServiceContext
from roompay.services.dashboard import ORDER_ROLES, require_role
from roompay.services.errors import ErrorKind, ServiceError, invalid
from roompay.web.deps import get_ctx

POLL_S = 0.3
HEARTBEAT_S = 15.0
STREAM_MAX_S = 600.0
RETRY_MS = 1000
COOKIE = "roompay_token"

router = APIRouter(prefix="/api/v1", tags=["staff"])


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


async def _events(ctx: ServiceContext, scope: int | None, after: int) -> AsyncIterator[str]:
    yield f"retry: {RETRY_MS}\n\n"
    started = last_sent = time.monotonic()
    while time.monotonic() - started < STREAM_MAX_S:
        items = await run_in_threadpool(_read, ctx, scope, after)
        for item in items:
            yield _frame(item)
            after = item.id
        now = time.monotonic()
        if items:
            last_sent = now
            continue  # a full page may have more behind it
        if now - last_sent >= HEARTBEAT_S:
            yield ": keep-alive\n\n"
            last_sent = now
        await asyncio.sleep(POLL_S)


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
        _events(ctx, principal.hotel_scope(), start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
