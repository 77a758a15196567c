"""Signed commands: only the server can start or stop an appliance, and only the one it meant.

Each device holds its own 32-byte key, derived from the server's master secret:

    key = HKDF-SHA256(ikm=master, salt=none, info="roompay device command key|{code}|{key_id}")

`key_id` names the key so that it can be rotated. A command is signed over its
canonical bytes: the compact JSON of every field except `sig`, with sorted keys,
plus the device code and the command kind, so that a command signed for device A
is never valid on device B and a start is never valid as a stop:

    sig = base64url(HMAC-SHA256(key, canonical bytes)), without padding

Timestamps enter the canonical form in UTC with microseconds
(`2025-03-01T08:00:00.000000Z`), so the instant is signed, not its spelling.
"""

import base64
import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from typing import overload

from roompay.protocol.messages import (
    StartCommand,
    StartCommandBody,
    StopCommand,
    StopCommandBody,
)
from roompay.protocol.topics import check_code

DEFAULT_KEY_ID = "k1"
"""The key id a device is provisioned with unless told otherwise."""

KEY_BYTES = 32
_INFO_PREFIX = b"roompay device command key|"
_KEY_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int) -> bytes:
    """Derive `length` bytes from `ikm` as RFC 5869 says (HKDF with SHA-256)."""
    digest_size = hashlib.sha256().digest_size
    if not 0 < length <= 255 * digest_size:
        raise ValueError(f"HKDF-SHA256 cannot make {length} bytes")
    # RFC 5869 §2.2: an absent salt is HashLen zero bytes.
    prk = hmac.new(salt or bytes(digest_size), ikm, hashlib.sha256).digest()
    okm = b""
    block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def device_key(master_secret: bytes, device_code: str, key_id: str) -> bytes:
    """Return the command key of one device under one key id."""
    if len(master_secret) < 16:
        raise ValueError("the master secret must be at least 16 bytes")
    check_code(device_code)
    if _KEY_ID.fullmatch(key_id) is None:
        raise ValueError(f"invalid key id {key_id!r}: want [A-Za-z0-9_.-]{{1,32}}")
    info = _INFO_PREFIX + device_code.encode() + b"|" + key_id.encode()
    return hkdf_sha256(master_secret, salt=b"", info=info, length=KEY_BYTES)


def canonical_command_bytes(cmd: StartCommandBody | StopCommandBody, device_code: str) -> bytes:
    """Return the bytes a command's signature covers, bound to `device_code`."""
    document: dict[str, object] = {
        name: _canonical_value(value)
        for name, value in cmd.model_dump(mode="python", exclude={"sig"}).items()
    }
    document["device"] = check_code(device_code)
    document["command"] = "start" if isinstance(cmd, StartCommandBody) else "stop"
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


@overload
def sign_command(cmd: StartCommandBody, key: bytes, device_code: str) -> StartCommand: ...


@overload
def sign_command(cmd: StopCommandBody, key: bytes, device_code: str) -> StopCommand: ...


def sign_command(
    cmd: StartCommandBody | StopCommandBody, key: bytes, device_code: str
) -> StartCommand | StopCommand:
    """Return `cmd` as a signed command for device `device_code` (any old `sig` is replaced)."""
    fields = cmd.model_dump(exclude={"sig"})
    fields["sig"] = _signature(key, canonical_command_bytes(cmd, device_code))
    if isinstance(cmd, StartCommandBody):
        return StartCommand.model_validate(fields)
    return StopCommand.model_validate(fields)


def verify_command(cmd: StartCommand | StopCommand, key: bytes, device_code: str) -> bool:
    """Tell whether `cmd.sig` was made with `key` for `device_code`; constant time."""
    expected = _signature(key, canonical_command_bytes(cmd, device_code))
    return hmac.compare_digest(expected.encode(), cmd.sig.encode())


def _signature(key: bytes, message: bytes) -> str:
    if not key:
        raise ValueError("a command key must not be empty")
    mac = hmac.new(key, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def _canonical_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return value


__all__ = [
    "DEFAULT_KEY_ID",
    "KEY_BYTES",
    "canonical_command_bytes",
    "device_key",
    "hkdf_sha256",
    "sign_command",
    "verify_command",
]
