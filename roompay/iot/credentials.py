"""MQTT credentials: random passwords and hashes in Mosquitto's password-file format.

Mosquitto 2.0 (`mosquitto_passwd`, default `-H sha512-pbkdf2`) writes one line per user:

    username:$7$101$<base64 salt, 12 bytes>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>

`7` names the algorithm and `101` the iteration count; the broker reads both from the
line, so a file written here needs no `mosquitto_passwd -U`. We keep Mosquitto's 101
iterations: the passwords are random with 144 bits or more, so stretching buys nothing,
while every CONNECT pays for it.
"""

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

HASH_SCHEME = "7"
DEFAULT_ITERATIONS = 101
SALT_BYTES = 12
PASSWORD_BYTES = 18  # 24 URL-safe characters
FIRST_KEY_ID = "k1"
BACKEND_USERNAME = "backend"

_USERNAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HASH = re.compile(r"\$7\$([1-9][0-9]{0,8})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


class CredentialError(ValueError):
    """A username, password or password hash is not acceptable."""


@dataclass(frozen=True, slots=True)
class MqttAccount:
    """One line of the broker's password file: a user and the hash of its password."""

    username: str
    password_hash: str = field(repr=False)

    def __post_init__(self) -> None:
        check_username(self.username)
        parse_password_hash(self.password_hash)


def check_username(username: str) -> str:
    """Return `username` unchanged, or raise CredentialError if it is not `[A-Za-z0-9_-]{1,64}`.

    The same alphabet as device codes: no `:` (the password-file separator) and no
    `/`, `+` or `#`, which Mosquitto refuses to substitute for `%u` in ACL patterns.
    """
    if _USERNAME.fullmatch(username) is None:
        raise CredentialError(f"invalid MQTT username {username!r}: want [A-Za-z0-9_-]{{1,64}}")
    return username


def generate_password() -> str:
    """Return a new random MQTT password of 24 URL-safe characters."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> str:
    """Hash `password` as `mosquitto_passwd` 2.0 does: `$7$<iterations>$<salt>$<hash>`."""
    if not password:
        raise CredentialError("an MQTT password must not be empty")
    if iterations < 1:
        raise CredentialError(f"iterations must be positive, not {iterations}")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    if len(salt) != SALT_BYTES:
        raise CredentialError(f"salt must be {SALT_BYTES} bytes, not {len(salt)}")
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"${HASH_SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def parse_password_hash(password_hash: str) -> tuple[int, bytes, bytes]:
    """Return (iterations, salt, digest) of a `$7$` hash, or raise CredentialError."""
    match = _HASH.fullmatch(password_hash)
    if match is None:
        raise CredentialError("not a Mosquitto $7$ (PBKDF2-SHA512) password hash")
    try:
        salt = base64.b64decode(match[2], validate=True)
        digest = base64.b64decode(match[3], validate=True)
    except binascii.Error as exc:
        raise CredentialError("malformed base64 in a $7$ password hash") from exc
    if len(salt) != SALT_BYTES or len(digest) != hashlib.sha512().digest_size:
        raise CredentialError("wrong salt or digest length in a $7$ password hash")
    return int(match[1]), salt, digest


def verify_password(password: str, password_hash: str) -> bool:
    """Tell whether `password` matches a `$7$` hash; a malformed hash never matches."""
    try:
        iterations, salt, digest = parse_password_hash(password_hash)
    except CredentialError:
        return False
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return hmac.compare_digest(candidate, digest)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")
