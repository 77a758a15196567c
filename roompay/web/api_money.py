"""The money API: settlement statements (JSON, CSV, printable HTML) and reconciliation."""

from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.templating import Jinja2Templates

from roompay.domain.catalog import Wallet
from roompay.domain.money import format_cny
from roompay.services import reconciliation, settlement
from roompay.services.auth import Principal, Role
from roompay.services.errors import ErrorKind, ServiceError, not_found
from roompay.web.deps import Ctx, CurrentUser

router = APIRouter(prefix="/api/v1", tags=["money"])
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))

Format = Literal["json", "csv", "html"]


def _admin(user: Principal) -> None:
    if user.role is not Role.ADMIN:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "only the operator can do this")


def _render(
    request: Request, view: settlement.StatementView, fmt: Format
) -> Response | dict[str, Any]:
    if fmt == "csv":
        name = f"statement-{view.hotel_code}-{view.period}.csv"
        return Response(
            settlement.statement_csv(view),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    if fmt == "html":
        return TEMPLATES.TemplateResponse(request, "statement.html", {"s": view, "cny": format_cny})
    return view.to_json()


@router.post("/hotels/{hotel}/statements/{period}")
def issue_statement(
    ctx: Ctx,
    user: CurrentUser,
    request: Request,
    hotel: str,
    period: str,
    response: Response,
    fmt: Annotated[Format, Query(alias="format")] = "json",
) -> Any:
    """Issue a hotel's statement for a finished day or month (the issued one if it exists)."""
    _admin(user)
    view = settlement.settle(ctx, hotel, period)
    response.status_code = 201 if view.created else 200
    rendered = _render(request, view, fmt)
    if isinstance(rendered, Response):
        rendered.status_code = response.status_code
    return rendered


@router.get("/hotels/{hotel}/statements/{period}")
def get_statement(
    ctx: Ctx,
    user: CurrentUser,
    request: Request,
    hotel: str,
    period: str,
    fmt: Annotated[Format, Query(alias="format")] = "json",
) -> Any:
    """An issued statement; hotel managers and front desk see their own hotel's only."""
    if user.role is Role.TECHNICIAN:
        raise ServiceError(ErrorKind.FORBIDDEN, "forbidden", "your role cannot see money")
    scope = user.hotel_scope()
    if scope is not None and settlement.hotel_id_of(ctx, hotel) != scope:
        raise not_found("unknown_hotel", f"no hotel {hotel!r}")
    return _render(request, settlement.read_statement(ctx, hotel, period), fmt)


@router.post("/reconciliations/{bill_date}")
def run_reconciliation(
    ctx: Ctx,
    user: CurrentUser,
    bill_date: date,
    wallet: Wallet | None = None,
    rerun: bool = False,
) -> list[dict[str, object]]:
    """Reconcile the providers' bills of a finished Beijing day against the ledger."""
    _admin(user)
    if wallet is not None:
        views = [reconciliation.reconcile(ctx, bill_date, wallet, rerun=rerun)]
    else:
        views = reconciliation.reconcile_day(ctx, bill_date, rerun=rerun)
    return [v.to_json() for v in views]


@router.get("/reconciliations/{bill_date}")
def get_reconciliation(ctx: Ctx, user: CurrentUser, bill_date: date) -> list[dict[str, object]]:
    """The newest reconciliation report of each wallet for a day."""
    _admin(user)
    return [v.to_json() for v in reconciliation.read_reports(ctx, bill_date)]
