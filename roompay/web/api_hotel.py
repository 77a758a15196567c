"""The hotel API: webhooks, programs and prices, and comp sessions; staff only."""

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Response
from pydantic import BaseModel, ConfigDict, Field

from roompay.services import catalog, comps, webhooks
from roompay.web.deps import Ctx, CurrentUser

router = APIRouter(prefix="/api/v1", tags=["hotel"])

Code = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class WebhookIn(BaseModel):
    """Where to POST the hotel's consumption records."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=webhooks.MAX_URL_LENGTH)]


class WebhookRegistered(BaseModel):
    """A registered webhook with its signing secret, shown this once."""

    hotel: str
    url: str
    secret: str
    created_at: datetime


class DeliveryOut(BaseModel):
    """One consumption record sent (or being sent) to the hotel's URL."""

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


class WebhookOut(BaseModel):
    """A hotel's webhook (never its secret), deliveries counted by status, the latest ones."""

    hotel: str
    url: str | None
    created_at: datetime | None
    counts: dict[str, int]
    deliveries: list[DeliveryOut]


class RetriedOut(BaseModel):
    """How many failing deliveries were queued again."""

    retried: int


class ProgramAdminOut(BaseModel):
    """A program of a hotel, active or not, with its price in fen."""

    hotel: str
    code: str
    kind: str
    name: str
    duration_s: int
    amount_fen: int
    active: bool


class ProgramPatch(BaseModel):
    """A new price in fen and/or availability; orders already created keep their price."""

    model_config = ConfigDict(extra="forbid")

    amount_fen: Annotated[int | None, Field(strict=True)] = None
    active: Annotated[bool | None, Field(strict=True)] = None


class CompIn(BaseModel):
    """A free run: which program, and why."""

    model_config = ConfigDict(extra="forbid")

    program: Code
    reason: Annotated[str, Field(min_length=1, max_length=comps.MAX_REASON)]


class CompOut(BaseModel):
    """The comp order: amount 0, started through the usual command path."""

    order_id: str
    device: str
    program: str
    duration_s: int
    amount_fen: int
    status: str
    reason: str
    created_at: datetime


def _webhook_out(view: webhooks.WebhookView) -> WebhookOut:
    return WebhookOut(
        hotel=view.hotel,
        url=view.url,
        created_at=view.created_at,
        counts=view.counts,
        deliveries=[
            DeliveryOut(**{k: getattr(d, k) for k in DeliveryOut.model_fields})
            for d in view.deliveries
        ],
    )


@router.put("/hotels/{hotel}/webhook")
def register_webhook(ctx: Ctx, user: CurrentUser, hotel: str, body: WebhookIn) -> WebhookRegistered:
    """Register or replace the hotel's URL; the answer holds the new signing secret, once."""
    done = webhooks.register(ctx, user, hotel, body.url)
    return WebhookRegistered(
        hotel=done.hotel, url=done.url, secret=done.secret, created_at=done.created_at
    )


@router.get("/hotels/{hotel}/webhook")
def get_webhook(ctx: Ctx, user: CurrentUser, hotel: str) -> WebhookOut:
    """The hotel's webhook and its latest deliveries, newest first."""
    return _webhook_out(webhooks.describe(ctx, user, hotel))


@router.delete("/hotels/{hotel}/webhook", status_code=204, response_class=Response)
def delete_webhook(ctx: Ctx, user: CurrentUser, hotel: str) -> Response:
    """Stop sending the hotel's records."""
    webhooks.unregister(ctx, user, hotel)
    return Response(status_code=204)


@router.post("/hotels/{hotel}/webhook/retry")
def retry_webhook(ctx: Ctx, user: CurrentUser, hotel: str) -> RetriedOut:
    """Send the hotel's failing deliveries again."""
    return RetriedOut(retried=webhooks.retry_failing(ctx, user, hotel))


@router.get("/hotels/{hotel}/programs")
def get_programs(ctx: Ctx, user: CurrentUser, hotel: str) -> list[ProgramAdminOut]:
    """Every program of the hotel, active or not."""
    with ctx.sessions() as session:
        programs = catalog.hotel_programs(session, user, hotel)
    return [
        ProgramAdminOut(**{k: getattr(p, k) for k in ProgramAdminOut.model_fields})
        for p in programs
    ]


@router.patch("/hotels/{hotel}/programs/{program}")
def patch_program(
    ctx: Ctx, user: CurrentUser, hotel: str, program: str, body: ProgramPatch
) -> ProgramAdminOut:
    """Change a program's price (fen) or switch it on or off at this hotel; audited."""
    changed = catalog.update_program(
        ctx, user, hotel, program, amount_fen=body.amount_fen, active=body.active
    )
    return ProgramAdminOut(**{k: getattr(changed, k) for k in ProgramAdminOut.model_fields})


@router.post("/devices/{code}/comps", status_code=201)
def create_comp(
    ctx: Ctx,
    user: CurrentUser,
    code: str,
    body: CompIn,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> CompOut:
    """Start a free run on an idle, online appliance of the caller's hotel; audited."""
    view = comps.start_comp(ctx, user, code, body.program, body.reason, idempotency_key or None)
    if not view.created:
        response.status_code = 200
    return CompOut(**{k: getattr(view, k) for k in CompOut.model_fields})
