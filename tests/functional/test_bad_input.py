"""Bad input on every endpoint: a 4xx in the contract's error shape, and nothing written."""

from typing import Any

import httpx
import pytest

from tests.support.server import Stack

Case = tuple[str, str, dict[str, Any], int, str | None]


def checkout_cases(device: str) -> list[Case]:
    """(method, path, request kwargs, status, error code) for the checkout endpoint."""
    good = {"device": device, "program": "dry30", "wallet": "wechat"}
    url = "/api/v1/checkout"
    return [
        ("POST", url, {"json": {**good, "device": "NOPE-1"}}, 404, "unknown_device"),
        ("POST", url, {"json": {**good, "program": "air8h"}}, 404, "unknown_program"),
        ("POST", url, {"json": {**good, "program": "nope"}}, 404, "unknown_program"),
        ("POST", url, {"json": {**good, "wallet": "paypal"}}, 422, "invalid_request"),
        ("POST", url, {"json": {**good, "device": 12}}, 422, "invalid_request"),
        ("POST", url, {"json": {**good, "program": None}}, 422, "invalid_request"),
        ("POST", url, {"json": {**good, "amount_fen": 1}}, 422, "invalid_request"),
        ("POST", url, {"json": {**good, "device": "../../etc"}}, 422, "invalid_request"),
        ("POST", url, {"json": ["not", "an", "object"]}, 422, "invalid_request"),
        ("POST", url, {"json": {}}, 422, "invalid_request"),
        ("POST", url, {"content": b"{not json", "headers": _json}, 400, "malformed_json"),
        ("POST", url, {"content": b"", "headers": _json}, 422, "invalid_request"),
        ("POST", url, {"data": good}, 422, "invalid_request"),
        ("POST", url, {"content": b"x" * 70_000, "headers": _json}, 413, "payload_too_large"),
        (
            "POST",
            url,
            {"json": good, "headers": {"Idempotency-Key": "k" * 256}},
            422,
            "invalid_request",
        ),
        ("GET", url, {}, 405, "method_not_allowed"),
    ]


_json = {"Content-Type": "application/json"}


def other_cases() -> list[Case]:
    """Every other endpoint with something wrong."""
    return [
        ("GET", "/api/v1/devices/NOPE-1/programs", {}, 404, "unknown_device"),
        ("GET", "/api/v1/orders/0123456789abcdef0123456789abcdef", {}, 404, "unknown_order"),
        ("GET", "/api/v1/orders/x/qr.svg", {}, 404, "unknown_order"),
        ("GET", "/api/v1/devices", {}, 401, "invalid_token"),
        (
            "GET",
            "/api/v1/devices",
            {"headers": {"Authorization": "Bearer abc.def"}},
            401,
            "invalid_token",
        ),
        (
            "POST",
            "/api/v1/auth/token",
            {"data": {"username": "admin", "password": "x"}},
            401,
            "bad_credentials",
        ),
        ("POST", "/api/v1/auth/token", {"data": {"username": "admin"}}, 422, "invalid_request"),
        (
            "POST",
            "/api/v1/auth/token",
            {"json": {"username": "a", "password": "b"}},
            422,
            "invalid_request",
        ),
        (
            "POST",
            "/sandbox/pay",
            {"json": {"qr": "weixin://wxpay/bizpayurl?pr=unknown"}},
            404,
            "unknown_qr",
        ),
        ("POST", "/sandbox/pay", {"json": {"qr": ""}}, 422, "invalid_request"),
        ("POST", "/sandbox/pay", {"content": b"][", "headers": _json}, 400, "malformed_json"),
        ("GET", "/panel/NOPE-1", {}, 404, "unknown_device"),
        ("GET", "/no/such/route", {}, 404, "not_found"),
        ("POST", "/api/v1/notify/wechatpay", {"content": b"{}", "headers": _json}, 400, None),
        ("POST", "/api/v1/notify/wechatpay", {"content": b"\xff\x00garbage"}, 400, None),
        (
            "POST",
            "/api/v1/notify/alipay",
            {"data": {"out_trade_no": "x", "total_amount": "1.00"}},
            400,
            None,
        ),
        ("POST", "/api/v1/notify/alipay", {"content": b"%%%=&&"}, 400, None),
        ("POST", "/api/v1/notify/alipay", {"content": b"x" * 70_000}, 413, "payload_too_large"),
    ]


def _send(http: httpx.Client, case: Case) -> httpx.Response:
    method, path, kwargs, _status, _code = case
    return http.request(method, path, **kwargs)


def test_every_bad_request_gets_a_clear_4xx_and_changes_nothing(stack: Stack) -> None:
    # Given a hotel with devices and an empty order book
    device = stack.device_codes[0]
    before = stack.table_counts()
    cases = checkout_cases(device) + other_cases()
    with stack.client() as http:
        for case in cases:
            # When a bad request arrives
            response = _send(http, case)
            method, path, _kwargs, status, code = case
            # Then it is refused with the expected status and, for our API, the error shape
            assert response.status_code == status, (method, path, response.text)
            if code is not None:
                error = response.json()["error"]
                assert error["code"] == code, (method, path, error)
                assert error["message"]
    # And nothing at all was written
    assert stack.table_counts() == before


def test_checkout_on_an_offline_appliance_is_refused_without_an_order(stack: Stack) -> None:
    # Given a device that never connected
    before = stack.table_counts()
    with stack.client() as http:
        response = http.post(
            "/api/v1/checkout",
            json={"device": stack.device_codes[0], "program": "dry30", "wallet": "alipay"},
        )
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "device_offline"
    assert stack.table_counts() == before


@pytest.mark.parametrize("path", ["/api/v1/checkout", "/api/v1/notify/wechatpay"])
def test_a_body_larger_than_declared_is_cut_off(stack: Stack, path: str) -> None:
    # A chunked body has no Content-Length: the limit must hold while streaming too.
    before = stack.table_counts()

    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 4096

    with stack.client() as http:
        response = http.post(path, content=chunks(), headers=_json)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert stack.table_counts() == before
