"""Request-scoped access to the runtime and the caller's identity."""

import asyncio
from typing import Annotated, TypeVar

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import OAuth2PasswordBearer

from roompay.runtime import Runtime
from roompay.services.auth import Principal, read_token
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError
from roompay.store.writer import Job

T = TypeVar("T")

oauth2 = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def get_runtime(request: Request) -> Runtime:
    """The runtime this app was built with."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_ctx(request: Request) -> ServiceContext:
    """The services' collaborators."""
    return get_runtime(request).ctx


async def run_job(ctx: ServiceContext, job: Job[T], key: str) -> T:
    """Run a writer job without holding a thread of the pool while it waits its turn."""
    if ctx.writer is not None:
        return await asyncio.wrap_future(ctx.writer.submit(job, key))
    return await run_in_threadpool(ctx.execute, job, key)


def get_principal(
    ctx: Annotated[ServiceContext, Depends(get_ctx)],
    token: Annotated[str | None, Depends(oauth2)],
) -> Principal:
    """The signed-in caller; 401 without a valid bearer token."""
    if token is None:
        raise ServiceError(ErrorKind.UNAUTHORIZED, "invalid_token", "sign in first")
    return read_token(token, ctx.settings.secret_key, ctx.clock.now())


Ctx = Annotated[ServiceContext, Depends(get_ctx)]
CurrentUser = Annotated[Principal, Depends(get_principal)]
