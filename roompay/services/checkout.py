"""Checkout: the guest picks a program and a wallet; we create the provider's QR order.

The provider call happens between two short transactions, never inside one: the
order row exists (awaiting payment, no QR yet) before the provider hears of it, so a
payment can always be matched, and no database lock is held across the network.
"""

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from roompay.domain.catalog import APPLIANCE_NAMES, ApplianceKind, Wallet
from roompay.domain.orders import OrderStatus
from roompay.logs import order_context
from roompay.payments.base import QrOrderRequest
from roompay.payments.errors import PaymentError
from roompay.services.catalog import device_programs, get_device
from roompay.services.context import ServiceContext
from roompay.services.errors import conflict, invalid, not_found, unavailable
from roompay.services.timeline import record_event
from roompay.store.db import transaction
from roompay.store.models import Device, Order

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    """What the panel sends."""

    device_code: str
    program_code: str
    wallet: Wallet
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class CheckoutResult:
    """What the panel needs to show the QR code."""

    order_id: str
    status: str
    amount_fen: int
    wallet: Wallet
    qr: str
    expires_at: datetime


def checkout(ctx: ServiceContext, request: CheckoutRequest) -> CheckoutResult:
    """Create an order and its provider QR code, or return the one made for this key."""
    if request.wallet not in ctx.providers:
        raise unavailable("wallet_unavailable", f"{request.wallet} is not configured here")
    order, created = _create_order(ctx, request)
    with order_context(order.id):
        if created or _interrupted(order):
            return _issue_qr(ctx, order, request.device_code)
        return _replay(order)


def _interrupted(order: Order) -> bool:
    """Tell whether an earlier attempt with this key stopped before storing the QR code.

    A retry re-issues it: both providers answer a repeated order with the same
    parameters with the same QR code, so a concurrent duplicate is harmless too.
    """
    return order.qr_content is None and order.status == OrderStatus.AWAITING_PAYMENT


def _fingerprint(request: CheckoutRequest) -> str:
    text = f"{request.device_code}|{request.program_code}|{request.wallet}"
    return hashlib.sha256(text.encode()).hexdigest()


def _create_order(ctx: ServiceContext, request: CheckoutRequest) -> tuple[Order, bool]:
    try:
        with transaction(ctx.sessions) as session:
            existing = _find_by_key(session, request)
            if existing is not None:
                return existing, False
            return _insert_order(ctx, session, request), True
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert.
        with transaction(ctx.sessions) as session:
            existing = _find_by_key(session, request)
            if existing is None:
                raise
            return existing, False


def _find_by_key(session: Session, request: CheckoutRequest) -> Order | None:
    if request.idempotency_key is None:
        return None
    device = get_device(session, request.device_code)
    order = session.scalars(
        select(Order).where(
            Order.device_id == device.id, Order.idempotency_key == request.idempotency_key
        )
    ).one_or_none()
    if order is not None and order.request_fingerprint != _fingerprint(request):
        raise invalid(
            "idempotency_key_reused", "this Idempotency-Key was used for a different checkout"
        )
    return order


def _insert_order(ctx: ServiceContext, session: Session, request: CheckoutRequest) -> Order:
    device = get_device(session, request.device_code)
    program = next(
        (p for p in device_programs(session, device) if p.code == request.program_code), None
    )
    if program is None:
        raise not_found(
            "unknown_program", f"program {request.program_code!r} is not sold on this device"
        )
    _check_device_ready(ctx, device)
    now = ctx.clock.now()
    order = Order(
        id=ctx.ids.order_id(),
        device_id=device.id,
        hotel_id=device.hotel_id,
        program_id=program.id,
        program_code=program.code,
        wallet=request.wallet.value,
        amount_fen=program.amount_fen,
        duration_s=program.duration_s,
        status=OrderStatus.AWAITING_PAYMENT.value,
        idempotency_key=request.idempotency_key,
        request_fingerprint=_fingerprint(request),
        created_at=now,
        expires_at=now + timedelta(seconds=ctx.settings.checkout_ttl_s),
    )
    session.add(order)
    session.flush()
    ctx.order_devices.remember(order.id, device.code)
    record_event(
        session, order.id, now, "created", wallet=order.wallet, amount_fen=order.amount_fen
    )
    return order


def _check_device_ready(ctx: ServiceContext, device: Device) -> None:
    if ctx.settings.require_device_online and not device.online:
        raise conflict("device_offline", "the appliance is offline; please contact the front desk")
    if device.state == "fault":
        raise conflict(
            "device_faulted", "the appliance reports a fault; please contact the front desk"
        )
    if device.state == "running":
        raise conflict("device_busy", "the appliance is already running")


def _issue_qr(ctx: ServiceContext, order: Order, device_code: str) -> CheckoutResult:
    wallet = Wallet(order.wallet)
    kind = ApplianceKind(_device_kind(ctx, order.device_id))
    description = f"{APPLIANCE_NAMES[kind][1]} {order.program_code} {device_code}"
    provider_request = QrOrderRequest(
        out_trade_no=order.id,
        description=description,
        amount_fen=order.amount_fen,
        expires_at=order.expires_at,
        notify_url=f"{ctx.settings.public_base_url}/api/v1/notify/{_notify_path(wallet)}",
    )
    try:
        qr_order = ctx.provider(wallet).create_qr_order(provider_request)
    except PaymentError as exc:
        _abandon(ctx, order.id, str(exc))
        raise unavailable("provider_unavailable", f"{wallet} could not create the order") from exc
    with transaction(ctx.sessions) as session:
        stored = session.get_one(Order, order.id, with_for_update=True)
        if stored.qr_content is None:
            stored.qr_content = qr_order.qr_content
            record_event(session, order.id, ctx.clock.now(), "qr_issued")
        qr_content = stored.qr_content  # a concurrent retry's, if it stored one first
    log.info("checkout created", extra={"wallet": wallet.value, "amount_fen": order.amount_fen})
    return CheckoutResult(
        order.id, order.status, order.amount_fen, wallet, qr_content, order.expires_at
    )


def _notify_path(wallet: Wallet) -> str:
    return "wechatpay" if wallet is Wallet.WECHAT else "alipay"


def _device_kind(ctx: ServiceContext, device_id: int) -> str:
    """The appliance kind of a device."""
    with ctx.sessions() as session:
        return session.get_one(Device, device_id).kind


def _abandon(ctx: ServiceContext, order_id: str, reason: str) -> None:
    """Expire an order the provider never accepted, so no QR code exists for it."""
    with transaction(ctx.sessions) as session:
        order = session.get_one(Order, order_id, with_for_update=True)
        if order.status == OrderStatus.AWAITING_PAYMENT:
            order.status = OrderStatus.EXPIRED.value
            record_event(session, order_id, ctx.clock.now(), "provider_failed", reason=reason)
    log.warning("provider refused checkout: %s", reason)


def _replay(order: Order) -> CheckoutResult:
    if order.qr_content is None:
        raise conflict(
            "checkout_failed", "this checkout could not be completed; please start a new one"
        )
    return CheckoutResult(
        order.id,
        order.status,
        order.amount_fen,
        Wallet(order.wallet),
        order.qr_content,
        order.expires_at,
    )
