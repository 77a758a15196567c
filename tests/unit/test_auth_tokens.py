"""Bearer tokens, hotel scopes and password hashes: the pure half of `services.auth`."""

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from hypothesis import given
from hypothesis import strategies as st

from roompay.services.auth import Principal, Role, hash_password, issue_token, read_token
from roompay.services.errors import ErrorKind, ServiceError

SECRET = "s" * 40
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL_S = 3600
MANAGER = Principal(user_id=7, username="lin.wei", role=Role.MANAGER, hotel_id=3)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def assert_refused(token: str, secret: str = SECRET, now: datetime = NOW) -> None:
    with pytest.raises(ServiceError) as caught:
        read_token(token, secret, now)
    assert caught.value.kind is ErrorKind.UNAUTHORIZED
    assert caught.value.code == "invalid_token"
    assert caught.value.message == "missing, invalid or expired token"


# --- round trip and expiry ------------------------------------------------------


@pytest.mark.parametrize(
    "principal",
    [
        Principal(1, "admin", Role.ADMIN, None),
        MANAGER,
        Principal(8, "desk-1", Role.FRONT_DESK, 3),
        Principal(9, "技术员", Role.TECHNICIAN, 12),
    ],
    ids=lambda p: p.role.value,
)
def test_a_token_read_back_gives_exactly_the_principal_it_was_issued_for(
    principal: Principal,
) -> None:
    token = issue_token(principal, SECRET, NOW, TTL_S)

    assert read_token(token, SECRET, NOW) == principal


def test_a_token_carries_exactly_these_claims() -> None:
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)

    body, _, _mac = token.partition(".")
    assert json.loads(unb64(body)) == {
        "uid": 7,
        "sub": "lin.wei",
        "role": "manager",
        "hotel": 3,
        "exp": int(NOW.timestamp()) + TTL_S,
    }


def test_a_token_one_second_before_expiry_is_accepted() -> None:
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)

    assert read_token(token, SECRET, NOW + timedelta(seconds=TTL_S - 1)) == MANAGER


def test_a_token_read_exactly_at_expiry_is_refused() -> None:
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)

    assert_refused(token, now=NOW + timedelta(seconds=TTL_S))


def test_a_token_read_after_expiry_is_refused() -> None:
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)

    assert_refused(token, now=NOW + timedelta(days=1))


# --- tampering ------------------------------------------------------------------


def test_a_token_whose_body_was_changed_is_refused() -> None:
    # Given a manager's token whose claims are rewritten to make them an admin
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)
    body, _, mac = token.partition(".")
    claims = json.loads(unb64(body))
    forged = b64(json.dumps({**claims, "role": "admin"}, separators=(",", ":")).encode())

    # When it is read, then it is refused
    assert_refused(f"{forged}.{mac}")


def test_a_token_whose_mac_was_changed_is_refused() -> None:
    # Given a token whose MAC has one bit flipped (base64 text edits may only touch padding bits)
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)
    body, _, mac = token.partition(".")
    raw = bytearray(unb64(mac))
    raw[0] ^= 0x01

    # When it is read, then it is refused
    assert_refused(f"{body}.{b64(bytes(raw))}")


def test_a_token_with_its_mac_cut_off_is_refused() -> None:
    token = issue_token(MANAGER, SECRET, NOW, TTL_S)
    body, _, _mac = token.partition(".")

    assert_refused(body)
    assert_refused(f"{body}.")


def test_a_token_issued_under_another_secret_is_refused() -> None:
    token = issue_token(MANAGER, "another-secret-" + "x" * 30, NOW, TTL_S)

    assert_refused(token)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param({"uid": 7, "sub": "x", "role": "manager", "hotel": 3}, id="no-exp"),
        pytest.param(
            {"uid": 7, "sub": "x", "role": "owner", "hotel": 3, "exp": 2**40}, id="unknown-role"
        ),
        pytest.param(
            {"uid": "seven", "sub": "x", "role": "manager", "hotel": 3, "exp": 2**40},
            id="uid-not-a-number",
        ),
        pytest.param([1, 2, 3], id="not-an-object"),
    ],
)
def test_a_correctly_signed_token_with_bad_claims_is_refused(claims: object) -> None:
    # Given a body signed with our secret but not written by issue_token
    body = b64(json.dumps(claims).encode())
    mac = hmac.new(SECRET.encode(), body.encode(), hashlib.sha256).digest()

    assert_refused(f"{body}.{b64(mac)}")


@pytest.mark.parametrize("token", ["", ".", "..", "a.b", "not a token", "é.ü", "Bearer x.y"])
def test_garbage_tokens_are_refused(token: str) -> None:
    assert_refused(token)


@given(token=st.text())
def test_any_text_is_refused_as_a_token(token: str) -> None:
    assert_refused(token)


@given(body=st.text(alphabet=st.characters(codec="ascii")), mac=st.text())
def test_any_two_dotted_parts_are_refused_as_a_token(body: str, mac: str) -> None:
    assert_refused(f"{body}.{mac}")


# --- scopes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("principal", "scope"),
    [
        (Principal(1, "op", Role.ADMIN, None), None),
        (Principal(1, "op", Role.ADMIN, 3), None),
        (Principal(2, "mgr", Role.MANAGER, 3), 3),
        (Principal(3, "desk", Role.FRONT_DESK, 4), 4),
        (Principal(4, "tech", Role.TECHNICIAN, 5), 5),
    ],
    ids=["admin", "admin-with-hotel", "manager", "front-desk", "technician"],
)
def test_hotel_scope_is_none_for_admins_and_the_own_hotel_for_others(
    principal: Principal, scope: int | None
) -> None:
    assert principal.hotel_scope() == scope


def test_hotel_scope_of_a_principal_read_from_a_token_keeps_its_role() -> None:
    admin = Principal(1, "op", Role.ADMIN, 3)

    read = read_token(issue_token(admin, SECRET, NOW, TTL_S), SECRET, NOW)

    assert read.hotel_scope() is None


# --- password hashes ------------------------------------------------------------


def test_hash_password_makes_an_argon2id_hash_that_verifies() -> None:
    hashed = hash_password("correct horse 电池 staple")

    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "correct horse 电池 staple") is True
    with pytest.raises(VerifyMismatchError):
        PasswordHasher().verify(hashed, "correct horse 电池 stapler")


def test_hash_password_twice_gives_two_different_hashes() -> None:
    first = hash_password("same password")
    second = hash_password("same password")

    assert first != second
    assert PasswordHasher().verify(second, "same password") is True
