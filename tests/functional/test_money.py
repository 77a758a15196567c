"""The books through the real server: ledger, statements and reconciliation with the sandbox."""

from concurrent.futures import ThreadPoolExecutor
from datetime import date, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import delete, func, select, text, update

from roompay.domain import ledger as rules
from roompay.domain.catalog import Wallet
from roompay.domain.ledger import HotelContract, ShareBasis
from roompay.payments.base import QrOrderRequest
from roompay.services.auth import Role, create_user
from roompay.services.ledger import (
    account_balances,
    add_contract,
    post_payment,
    post_refund,
    unbalanced_entries,
)
from roompay.store.db import transaction
from roompay.store.models import (
    Device,
    LedgerEntry,
    LedgerLine,
    Order,
    OrderFunds,
    Refund,
    Statement,
    User,
)
from tests.support.devices import device_agents
from tests.support.server import Stack
from tests.support.waiting import wait_for

WATER = 2  # index of the water purifier among the stack's devices: its programs are short


@pytest.fixture
def books(stack: Stack) -> Stack:
    """The stack, with reconciliation reports of earlier tests gone (they are per day)."""
    with stack.runtime.engine.begin() as conn:
        for table in ("order_funds", "reconciliation_lines", "reconciliation_reports"):
            conn.execute(text(f"DELETE FROM {table}"))
    return stack


def _admin(stack: Stack, http: httpx.Client) -> dict[str, str]:
    with transaction(stack.runtime.ctx.sessions) as session:
        if session.scalars(select(User).where(User.username == "books")).one_or_none() is None:
            create_user(session, "books", "pw-books", Role.ADMIN, None, stack.clock.now())
    token = http.post("/api/v1/auth/token", data={"username": "books", "password": "pw-books"})
    return {"Authorization": f"Bearer {token.json()['access_token']}"}


def _hotel(stack: Stack) -> tuple[int, str]:
    with stack.runtime.ctx.sessions() as session:
        device = session.scalars(select(Device).where(Device.code == stack.device_codes[0])).one()
        code = session.scalar(
            text("SELECT code FROM hotels WHERE id = :id"), {"id": device.hotel_id}
        )
        return device.hotel_id, str(code)


def _paid_order(
    http: httpx.Client, device: str, wallet: str, program: str = "water1"
) -> dict[str, Any]:
    order: dict[str, Any] = http.post(
        "/api/v1/checkout", json={"device": device, "program": program, "wallet": wallet}
    ).json()
    assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
    wait_for(lambda: _status(http, order["order_id"]) == "completed", 20, "completed")
    return order


def _status(http: httpx.Client, order_id: str) -> str:
    return str(http.get(f"/api/v1/orders/{order_id}").json()["status"])


def _next_beijing_day(stack: Stack) -> date:
    """Move the clock just past the next Beijing midnight; return the day that ended."""
    now = stack.clock.now()
    today = rules.beijing_day(now)
    stack.clock.advance((rules.day_period(today).ends_at() - now).total_seconds() + 60)
    return today


def _refund(
    http: httpx.Client, admin: dict[str, str], order_id: str, amount: int, status: str
) -> None:
    created = http.post(
        f"/api/v1/orders/{order_id}/refunds",
        json={"amount_fen": amount, "reason": "damp"},
        headers=admin,
    )
    assert created.status_code == 201, created.text
    wait_for(lambda: _status(http, order_id) == status, 20, status)


def _entry_count(stack: Stack) -> int:
    with stack.runtime.ctx.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(LedgerEntry)) or 0)


