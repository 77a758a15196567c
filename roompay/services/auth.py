"""Staff accounts, password checks and bearer tokens.

Tokens are `base64url(json).base64url(hmac_sha256)` under the server's secret key,
with an expiry; no state is kept server-side, so several processes accept each
other's tokens.

Failed sign-ins are counted per account and per client address in a `LoginThrottle`;
after `LoginThrottle.limit` failures within `LoginThrottle.window` further attempts are
refused until the window has passed. The counters live in the process: several server
processes each count on their own (a shared store is the multi-process follow-up).
"""

import base64
import binascii
import hashlib
import hmac
import json
import threading
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.clock import Clock
from roompay.services.errors import ErrorKind, ServiceError
from roompay.store.models import User


class Role(StrEnum):
    """What a user may do."""

    ADMIN = "admin"  # the operator: every hotel
    MANAGER = "manager"  # one hotel
    FRONT_DESK = "front_desk"  # one hotel
    TECHNICIAN = "technician"  # devices of assigned hotels


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as proven by a token."""

    user_id: int
    username: str
    role: Role
    hotel_id: int | None

    def hotel_scope(self) -> int | None:
        """The only hotel this user may see, or None for all hotels."""
        return None if self.role is Role.ADMIN else self.hotel_id


_hasher = PasswordHasher()
_BAD_LOGIN = ServiceError(ErrorKind.UNAUTHORIZED, "bad_credentials", "wrong username or password")


def hash_password(password: str) -> str:
    """Hash a password with argon2id."""
    return _hasher.hash(password)


def create_user(
    session: Session, username: str, password: str, role: Role, hotel_id: int | None, now: datetime
) -> User:
    """Add a user; hotel roles must name their hotel."""
    if role is not Role.ADMIN and hotel_id is None:
        raise ValueError(f"a {role} must belong to a hotel")
    user = User(
        username=username,
        password_hash=hash_password(password),
        role=role.value,
        hotel_id=hotel_id,
        created_at=now,
    )
    session.add(user)
    session.flush()
    return user


class LoginThrottle:
    """Failed sign-ins per account and per client address over a sliding window.

    Thread-safe: FastAPI runs sign-ins in a thread pool.
    """

    limit = 10
    window = timedelta(minutes=15)

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[tuple[str, str], deque[datetime]] = {}

    @staticmethod
    def _keys(username: str, address: str | None) -> list[tuple[str, str]]:
        keys = [("account", username.casefold())]
        if address:
            keys.append(("address", address))
        return keys

    def _recent(self, key: tuple[str, str], now: datetime) -> deque[datetime]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            self._failures.pop(key, None)
        return times

    def check(self, username: str, address: str | None) -> None:
        """Refuse the attempt while the account or the address is over the limit."""
        now = self._clock.now()
        with self._lock:
            blocked = [
                times[0] + self.window
                for key in self._keys(username, address)
                if len(times := self._recent(key, now)) >= self.limit
            ]
        if blocked:
            wait_s = max(1, int((max(blocked) - now).total_seconds()) + 1)
            minutes = -(-wait_s // 60)
            raise ServiceError(
                ErrorKind.UNAUTHORIZED,
                "too_many_attempts",
                f"too many failed sign-ins; try again in {minutes} min",
            )

    def failed(self, username: str, address: str | None) -> None:
        """Count one failed attempt against the account and the address."""
        now = self._clock.now()
        with self._lock:
            for key in self._keys(username, address):
                self._recent(key, now)
                self._failures.setdefault(key, deque()).append(now)

    def succeeded(self, username: str) -> None:
        """Forget the account's failures once its owner has signed in."""
        with self._lock:
            self._failures.pop(("account", username.casefold()), None)


def authenticate(
    session: Session,
    username: str,
    password: str,
    *,
    throttle: LoginThrottle | None = None,
    address: str | None = None,
) -> Principal:
    """Check a username and password; the same error for an unknown user and a bad password.

    With a throttle, an account or address over its failure limit is refused before
    the password is looked at, whether or not the account exists.
    """
    if throttle is not None:
        throttle.check(username, address)
    try:
        principal = _verify(session, username, password)
    except ServiceError:
        if throttle is not None:
            throttle.failed(username, address)
        raise
    if throttle is not None:
        throttle.succeeded(username)
    return principal


def _verify(session: Session, username: str, password: str) -> Principal:
    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        _hasher.hash(password)  # spend the same time as a real check: no user enumeration
        raise _BAD_LOGIN
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        raise _BAD_LOGIN from None
    return Principal(user.id, user.username, Role(user.role), user.hotel_id)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_expiry(now: datetime, ttl_s: int) -> datetime:
    """When a token issued at `now` expires: whole seconds, as written into the token."""
    return datetime.fromtimestamp(int((now + timedelta(seconds=ttl_s)).timestamp()), UTC)


def issue_token(principal: Principal, secret: str, now: datetime, ttl_s: int) -> str:
    """Make a bearer token for this principal, valid until `token_expiry(now, ttl_s)`."""
    claims = {
        "uid": principal.user_id,
        "sub": principal.username,
        "role": principal.role.value,
        "hotel": principal.hotel_id,
        "exp": int(token_expiry(now, ttl_s).timestamp()),
    }
    body = _b64(json.dumps(claims, separators=(",", ":")).encode())
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
    return f"{body}.{_b64(mac)}"


def read_token(token: str, secret: str, now: datetime) -> Principal:
    """Verify a bearer token and return its principal; raise unauthorized otherwise."""
    denied = ServiceError(
        ErrorKind.UNAUTHORIZED, "invalid_token", "missing, invalid or expired token"
    )
    body, _, mac = token.partition(".")
    try:
        expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(mac)):
            raise denied
        claims = json.loads(_unb64(body))
        if int(claims["exp"]) <= now.timestamp():
            raise denied
        return Principal(
            int(claims["uid"]), str(claims["sub"]), Role(claims["role"]), claims["hotel"]
        )
    except (ValueError, KeyError, TypeError, OverflowError, binascii.Error):
        raise denied from None
