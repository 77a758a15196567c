"""Server-rendered pages: the appliance panel, the sticker page, a first dashboard."""

import json
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from roompay.domain.catalog import APPLIANCE_NAMES, ApplianceKind
from roompay.domain.money import format_cny
from roompay.services import catalog
from roompay.services.auth import Principal, authenticate, issue_token, read_token
from roompay.services.errors import ServiceError
from roompay.store.models import Order
from roompay.web.deps import get_ctx, get_runtime
from roompay.web.i18n import TEXTS, pick_language

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
COOKIE = "roompay_token"

router = APIRouter(include_in_schema=False)


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
    panel = {"device": device.code, "t": texts, "wallet_hint": wallet_hint}
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
    """Sign in and keep the token in an HttpOnly cookie."""
    ctx = get_ctx(request)
    lang = _lang(request)
    try:
        with ctx.sessions() as session:
            principal = authenticate(session, username, password)
    except ServiceError as exc:
        return TEMPLATES.TemplateResponse(
            request,
            "login.html",
            {"lang": lang, "t": TEXTS[lang], "error": exc.message},
            status_code=401,
        )
    token = issue_token(
        principal, ctx.settings.secret_key, ctx.clock.now(), ctx.settings.token_ttl_s
    )
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        COOKIE, token, httponly=True, samesite="lax", max_age=ctx.settings.token_ttl_s
    )
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


@router.get("/dashboard", response_class=HTMLResponse, response_model=None)
def dashboard(request: Request) -> Response:
    """Rooms with live device state and the latest orders of the caller's hotels."""
    principal = _cookie_principal(request)
    if principal is None:
        return RedirectResponse("/login", status_code=303)
    ctx = get_ctx(request)
    lang = _lang(request)
    scope = principal.hotel_scope()
    with ctx.sessions() as session:
        devices = catalog.describe_devices(session, scope)
        query = select(Order).order_by(Order.created_at.desc()).limit(30)
        if scope is not None:
            query = query.where(Order.hotel_id == scope)
        orders = list(session.scalars(query))
    return TEMPLATES.TemplateResponse(
        request,
        "dashboard.html",
        {
            "lang": lang,
            "t": TEXTS[lang],
            "devices": devices,
            "orders": orders,
            "user": principal,
            "format_cny": format_cny,
        },
    )
