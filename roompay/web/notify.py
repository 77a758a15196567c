"""Provider notification endpoints, answering in each provider's own format.

The error shape of the rest of the API does not apply here: WeChat Pay reads the
HTTP status (2xx = handled) and Alipay reads the literal body `success`.
"""

import logging
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from roompay.domain.catalog import Wallet
from roompay.payments.errors import NotificationRejectedError
from roompay.services.payments import notification_job, writer_key
from roompay.services.refunds import apply_refund_notice
from roompay.web.deps import get_ctx, run_job

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/notify", tags=["provider notifications"])


async def _handle(request: Request, wallet: Wallet) -> Response:
    started = time.perf_counter()
    ctx = get_ctx(request)
    provider = ctx.providers.get(wallet)
    if provider is None:
        return Response(status_code=404)
    body = await request.body()
    try:
        notice = provider.parse_notification(request.headers, body, ctx.clock.now())
    except NotificationRejectedError as exc:
        log.warning("rejected %s notification: %s", wallet, exc)
        elapsed = time.perf_counter() - started
        ctx.metrics.notify_seconds.labels(wallet.value, "forged").observe(elapsed)
        reply = provider.reply_fail("verification failed")
        # 400 whatever the provider: the notify is not ours to accept.
        return Response(reply.body, status_code=400, media_type=reply.media_type)
    # A recent checkout's appliance is known in memory: no thread hop for the lookup.
    key = ctx.order_devices.get(notice.out_trade_no)
    if key is None:
        key = await run_in_threadpool(writer_key, ctx, notice.out_trade_no)
    result = await run_job(ctx, notification_job(ctx, notice), key)
    elapsed = time.perf_counter() - started
    ctx.metrics.notify_seconds.labels(wallet.value, result.outcome.value).observe(elapsed)
    reply = provider.reply_ok() if result.acknowledge else provider.reply_fail(result.outcome.value)
    return Response(reply.body, status_code=reply.status_code, media_type=reply.media_type)


@router.post("/wechatpay/refund")
async def wechatpay_refund(request: Request) -> Response:
    """WeChat Pay API v3 refund-result notification (REFUND.SUCCESS / ABNORMAL / CLOSED)."""
    ctx = get_ctx(request)
    provider = ctx.providers.get(Wallet.WECHAT)
    if provider is None:
        return Response(status_code=404)
    body = await request.body()
    try:
        outcome = provider.parse_refund_notification(request.headers, body, ctx.clock.now())
    except NotificationRejectedError as exc:
        log.warning("rejected refund notification: %s", exc)
        reply = provider.reply_fail("verification failed")
        return Response(reply.body, status_code=400, media_type=reply.media_type)
    # An unknown key is acknowledged too: retrying would not make it ours.
    await run_in_threadpool(apply_refund_notice, ctx, outcome)
    reply = provider.reply_ok()
    return Response(reply.body, status_code=reply.status_code, media_type=reply.media_type)


@router.post("/wechatpay")
async def wechatpay(request: Request) -> Response:
    """WeChat Pay API v3 payment notification (TRANSACTION.SUCCESS)."""
    return await _handle(request, Wallet.WECHAT)


@router.post("/alipay")
async def alipay(request: Request) -> Response:
    """Alipay asynchronous notification (trade_status_sync)."""
    return await _handle(request, Wallet.ALIPAY)
