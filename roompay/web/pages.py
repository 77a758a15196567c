"""Server-rendered pages: the appliance panel, the sticker page and the staff dashboard.

Staff pages read the signed-in user from an HttpOnly cookie holding the same token as
the API's bearer token, with the same expiry. Their forms carry a token derived from
that cookie (and the cookie is SameSite=Lax), so another site cannot post them.
"""

import hashlib
import hmac
import json
import threading
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from roompay.domain.catalog import APPLIANCE_NAMES, ApplianceKind
from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import format_cny, parse_yuan, yuan_str
from roompay.domain.orders import OrderStatus
from roompay.services import (
    catalog,
    comps,
    dashboard,
    device_control,
    orders,
    reconciliation,
    settlement,
    staff,
    timeline,
    webhooks,
)
from roompay.services.auth import (
    LoginThrottle,
    Principal,
    Role,
    authenticate,
    issue_token,
    read_token,
    token_expiry,
)
from roompay.services.errors import ErrorKind, ServiceError
from roompay.services.refunds import owed_total, paid_total
from roompay.web import feed
from roompay.web.deps import get_ctx, get_runtime
from roompay.web.errors import STATUS_BY_KIND
from roompay.web.feed import COOKIE
from roompay.web.i18n import TEXTS, pick_language

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
_THROTTLE_LOCK = threading.Lock()

router = APIRouter(include_in_schema=False)
# The feed is an API route, but only the dashboard gives it a reason to exist.
router.include_router(feed.router)


def _lang(request: Request) -> str:
    return pick_language(request.query_params.get("lang"), request.headers.get("accept-language"))


def wallet_from_user_agent(user_agent: str) -> str | None:
    """The wallet whose app opened the page: WeChat's in-app browser or Alipay's."""
    if "MicroMessenger" in user_agent:
        return "wechat"
    if "AlipayClient" in user_agent:
        return "alipay"
    return None


def _render_panel(request: Request, code: str, wallet_hint: str | None) -> HTMLResponse:
    ctx = get_ctx(request)
    lang = _lang(request)
    with ctx.sessions() as session:
        device = catalog.describe_device(session, code)
        programs = catalog.list_programs(session, code)
    texts = TEXTS[lang]
    english, chinese = APPLIANCE_NAMES[ApplianceKind(device.kind)]
    panel = {
        "device": device.code,
        "t": texts,
        "wallet_hint": wallet_hint,
        "online": device.online,
        "state": device.state,
    }
    return TEMPLATES.TemplateResponse(
        request,
        "panel.html",
        {
            "lang": lang,
            "t": texts,
            "device": device,
            "kind_name": chinese if lang == "zh-CN" else english,
            "programs": [{**vars_of(p), "price": format_cny(p.amount_fen)} for p in programs],
            "unavailable": not device.online or device.state != "idle",
            "sandbox": get_runtime(request).sandbox is not None,
            "wallet_hint": wallet_hint,
            "wallets": [wallet_hint] if wallet_hint else ["wechat", "alipay"],
            "panel_json": json.dumps(panel, ensure_ascii=False).replace("</", "<\\/"),
        },
    )


def vars_of(program: catalog.ProgramView) -> dict[str, object]:
    """A program as a plain dict for the template."""
    return {
        "code": program.code,
        "name": program.name,
        "duration_s": program.duration_s,
        "amount_fen": program.amount_fen,
    }


@router.get("/panel/{code}", response_class=HTMLResponse)
def panel(request: Request, code: str) -> HTMLResponse:
    """The appliance's own screen: programs, wallet, QR, live status."""
    return _render_panel(request, code, None)


@router.get("/panel/{code}/state.json")
def panel_state(request: Request, code: str) -> dict[str, object]:
    """Whether the appliance can take an order now, for a panel waiting on it."""
    with get_ctx(request).sessions() as session:
        device = catalog.describe_device(session, code)
    return {"device": device.code, "online": device.online, "state": device.state}


@router.get("/d/{code}", response_class=HTMLResponse)
def sticker(request: Request, code: str) -> HTMLResponse:
    """The page behind a screenless appliance's QR sticker; the wallet follows the app."""
    return _render_panel(
        request, code, wallet_from_user_agent(request.headers.get("user-agent", ""))
    )


@router.get("/")
def index() -> RedirectResponse:
    """Staff start at the dashboard."""
    return RedirectResponse("/dashboard", status_code=303)


