"""Webhooks: every consumption record of a hotel, POSTed to the hotel's own system.

The outbox (`webhook_deliveries`) is filled by a session hook in the very flush that
writes the order step, so a record is queued if and only if its transaction commits;
nothing is sent from the payment path. A worker delivers due rows with httpx outside
any transaction, after leasing them (`FOR UPDATE SKIP LOCKED` on PostgreSQL), and
retries failures with capped exponential backoff; after `max_attempts` a delivery is
`failing` and stays visible with its last error until staff send it again.

Each request carries `Roompay-Timestamp` (Unix seconds) and
`Roompay-Signature: v1=<hex HMAC-SHA256 over "<timestamp>.<raw body>">` under the
hotel's secret, which is shown once at registration (docs/api.md, "Webhooks").
"""

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import event, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from roompay.clock import Clock
from roompay.services.auth import Principal, Role
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError, invalid, not_found
from roompay.services.feed import feed_items
from roompay.services.staff import audit
from roompay.store import hot_path
from roompay.store.db import transaction
from roompay.store.models import Hotel, Order, OrderEvent, WebhookDelivery, WebhookEndpoint

log = logging.getLogger(__name__)

WEBHOOK_ROLES = frozenset({Role.ADMIN, Role.MANAGER})
# The consumption records a hotel's system hears about; the other steps are internal.
RECORD_EVENTS = frozenset({"paid", "comped", "started", "ended", "start_failed", "refunded"})
SIGNATURE_HEADER = "Roompay-Signature"
TIMESTAMP_HEADER = "Roompay-Timestamp"
EVENT_HEADER = "Roompay-Event"
DELIVERY_HEADER = "Roompay-Delivery"
MAX_URL_LENGTH = 500
_QUEUED = "roompay.webhooks_queued"


class DeliveryStatus(StrEnum):
    """Where a delivery stands."""

    PENDING = "pending"  # not yet accepted by the receiver; retried with backoff
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILING = "failing"  # max attempts used up; sent again only on a staff request


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff: `base_s * 2**(attempt-1)`, at most `cap_s`."""

    base_s: float = 10.0
    cap_s: float = 6 * 3600.0
    max_attempts: int = 12
    timeout_s: float = 5.0
    lease_s: float = 60.0

    def delay_after(self, attempts: int) -> timedelta:
        """How long to wait after the `attempts`-th failed attempt."""
        return timedelta(seconds=min(self.base_s * 2 ** max(attempts - 1, 0), self.cap_s))


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value for this body at this time."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def endpoint_secret(server_secret: str, salt: str) -> str:
    """The hotel's signing secret, derived from the server's secret and the endpoint's salt."""
    mac = hmac.new(server_secret.encode(), f"webhook|{salt}".encode(), hashlib.sha256)
    return f"whsec_{mac.hexdigest()}"


# --- the outbox, filled in the record's own transaction ---------------------------------


class WebhookOutbox:
    """The outbox hook and the delivery job of one server process.

    Built with the runtime, so that every session of the process queues deliveries;
    the runtime's worker calls `deliver_due` and sets `on_queued` to its wake-up.
    """

    def __init__(self, ctx: ServiceContext, policy: RetryPolicy | None = None) -> None:
        self._ctx = ctx
        self.policy = policy or RetryPolicy()
        self.on_queued: Callable[[], None] = lambda: None
        install_outbox(ctx.sessions, ctx.clock, self._queued)

    def _queued(self) -> None:
        self.on_queued()  # looked up at call time: the worker sets it after this hook exists

    def deliver_due(self) -> int:
        """Deliver what is due now (the worker's job)."""
        return deliver_due(self._ctx, self.policy)


