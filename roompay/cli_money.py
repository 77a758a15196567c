"""Money commands: settlement statements and reconciliation of the providers' bills.

    roompay settle --hotel CODE --period YYYY-MM|YYYY-MM-DD [--json] [--csv FILE]
    roompay reconcile --date YYYY-MM-DD [--wallet W] [--rerun] [--json]

`register(app)` adds them to the main command line. Both read the database (and, for
reconciliation, the providers) from the ROOMPAY_* settings. Running either twice
moves no money and issues nothing twice; exit code 1 means the command was refused,
2 (reconcile) that the bills and the ledger differ.
"""

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from roompay.services.context import ServiceContext

T = TypeVar("T")


def register(app: typer.Typer) -> None:
    """Add `settle` and `reconcile` to the CLI."""
    app.command("settle")(settle)
    app.command("reconcile")(reconcile)


@contextmanager
def _context() -> Iterator["ServiceContext"]:
    from roompay.payments.factory import build_providers  # noqa: PLC0415 - keeps `--help` fast
    from roompay.runtime import Runtime  # noqa: PLC0415
    from roompay.settings import Settings  # noqa: PLC0415

    settings = Settings()
    runtime = Runtime(settings, build_providers(settings))
    try:
        yield runtime.ctx
    finally:
        runtime.engine.dispose()


def _run(action: Callable[[], T]) -> T:
    from roompay.services.errors import ServiceError  # noqa: PLC0415

    try:
        return action()
    except ServiceError as exc:
        typer.echo(f"refused: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(1) from exc


def settle(
    hotel: Annotated[str, typer.Option(help="The hotel's code.")],
    period: Annotated[str, typer.Option(help="YYYY-MM (a month) or YYYY-MM-DD (a day).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the statement as JSON.")] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Also write the statement as CSV here.")
    ] = None,
) -> None:
    """Issue a hotel's statement for a finished Beijing day or month (or show the issued one)."""
    from roompay.domain.money import yuan_str  # noqa: PLC0415
    from roompay.services.settlement import settle as issue  # noqa: PLC0415
    from roompay.services.settlement import statement_csv  # noqa: PLC0415

    with _context() as ctx:
        view = _run(lambda: issue(ctx, hotel, period))
    if csv_file is not None:
        csv_file.write_text(statement_csv(view), encoding="utf-8")
    if as_json:
        typer.echo(json.dumps(view.to_json(), ensure_ascii=False))
        return
    t = view.totals
    typer.echo(
        f"{view.hotel_code} {view.period}: {'issued' if view.created else 'already issued'}"
        f" {view.issued_at.isoformat()} sha256={view.lines_hash}"
    )
    typer.echo(
        f"orders {t.orders}  refunds {t.refunds}  gross {yuan_str(t.gross_fen)}"
        f"  refunded {yuan_str(t.refunded_fen)}  fees {yuan_str(t.fee_fen)}"
        f"  hotel {yuan_str(t.hotel_fen)}  manufacturer {yuan_str(t.manufacturer_fen)}"
        f"  suspense {yuan_str(t.suspense_fen)}  guarantee {yuan_str(t.guarantee_fen)}"
    )


def reconcile(
    day: Annotated[str, typer.Option("--date", help="The Beijing day, YYYY-MM-DD.")],
    wallet: Annotated[str | None, typer.Option(help="Only this wallet (wechat or alipay).")] = None,
    rerun: Annotated[
        bool, typer.Option("--rerun", help="Make a new report version even if one exists.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Reconcile the providers' bills of a finished Beijing day against the ledger."""
    from roompay.domain.catalog import Wallet  # noqa: PLC0415
    from roompay.domain.money import yuan_str  # noqa: PLC0415
    from roompay.services.reconciliation import reconcile as run  # noqa: PLC0415
    from roompay.services.reconciliation import reconcile_day  # noqa: PLC0415

    try:
        bill_date = date.fromisoformat(day)
        chosen = Wallet(wallet) if wallet is not None else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    with _context() as ctx:
        if chosen is None:
            views = _run(lambda: reconcile_day(ctx, bill_date, rerun=rerun))
        else:
            views = _run(lambda: [run(ctx, bill_date, chosen, rerun=rerun)])
    if as_json:
        typer.echo(json.dumps([v.to_json() for v in views], ensure_ascii=False))
    else:
        for view in views:
            counts = "  ".join(
                f"{name} {count} ({yuan_str(view.amounts_fen[name])})"
                for name, count in view.counts.items()
            )
            state = "new" if view.created else "existing"
            typer.echo(f"{view.wallet} {view.bill_date} v{view.version} ({state}): {counts}")
    if any(view.differences for view in views):
        raise typer.Exit(2)
