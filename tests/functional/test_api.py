"""The JSON API and operations endpoints through the real app."""

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from roompay.domain.catalog import Wallet
from roompay.services.auth import Role, create_user
from roompay.services.checkout import CheckoutRequest, _create_order
from roompay.services.seed import create_hotel, ensure_operator, place_devices
from roompay.store.db import transaction
from tests.support.devices import device_agents
from tests.support.server import Stack, running_stack


def _user(stack: Stack, username: str, role: Role, hotel_id: int | None) -> None:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, "correct horse", role, hotel_id, stack.runtime.clock.now())


def _token(stack: Stack, username: str) -> str:
    with stack.client() as http:
        response = http.post(
            "/api/v1/auth/token", data={"username": username, "password": "correct horse"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    return str(body["access_token"])


def test_health_readiness_and_metrics(stack: Stack) -> None:
    with stack.client() as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        metrics = http.get("/metrics")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "checks": {"database": "ok", "broker": "ok"}}
    assert metrics.status_code == 200
    assert "roompay_devices_connected 0.0" in metrics.text
    assert "# TYPE roompay_notify_seconds histogram" in metrics.text
    assert "# TYPE roompay_command_seconds histogram" in metrics.text


def test_metrics_with_a_configured_token_need_it(
    tmp_path: Path, keys_dir: Path, backend_urls: tuple[str, str]
) -> None:
    # Given a server whose metrics are behind a token
    database_url, mqtt_url = backend_urls
    token = "prometheus-scrape-token"
    with (
        running_stack(
            tmp_path, keys_dir, database_url, mqtt_url, with_workers=False, metrics_token=token
        ) as quiet,
        quiet.client() as http,
    ):
        # When it is scraped without the token, with a wrong one, and with the right one
        anonymous = http.get("/metrics")
        wrong = http.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
        right = http.get("/metrics", headers={"Authorization": f"Bearer {token}"})

    # Then only the right token sees the figures
    assert anonymous.status_code == 401
    assert anonymous.json() == {
        "error": {"code": "unauthorized", "message": "/metrics needs the metrics bearer token"}
    }
    assert wrong.status_code == 401
    assert "roompay_" not in wrong.text
    assert right.status_code == 200
    assert "# TYPE roompay_notify_seconds histogram" in right.text


def test_openapi_is_published(stack: Stack) -> None:
    with stack.client() as http:
        spec = http.get("/openapi.json").json()
    for path in (
        "/api/v1/auth/token",
        "/api/v1/devices",
        "/api/v1/devices/{code}/programs",
        "/api/v1/checkout",
        "/api/v1/orders/{order_id}",
        "/api/v1/notify/wechatpay",
        "/api/v1/notify/alipay",
    ):
        assert path in spec["paths"], path


def test_programs_are_the_hotels_prices_for_the_device_kind(stack: Stack) -> None:
    with stack.client() as http:
        dryer = http.get(f"/api/v1/devices/{stack.device_codes[0]}/programs").json()
        diffuser = http.get(f"/api/v1/devices/{stack.device_codes[3]}/programs").json()
    assert dryer == [
        {"code": "dry30", "name": "Dry 30 min", "duration_s": 1800, "amount_fen": 800},
        {"code": "dry60", "name": "Dry 60 min", "duration_s": 3600, "amount_fen": 1500},
    ]
    assert [p["code"] for p in diffuser] == ["aroma1h", "aroma3h"]


def test_staff_see_only_their_hotels_devices_and_the_operator_sees_all(stack: Stack) -> None:
    # Given a second hotel with its own device and a manager for each side
    with transaction(stack.runtime.ctx.sessions) as session:
        operator = ensure_operator(session, "op", "Test Operator")
        other = create_hotel(session, operator, "other", "Other Hotel", rooms=2)
        other_codes = place_devices(session, other, 1, code_prefix="OTH")
        other_id = other.id
    _user(stack, "root", Role.ADMIN, None)
    _user(stack, "other-manager", Role.MANAGER, other_id)
    with stack.client() as http:
        everyone = http.get(
            "/api/v1/devices", headers={"Authorization": f"Bearer {_token(stack, 'root')}"}
        ).json()
        theirs = http.get(
            "/api/v1/devices",
            headers={"Authorization": f"Bearer {_token(stack, 'other-manager')}"},
        ).json()
    assert sorted(d["code"] for d in everyone) == sorted(stack.device_codes + other_codes)
    assert theirs == [
        {
            "code": other_codes[0],
            "kind": "clothes_dryer",
            "hotel": "other",
            "room": "101",
            "online": False,
            "state": "idle",
        }
    ]


def test_the_same_idempotency_key_returns_the_same_order_even_concurrently(stack: Stack) -> None:
    device = stack.device_codes[1]
    request = {"device": device, "program": "air8h", "wallet": "wechat"}
    with device_agents(stack, [device]), stack.client() as http:

        def post(_: int) -> tuple[int, str]:
            response = http.post(
                "/api/v1/checkout", json=request, headers={"Idempotency-Key": "panel-attempt-1"}
            )
            return response.status_code, response.text

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(16)))
        created = [text for status, text in answers if status == 201]
        reused = http.post(
            "/api/v1/checkout",
            json={**request, "wallet": "alipay"},
            headers={"Idempotency-Key": "panel-attempt-1"},
        )
    # Every answer is the one order with its one QR code
    assert len(created) == 16
    assert len(set(created)) == 1
    assert stack.table_counts()["orders"] == 1
    # And the key cannot be reused for a different checkout
    assert reused.status_code == 422
    assert reused.json()["error"]["code"] == "idempotency_key_reused"


