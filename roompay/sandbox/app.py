"""The sandbox as a whole: both providers' emulators and the guest's actions.

Mounted under `/sandbox` (inside `roompay demo`, or alone by `roompay sandbox`):
`/sandbox/wechatpay/...` and `/sandbox/alipay/gateway.do` are the providers' APIs at
their real paths, `/sandbox/pay` is the guest scanning and paying.
"""

from pathlib import Path
from typing import Literal

import httpx
from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from roompay.clock import Clock, SystemClock
from roompay.payments.alipay.constants import NOTIFY_REPLY_OK
from roompay.sandbox.alipay import AlipayEmulator
from roompay.sandbox.faults import FaultKind, Faults, RefundMode
from roompay.sandbox.notifier import Notifier
from roompay.sandbox.wechatpay import WechatPayEmulator


class PayIn(BaseModel):
    """The guest scans this QR content and pays."""

    model_config = ConfigDict(extra="forbid")

    qr: str = Field(min_length=1, max_length=512)
    # Fault injection: the provider's signed notify claims this amount instead of the order's.
    notify_amount_fen: int | None = Field(default=None, gt=0)


class ScanIn(BaseModel):
    """The guest scans this QR content."""

    model_config = ConfigDict(extra="forbid")

    qr: str = Field(min_length=1, max_length=512)


class FaultIn(BaseModel):
    """Arm a provider error for the next `count` calls of one operation."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["wechatpay", "alipay"]
    operation: str = Field(min_length=1, max_length=64)
    kind: FaultKind
    count: int = Field(default=1, ge=1, le=1000)


class RefundModeIn(BaseModel):
    """Choose how a provider's refunds end from now on."""

    model_config = ConfigDict(extra="forbid")

    provider: Literal["wechatpay", "alipay"]
    mode: RefundMode


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class _HoldingTransport(httpx.AsyncBaseTransport):
    """Keeps notifications instead of sending them, and tells the provider they arrived.

    Whoever holds them delivers them, once, as the provider would; the provider stops as
    it stops once a merchant has answered. Answering 503 instead made it retry on its
    schedule, signing each notification again every time: in a benchmark, waves of RSA
    signatures at 15 s, 30 s and 3 minutes after the orders were paid, on the same cores
    as the servers being measured, and duplicates in `held_notifies`.
    """

    def __init__(self, held: list[httpx.Request]) -> None:
        self._held = held

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        self._held.append(request)
        # Both providers' success: WeChat Pay reads the status, Alipay the body.
        return httpx.Response(200, content=NOTIFY_REPLY_OK.encode(), request=request)


class Sandbox:
    """Both emulators with one notifier, and the guest's actions.

    With `hold_notifies`, notifications are kept in `held_notifies` instead of being
    delivered: benchmarks and demos then deliver them when and how they choose.
    """

    def __init__(
        self,
        state_dir: Path,
        clock: Clock | None = None,
        time_scale: float = 1.0,
        notify_transport: httpx.AsyncBaseTransport | None = None,
        hold_notifies: bool = False,
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        clock = clock or SystemClock()
        self.held_notifies: list[httpx.Request] = []
        if hold_notifies:
            notify_transport = _HoldingTransport(self.held_notifies)
        self.notifier = Notifier(time_scale=time_scale, transport=notify_transport)
        self.faults = Faults()
        self.wechatpay = WechatPayEmulator(state_dir, clock, self.notifier, self.faults)
        self.alipay = AlipayEmulator(state_dir, clock, self.notifier, self.faults)

    def router(self) -> APIRouter:
        """All sandbox routes under `/sandbox`."""
        router = APIRouter(prefix="/sandbox", tags=["sandbox"])
        router.include_router(self.wechatpay.router(), prefix="/wechatpay")
        router.include_router(self.alipay.router(), prefix="/alipay")
        router.add_api_route("/pay", self._pay, methods=["POST"])
        router.add_api_route("/scan", self._scan, methods=["POST"])
        router.add_api_route("/faults", self._arm_fault, methods=["POST"], status_code=204)
        router.add_api_route("/refund-mode", self._refund_mode, methods=["POST"], status_code=204)
        router.add_api_route("/faults", self._clear_faults, methods=["DELETE"], status_code=204)
        return router

    async def _scan(self, body: ScanIn) -> JSONResponse:
        """The guest scans the QR code but has not paid (yet, or ever: abandoning is not paying).

        For Alipay the trade only comes into existence at the scan; a WeChat Pay
        Native order exists from its creation, so the scan changes nothing there.
        """
        if self.alipay.owns_qr(body.qr):
            try:
                self.alipay.scan(body.qr)
            except ValueError as exc:
                return _error(409, "cannot_scan", str(exc))
            return JSONResponse({"provider": "alipay", "state": "WAIT_BUYER_PAY"})
        if self.wechatpay.owns_qr(body.qr):
            return JSONResponse({"provider": "wechatpay", "state": "NOTPAY"})
        return _error(404, "unknown_qr", "no sandbox order has this QR content")

    async def _arm_fault(self, body: FaultIn) -> None:
        """Make the provider fail the next calls of one operation."""
        self.faults.arm(body.provider, body.operation, body.kind, body.count)

    async def _refund_mode(self, body: RefundModeIn) -> None:
        """Choose how the provider's refunds end."""
        self.faults.refund_mode[body.provider] = body.mode

    async def _clear_faults(self) -> None:
        """Back to a healthy provider."""
        self.faults.clear()

    async def _pay(self, body: PayIn) -> JSONResponse:
        """The guest scans the QR code with the matching app and pays."""
        for emulator in (self.wechatpay, self.alipay):
            if emulator.owns_qr(body.qr):
                try:
                    result = await emulator.guest_pay(body.qr, body.notify_amount_fen)
                except ValueError as exc:
                    return _error(409, "cannot_pay", str(exc))
                return JSONResponse(result)
        return _error(404, "unknown_qr", "no sandbox order has this QR content")

    async def aclose(self) -> None:
        """Stop pending notification deliveries."""
        await self.notifier.aclose()


def create_sandbox_app(state_dir: Path, time_scale: float = 1.0) -> FastAPI:
    """The sandbox alone, as `roompay sandbox` serves it."""
    sandbox = Sandbox(state_dir, time_scale=time_scale)
    app = FastAPI(title="roompay provider sandbox")
    app.include_router(sandbox.router())
    return app