def login_throttle(request: Request) -> LoginThrottle:
    """The app's sign-in throttle, made on first use."""
    state = request.app.state
    with _THROTTLE_LOCK:
        throttle: LoginThrottle | None = getattr(state, "login_throttle", None)
        if throttle is None:
            throttle = LoginThrottle(get_ctx(request).clock)
            state.login_throttle = throttle
    return throttle


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request) -> HTMLResponse:
    """The staff sign-in form."""
    return TEMPLATES.TemplateResponse(
        request, "login.html", {"lang": _lang(request), "t": TEXTS[_lang(request)], "error": None}
    )


@router.post("/login", response_class=HTMLResponse, response_model=None)
def login(
    request: Request, username: Annotated[str, Form()], password: Annotated[str, Form()]
) -> Response:
    """Sign in and keep the token in an HttpOnly cookie that expires with the token."""
    ctx = get_ctx(request)
    lang = _lang(request)
    address = request.client.host if request.client else None
    try:
        with ctx.sessions() as session:
            principal = authenticate(
                session, username, password, throttle=login_throttle(request), address=address
            )
    except ServiceError as exc:
        return TEMPLATES.TemplateResponse(
            request,
            "login.html",
            {"lang": lang, "t": TEXTS[lang], "error": exc.message},
            status_code=401,
        )
    now = ctx.clock.now()
    ttl_s = ctx.settings.token_ttl_s
    token = issue_token(principal, ctx.settings.secret_key, now, ttl_s)
    expires = token_expiry(now, ttl_s)
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        max_age=int((expires - now).total_seconds()),
        expires=expires,
    )
    return response


@router.post("/logout")
def logout(request: Request, csrf: Annotated[str, Form()] = "") -> Response:
    """Forget the dashboard cookie."""
    if _cookie_principal(request) is not None and not _csrf_ok(request, csrf):
        return _denied(request, None)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, httponly=True, samesite="lax")
    return response


def _cookie_principal(request: Request) -> Principal | None:
    ctx = get_ctx(request)
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    try:
        return read_token(token, ctx.settings.secret_key, ctx.clock.now())
    except ServiceError:
        return None


def _csrf(request: Request) -> str:
    secret = get_ctx(request).settings.secret_key.encode()
    cookie = request.cookies.get(COOKIE, "")
    return hmac.new(secret, f"csrf|{cookie}".encode(), hashlib.sha256).hexdigest()[:32]


def _csrf_ok(request: Request, given: str) -> bool:
    return hmac.compare_digest(_csrf(request), given)


