"""Signed commands: key derivation, canonical bytes, signatures and what breaks them."""

from datetime import UTC, datetime, timedelta, timezone

import pytest

from roompay.protocol.messages import (
    StartCommand,
    StartCommandBody,
    StopCommand,
    StopCommandBody,
    decode,
    encode,
)
from roompay.protocol.signing import (
    canonical_command_bytes,
    device_key,
    hkdf_sha256,
    sign_command,
    verify_command,
)

MASTER = b"roompay test master secret 32 b!"
ISSUED = datetime(2025, 3, 1, 8, 0, 0, tzinfo=UTC)
KEY_A1 = bytes.fromhex("dcc3454ba43f4b4fdba73e23abd6e38947dad1c6813d6b60ad85bf5f14a956bd")


def start_body(**overrides: object) -> StartCommandBody:
    fields: dict[str, object] = {
        "cmd_id": "cmd-1",
        "order_id": "0f" * 16,
        "program": "massage-30",
        "duration_s": 1800,
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(minutes=3),
        "seq": 7,
        "key_id": "k1",
    }
    fields.update(overrides)
    return StartCommandBody.model_validate(fields)


def stop_body(**overrides: object) -> StopCommandBody:
    fields: dict[str, object] = {
        "cmd_id": "stop-1",
        "run_id": "5e1b" * 8,
        "order_id": "0f" * 16,
        "reason": "guest_request",
        "issued_at": ISSUED,
        "expires_at": ISSUED + timedelta(minutes=3),
        "seq": 8,
        "key_id": "k1",
    }
    fields.update(overrides)
    return StopCommandBody.model_validate(fields)


# --- key derivation -----------------------------------------------------------


def test_hkdf_matches_rfc_5869_test_case_1() -> None:
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
        length=42,
    )

    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_hkdf_matches_rfc_5869_test_case_3_without_salt_or_info() -> None:
    okm = hkdf_sha256(bytes.fromhex("0b" * 22), salt=b"", info=b"", length=42)

    assert okm.hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )


def test_device_key_is_pinned() -> None:
    assert device_key(MASTER, "A-1", "k1") == KEY_A1


def test_device_key_differs_per_device_and_per_key_id() -> None:
    keys = {
        device_key(MASTER, "A-1", "k1"),
        device_key(MASTER, "A-2", "k1"),
        device_key(MASTER, "A-1", "k2"),
        device_key(MASTER + b"x", "A-1", "k1"),
    }

    assert len(keys) == 4
    assert {len(key) for key in keys} == {32}