def test_a_day_balances_reconciles_with_zero_differences_and_settles_once(books: Stack) -> None:
    stack = books
    hotel_id, hotel_code = _hotel(stack)
    # Given the hotel moved to 40 % of the amount net of fees, with a 100 yuan guarantee
    today = rules.beijing_day(stack.clock.now())
    with transaction(stack.runtime.ctx.sessions) as session:
        add_contract(
            session,
            hotel_id,
            HotelContract(today, 4000, ShareBasis.NET, 100_00),
            stack.clock.now(),
        )
    water = stack.device_codes[WATER]
    with device_agents(stack, [water]), stack.client() as http:
        admin = _admin(stack, http)
        # When guests pay four orders with both wallets and two are partly refunded
        w1 = _paid_order(http, water, "wechat", "water5")  # 800
        a1 = _paid_order(http, water, "alipay", "water5")  # 800
        w2 = _paid_order(http, water, "wechat")  # 200
        a2 = _paid_order(http, water, "alipay")  # 200
        _refund(http, admin, w1["order_id"], 333, "partially_refunded")
        _refund(http, admin, a1["order_id"], 333, "partially_refunded")
        _refund(http, admin, a2["order_id"], 200, "refunded")

    # Then every entry balances, and so does the ledger
    with stack.runtime.ctx.sessions() as session:
        assert unbalanced_entries(session) == []
        balances = account_balances(session)
    assert sum(balances.values()) == 0
    # fees: wechat 5 + 1 - 2 (per line on 333); alipay 5 + 1 - (fee(333)=2) - 1 (all back)
    assert balances["provider_fees:wechat"] == 4
    assert balances["provider_fees:alipay"] == 3
    kept = (800 - 333) + (800 - 333) + 200 + 0
    assert balances["clearing:wechat"] + balances["clearing:alipay"] == kept - 7
    hotel_share = -balances[f"hotel_payable:{hotel_id}"]
    # 40 % of (kept - fee) per order, each rounded down: 464 -> 185, 464 -> 185, 199 -> 79, 0
    assert hotel_share == 185 + 185 + 79 + 0
    manufacturer = -balances["manufacturer_revenue"] - 7
    assert hotel_share + manufacturer + 7 == kept

    bill_day = _next_beijing_day(stack)
    with stack.client() as http:
        admin = _admin(stack, http)
        # When the day is reconciled four times at once
        url = f"/api/v1/reconciliations/{bill_day.isoformat()}"
        with ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(lambda _: http.post(url, headers=admin), range(4)))
        assert {r.status_code for r in runs} == {200}
        reports = runs[0].json()
        # Then both wallets match to the fen, in one report version each
        assert [(r["wallet"], r["version"], r["differences"]) for r in reports] == [
            ("alipay", 1, 0),
            ("wechat", 1, 0),
        ]
        assert [r["counts"]["matched"] for r in reports] == [4, 3]
        assert all(
            [(x["wallet"], x["version"]) for x in run.json()] == [("alipay", 1), ("wechat", 1)]
            for run in runs
        )
        again = http.post(url, headers=admin).json()
        assert [r["created"] for r in again] == [False, False]
        rerun = http.post(url, params={"rerun": "true"}, headers=admin).json()
        assert [(r["version"], r["differences"]) for r in rerun] == [(2, 0), (2, 0)]

        # When the day is settled twice at once, and again
        entries_before = _entry_count(stack)
        statement_url = f"/api/v1/hotels/{hotel_code}/statements/{bill_day.isoformat()}"
        with ThreadPoolExecutor(2) as pool:
            issued = list(pool.map(lambda _: http.post(statement_url, headers=admin), range(2)))
        assert sorted(r.status_code for r in issued) == [200, 201]
        repeat = http.post(statement_url, headers=admin)
        csv_body = http.get(statement_url, params={"format": "csv"}, headers=admin)
        page = http.get(statement_url, params={"format": "html"}, headers=admin)
    # Then one statement exists, equal to the ledger, and settling moved no money
    assert _entry_count(stack) == entries_before
    day = next(r.json() for r in issued if r.status_code == 201)
    assert repeat.json() == {**day, "created": False}
    totals = day["totals"]
    assert (totals["orders"], totals["refunds"]) == (4, 3)
    assert (totals["gross_fen"], totals["refunded_fen"], totals["fee_fen"]) == (2000, 866, 7)
    assert totals["hotel_fen"] == hotel_share
    assert totals["manufacturer_fen"] == manufacturer
    assert totals["gross_fen"] - totals["refunded_fen"] == (
        totals["fee_fen"] + totals["hotel_fen"] + totals["manufacturer_fen"]
    )
    assert sorted({line["order_id"] for line in day["lines"]}) == sorted(
        o["order_id"] for o in (w1, a1, w2, a2)
    )
    assert csv_body.status_code == 200
    assert csv_body.text.splitlines()[-1].startswith("total,orders=4 refunds=3,")
    assert page.status_code == 200
    assert "Settlement statement" in page.text
    assert w1["order_id"] in page.text
    # And the bill confirmed every payment: the funds arrived, once each
    with stack.runtime.ctx.sessions() as session:
        marked = sorted(session.scalars(select(OrderFunds.order_id)))
    assert marked == sorted(o["order_id"] for o in (w1, a1, w2, a2))


