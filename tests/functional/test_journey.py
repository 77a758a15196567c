"""The scan-to-run journey through real HTTP, the sandbox, real MQTT and a device process."""

from typing import Any

import httpx
import pytest

from roompay.services.timeline import order_timeline
from tests.support.devices import device_process
from tests.support.server import Stack
from tests.support.timeline import PAID_RUN_STEPS
from tests.support.waiting import wait_for

QR_PREFIX = {"wechat": "weixin://wxpay/bizpayurl?pr=", "alipay": "https://qr.alipay.com/"}


def order_in(http: httpx.Client, order_id: str, status: str) -> dict[str, Any] | None:
    """The order if it has reached `status`, else None."""
    body: dict[str, Any] = http.get(f"/api/v1/orders/{order_id}").json()
    return body if body["status"] == status else None


@pytest.mark.parametrize("wallet", ["wechat", "alipay"])
def test_guest_pays_by_qr_and_the_appliance_runs_to_completion(stack: Stack, wallet: str) -> None:
    # Given a clothes dryer whose IoT module runs as its own process
    dryer = stack.device_codes[0]
    with device_process(stack, dryer), stack.client() as http:
        # When the guest picks the 30-minute program and a wallet on the panel
        created = http.post(
            "/api/v1/checkout", json={"device": dryer, "program": "dry30", "wallet": wallet}
        )
        assert created.status_code == 201, created.text
        order = created.json()
        assert order["status"] == "awaiting_payment"
        assert order["amount_fen"] == 800
        assert order["wallet"] == wallet
        assert order["qr"].startswith(QR_PREFIX[wallet])
        assert len(order["order_id"]) == 32

        # And scans the QR code and pays
        paid = http.post("/sandbox/pay", json={"qr": order["qr"]})
        assert paid.status_code == 200, paid.text

        # Then the provider's signed notify pays the order, the device starts and completes
        done = wait_for(lambda: order_in(http, order["order_id"], "completed"), 20, "completion")

    assert done["actual_run_s"] == 1800
    assert done["paid_at"] is not None
    assert done["started_at"] is not None
    assert done["ended_at"] is not None
    with stack.runtime.ctx.sessions() as session:
        steps = [e.event for e in order_timeline(session, order["order_id"])]
    assert steps == PAID_RUN_STEPS