@pytest.mark.parametrize(
    ("master", "code", "key_id", "message"),
    [
        (b"short", "A-1", "k1", "at least 16 bytes"),
        (MASTER, "A|1", "k1", "invalid device code"),
        (MASTER, "A-1", "k|1", "invalid key id"),
        (MASTER, "A-1", "", "invalid key id"),
    ],
)
def test_device_key_refuses_bad_inputs(master: bytes, code: str, key_id: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        device_key(master, code, key_id)


# --- canonical bytes and pinned signatures ------------------------------------


def test_start_command_canonical_bytes_and_signature_are_pinned() -> None:
    body = start_body()

    assert canonical_command_bytes(body, "A-1") == (
        b'{"cmd_id":"cmd-1","command":"start","device":"A-1","duration_s":1800,'
        b'"expires_at":"2025-03-01T08:03:00.000000Z","issued_at":"2025-03-01T08:00:00.000000Z",'
        b'"key_id":"k1","order_id":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","program":"massage-30",'
        b'"seq":7,"v":1}'
    )
    assert sign_command(body, KEY_A1, "A-1").sig == "gQFxMM-LNCMKruuTOKUKdfyxLAgcHI1np_mBuFkNiZE"


def test_stop_command_canonical_bytes_and_signature_are_pinned() -> None:
    body = stop_body()

    assert canonical_command_bytes(body, "A-1") == (
        b'{"cmd_id":"stop-1","command":"stop","device":"A-1",'
        b'"expires_at":"2025-03-01T08:03:00.000000Z","issued_at":"2025-03-01T08:00:00.000000Z",'
        b'"key_id":"k1","order_id":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","reason":"guest_request",'
        b'"run_id":"5e1b5e1b5e1b5e1b5e1b5e1b5e1b5e1b","seq":8}'
    )
    assert sign_command(body, KEY_A1, "A-1").sig == "hjvlKpz478rMTgv9078sk3RHGGS1UvLceQb9TdweXgY"


def test_signed_commands_verify_after_a_trip_over_the_wire() -> None:
    start = sign_command(start_body(), KEY_A1, "A-1")
    stop = sign_command(stop_body(), KEY_A1, "A-1")

    assert isinstance(start, StartCommand)
    assert isinstance(stop, StopCommand)
    assert verify_command(decode(StartCommand, encode(start)), KEY_A1, "A-1") is True
    assert verify_command(decode(StopCommand, encode(stop)), KEY_A1, "A-1") is True


def test_the_instant_is_signed_not_its_spelling() -> None:
    signed = sign_command(start_body(), KEY_A1, "A-1")
    beijing = timezone(timedelta(hours=8))
    respelled = signed.model_copy(
        update={
            "issued_at": ISSUED.astimezone(beijing),
            "expires_at": (ISSUED + timedelta(minutes=3)).astimezone(beijing),
        }
    )

    assert verify_command(respelled, KEY_A1, "A-1") is True


def test_signing_again_replaces_the_old_signature() -> None:
    signed = sign_command(start_body(), KEY_A1, "A-1")

    assert sign_command(signed, KEY_A1, "A-1") == signed


# --- tampering ----------------------------------------------------------------

LATER = ISSUED + timedelta(seconds=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cmd_id", "cmd-2"),
        ("order_id", "1f" * 16),
        ("program", "massage-60"),
        ("duration_s", 1801),
        ("issued_at", ISSUED - timedelta(microseconds=1)),
        ("expires_at", ISSUED + timedelta(minutes=3, microseconds=1)),
        ("seq", 8),
        ("key_id", "k2"),
    ],
)
def test_changing_any_start_field_breaks_the_signature(field: str, value: object) -> None:
    signed = sign_command(start_body(), KEY_A1, "A-1")

    tampered = signed.model_copy(update={field: value})

    assert verify_command(tampered, KEY_A1, "A-1") is False


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cmd_id", "stop-2"),
        ("run_id", "6e1b" * 8),
        ("order_id", "1f" * 16),
        ("reason", "admin"),
        ("issued_at", LATER),
        ("expires_at", ISSUED + timedelta(minutes=4)),
        ("seq", 9),
        ("key_id", "k2"),
    ],
)
def test_changing_any_stop_field_breaks_the_signature(field: str, value: object) -> None:
    signed = sign_command(stop_body(), KEY_A1, "A-1")

    tampered = signed.model_copy(update={field: value})

    assert verify_command(tampered, KEY_A1, "A-1") is False


def test_every_field_is_covered_by_the_tamper_tests() -> None:
    start_fields = set(StartCommand.model_fields) - {"sig", "v"}
    stop_fields = set(StopCommand.model_fields) - {"sig"}

    assert start_fields == {
        "cmd_id",
        "order_id",
        "program",
        "duration_s",
        "issued_at",
        "expires_at",
        "seq",
        "key_id",
    }
    assert stop_fields == {
        "cmd_id",
        "run_id",
        "order_id",
        "reason",
        "issued_at",
        "expires_at",
        "seq",
        "key_id",
    }


def test_a_command_for_one_device_is_not_valid_on_another_even_with_its_key() -> None:
    signed = sign_command(start_body(), KEY_A1, "A-1")

    assert verify_command(signed, KEY_A1, "A-2") is False
    assert verify_command(signed, device_key(MASTER, "A-2", "k1"), "A-2") is False


def test_the_wrong_key_or_a_mangled_signature_fails() -> None:
    signed = sign_command(start_body(), KEY_A1, "A-1")

    assert verify_command(signed, device_key(MASTER, "A-1", "k2"), "A-1") is False
    assert (
        verify_command(signed.model_copy(update={"sig": signed.sig[:-1]}), KEY_A1, "A-1") is False
    )
    assert verify_command(signed.model_copy(update={"sig": "ü" * 43}), KEY_A1, "A-1") is False


def test_a_start_signature_does_not_sign_a_stop() -> None:
    start = sign_command(start_body(), KEY_A1, "A-1")
    stop = sign_command(stop_body(), KEY_A1, "A-1")

    assert verify_command(stop.model_copy(update={"sig": start.sig}), KEY_A1, "A-1") is False


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        sign_command(start_body(), b"", "A-1")
