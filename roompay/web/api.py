"""The JSON API of CONTRACTS.md: auth, devices, programs, checkout, orders."""

from datetime import datetime
from typing import Annotated, Literal

import segno
from fastapi import APIRouter, Depends, Header, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.security import OAuth2PasswordRequestForm
from pydantic import BaseModel, ConfigDict, Field

from roompay.domain.catalog import Wallet
from roompay.services import catalog, device_control, orders, staff
from roompay.services.auth import authenticate, issue_token
from roompay.services.checkout import CheckoutRequest, checkout
from roompay.web.deps import Ctx, CurrentUser

router = APIRouter(prefix="/api/v1")

DeviceCode = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class TokenOut(BaseModel):
    """An OAuth2 bearer token."""

    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type, not a secret


class DeviceOut(BaseModel):
    """A device as its hotel's staff see it."""

    code: str
    kind: str
    hotel: str
    room: str | None
    online: bool
    state: str


class ProgramOut(BaseModel):
    """What a guest can buy on a device."""

    code: str
    name: str
    duration_s: int
    amount_fen: int


class CheckoutIn(BaseModel):
    """The panel's checkout request; amounts are never taken from the client."""

    model_config = ConfigDict(extra="forbid")

    device: DeviceCode
    program: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")]
    wallet: Wallet


class CheckoutOut(BaseModel):
    """The order to pay and the QR content to show."""

    order_id: str
    status: str
    amount_fen: int
    wallet: Wallet
    qr: str
    expires_at: datetime


class OrderOut(BaseModel):
    """An order's status and times."""

    order_id: str
    status: str
    device: str
    program: str
    wallet: str
    amount_fen: int
    duration_s: int
    created_at: datetime
    expires_at: datetime
    paid_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    actual_run_s: int | None
    refunded_fen: int


class RefundIn(BaseModel):
    """A staff refund: how much, and why."""

    model_config = ConfigDict(extra="forbid")

    amount_fen: Annotated[int, Field(gt=0, le=100_000_00, strict=True)]
    reason: Annotated[str, Field(min_length=1, max_length=200)]


class RefundOut(BaseModel):
    """A refund and where it stands."""

    refund_key: str
    amount_fen: int
    reason: str
    status: str
    created_at: datetime
    note: str | None


class StopIn(BaseModel):
    """A staff stop: why the run must end now."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, Field(min_length=1, max_length=200)]


class StopOut(BaseModel):
    """The stop command queued for the device, and where it stands."""

    command_id: str
    device: str
    order_id: str
    run_id: str
    status: str
    created_at: datetime


@router.post("/auth/token", tags=["auth"])
def token(ctx: Ctx, form: Annotated[OAuth2PasswordRequestForm, Depends()]) -> TokenOut:
    """Exchange a username and password for a bearer token."""
    with ctx.sessions() as session:
        principal = authenticate(session, form.username, form.password)
    access = issue_token(
        principal, ctx.settings.secret_key, ctx.clock.now(), ctx.settings.token_ttl_s
    )
    return TokenOut(access_token=access)


@router.get("/devices", tags=["devices"])
def list_devices(ctx: Ctx, user: CurrentUser) -> list[DeviceOut]:
    """The caller's devices: every hotel for the operator, one hotel for hotel staff."""
    with ctx.sessions() as session:
        views = catalog.describe_devices(session, user.hotel_scope())
    return [
        DeviceOut(
            code=v.code, kind=v.kind, hotel=v.hotel, room=v.room, online=v.online, state=v.state
        )
        for v in views
    ]


@router.post("/devices/{code}/stop", status_code=202, tags=["staff"])
def stop_device(ctx: Ctx, user: CurrentUser, code: str, body: StopIn) -> StopOut:
    """End the run on this appliance now, with a reason; recorded in the audit log.

    The device gets a signed stop command; its `ended` event then settles the order
    and the pro-rated refund of the unused time.
    """
    view = device_control.stop_run(ctx, user, code, body.reason)
    return StopOut(**{k: getattr(view, k) for k in StopOut.model_fields})


@router.get("/devices/{code}/programs", tags=["guest"])
def list_programs(ctx: Ctx, code: str) -> list[ProgramOut]:
    """What a guest can buy on this device."""
    with ctx.sessions() as session:
        programs = catalog.list_programs(session, code)
    return [
        ProgramOut(code=p.code, name=p.name, duration_s=p.duration_s, amount_fen=p.amount_fen)
        for p in programs
    ]


@router.post("/checkout", status_code=201, tags=["guest"])
def create_checkout(
    ctx: Ctx,
    body: CheckoutIn,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> CheckoutOut:
    """Create an order with the chosen wallet's provider and return its QR content."""
    result = checkout(
        ctx, CheckoutRequest(body.device, body.program, body.wallet, idempotency_key or None)
    )
    return CheckoutOut(
        order_id=result.order_id,
        status=result.status,
        amount_fen=result.amount_fen,
        wallet=result.wallet,
        qr=result.qr,
        expires_at=result.expires_at,
    )


@router.get("/orders/{order_id}", tags=["guest"])
def get_order(ctx: Ctx, order_id: str) -> OrderOut:
    """An order's status and times, by its unguessable id."""
    with ctx.sessions() as session:
        view = orders.get_order_view(session, order_id)
    return OrderOut(**{k: getattr(view, k) for k in OrderOut.model_fields})


@router.post("/orders/{order_id}/refunds", status_code=201, tags=["staff"])
def create_refund(
    ctx: Ctx,
    user: CurrentUser,
    order_id: str,
    body: RefundIn,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> RefundOut:
    """Refund part or all of an order, with a reason; recorded in the audit log."""
    view = staff.refund_order(ctx, user, order_id, body.amount_fen, body.reason, idempotency_key)
    return RefundOut(**{k: getattr(view, k) for k in RefundOut.model_fields})


@router.get("/orders/{order_id}/refunds", tags=["staff"])
def order_refunds(ctx: Ctx, user: CurrentUser, order_id: str) -> list[RefundOut]:
    """An order's refunds."""
    return [
        RefundOut(**{k: getattr(v, k) for k in RefundOut.model_fields})
        for v in staff.list_refunds(ctx, user, order_id)
    ]


@router.get("/orders/{order_id}/qr.svg", tags=["guest"], response_class=Response)
async def order_qr(ctx: Ctx, order_id: str) -> Response:
    """The order's QR code as SVG, for the panel to show."""
    qr = await run_in_threadpool(_qr_content, ctx, order_id)
    svg = await run_in_threadpool(_render_svg, qr)
    return Response(
        svg, media_type="image/svg+xml", headers={"Cache-Control": "private, max-age=600"}
    )


def _qr_content(ctx: Ctx, order_id: str) -> str:
    with ctx.sessions() as session:
        return orders.qr_content(session, order_id)


def _render_svg(content: str) -> bytes:
    return segno.make(content, error="m").svg_inline(scale=6, border=2).encode()
