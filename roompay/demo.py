"""`roompay demo`: the whole product in one process on embedded defaults.

SQLite in the data directory, the embedded MQTT broker, the provider sandbox
mounted under /sandbox, a demo hotel and simulated appliances of all four kinds.
Starting again on the same directory keeps every order, key and credential.

The simulated appliances log in to the broker as real ones do, with their own
provisioned account; like a real IoT module, each keeps its password in its own
storage (`devices/credentials.json` in the data directory), never the server.
"""

import json
import logging
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import uvicorn

from roompay.device.agent import DeviceAgent
from roompay.device.relay import SimulatedRelay
from roompay.iot.credentials import verify_password
from roompay.payments import crypto
from roompay.payments.factory import build_providers
from roompay.protocol.signing import device_key
from roompay.runtime import Runtime
from roompay.sandbox.app import Sandbox
from roompay.services.auth import Role, create_user, hash_password
from roompay.services.provisioning import rotate_password
from roompay.services.seed import DemoData, ensure_demo
from roompay.settings import Settings
from roompay.store.db import transaction, upgrade
from roompay.store.models import Device, User
from roompay.web.app import create_app

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """The demo command's options."""

    host: str
    port: int
    data_dir: Path
    devices: int
    admin_password: str | None
    time_scale: float


def sandbox_merchant_settings(
    merchant_dir: Path, sandbox: Sandbox, base_url: str
) -> dict[str, Any]:
    """Our merchant keys and the sandbox's credentials for them, made once and kept.

    The keys are generated here as a merchant generates its own; the sandbox hands
    back what the real provider would (merchant ids, platform keys, APIv3 key).
    """
    merchant_dir.mkdir(parents=True, exist_ok=True)
    saved = merchant_dir / "credentials.json"
    if saved.exists():
        return dict(json.loads(saved.read_text()))
    wechat_key, alipay_key = crypto.generate_private_key(), crypto.generate_private_key()
    paths = {
        name: merchant_dir / f"{name}.pem"
        for name in ("wechat_merchant", "wechat_platform", "alipay_app", "alipay_public")
    }
    paths["wechat_merchant"].write_text(crypto.private_key_pem(wechat_key))
    paths["alipay_app"].write_text(crypto.private_key_pem(alipay_key))
    for path in (paths["wechat_merchant"], paths["alipay_app"]):
        path.chmod(0o600)
    wechat = sandbox.wechatpay.register_merchant(crypto.public_key_pem(wechat_key))
    alipay = sandbox.alipay.register_merchant(crypto.public_key_pem(alipay_key))
    paths["wechat_platform"].write_text(wechat["public_key_pem"])
    paths["alipay_public"].write_text(alipay["public_key_pem"])
    values = {
        "wechat_mchid": wechat["mchid"],
        "wechat_appid": wechat["appid"],
        "wechat_serial_no": wechat["serial_no"],
        "wechat_private_key_path": str(paths["wechat_merchant"]),
        "wechat_apiv3_key": wechat["apiv3_key"],
        "wechat_platform_public_key_path": str(paths["wechat_platform"]),
        "wechat_platform_public_key_id": wechat["public_key_id"],
        "wechat_base_url": f"{base_url}/sandbox/wechatpay",
        "alipay_app_id": alipay["app_id"],
        "alipay_seller_id": alipay["seller_id"],
        "alipay_private_key_path": str(paths["alipay_app"]),
        "alipay_public_key_path": str(paths["alipay_public"]),
        "alipay_gateway_url": f"{base_url}/sandbox/alipay/gateway.do",
    }
    saved.write_text(json.dumps(values, indent=2))
    saved.chmod(0o600)
    return values


def ensure_admin(runtime: Runtime, password: str | None) -> str | None:
    """Create the `admin` user once; return the password only when it was generated now."""
    with transaction(runtime.ctx.sessions) as session:
        admin = session.query(User).filter_by(username="admin").one_or_none()
        if admin is None:
            generated = password is None
            password = password or secrets.token_urlsafe(12)
            create_user(session, "admin", password, Role.ADMIN, None, runtime.clock.now())
            return password if generated else None
        if password is not None:
            admin.password_hash = hash_password(password)
        return None