def test_the_month_statement_adds_the_guarantee_once_and_late_entries_go_to_the_next_day(
    books: Stack,
) -> None:
    stack = books
    hotel_id, hotel_code = _hotel(stack)
    today = rules.beijing_day(stack.clock.now())
    with transaction(stack.runtime.ctx.sessions) as session:
        add_contract(
            session,
            hotel_id,
            HotelContract(today, 3000, ShareBasis.GROSS, 50_00),
            stack.clock.now(),
        )
    water = stack.device_codes[WATER]
    with device_agents(stack, [water]), stack.client() as http:
        admin = _admin(stack, http)
        order = _paid_order(http, water, "wechat", "water5")  # 800: the hotel's share is 240
    first_day = _next_beijing_day(stack)
    with stack.client() as http:
        admin = _admin(stack, http)
        day_url = f"/api/v1/hotels/{hotel_code}/statements/{first_day.isoformat()}"
        assert http.post(day_url, headers=admin).status_code == 201
        # Given a refund confirmed after the day was closed
        with device_agents(stack, [water]):
            _refund(http, admin, order["order_id"], 100, "partially_refunded")
    # When the next day and the month are settled
    second_day = _next_beijing_day(stack)
    month = rules.month_period(first_day)
    stack.clock.advance(max(0.0, (month.ends_at() - stack.clock.now()).total_seconds() + 60))
    with stack.client() as http:
        admin = _admin(stack, http)
        closed = http.get(day_url, headers=admin).json()
        late = http.post(
            f"/api/v1/hotels/{hotel_code}/statements/{second_day.isoformat()}", headers=admin
        ).json()
        month_url = f"/api/v1/hotels/{hotel_code}/statements/{month.label}"
        with ThreadPoolExecutor(3) as pool:
            months = list(pool.map(lambda _: http.post(month_url, headers=admin), range(3)))
        not_yet = http.post(
            f"/api/v1/hotels/{hotel_code}/statements/{month.following().label}", headers=admin
        )
    # Then the closed day is unchanged and the late refund is on the next day's statement
    assert closed["totals"]["refunded_fen"] == 0
    assert [(line["kind"], line["refunded_fen"]) for line in late["lines"]] == [("refund", 100)]
    # And the month holds both, topped up to the guarantee exactly once
    assert sorted(r.status_code for r in months) == [200, 200, 201]
    statement = months[0].json()["totals"]
    # 30 % of 800 is 240; after the refund, 30 % of 700 is 210. A refund on the first
    # day of the next month belongs to that month.
    same_month = rules.month_period(second_day) == month
    refunded, share = (100, 210) if same_month else (0, 240)
    assert (statement["gross_fen"], statement["refunded_fen"]) == (800, refunded)
    assert statement["guarantee_fen"] == 50_00 - share
    assert statement["hotel_fen"] == 50_00
    assert not_yet.status_code == 409
    with stack.runtime.ctx.sessions() as session:
        topups = session.scalar(
            select(func.count())
            .select_from(LedgerEntry)
            .where(LedgerEntry.kind == "guarantee_topup")
        )
        statements = session.scalar(select(func.count()).select_from(Statement))
        assert unbalanced_entries(session) == []
    assert topups == 1
    assert statements == 3


