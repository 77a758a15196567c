"""Fleet commands: provision devices and write the Mosquitto configuration.

    roompay device add --hotel CODE --kind KIND [--room N] [--code CODE] [--json]
    roompay device rotate-password --code CODE [--json]
    roompay broker mosquitto-config --dir DIR [--host H] [--port P] [--topic-root R]

`register(app, device_app)` adds them to the main command line. Every command reads
the database from `ROOMPAY_DATABASE_URL` (roompay.settings) and writes nothing when it
fails.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

SHOWN_ONCE = (
    "These credentials are shown once: the server keeps only a hash of the password. "
    "Store them on the device now."
)
T = TypeVar("T")

broker_app = typer.Typer(help="MQTT broker configuration.", no_args_is_help=True)


def register(app: typer.Typer, device_app: typer.Typer) -> None:
    """Add `device add`, `device rotate-password` and the `broker` group to the CLI."""
    device_app.command("add")(device_add)
    device_app.command("rotate-password")(device_rotate_password)
    app.add_typer(broker_app, name="broker")


def device_add(
    hotel: Annotated[str, typer.Option(help="Code of the hotel the device is placed in.")],
    kind: Annotated[str, typer.Option(help="Appliance kind, e.g. clothes_dryer.")],
    room: Annotated[str | None, typer.Option(help="Room number within the hotel.")] = None,
    code: Annotated[
        str | None, typer.Option(help="Device code [A-Za-z0-9_-]{1,64}; generated if left out.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Place a new device and print its MQTT credentials (shown once)."""
    from roompay.clock import SystemClock  # noqa: PLC0415 - keeps `--help` fast
    from roompay.services.provisioning import add_device  # noqa: PLC0415

    now = SystemClock().now()
    placed = _in_transaction(lambda session: add_device(session, hotel, kind, room, code, now))
    credentials = placed.credentials
    record = {
        "code": placed.code,
        "hotel": placed.hotel_code,
        "kind": placed.kind.value,
        "room": placed.room,
        "mqtt_username": credentials.mqtt_username,
        "mqtt_password": credentials.mqtt_password,
        "key_id": credentials.key_id,
        "command_key_hex": _command_key_hex(placed.code, credentials.key_id),
    }
    if as_json:
        typer.echo(json.dumps(record))
        typer.echo(SHOWN_ONCE, err=True)
        return
    where = f"hotel {placed.hotel_code}" + (f", room {placed.room}" if placed.room else "")
    typer.echo(f"device {placed.code} ({placed.kind.value}) placed in {where}")
    _echo_credentials(
        credentials.mqtt_username,
        credentials.mqtt_password,
        credentials.key_id,
        str(record["command_key_hex"]),
    )


def _command_key_hex(code: str, key_id: str) -> str:
    """The key the device verifies its commands with, derived from the server's secret."""
    from roompay.protocol.signing import device_key  # noqa: PLC0415
    from roompay.settings import Settings  # noqa: PLC0415

    return device_key(Settings().secret_key.encode(), code, key_id).hex()


def device_rotate_password(
    code: Annotated[str, typer.Option(help="The device code.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Issue a new MQTT password for a device (shown once); regenerate the broker files."""
    from roompay.clock import SystemClock  # noqa: PLC0415
    from roompay.services.provisioning import rotate_password  # noqa: PLC0415

    now = SystemClock().now()
    credentials = _in_transaction(lambda session: rotate_password(session, code, now))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "code": code,
                    "mqtt_username": credentials.mqtt_username,
                    "mqtt_password": credentials.mqtt_password,
                    "key_id": credentials.key_id,
                }
            )
        )
        typer.echo(SHOWN_ONCE, err=True)
        return
    _echo_credentials(credentials.mqtt_username, credentials.mqtt_password, credentials.key_id)
    typer.echo("The old password works until the broker's files are regenerated and reloaded.")


@broker_app.command("mosquitto-config")
def broker_mosquitto_config(
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory for mosquitto.conf, passwd, acl and data/.")
    ],
    host: Annotated[str, typer.Option(help="Address the listener binds.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Listener port.")] = 1883,
    topic_root: Annotated[str, typer.Option(help="Topic root, as the server's.")] = "roompay/v1",
    run_as: Annotated[
        str | None,
        typer.Option(
            help="Write `user NAME` into the config; without it, Mosquitto started as root "
            "drops to the user `mosquitto`."
        ),
    ] = None,
    device_reads_own_state: Annotated[
        bool, typer.Option(help="Let each device read its own retained state.")
    ] = False,
) -> None:
    """Write a Mosquitto 2.0 configuration from the database: every device, own topics only."""
    from roompay.iot.credentials import CredentialError  # noqa: PLC0415
    from roompay.iot.mosquitto import MosquittoOptions, write_config  # noqa: PLC0415
    from roompay.protocol.errors import InvalidTopicError  # noqa: PLC0415
    from roompay.services.provisioning import backend_account, device_accounts  # noqa: PLC0415
    from roompay.settings import Settings  # noqa: PLC0415

    try:
        options = MosquittoOptions(host, port, topic_root, run_as, device_reads_own_state)
    except (ValueError, InvalidTopicError) as exc:
        _fail(str(exc))
    backend = _or_fail(lambda: backend_account(Settings().mqtt_url))
    accounts = _in_transaction(device_accounts)
    try:
        files = write_config(directory, backend, accounts.accounts, options)
    except CredentialError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {directory}: {exc}")
    typer.echo(
        f"wrote {files.config}, {files.password_file.name} and {files.acl_file.name} "
        f"({len(accounts.accounts)} devices and `{backend.username}`)"
    )
    if accounts.without_credentials:
        typer.echo(
            f"{len(accounts.without_credentials)} devices have no credentials and cannot log in "
            f"({', '.join(accounts.without_credentials)}); "
            "issue them with `roompay device rotate-password --code CODE`",
            err=True,
        )
    typer.echo(f"start the broker:  {' '.join(files.command())}")
    typer.echo("after regenerating, reload a running broker with SIGHUP (kill -HUP <pid>)")


def _echo_credentials(
    username: str, password: str, key_id: str, key_hex: str | None = None
) -> None:
    typer.echo(f"MQTT username:  {username}")
    typer.echo(f"MQTT password:  {password}")
    typer.echo(f"command key id: {key_id}")
    if key_hex is not None:
        typer.echo(f"command key:    {key_hex}")
    typer.echo(SHOWN_ONCE)


def _in_transaction(work: "Callable[[Session], T]") -> T:
    """Run `work(session)` in one transaction; a refusal rolls back and exits non-zero."""
    from roompay.settings import Settings  # noqa: PLC0415
    from roompay.store.db import make_engine, session_factory, transaction  # noqa: PLC0415

    engine = make_engine(Settings().resolved_database_url, pool_size=1)
    try:
        sessions = session_factory(engine)

        def run() -> T:
            with transaction(sessions) as session:
                return work(session)

        return _or_fail(run)
    finally:
        engine.dispose()


def _or_fail(action: Callable[[], T]) -> T:
    from sqlalchemy.exc import SQLAlchemyError  # noqa: PLC0415

    from roompay.services.errors import ServiceError  # noqa: PLC0415

    try:
        return action()
    except ServiceError as exc:
        _fail(f"{exc.message} ({exc.code})")
    except SQLAlchemyError as exc:
        _fail(f"database error ({exc.__class__.__name__}); is it migrated? (roompay db upgrade)")


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=1)