def install_outbox(
    sessions: sessionmaker[Session], clock: Clock, on_queued: Callable[[], None]
) -> None:
    """Queue a delivery for every new consumption record of a hotel that has a webhook.

    The rows are inserted in the flush that inserts the order step (same connection,
    same transaction); `on_queued` runs after such a transaction commits.
    """

    def after_flush(session: Session, _context: object) -> None:
        steps = [
            Step(obj.id, obj.order_id, obj.event)
            for obj in session.new
            if isinstance(obj, OrderEvent) and obj.event in RECORD_EVENTS
        ]
        if steps:
            queue_deliveries(session, steps, clock.now())

    def after_commit(session: Session) -> None:
        if session.info.pop(_QUEUED, False):
            on_queued()

    def after_rollback(session: Session, _previous: object) -> None:
        session.info.pop(_QUEUED, None)

    event.listen(sessions, "after_flush", after_flush)
    event.listen(sessions, "after_commit", after_commit)
    event.listen(sessions, "after_soft_rollback", after_rollback)


@dataclass(frozen=True, slots=True)
class Step:
    """An order step just written in the current transaction."""

    id: int
    order_id: str
    event: str


def queue_deliveries(session: Session, steps: Sequence[Step], now: datetime) -> None:
    """Queue these new steps for their hotels' endpoints, in the caller's transaction.

    The ORM hook above calls it for steps the session flushes; code that writes steps
    with Core calls it itself, and only for a hotel it knows has an active endpoint.
    Steps that are not consumption records, or whose hotel has no endpoint, are skipped.
    """
    records = [step for step in steps if step.event in RECORD_EVENTS]
    if records and _queue(session, records, now):
        session.info[_QUEUED] = True


def insert_steps(
    session: Session,
    order_id: str,
    at: datetime,
    steps: list[tuple[str, dict[str, Any]]],
    *,
    webhooks: bool,
) -> None:
    """Append steps to an order's timeline in one statement; queue their webhooks if asked.

    `webhooks` says the order's hotel has an active endpoint (the caller has read it).
    """
    rows = [
        {"order_id": order_id, "at": at, "event": name, "detail": detail} for name, detail in steps
    ]
    conn = session.connection()
    if not webhooks:
        conn.execute(hot_path.INSERT_STEPS, rows)
        return
    ids = conn.execute(hot_path.INSERT_STEPS_RETURNING_IDS, rows).scalars()
    queue_deliveries(
        session,
        [Step(step_id, order_id, name) for step_id, (name, _) in zip(ids, steps, strict=True)],
        at,
    )


def _queue(session: Session, steps: Sequence[Step], now: datetime) -> bool:
    """Insert the deliveries of these new steps; tell whether there were any."""
    order_ids = {step.order_id for step in steps}
    targets = {
        order_id: (endpoint_id, hotel_id)
        for order_id, endpoint_id, hotel_id in session.execute(
            select(Order.id, WebhookEndpoint.id, Order.hotel_id)
            .join(WebhookEndpoint, WebhookEndpoint.hotel_id == Order.hotel_id)
            .where(Order.id.in_(order_ids), WebhookEndpoint.active.is_(True))
        )
    }
    wanted = [step.id for step in steps if step.order_id in targets]
    if not wanted:
        return False
    rows = [
        {
            "endpoint_id": targets[item.order_id][0],
            "hotel_id": targets[item.order_id][1],
            "event_id": item.id,
            "event": item.event,
            "order_id": item.order_id,
            "payload": item.as_json(),
            "status": DeliveryStatus.PENDING.value,
            "attempts": 0,
            "created_at": now,
            "next_attempt_at": now,
        }
        for item in feed_items(session, wanted)
    ]
    # A Core insert on the flush's own connection: part of the same transaction.
    session.connection().execute(insert(WebhookDelivery), rows)
    return True


# --- registration ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered endpoint; `secret` is only ever given here, once."""

    hotel: str
    url: str
    secret: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeliveryView:
    """One delivery as the dashboard shows it."""

    id: int
    event: str
    order_id: str
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_status_code: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class WebhookView:
    """A hotel's webhook: its URL (never its secret), counts by status, latest deliveries."""

    hotel: str
    hotel_name: str
    url: str | None
    created_at: datetime | None
    counts: dict[str, int]
    deliveries: list[DeliveryView]


def _require(principal: Principal) -> None:
    if principal.role not in WEBHOOK_ROLES:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot manage webhooks")


