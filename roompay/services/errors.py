"""Errors the use cases raise; the web layer maps each kind to one HTTP status.

ServiceError(kind, code, message)
kinds: not_found, invalid, conflict, unavailable, unauthorized, forbidden
"""

from enum import StrEnum


class ErrorKind(StrEnum):
    """What sort of failure, independent of transport."""

    NOT_FOUND = "not_found"
    INVALID = "invalid"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"


class ServiceError(Exception):
    """A use case refused or failed, with a stable machine-readable code."""

    def __init__(self, kind: ErrorKind, code: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message


def not_found(code: str, message: str) -> ServiceError:
    """Something the caller named does not exist (or is not theirs to see)."""
    return ServiceError(ErrorKind.NOT_FOUND, code, message)


def conflict(code: str, message: str) -> ServiceError:
    """The request is valid but the current state does not allow it."""
    return ServiceError(ErrorKind.CONFLICT, code, message)


def invalid(code: str, message: str) -> ServiceError:
    """The request is malformed or inconsistent."""
    return ServiceError(ErrorKind.INVALID, code, message)


def unavailable(code: str, message: str) -> ServiceError:
    """A dependency (provider, broker) failed; the caller may retry."""
    return ServiceError(ErrorKind.UNAVAILABLE, code, message)
