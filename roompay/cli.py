"""The `roompay` command line."""

import gc
import json
from pathlib import Path
from typing import Annotated

import typer
import uvicorn

from roompay.cli_fleet import register as register_fleet_commands
from roompay.cli_money import register as register_money
from roompay.logs import configure_logging
from roompay.simulate import register as register_simulate

app = typer.Typer(
    help="roompay: pay-per-use platform for in-room hotel appliances.", no_args_is_help=True
)
db_app = typer.Typer(help="Database tasks.", no_args_is_help=True)
device_app = typer.Typer(help="Appliance IoT modules.", no_args_is_help=True)
app.add_typer(db_app, name="db")
bench_app = typer.Typer(
    help="Performance figures measured on this machine.", invoke_without_command=True
)
app.add_typer(device_app, name="device")
app.add_typer(bench_app, name="bench")
register_fleet_commands(app, device_app)
register_money(app)
register_simulate(app)


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where the demo keeps its data.")] = Path(
        "roompay-data"
    ),
    devices: Annotated[int, typer.Option(min=1, max=500, help="Simulated appliances.")] = 8,
    admin_password: Annotated[
        str | None, typer.Option(help="Password of the `admin` user.")
    ] = None,
    time_scale: Annotated[
        float, typer.Option(min=1.0, max=10000.0, help="Appliance seconds per real second.")
    ] = 60.0,
) -> None:
    """Run everything in one process: server, sandbox, embedded broker, appliances."""
    from roompay.demo import DemoOptions, run_demo  # noqa: PLC0415 - keeps `--help` fast

    configure_logging()
    run_demo(
        DemoOptions(host, port, data_dir, devices, admin_password, time_scale), echo=typer.echo
    )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8000,
) -> None:
    """Run the server alone, configured by ROOMPAY_* environment variables."""
    from roompay.payments.factory import build_providers  # noqa: PLC0415
    from roompay.runtime import Runtime  # noqa: PLC0415
    from roompay.sandbox.app import Sandbox  # noqa: PLC0415
    from roompay.settings import Settings  # noqa: PLC0415
    from roompay.web.app import create_app  # noqa: PLC0415

    configure_logging()
    settings = Settings()
    sandbox = (
        Sandbox(settings.data_dir / "sandbox", time_scale=settings.sandbox_time_scale)
        if settings.sandbox_enabled
        else None
    )
    runtime = Runtime(settings, build_providers(settings), sandbox=sandbox)
    app = create_app(runtime)
    # What is loaded by now lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise stop every thread for 100 ms and more
    # while a guest waits for the appliance (docs/performance.md).
    gc.freeze()
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)