def hotel_for(session: Session, principal: Principal, hotel_code: str) -> Hotel:
    """The hotel if this user may act on it; otherwise not_found."""
    hotel = session.scalars(select(Hotel).where(Hotel.code == hotel_code)).one_or_none()
    scope = principal.hotel_scope()
    if hotel is None or (scope is not None and hotel.id != scope):
        raise not_found("unknown_hotel", f"no hotel {hotel_code!r}")
    return hotel


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host, or invalid."""
    url = url.strip()
    parts = urlsplit(url)
    if len(url) > MAX_URL_LENGTH or parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(
            "invalid_url", f"give an http or https URL of at most {MAX_URL_LENGTH} characters"
        )
    return url


def register(ctx: ServiceContext, principal: Principal, hotel_code: str, url: str) -> Registration:
    """Register (or replace) the hotel's URL; a new secret every time, shown only here."""
    _require(principal)
    url = check_url(url)
    now = ctx.clock.now()
    salt = ctx.ids.token(16)
    with transaction(ctx.sessions) as session:
        hotel = hotel_for(session, principal, hotel_code)
        endpoint = session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.hotel_id == hotel.id)
        ).one_or_none()
        old_url = endpoint.url if endpoint is not None and endpoint.active else None
        if endpoint is None:
            endpoint = WebhookEndpoint(hotel_id=hotel.id, url=url, secret_salt=salt)
            session.add(endpoint)
        endpoint.url = url
        endpoint.secret_salt = salt
        endpoint.active = True
        endpoint.created_at = now
        endpoint.created_by = principal.user_id
        audit(
            session,
            principal,
            now,
            "webhook_registered",
            hotel.code,
            hotel.id,
            old=old_url,
            new=url,
        )
    return Registration(hotel.code, url, endpoint_secret(ctx.settings.secret_key, salt), now)


def unregister(ctx: ServiceContext, principal: Principal, hotel_code: str) -> None:
    """Stop sending to the hotel's URL (if any); undelivered records are not sent."""
    _require(principal)
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        hotel = hotel_for(session, principal, hotel_code)
        endpoint = session.scalars(
            select(WebhookEndpoint).where(
                WebhookEndpoint.hotel_id == hotel.id, WebhookEndpoint.active.is_(True)
            )
        ).one_or_none()
        if endpoint is None:
            return  # already gone: removing twice is removing once
        endpoint.active = False
        audit(session, principal, now, "webhook_removed", hotel.code, hotel.id, old=endpoint.url)


def retry_failing(ctx: ServiceContext, principal: Principal, hotel_code: str) -> int:
    """Send the hotel's failing deliveries again from now on; return how many."""
    _require(principal)
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        hotel = hotel_for(session, principal, hotel_code)
        result = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.hotel_id == hotel.id,
                WebhookDelivery.status == DeliveryStatus.FAILING.value,
            )
            .values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now)
        )
        count = int(getattr(result, "rowcount", 0) or 0)
        if count:
            audit(session, principal, now, "webhook_retry", hotel.code, hotel.id, deliveries=count)
    return count


def describe(
    ctx: ServiceContext, principal: Principal, hotel_code: str, limit: int = 50
) -> WebhookView:
    """The hotel's webhook and its latest deliveries, newest first."""
    _require(principal)
    with ctx.sessions() as session:
        hotel = hotel_for(session, principal, hotel_code)
        return _describe(session, hotel, limit)


def describe_all(ctx: ServiceContext, principal: Principal, limit: int = 50) -> list[WebhookView]:
    """The webhooks of every hotel the user may see."""
    _require(principal)
    scope = principal.hotel_scope()
    with ctx.sessions() as session:
        query = select(Hotel).order_by(Hotel.code)
        if scope is not None:
            query = query.where(Hotel.id == scope)
        return [_describe(session, hotel, limit) for hotel in session.scalars(query)]


