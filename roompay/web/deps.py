"""Request-scoped access to the runtime and the caller's identity."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import OAuth2PasswordBearer

from roompay.runtime import Runtime
from roompay.services.auth import Principal, read_token
from roompay.services.context import ServiceContext
from roompay.services.errors import ErrorKind, ServiceError

oauth2 = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)


def get_runtime(request: Request) -> Runtime:
    """The runtime this app was built with."""
    runtime: Runtime = request.app.state.runtime
    return runtime


def get_ctx(request: Request) -> ServiceContext:
    """The services' collaborators."""
    return get_runtime(request).ctx


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
