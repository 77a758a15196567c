"""`roompay demo` as a guest, the front desk and an operator would use it."""

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.server import free_port
from tests.support.waiting import wait_for


@contextmanager
def demo_process(data_dir: Path, port: int, *extra: str) -> Iterator[tuple[str, list[str]]]:
    """Run `roompay demo` until the block ends; yield its base URL and printed lines."""
    command = [
        sys.executable,
        "-m",
        "roompay",
        "demo",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--devices",
        "4",
        "--time-scale",
        "2000",
        *extra,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=os.environ.copy()
    )
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any(line.startswith("  admin login") for line in lines):
            line = process.stdout.readline()
            assert line or process.poll() is None, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            assert time.monotonic() < deadline, "demo did not print its URLs in time"
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(base), 30, "demo ready")
        yield base, lines
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        finally:
            process.stdout.close()
        assert code == 0, f"demo exited with {code}"


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _url(lines: list[str], label: str) -> str:
    match = next(
        re.search(r"(http://\S+)", line) for line in lines if line.strip().startswith(label)
    )
    assert match is not None
    return match.group(1)


def _pay_and_wait(http: httpx.Client, device: str) -> str:
    order = http.post(
        "/api/v1/checkout", json={"device": device, "program": "dry30", "wallet": "alipay"}
    ).json()
    assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
    wait_for(
        lambda: http.get(f"/api/v1/orders/{order['order_id']}").json()["status"] == "completed",
        30,
        "demo order completed",
    )
    return str(order["order_id"])


def test_demo_serves_everything_and_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    port = free_port()
    # Given a first start of the demo with a generated admin password
    with demo_process(data_dir, port) as (base, lines):
        password = re.search(r"admin login: admin / (\S+)", "".join(lines))
        assert password is not None
        panel, sticker, dashboard = (
            _url(lines, "panel"),
            _url(lines, "sticker"),
            _url(lines, "dashboard"),
        )
        with httpx.Client(base_url=base, timeout=10) as http:
            # Then its printed pages answer
            assert http.get(panel).status_code == 200
            assert http.get(sticker).status_code == 200
            assert http.get(dashboard).status_code == 303  # to the sign-in page
            # And a guest's purchase runs on a simulated appliance
            device = panel.rsplit("/", 1)[-1]
            order_id = _pay_and_wait(http, device)
            token = http.post(
                "/api/v1/auth/token", data={"username": "admin", "password": password.group(1)}
            )
            assert token.status_code == 200
    # When it starts again on the same directory
    with demo_process(data_dir, port) as (base, lines):
        # Then the password is not printed again, and the order and the login are still there
        assert "admin login: admin / (the password you set)" in "".join(lines)
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get(f"/api/v1/orders/{order_id}").json()["status"] == "completed"
            token = http.post(
                "/api/v1/auth/token", data={"username": "admin", "password": password.group(1)}
            )
            assert token.status_code == 200
            devices = http.get(
                "/api/v1/devices",
                headers={"Authorization": f"Bearer {token.json()['access_token']}"},
            ).json()
            assert sorted(d["kind"] for d in devices) == [
                "air_purifier",
                "aroma_diffuser",
                "clothes_dryer",
                "water_purifier",
            ]
            # And its appliances are online again, ready for the next guest
            _pay_and_wait(http, device)