def build_demo_runtime(
    options: DemoOptions, base: Settings | None = None, hold_notifies: bool = False
) -> Runtime:
    """Prepare the data directory, database, sandbox and runtime of the demo."""
    data_dir = options.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    base_url = f"http://{options.host}:{options.port}"
    settings = (base or Settings()).model_copy(
        update={
            "data_dir": data_dir,
            "public_base_url": base_url,
            "sandbox_enabled": True,
            "mqtt_url": "embedded",
        }
    )
    sandbox = Sandbox(
        data_dir / "sandbox", time_scale=settings.sandbox_time_scale, hold_notifies=hold_notifies
    )
    merchant = sandbox_merchant_settings(data_dir / "merchant", sandbox, base_url)
    settings = Settings.model_validate({**settings.model_dump(), **merchant})
    upgrade(settings.resolved_database_url)
    return Runtime(settings, build_providers(settings), sandbox=sandbox)


def device_passwords(runtime: Runtime, codes: list[str], store: Path) -> dict[str, str]:
    """The broker password of each simulated appliance, issued once and kept in `store`.

    A password the database no longer accepts (a device never provisioned, or rotated
    by `roompay device rotate-password` since) is issued anew.
    """
    saved: dict[str, str] = json.loads(store.read_text()) if store.exists() else {}
    with transaction(runtime.ctx.sessions) as session:
        for code in codes:
            device = session.query(Device).filter_by(code=code).one()
            known = saved.get(code)
            if (
                known is None
                or device.mqtt_username != code
                or device.mqtt_password_hash is None
                or not verify_password(known, device.mqtt_password_hash)
            ):
                saved[code] = rotate_password(session, code, runtime.clock.now()).mqtt_password
    store.write_text(json.dumps(saved, indent=2))
    store.chmod(0o600)
    return saved


def start_agents(runtime: Runtime, codes: list[str], time_scale: float) -> list[DeviceAgent]:
    """Connect one simulated appliance per device code to the runtime's broker.

    Each logs in with its own provisioned account; the broker is told about accounts
    issued here before the first agent connects.
    """
    journals = runtime.settings.data_dir / "devices"
    journals.mkdir(parents=True, exist_ok=True)
    passwords = device_passwords(runtime, codes, journals / "credentials.json")
    runtime.refresh_broker_accounts()
    broker = runtime.mqtt_endpoint()
    secret = runtime.settings.secret_key.encode()
    agents = []
    for code in codes:
        agent = DeviceAgent(
            code,
            replace(broker, username=code, password=passwords[code]),
            runtime.topics,
            SimulatedRelay(),
            device_key=device_key(secret, code, "k1"),
            key_id="k1",
            journal_path=journals / f"{code}.journal",
            time_scale=time_scale,
            progress_every_s=60.0,
            heartbeat_s=30.0,
        )
        agent.start()
        agents.append(agent)
    return agents


def run_demo(options: DemoOptions, echo: Any = print) -> None:
    """Run the demo until Ctrl-C."""
    runtime = build_demo_runtime(options)
    runtime.start()
    with transaction(runtime.ctx.sessions) as session:
        demo: DemoData = ensure_demo(session, options.devices)
    generated = ensure_admin(runtime, options.admin_password)
    agents = start_agents(runtime, demo.device_codes, options.time_scale)
    base = runtime.settings.public_base_url
    echo(f"roompay demo: {len(agents)} appliances in hotel '{demo.hotel_code}'")
    echo(f"  data       {options.data_dir.resolve()}")
    echo(f"  dashboard  {base}/dashboard")
    echo(f"  panel      {base}/panel/{demo.device_codes[0]}")
    echo(f"  sticker    {base}/d/{demo.device_codes[-1]}")
    echo(f"  API docs   {base}/docs")
    if generated is not None:
        echo(f"  admin login: admin / {generated}   (shown once; pass --admin-password to choose)")
    else:
        echo("  admin login: admin / (the password you set)")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(runtime, manage_runtime=False),
            host=options.host,
            port=options.port,
            log_config=None,
            access_log=False,
        )
    )
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; ours follows
    finally:
        for agent in agents:
            agent.stop()
        runtime.stop()
