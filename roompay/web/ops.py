"""Operations: liveness, readiness (database and broker) and Prometheus metrics."""

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.exc import SQLAlchemyError

from roompay.store.db import ping
from roompay.web.deps import get_runtime
from roompay.web.errors import error_response

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready when the database answers and the MQTT link is connected."""
    runtime = get_runtime(request)
    checks: dict[str, str] = {}
    try:
        await run_in_threadpool(ping, runtime.engine)
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    checks["broker"] = "ok" if runtime.link is not None and runtime.link.connected else "down"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition; behind a bearer token when one is configured.

    The figures (orders by status, devices online) are trade information, so
    production refuses to start without `ROOMPAY_METRICS_TOKEN`.
    """
    runtime = get_runtime(request)
    token = runtime.settings.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
            return error_response(401, "unauthorized", "/metrics needs the metrics bearer token")
    registry = runtime.ctx.metrics.registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