def test_a_retry_after_a_crash_before_the_provider_call_issues_the_qr(stack: Stack) -> None:
    # Given a checkout whose server died right after storing the order, before any QR
    device = stack.device_codes[1]
    request = CheckoutRequest(device, "air8h", Wallet.WECHAT, idempotency_key="panel-7")
    with device_agents(stack, [device]), stack.client() as http:
        half_made, created = _create_order(stack.runtime.ctx, request)
        assert created
        assert half_made.qr_content is None

        # When the panel retries with the same key
        retry = http.post(
            "/api/v1/checkout",
            json={"device": device, "program": "air8h", "wallet": "wechat"},
            headers={"Idempotency-Key": "panel-7"},
        )
        again = http.post(
            "/api/v1/checkout",
            json={"device": device, "program": "air8h", "wallet": "wechat"},
            headers={"Idempotency-Key": "panel-7"},
        )
        order = http.get(f"/api/v1/orders/{half_made.id}").json()

    # Then the same order gets its QR code, once, and the replay shows the same one
    assert retry.status_code == 201, retry.text
    assert retry.json()["order_id"] == half_made.id
    assert retry.json()["qr"].startswith("weixin://")
    assert again.json() == retry.json()
    assert order["status"] == "awaiting_payment"
    assert stack.table_counts()["orders"] == 1


def test_a_retry_of_a_checkout_the_provider_refused_says_to_start_again(stack: Stack) -> None:
    # Given a checkout the provider refused
    device = stack.device_codes[1]
    body = {"device": device, "program": "air8h", "wallet": "wechat"}
    with device_agents(stack, [device]), stack.client() as http:
        armed = http.post(
            "/sandbox/faults",
            json={"provider": "wechatpay", "operation": "native", "kind": "system_error"},
        )
        assert armed.status_code == 204
        refused = http.post("/api/v1/checkout", json=body, headers={"Idempotency-Key": "p-8"})
        counts = stack.table_counts()

        # When the panel retries with the same key
        retry = http.post("/api/v1/checkout", json=body, headers={"Idempotency-Key": "p-8"})

    # Then it is told clearly, and nothing changes
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "provider_unavailable"
    assert retry.status_code == 409
    assert retry.json() == {
        "error": {
            "code": "checkout_failed",
            "message": "this checkout could not be completed; please start a new one",
        }
    }
    assert stack.table_counts() == counts


def test_panel_page_shows_programs_wallets_and_the_devices_state(stack: Stack) -> None:
    device = stack.device_codes[0]
    with stack.client() as http:
        offline = http.get(f"/panel/{device}?lang=en")
        with device_agents(stack, [device]):
            online = http.get(f"/panel/{device}", headers={"Accept-Language": "zh-CN"})
    assert offline.status_code == 200
    assert "This appliance is offline" in offline.text
    assert 'id="choose" class="hidden"' in offline.text
    assert online.status_code == 200
    assert "干衣机" in online.text
    assert "¥8.00" in online.text
    assert "¥15.00" in online.text
    assert "微信支付" in online.text
    assert "支付宝" in online.text
    assert 'id="choose" class=""' in online.text
