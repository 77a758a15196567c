"""The money pages of the dashboard: statements, reconciliation, revenue by hotel."""

import re
from datetime import timedelta

import httpx
from sqlalchemy import update

from roompay.services.auth import Role, create_user
from roompay.services.catalog import get_device
from roompay.services.dashboard import hotel_today
from roompay.services.seed import create_hotel, ensure_operator
from roompay.store.db import transaction
from roompay.store.models import Device, Hotel
from tests.support.server import Stack
from tests.support.waiting import wait_for

PASSWORD = "correct horse"


def _token(stack: Stack, username: str, role: Role, hotel_id: int | None) -> str:
    with transaction(stack.runtime.ctx.sessions) as session:
        create_user(session, username, PASSWORD, role, hotel_id, stack.runtime.clock.now())
    with stack.client() as http:
        return str(
            http.post(
                "/api/v1/auth/token", data={"username": username, "password": PASSWORD}
            ).json()["access_token"]
        )


def _hotels(stack: Stack) -> tuple[int, str, int]:
    with transaction(stack.runtime.ctx.sessions) as session:
        ours = get_device(session, stack.device_codes[0]).hotel_id
        other = create_hotel(session, ensure_operator(session, "op", "Op"), "other", "B", rooms=1)
        return ours, session.get_one(Hotel, ours).code, other.id


def _page(stack: Stack, token: str, path: str) -> httpx.Response:
    with httpx.Client(
        base_url=stack.base_url, cookies={"roompay_token": token}, timeout=10
    ) as http:
        return http.get(path)


def _rows(html: str, attribute: str) -> list[str]:
    return re.findall(rf'{attribute}="([^"]+)"', html)


def test_statements_are_listed_per_hotel_with_printable_and_csv_forms(quiet_stack: Stack) -> None:
    stack = quiet_stack
    ours, hotel, _other = _hotels(stack)
    admin = _token(stack, "operator", Role.ADMIN, None)
    manager = _token(stack, "manager-a", Role.MANAGER, ours)
    desk = _token(stack, "desk-a", Role.FRONT_DESK, ours)
    month = (hotel_today(stack.clock.now()).replace(day=1) - timedelta(days=1)).strftime("%Y-%m")
    # Given last month's statements of both hotels, issued by the operator
    with stack.client() as http:
        for code in (hotel, "other"):
            issued = http.post(
                f"/api/v1/hotels/{code}/statements/{month}",
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert issued.status_code == 201, issued.text
    # When the operator and hotel A's manager open the statements page
    everyone = _page(stack, admin, "/dashboard/statements?lang=en")
    mine = _page(stack, manager, "/dashboard/statements?lang=en")
    # Then the operator sees both hotels, the manager only A, each with its links
    assert everyone.status_code == 200
    assert sorted(_rows(everyone.text, "data-statement")) == sorted(
        [f"{hotel}/{month}", f"other/{month}"]
    )
    assert _rows(mine.text, "data-statement") == [f"{hotel}/{month}"]
    assert f'href="/dashboard/statements/{hotel}/{month}?format=csv"' in mine.text
    printable = _page(stack, manager, f"/dashboard/statements/{hotel}/{month}")
    csv = _page(stack, manager, f"/dashboard/statements/{hotel}/{month}?format=csv")
    assert printable.status_code == 200
    assert '<td class="n" id="hotel-share">¥0.00</td>' in printable.text
    assert (csv.status_code, csv.headers["content-type"]) == (200, "text/csv; charset=utf-8")
    assert csv.text.splitlines()[0].startswith(f"hotel,{hotel},period,{month},sha256,")
    # And hotel B's statement does not exist for A's manager; the front desk sees no money
    assert _page(stack, manager, f"/dashboard/statements/other/{month}").status_code == 404
    assert _page(stack, desk, "/dashboard/statements").status_code == 403


def test_the_operator_sees_reconciliation_reports_and_revenue_by_hotel(quiet_stack: Stack) -> None:
    stack = quiet_stack
    ours, hotel, _other = _hotels(stack)
    admin = _token(stack, "operator", Role.ADMIN, None)
    manager = _token(stack, "manager-a", Role.MANAGER, ours)
    held = stack.notify_wire.held
    assert held is not None
    with transaction(stack.runtime.ctx.sessions) as session:
        session.execute(update(Device).values(online=True))
    yesterday = (hotel_today(stack.clock.now()) - timedelta(days=1)).isoformat()
    with stack.client() as http:
        # Given a paid order in hotel A today and yesterday's reconciliation
        order = http.post(
            "/api/v1/checkout",
            json={"device": stack.device_codes[0], "program": "dry30", "wallet": "alipay"},
        ).json()
        assert http.post("/sandbox/pay", json={"qr": order["qr"]}).status_code == 200
        notify: httpx.Request = wait_for(lambda: held[0] if held else None, 10, "the notify")
        delivered = http.post(notify.url.path, content=notify.content, headers=dict(notify.headers))
        assert delivered.text == "success"
        reconciled = http.post(
            f"/api/v1/reconciliations/{yesterday}", headers={"Authorization": f"Bearer {admin}"}
        )
        assert reconciled.status_code == 200, reconciled.text
    # When the operator opens the reconciliation and revenue pages
    reports = _page(stack, admin, "/dashboard/reconciliation?lang=en")
    revenue = _page(stack, admin, "/dashboard/revenue?lang=en")
    # Then each wallet's report of the day is there with its classes, and no differences
    assert reports.status_code == 200
    assert sorted(_rows(reports.text, "data-report")) == [
        f"{yesterday}/alipay",
        f"{yesterday}/wechat",
    ]
    for outcome in ("Matched", "Only at the provider", "Only in our books", "Amount differs"):
        assert f"<th>{outcome}</th>" in reports.text
    assert "data-differences=" not in reports.text
    # And the revenue page has a bar per hotel: A took 8.00, B nothing
    section = revenue.text.split('id="revenue-by-hotel"')[1]
    labels = re.findall(r'class="bar-label">([^<]+)<', section)
    values = re.findall(r'class="bar-value">([^<]+)<', section)
    assert list(zip(labels, values, strict=True)) == [(hotel, "¥8.00"), ("other", "¥0.00")]
    # While a manager sees neither reconciliation nor other hotels' revenue
    assert _page(stack, manager, "/dashboard/reconciliation").status_code == 403
    assert 'id="revenue-by-hotel"' not in _page(stack, manager, "/dashboard/revenue").text