def _describe(session: Session, hotel: Hotel, limit: int) -> WebhookView:
    endpoint = session.scalars(
        select(WebhookEndpoint).where(
            WebhookEndpoint.hotel_id == hotel.id, WebhookEndpoint.active.is_(True)
        )
    ).one_or_none()
    counts = {status.value: 0 for status in DeliveryStatus}
    for status, count in session.execute(
        select(WebhookDelivery.status, func.count())
        .where(WebhookDelivery.hotel_id == hotel.id)
        .group_by(WebhookDelivery.status)
    ):
        counts[status] = int(count)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.hotel_id == hotel.id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    )
    return WebhookView(
        hotel=hotel.code,
        hotel_name=hotel.name,
        url=endpoint.url if endpoint else None,
        created_at=endpoint.created_at if endpoint else None,
        counts=counts,
        deliveries=[
            DeliveryView(
                d.id,
                d.event,
                d.order_id,
                d.status,
                d.attempts,
                d.created_at,
                d.next_attempt_at,
                d.delivered_at,
                d.last_status_code,
                d.last_error,
            )
            for d in rows
        ],
    )


# --- delivery ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Claim:
    id: int
    url: str
    secret: str
    event: str
    payload: dict[str, Any]


def deliver_due(ctx: ServiceContext, policy: RetryPolicy | None = None, batch: int = 50) -> int:
    """POST every due delivery once, outside any transaction; return how many were attempted."""
    policy = policy or RetryPolicy()
    claims = _claim_due(ctx, policy, batch)
    if claims:
        with httpx.Client(follow_redirects=False) as client:
            for claim in claims:
                _attempt(ctx, client, policy, claim)
    return len(claims)


def _claim_due(ctx: ServiceContext, policy: RetryPolicy, batch: int) -> list[_Claim]:
    """Lease due deliveries: their next attempt moves out before the request is made."""
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        rows = session.execute(
            select(WebhookDelivery, WebhookEndpoint)
            .join(WebhookEndpoint, WebhookDelivery.endpoint_id == WebhookEndpoint.id)
            .where(
                WebhookDelivery.status == DeliveryStatus.PENDING.value,
                WebhookDelivery.next_attempt_at <= now,
                WebhookEndpoint.active.is_(True),
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(batch)
            .with_for_update(skip_locked=True, of=WebhookDelivery)
        ).all()
        claims = []
        for delivery, endpoint in rows:
            delivery.next_attempt_at = now + timedelta(seconds=policy.lease_s)
            claims.append(
                _Claim(
                    delivery.id,
                    endpoint.url,
                    endpoint_secret(ctx.settings.secret_key, endpoint.secret_salt),
                    delivery.event,
                    dict(delivery.payload),
                )
            )
        return claims


def _attempt(ctx: ServiceContext, client: httpx.Client, policy: RetryPolicy, claim: _Claim) -> None:
    body = json.dumps(claim.payload, ensure_ascii=False, separators=(",", ":")).encode()
    timestamp = int(ctx.clock.now().timestamp())
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": "roompay-webhooks/1",
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(claim.secret, timestamp, body),
        EVENT_HEADER: claim.event,
        DELIVERY_HEADER: str(claim.id),
    }
    status: int | None = None
    error: str | None = None
    try:
        response = client.post(claim.url, content=body, headers=headers, timeout=policy.timeout_s)
        status = response.status_code
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    _record(ctx, policy, claim.id, status, error)


def _record(
    ctx: ServiceContext,
    policy: RetryPolicy,
    delivery_id: int,
    status: int | None,
    error: str | None,
) -> None:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        delivery = session.get_one(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery.status != DeliveryStatus.PENDING.value:
            return
        delivery.attempts += 1
        delivery.last_status_code = status
        if error is None:
            delivery.status = DeliveryStatus.DELIVERED.value
            delivery.delivered_at = now
            delivery.last_error = None
            return
        delivery.last_error = error[:200]
        if delivery.attempts >= policy.max_attempts:
            delivery.status = DeliveryStatus.FAILING.value
            log.warning(
                "webhook delivery %s failing after %s attempts", delivery_id, delivery.attempts
            )
        else:
            delivery.next_attempt_at = now + policy.delay_after(delivery.attempts)