def test_each_injected_discrepancy_is_found_and_classified(books: Stack) -> None:
    stack = books
    water = stack.device_codes[WATER]
    ctx = stack.runtime.ctx
    with device_agents(stack, [water]), stack.client() as http:
        matched = _paid_order(http, water, "wechat")
        lost = _paid_order(http, water, "wechat")
        altered = _paid_order(http, water, "wechat")
        refunded_here = _paid_order(http, water, "wechat")
        alipay_ok = _paid_order(http, water, "alipay")
        unpaid: dict[str, Any] = http.post(
            "/api/v1/checkout", json={"device": water, "program": "water1", "wallet": "wechat"}
        ).json()
    # An Alipay payment for a trade roompay never created
    stranger = "0" * 24 + "feedbeef"
    provider = ctx.provider(Wallet.ALIPAY)
    qr = provider.create_qr_order(
        QrOrderRequest(
            stranger,
            "unknown",
            500,
            stack.clock.now() + timedelta(minutes=5),
            f"{stack.base_url}/api/v1/notify/alipay",
        )
    ).qr_content
    with stack.client() as http:
        assert http.post("/sandbox/pay", json={"qr": qr}).status_code == 200
    now = stack.clock.now()
    with transaction(ctx.sessions) as session:
        # The books lose one payment (missing here) ...
        entry_id = session.scalars(
            select(LedgerEntry.id).where(LedgerEntry.order_id == lost["order_id"])
        ).one()
        session.execute(delete(LedgerLine).where(LedgerLine.entry_id == entry_id))
        session.execute(delete(LedgerEntry).where(LedgerEntry.id == entry_id))
        # ... get another amount wrong ...
        altered_id = session.scalars(
            select(LedgerEntry.id).where(LedgerEntry.order_id == altered["order_id"])
        ).one()
        session.execute(
            update(LedgerLine)
            .where(LedgerLine.entry_id == altered_id, LedgerLine.account == "clearing:wechat")
            .values(debit_fen=LedgerLine.debit_fen + 1)
        )
        # ... book a refund the provider never made ...
        post_refund(
            session,
            Refund(order_id=refunded_here["order_id"], refund_key="ghost-refund", amount_fen=50),
            now,
        )
        # ... and book a payment for an order the guest never paid (missing at the provider)
        order = session.get_one(Order, unpaid["order_id"])
        order.paid_at = now
        post_payment(session, order, now, suspense=False)
        order.paid_at = None
    bill_day = _next_beijing_day(stack)
    with stack.client() as http:
        admin = _admin(stack, http)
        reports = http.post(f"/api/v1/reconciliations/{bill_day.isoformat()}", headers=admin).json()
    by_wallet = {r["wallet"]: r for r in reports}
    wechat = {
        (line["outcome"], line["kind"], line["out_trade_no"])
        for line in by_wallet["wechat"]["lines"]
    }
    assert wechat == {
        ("matched", "payment", matched["order_id"]),
        ("matched", "payment", refunded_here["order_id"]),
        ("orphan", "payment", lost["order_id"]),
        ("amount_mismatch", "payment", altered["order_id"]),
        ("status_mismatch", "refund", refunded_here["order_id"]),
        ("missing", "payment", unpaid["order_id"]),
    }
    assert by_wallet["wechat"]["counts"] == {
        "matched": 2,
        "orphan": 1,
        "missing": 1,
        "amount_mismatch": 1,
        "status_mismatch": 1,
    }
    assert by_wallet["wechat"]["amounts_fen"]["status_mismatch"] == 50
    assert by_wallet["alipay"]["counts"] == {
        "matched": 1,
        "orphan": 1,
        "missing": 0,
        "amount_mismatch": 0,
        "status_mismatch": 0,
    }
    orphan = next(line for line in by_wallet["alipay"]["lines"] if line["outcome"] == "orphan")
    assert (orphan["out_trade_no"], orphan["theirs"]["amount_fen"]) == (stranger, 500)
    # Funds arrived only where the bill and the books agree
    with ctx.sessions() as session:
        marked = set(session.scalars(select(OrderFunds.order_id)))
    assert marked == {matched["order_id"], refunded_here["order_id"], alipay_ok["order_id"]}


def test_settlement_of_an_unfinished_period_or_unknown_hotel_is_refused(books: Stack) -> None:
    stack = books
    _, hotel_code = _hotel(stack)
    today = rules.beijing_day(stack.clock.now()).isoformat()
    with stack.client() as http:
        admin = _admin(stack, http)
        unfinished = http.post(f"/api/v1/hotels/{hotel_code}/statements/{today}", headers=admin)
        unknown = http.post("/api/v1/hotels/nope/statements/2020-01-01", headers=admin)
        bad = http.post(f"/api/v1/hotels/{hotel_code}/statements/2020-1", headers=admin)
        anonymous = http.post(f"/api/v1/hotels/{hotel_code}/statements/2020-01-01")
    assert (unfinished.status_code, unfinished.json()["error"]["code"]) == (409, "period_not_over")
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_hotel")
    assert (bad.status_code, bad.json()["error"]["code"]) == (422, "bad_period")
    assert anonymous.status_code == 401
    with stack.runtime.ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Statement)) == 0
