"""Provisioning: a device's identity on the broker, issued once and stored only as a hash.

Each device logs in to the broker with username = its code and a random password.
The server keeps the password's hash (Mosquitto's `$7$` format, roompay.iot.credentials)
and the id of the device's command key; the key itself is derived from the server
secret and never stored. The plain password leaves this module exactly once, in the
value `add_device` or `rotate_password` returns.

The server logs in as its own account, taken from the `ROOMPAY_MQTT_URL` credentials.
"""

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from roompay.domain.catalog import ApplianceKind
from roompay.iot.credentials import (
    BACKEND_USERNAME,
    FIRST_KEY_ID,
    CredentialError,
    MqttAccount,
    check_username,
    generate_password,
    hash_password,
)
from roompay.protocol.mqtt_url import parse_mqtt_url
from roompay.services.errors import conflict, invalid, not_found
from roompay.services.seed import KIND_PREFIX
from roompay.store.models import Device, Hotel, Room

_CODE = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The server's own client ids (protocol §2); a device code of that form would collide.
_SERVER_CLIENT_ID = re.compile(r"roompay-server-.*")
_CODE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class DeviceCredentials:
    """What a device needs to log in and verify commands; the password is shown once."""

    mqtt_username: str
    mqtt_password: str = field(repr=False)
    key_id: str


@dataclass(frozen=True, slots=True)
class ProvisionedDevice:
    """A newly placed device and its credentials."""

    code: str
    hotel_code: str
    kind: ApplianceKind
    room: str | None
    credentials: DeviceCredentials


@dataclass(frozen=True, slots=True)
class DeviceAccounts:
    """Every device account the broker should know, and the devices that have none."""

    accounts: list[MqttAccount]
    without_credentials: list[str]


def add_device(
    session: Session,
    hotel_code: str,
    kind: str,
    room: str | None,
    code: str | None,
    now: datetime,
) -> ProvisionedDevice:
    """Place a device in a hotel (and room) and issue its broker credentials.

    A missing `code` becomes `<KIND>-<NNNN>-<4 hex>`, as the demo seed numbers devices
    plus a random suffix. Raises ServiceError: `hotel_not_found`, `room_not_found`,
    `invalid_kind`, `invalid_code`, `reserved_code`, `duplicate_code`.
    """
    hotel = session.scalars(select(Hotel).where(Hotel.code == hotel_code)).one_or_none()
    if hotel is None:
        raise not_found("hotel_not_found", f"no hotel with code {hotel_code!r}")
    try:
        appliance = ApplianceKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in ApplianceKind)
        raise invalid("invalid_kind", f"unknown kind {kind!r}; known: {known}") from None
    room_id: int | None = None
    if room is not None:
        found = session.scalars(
            select(Room).where(Room.hotel_id == hotel.id, Room.number == room)
        ).one_or_none()
        if found is None:
            raise not_found("room_not_found", f"hotel {hotel_code!r} has no room {room!r}")
        room_id = found.id
    device_code = _new_code(session, hotel, appliance) if code is None else _check_code(code)
    if _code_taken(session, device_code):
        raise conflict("duplicate_code", f"a device with code {device_code!r} already exists")

    password = generate_password()
    session.add(
        Device(
            code=device_code,
            kind=appliance.value,
            hotel_id=hotel.id,
            room_id=room_id,
            online=False,
            boot_id=0,
            state="idle",
            mqtt_username=device_code,
            mqtt_password_hash=hash_password(password),
            credentials_issued_at=now,
            key_id=FIRST_KEY_ID,
        )
    )
    session.flush()
    return ProvisionedDevice(
        code=device_code,
        hotel_code=hotel.code,
        kind=appliance,
        room=room,
        credentials=DeviceCredentials(device_code, password, FIRST_KEY_ID),
    )


def rotate_password(session: Session, code: str, now: datetime) -> DeviceCredentials:
    """Issue a new broker password for a device; the old one stops working once the
    broker's password file is regenerated and reloaded. The command key id is kept
    (a device placed before provisioning existed gets `k1`).
    """
    device = session.scalars(select(Device).where(Device.code == code)).one_or_none()
    if device is None:
        raise not_found("device_not_found", f"no device with code {code!r}")
    _check_code(device.code)
    password = generate_password()
    device.mqtt_username = device.code
    device.mqtt_password_hash = hash_password(password)
    device.credentials_issued_at = now
    if device.key_id is None:
        device.key_id = FIRST_KEY_ID
    session.flush()
    return DeviceCredentials(device.code, password, device.key_id)


def device_accounts(session: Session) -> DeviceAccounts:
    """Return every device's broker account, and the codes of devices that have none."""
    accounts: list[MqttAccount] = []
    missing: list[str] = []
    rows = session.execute(
        select(Device.code, Device.mqtt_username, Device.mqtt_password_hash).order_by(Device.code)
    )
    for code, username, password_hash in rows:
        if username is None or password_hash is None:
            missing.append(code)
        else:
            accounts.append(MqttAccount(username, password_hash))
    return DeviceAccounts(accounts, missing)


def backend_credentials(mqtt_url: str) -> tuple[str, str]:
    """Return the server's (username, password) from `ROOMPAY_MQTT_URL`.

    Raises ServiceError `backend_credentials_missing` when the URL is `embedded` or
    carries no credentials, and `invalid_backend_username` for a name the broker files
    cannot hold.
    """
    if mqtt_url == "embedded":
        raise invalid(
            "backend_credentials_missing",
            "ROOMPAY_MQTT_URL is `embedded`; set mqtt://backend:PASSWORD@host:port",
        )
    try:
        endpoint = parse_mqtt_url(mqtt_url)
    except ValueError as exc:
        raise invalid("backend_credentials_missing", str(exc)) from exc
    if endpoint.username is None or not endpoint.password:
        raise invalid(
            "backend_credentials_missing",
            "ROOMPAY_MQTT_URL has no user and password; "
            f"set mqtt://{BACKEND_USERNAME}:PASSWORD@host:port",
        )
    try:
        check_username(endpoint.username)
    except CredentialError as exc:
        raise invalid("invalid_backend_username", str(exc)) from exc
    return endpoint.username, endpoint.password


def backend_account(mqtt_url: str) -> MqttAccount:
    """Return the server's broker account (username and a fresh hash of its password)."""
    username, password = backend_credentials(mqtt_url)
    return MqttAccount(username, hash_password(password))


def _check_code(code: str) -> str:
    if _CODE.fullmatch(code) is None:
        raise invalid("invalid_code", f"invalid device code {code!r}: want [A-Za-z0-9_-]{{1,64}}")
    if code == BACKEND_USERNAME or _SERVER_CLIENT_ID.fullmatch(code):
        raise invalid("reserved_code", f"device code {code!r} is reserved for the server")
    return code


def _code_taken(session: Session, code: str) -> bool:
    found = session.scalars(
        select(Device.id).where((Device.code == code) | (Device.mqtt_username == code))
    ).first()
    return found is not None


def _new_code(session: Session, hotel: Hotel, kind: ApplianceKind) -> str:
    placed = session.scalars(
        select(Device.id).where(Device.hotel_id == hotel.id, Device.kind == kind.value)
    ).all()
    for _ in range(_CODE_ATTEMPTS):
        code = f"{KIND_PREFIX[kind]}-{len(placed) + 1:04d}-{secrets.token_hex(2)}"
        if not _code_taken(session, code):
            return code
    raise conflict("duplicate_code", "could not find a free device code; pass --code")