@app.command()
def sandbox(
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8100,
    state_dir: Annotated[Path, typer.Option(help="Where the sandbox keeps its keys.")] = Path(
        "roompay-data/sandbox"
    ),
    time_scale: Annotated[float, typer.Option(min=0.001, help="Notify retry speed-up.")] = 1.0,
) -> None:
    """Run the provider sandbox alone (WeChat Pay v3 and Alipay emulators)."""
    from roompay.sandbox.app import create_sandbox_app  # noqa: PLC0415
    from roompay.settings import Settings  # noqa: PLC0415

    configure_logging()
    if Settings().is_production:
        raise typer.BadParameter("the sandbox refuses to run in production mode")
    uvicorn.run(create_sandbox_app(state_dir, time_scale), host=host, port=port, log_config=None)


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the database migrations (ROOMPAY_DATABASE_URL, default SQLite in the data dir)."""
    from roompay.settings import Settings  # noqa: PLC0415
    from roompay.store.db import upgrade  # noqa: PLC0415

    settings = Settings()
    upgrade(settings.resolved_database_url)
    typer.echo("database is up to date")


@device_app.command("run")
def device_run(
    code: Annotated[str, typer.Option(help="The device code, [A-Za-z0-9_-]{1,64}.")],
    key_hex: Annotated[str, typer.Option(help="The command key printed by `device add` (hex).")],
    key_id: Annotated[str, typer.Option(help="The command key's id.")] = "k1",
    mqtt_url: Annotated[
        str, typer.Option(help="mqtt://[user:pass@]host[:port]")
    ] = "mqtt://127.0.0.1:1883",
    topic_root: Annotated[str, typer.Option(help="Topic root, as the server's.")] = "roompay/v1",
    journal: Annotated[
        Path | None, typer.Option(help="The device's durable journal (SQLite file).")
    ] = None,
    time_scale: Annotated[
        float, typer.Option(min=0.001, help="Appliance seconds per real second.")
    ] = 1.0,
    progress_every_s: Annotated[
        float, typer.Option(min=0.001, help="Progress report interval (appliance s).")
    ] = 60.0,
) -> None:
    """Run one appliance's IoT module (simulated relay) until Ctrl-C."""
    from roompay.device.agent import main  # noqa: PLC0415

    try:
        key = bytes.fromhex(key_hex)
    except ValueError as exc:
        raise typer.BadParameter("the key must be hexadecimal") from exc
    configure_logging()
    try:
        main(
            code,
            mqtt_url,
            topic_root,
            time_scale,
            progress_every_s,
            device_key=key,
            key_id=key_id,
            journal_path=journal,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


@bench_app.callback()
def bench(
    ctx: typer.Context,
    quick: Annotated[
        bool, typer.Option(help="1,000 appliances and fewer orders: under 3 minutes.")
    ] = False,
    smoke: Annotated[bool, typer.Option(help="The smallest sizes, to check it runs.")] = False,
    embedded: Annotated[
        bool, typer.Option(help="SQLite and the embedded broker instead of the services.")
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures here.")
    ] = None,
    postgres_url: Annotated[
        str, typer.Option(help="PostgreSQL server; a scratch database is made next to this one.")
    ] = "postgresql://postgres@127.0.0.1:5432/test",
    mqtt_url: Annotated[
        str,
        typer.Option(
            help="Mosquitto to use, e.g. mqtt://127.0.0.1:1883; `own` starts one configured"
            " as in production (TCP_NODELAY)."
        ),
    ] = "own",
    profile: Annotated[
        Path | None,
        typer.Option(
            help="Record the server with py-spy during roompay at c=16 (raw stacks of the"
            " thread holding the GIL)."
        ),
    ] = None,
) -> None:
    """The whole suite: pay -> start, checkout, fleet and feed, with the bare baseline."""
    if ctx.invoked_subcommand is not None:
        return
    from roompay.bench import FULL, QUICK, SMOKE, BenchOptions, run_suite  # noqa: PLC0415
    from roompay.bench.report import print_report, write_json  # noqa: PLC0415

    configure_logging("WARNING")
    sizes = SMOKE if smoke else QUICK if quick else FULL
    options = BenchOptions(
        sizes=sizes,
        embedded=embedded,
        postgres_url=postgres_url,
        mqtt_url=mqtt_url,
        profile=profile,
        log=lambda message: typer.echo(f"bench: {message}", err=True),
    )
    results = run_suite(options)
    print_report(results)
    if json_file is not None:
        write_json(results, json_file)


@bench_app.command("journey")
def bench_journey(
    count: Annotated[int, typer.Option(min=1, max=1000, help="Journeys to run.")] = 20,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures here.")
    ] = None,
) -> None:
    """Scan-to-run latency in the demo setup: sandbox pay -> paid -> appliance started."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from roompay.bench import run_journeys, write_json  # noqa: PLC0415

    configure_logging("WARNING")
    figures = run_journeys(count)
    table = Table(title=f"scan-to-run journeys (n={figures.count}, SQLite + embedded broker)")
    table.add_column("figure")
    table.add_column("ms", justify="right")
    for name, value in vars(figures).items():
        if name != "count":
            table.add_row(name, f"{value:.1f}")
    Console().print(table)
    if json_file is not None:
        write_json(figures, json_file)


@bench_app.command("notify")
def bench_notify(
    database_url: Annotated[
        str | None, typer.Option(help="Database to run on (default: SQLite in a temp dir).")
    ] = None,
    count: Annotated[int, typer.Option(min=10, max=100_000, help="Notifies per run.")] = 300,
    concurrency: Annotated[str, typer.Option(help="Comma-separated concurrency levels.")] = "1,16",
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Also write the figures here.")
    ] = None,
) -> None:
    """Notify handling: signature check, decryption, commit with its outbox row, reply."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from roompay.bench import run_notify_bench, write_json  # noqa: PLC0415

    try:
        levels = [int(c) for c in concurrency.split(",") if c.strip()]
    except ValueError as exc:
        raise typer.BadParameter("concurrency must be integers, e.g. 1,16") from exc
    if not levels or min(levels) < 1:
        raise typer.BadParameter("concurrency must be positive integers, e.g. 1,16")
    configure_logging("WARNING")
    figures = run_notify_bench(database_url, count, levels)
    table = Table(title="WeChat Pay notify handling (verify + decrypt + commit + reply)")
    for column in ("backend", "concurrency", "count", "notifies/s", "p50 ms", "p99 ms", "paid"):
        table.add_column(column, justify="right")
    for f in figures:
        table.add_row(
            f.backend,
            str(f.concurrency),
            str(f.count),
            f"{f.per_second:.0f}",
            f"{f.p50_ms:.2f}",
            f"{f.p99_ms:.2f}",
            str(f.paid),
        )
    Console().print(table)
    if json_file is not None:
        write_json(figures, json_file)


@app.command()
def version(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Print the version."""
    from roompay import __version__  # noqa: PLC0415

    typer.echo(json.dumps({"version": __version__}) if as_json else __version__)