def _local_time(value: datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(dashboard.HOTEL_TZ).strftime("%Y-%m-%d %H:%M:%S")


def _kind_name(kind: str, lang: str) -> str:
    try:
        english, chinese = APPLIANCE_NAMES[ApplianceKind(kind)]
    except ValueError:
        return kind
    return chinese if lang == "zh-CN" else english


def _render(
    request: Request,
    name: str,
    principal: Principal | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    lang = _lang(request)
    texts = TEXTS[lang]
    return TEMPLATES.TemplateResponse(
        request,
        name,
        {
            "lang": lang,
            "t": texts,
            "user": principal,
            "csrf": _csrf(request) if principal else "",
            "sees_orders": principal is not None and principal.role in dashboard.ORDER_ROLES,
            "sees_revenue": principal is not None and principal.role in dashboard.REVENUE_ROLES,
            "sees_reconciliation": principal is not None
            and principal.role in dashboard.RECONCILIATION_ROLES,
            "format_cny": format_cny,
            "local_time": _local_time,
            "kind_name": lambda kind: _kind_name(kind, lang),
            "label": lambda prefix, key: texts.get(f"{prefix}_{key}", key),
            **values,
        },
        status_code=status_code,
    )


def _not_found(request: Request, principal: Principal | None) -> HTMLResponse:
    return _render(request, "message.html", principal, 404, title="not_found")


def _denied(request: Request, principal: Principal | None) -> HTMLResponse:
    return _render(request, "message.html", principal, 403, title="forbidden")


def _staff(request: Request, roles: frozenset[Any] | None = None) -> Principal | Response:
    """The signed-in user allowed here, or the response that turns the caller away."""
    principal = _cookie_principal(request)
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    if roles is not None and principal.role not in roles:
        return _denied(request, principal)
    return principal


@router.get("/dashboard", response_class=HTMLResponse, response_model=None)
def dashboard_page(request: Request) -> Response:
    """Rooms with live device state, the live consumption feed and the latest orders."""
    principal = _staff(request)
    if isinstance(principal, Response):
        return principal
    ctx = get_ctx(request)
    scope = principal.hotel_scope()
    sees_orders = principal.role in dashboard.ORDER_ROLES
    with ctx.sessions() as session:
        rooms = dashboard.room_grid(session, scope)
        recent = dashboard.search_orders(session, scope, limit=20) if sees_orders else []
    return _render(request, "dashboard.html", principal, rooms=rooms, orders=recent)


def _tile_json(tile: dashboard.RoomTile) -> dict[str, object]:
    return {
        "device": tile.code,
        "kind": tile.kind,
        "hotel": tile.hotel,
        "room": tile.room,
        "state": tile.state,
        "order_id": tile.order_id,
        "ends_at": tile.ends_at.isoformat() if tile.ends_at else None,
    }


@router.get("/dashboard/rooms.json", response_model=None)
def rooms_json(request: Request) -> Response:
    """The room grid's live state, for the dashboard to refresh without reloading."""
    principal = _cookie_principal(request)
    if principal is None:
        return JSONResponse(
            {"error": {"code": "invalid_token", "message": "sign in first"}}, status_code=401
        )
    with get_ctx(request).sessions() as session:
        tiles = dashboard.room_grid(session, principal.hotel_scope())
    return JSONResponse(
        {"now": get_ctx(request).clock.now().isoformat(), "rooms": [_tile_json(t) for t in tiles]}
    )


@router.get("/dashboard/orders", response_class=HTMLResponse, response_model=None)
def order_search(
    request: Request,
    q: Annotated[str, Query(max_length=64)] = "",
    device: Annotated[str, Query(max_length=64)] = "",
    day: Annotated[str, Query(max_length=10)] = "",
) -> Response:
    """Find the caller's orders by id prefix, device and date."""
    principal = _staff(request, dashboard.ORDER_ROLES)
    if isinstance(principal, Response):
        return principal
    try:
        on_day = date.fromisoformat(day) if day else None
    except ValueError:
        on_day = None
    with get_ctx(request).sessions() as session:
        found = dashboard.search_orders(
            session, principal.hotel_scope(), q.strip().lower(), device.strip(), on_day
        )
    return _render(
        request,
        "orders.html",
        principal,
        orders=found,
        q=q,
        device=device,
        day=on_day.isoformat() if on_day else "",
    )


def _timeline_values(request: Request, principal: Principal, order_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    with ctx.sessions() as session:
        order = staff.load_order_for(session, principal, order_id)
        refundable = paid_total(order) - owed_total(session, order.id)
        view = orders.get_order_view(session, order_id)
        events = timeline.order_timeline(session, order_id)
        device = catalog.describe_device(session, view.device)
    refunds = staff.list_refunds(ctx, principal, order_id)
    return {
        "order": view,
        "device": device,
        "events": events,
        "refunds": refunds,
        "notes": {r.refund_key: r.note for r in refunds if r.note},
        "refundable_fen": refundable,
        "refundable_yuan": yuan_str(max(refundable, 0)),
        "can_refund": principal.role in staff.REFUND_ROLES and refundable > 0,
        "refund_key": ctx.ids.token(8),
        "error": None,
        "done": request.query_params.get("refunded") == "1",
        "comped": request.query_params.get("comped") == "1",
        "stopped": request.query_params.get("stopped") == "1",
        "can_stop": principal.role in device_control.STOP_ROLES
        and view.status == OrderStatus.RUNNING,
    }


@router.get("/dashboard/orders/{order_id}", response_class=HTMLResponse, response_model=None)
def order_page(request: Request, order_id: str) -> Response:
    """Every step of one order, its refunds, and the refund form."""
    principal = _staff(request, dashboard.ORDER_ROLES)
    if isinstance(principal, Response):
        return principal
    try:
        values = _timeline_values(request, principal, order_id)
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            return _not_found(request, principal)
        raise
    return _render(request, "order.html", principal, **values)


@router.post(
    "/dashboard/orders/{order_id}/refund", response_class=HTMLResponse, response_model=None
)
def refund_from_page(
    request: Request,
    order_id: str,
    amount: Annotated[str, Form(max_length=20)],
    reason: Annotated[str, Form(max_length=200)],
    key: Annotated[str, Form(max_length=64)],
    csrf: Annotated[str, Form(max_length=64)],
) -> Response:
    """Refund from the timeline page, through the same use case as the staff API."""
    principal = _staff(request, dashboard.ORDER_ROLES)
    if isinstance(principal, Response):
        return principal
    if not _csrf_ok(request, csrf):
        return _denied(request, principal)
    ctx = get_ctx(request)
    try:
        try:
            amount_fen = parse_yuan(amount)
        except InvalidAmountError:
            raise ServiceError(
                ErrorKind.INVALID, "invalid_amount", f"not an amount in yuan: {amount[:20]}"
            ) from None
        if not reason.strip():
            raise ServiceError(ErrorKind.INVALID, "invalid_reason", "give a reason")
        if amount_fen <= 0:
            raise ServiceError(ErrorKind.INVALID, "invalid_amount", "the amount must be positive")
        staff.refund_order(ctx, principal, order_id, amount_fen, reason.strip(), key or None)
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            return _not_found(request, principal)
        values = _timeline_values(request, principal, order_id)
        values["error"] = exc.message
        return _render(
            request, "order.html", principal, STATUS_BY_KIND.get(exc.kind, 400), **values
        )
    lang = _lang(request)
    return RedirectResponse(f"/dashboard/orders/{order_id}?refunded=1&lang={lang}", status_code=303)


@router.post("/dashboard/orders/{order_id}/stop", response_class=HTMLResponse, response_model=None)
def stop_from_page(
    request: Request,
    order_id: str,
    reason: Annotated[str, Form(max_length=200)],
    csrf: Annotated[str, Form(max_length=64)],
) -> Response:
    """Stop the order's run from its timeline page, through the staff API's use case."""
    principal = _staff(request, dashboard.ORDER_ROLES)
    if isinstance(principal, Response):
        return principal
    if not _csrf_ok(request, csrf):
        return _denied(request, principal)
    ctx = get_ctx(request)
    try:
        with ctx.sessions() as session:
            staff.load_order_for(session, principal, order_id)  # hotel B's order: not found
            device_code = orders.get_order_view(session, order_id).device
        if not reason.strip():
            raise ServiceError(ErrorKind.INVALID, "invalid_reason", "give a reason")
        device_control.stop_run(ctx, principal, device_code, reason.strip())
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            return _not_found(request, principal)
        values = _timeline_values(request, principal, order_id)
        values["error"] = exc.message
        return _render(
            request, "order.html", principal, STATUS_BY_KIND.get(exc.kind, 400), **values
        )
    lang = _lang(request)
    return RedirectResponse(f"/dashboard/orders/{order_id}?stopped=1&lang={lang}", status_code=303)


@router.get("/dashboard/revenue", response_class=HTMLResponse, response_model=None)
def revenue_page(request: Request) -> Response:
    """Net revenue by day and by appliance kind for the caller's hotels."""
    principal = _staff(request, dashboard.REVENUE_ROLES)
    if isinstance(principal, Response):
        return principal
    ctx = get_ctx(request)
    today = dashboard.hotel_today(ctx.clock.now())
    with ctx.sessions() as session:
        result = dashboard.revenue(session, principal.hotel_scope(), today)
        by_hotel = (
            dashboard.revenue_by_hotel(session, None, today) if principal.role is Role.ADMIN else []
        )
    return _render(
        request,
        "revenue.html",
        principal,
        revenue=result,
        day_bars=_bars(result.by_day),
        kind_bars=_bars(result.by_kind),
        hotel_bars=_bars(by_hotel),
        same=str,
    )


BAR_WIDTH = 400


def _bars(lines: list[dashboard.RevenueLine]) -> list[dict[str, object]]:
    """Each line with its bar length in SVG units, proportional to the largest net."""
    top = max((line.net_fen for line in lines), default=0)
    return [
        {
            "line": line,
            "width": (line.net_fen * BAR_WIDTH // top) if top > 0 else 0,
            "y": index * 24,
        }
        for index, line in enumerate(lines)
    ]


def _service_status(exc: ServiceError) -> int:
    return STATUS_BY_KIND.get(exc.kind, 400)


# --- comps ---------------------------------------------------------------------------------


def _comp_values(request: Request, principal: Principal, device: str) -> dict[str, Any]:
    with get_ctx(request).sessions() as session:
        choices = comps.comp_choices(session, principal.hotel_scope())
    return {
        "choices": choices,
        "chosen": device,
        "comp_key": get_ctx(request).ids.token(8),
        "error": None,
    }


@router.get("/dashboard/comp", response_class=HTMLResponse, response_model=None)
def comp_page(request: Request, device: Annotated[str, Query(max_length=64)] = "") -> Response:
    """Start a free run on an idle appliance, with a reason."""
    principal = _staff(request, comps.COMP_ROLES)
    if isinstance(principal, Response):
        return principal
    return _render(request, "comp.html", principal, **_comp_values(request, principal, device))


@router.post("/dashboard/comp", response_class=HTMLResponse, response_model=None)
def comp_from_page(
    request: Request,
    device: Annotated[str, Form(max_length=64)],
    program: Annotated[str, Form(max_length=32)],
    reason: Annotated[str, Form(max_length=200)],
    key: Annotated[str, Form(max_length=64)],
    csrf: Annotated[str, Form(max_length=64)],
) -> Response:
    """Start the comp through the same use case as the API, then show its timeline."""
    principal = _staff(request, comps.COMP_ROLES)
    if isinstance(principal, Response):
        return principal
    if not _csrf_ok(request, csrf):
        return _denied(request, principal)
    try:
        view = comps.start_comp(
            get_ctx(request), principal, device, program, reason, f"page:{key}" if key else None
        )
    except ServiceError as exc:
        values = _comp_values(request, principal, device)
        values["error"] = exc.message
        return _render(request, "comp.html", principal, _service_status(exc), **values)
    lang = _lang(request)
    return RedirectResponse(
        f"/dashboard/orders/{view.order_id}?comped=1&lang={lang}", status_code=303
    )


# --- programs and prices -------------------------------------------------------------------


def _programs_values(request: Request, principal: Principal) -> dict[str, Any]:
    with get_ctx(request).sessions() as session:
        hotels = catalog.programs_by_hotel(session, principal)
    return {"hotels": hotels, "yuan": yuan_str, "error": None, "error_target": None}


@router.get("/dashboard/programs", response_class=HTMLResponse, response_model=None)
def programs_page(request: Request) -> Response:
    """Each program of the caller's hotels: price and whether it is on sale."""
    principal = _staff(request, catalog.PRICE_ROLES)
    if isinstance(principal, Response):
        return principal
    values = _programs_values(request, principal)
    values["saved"] = request.query_params.get("saved", "")
    return _render(request, "programs.html", principal, **values)


@router.post(
    "/dashboard/programs/{hotel}/{program}", response_class=HTMLResponse, response_model=None
)
def program_from_page(
    request: Request,
    hotel: str,
    program: str,
    price: Annotated[str, Form(max_length=20)],
    csrf: Annotated[str, Form(max_length=64)],
    active: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """Save one program's price (in yuan on the page, fen in the store) and availability."""
    principal = _staff(request, catalog.PRICE_ROLES)
    if isinstance(principal, Response):
        return principal
    if not _csrf_ok(request, csrf):
        return _denied(request, principal)
    try:
        try:
            amount_fen = parse_yuan(price)
        except InvalidAmountError:
            raise ServiceError(
                ErrorKind.INVALID, "invalid_price", f"not a price in yuan: {price[:20]}"
            ) from None
        catalog.update_program(
            get_ctx(request),
            principal,
            hotel,
            program,
            amount_fen=amount_fen,
            active=active == "on",
        )
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            return _not_found(request, principal)
        values = _programs_values(request, principal)
        values |= {"error": exc.message, "error_target": f"{hotel}/{program}", "saved": ""}
        return _render(request, "programs.html", principal, _service_status(exc), **values)
    lang = _lang(request)
    return RedirectResponse(
        f"/dashboard/programs?saved={hotel}/{program}&lang={lang}", status_code=303
    )


# --- webhooks ------------------------------------------------------------------------------


def _webhook_values(request: Request, principal: Principal) -> dict[str, Any]:
    return {
        "hooks": webhooks.describe_all(get_ctx(request), principal),
        "secret": None,
        "secret_hotel": None,
        "error": None,
        "error_hotel": None,
        "retried": request.query_params.get("retried", ""),
    }


@router.get("/dashboard/webhooks", response_class=HTMLResponse, response_model=None)
def webhooks_page(request: Request) -> Response:
    """Each hotel's receiver URL and its deliveries: delivered, pending or failing."""
    principal = _staff(request, webhooks.WEBHOOK_ROLES)
    if isinstance(principal, Response):
        return principal
    return _render(request, "webhooks.html", principal, **_webhook_values(request, principal))


@router.post("/dashboard/webhooks/{hotel}", response_class=HTMLResponse, response_model=None)
def webhook_from_page(
    request: Request,
    hotel: str,
    url: Annotated[str, Form(max_length=webhooks.MAX_URL_LENGTH)],
    csrf: Annotated[str, Form(max_length=64)],
) -> Response:
    """Register the hotel's URL and show its new secret, this once."""
    principal = _staff(request, webhooks.WEBHOOK_ROLES)
    if isinstance(principal, Response):
        return principal
    if not _csrf_ok(request, csrf):
        return _denied(request, principal)
    try:
        done = webhooks.register(get_ctx(request), principal, hotel, url)
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            return _not_found(request, principal)
        values = _webhook_values(request, principal)
        values |= {"error": exc.message, "error_hotel": hotel}
        return _render(request, "webhooks.html", principal, _service_status(exc), **values)
    values = _webhook_values(request, principal)
    values |= {"secret": done.secret, "secret_hotel": done.hotel}
    response = _render(request, "webhooks.html", principal, **values)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/dashboard/webhooks/{hotel}/retry", response_class=HTMLResponse, response_model=None)
def webhook_retry_from_page(
    request: Request, hotel: str, csrf: Annotated[str, Form(max_length=64)]
) -> Response:
    """Send the hotel's failing deliveries again."""
    principal = _staff(request, webhooks.WEBHOOK_ROLES)
    if isinstance(principal, Response):
        return principal
    if not _csrf_ok(request, csrf):
        return _denied(request, principal)
    try:
        count = webhooks.retry_failing(get_ctx(request), principal, hotel)
    except ServiceError as exc:
        if exc.kind is ErrorKind.NOT_FOUND:
            return _not_found(request, principal)
        raise
    lang = _lang(request)
    return RedirectResponse(f"/dashboard/webhooks?retried={count}&lang={lang}", status_code=303)


# --- statements and reconciliation ---------------------------------------------------------


@router.get("/dashboard/statements", response_class=HTMLResponse, response_model=None)
def statements_page(
    request: Request, period: Annotated[str, Query(max_length=10)] = ""
) -> Response:
    """Issued statements of the caller's hotels with their totals and printable forms."""
    principal = _staff(request, dashboard.STATEMENT_ROLES)
    if isinstance(principal, Response):
        return principal
    with get_ctx(request).sessions() as session:
        rows = dashboard.list_statements(session, principal.hotel_scope(), period.strip())
    return _render(request, "statements.html", principal, statements=rows, period=period)


@router.get(
    "/dashboard/statements/{hotel}/{period}", response_class=HTMLResponse, response_model=None
)
def statement_page(
    request: Request,
    hotel: str,
    period: str,
    fmt: Annotated[Literal["html", "csv"], Query(alias="format")] = "html",
) -> Response:
    """One issued statement, printable or as CSV; hotel staff see their own hotel's only."""
    principal = _staff(request, dashboard.STATEMENT_ROLES)
    if isinstance(principal, Response):
        return principal
    ctx = get_ctx(request)
    try:
        scope = principal.hotel_scope()
        if scope is not None and settlement.hotel_id_of(ctx, hotel) != scope:
            return _not_found(request, principal)
        view = settlement.read_statement(ctx, hotel, period)
    except ServiceError as exc:
        if exc.kind in (ErrorKind.NOT_FOUND, ErrorKind.INVALID):
            return _not_found(request, principal)
        raise
    if fmt == "csv":
        return Response(
            settlement.statement_csv(view),
            media_type="text/csv; charset=utf-8",
            headers={
                "Content-Disposition": f'attachment; filename="statement-{hotel}-{period}.csv"'
            },
        )
    return TEMPLATES.TemplateResponse(request, "statement.html", {"s": view, "cny": format_cny})


@router.get("/dashboard/reconciliation", response_class=HTMLResponse, response_model=None)
def reconciliation_page(request: Request) -> Response:
    """The newest reconciliation report of each day and wallet, with its differences."""
    principal = _staff(request, dashboard.RECONCILIATION_ROLES)
    if isinstance(principal, Response):
        return principal
    with get_ctx(request).sessions() as session:
        reports = dashboard.list_reconciliations(session)
        differences = {r.id: dashboard.report_differences(session, r.id) for r in reports}
    return _render(
        request,
        "reconciliation.html",
        principal,
        reports=reports,
        differences=differences,
        outcomes=[o.value for o in reconciliation.Outcome],
    )
