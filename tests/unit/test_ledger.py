"""The books' rules: balanced postings, the split and its rounding, fees, terms by date."""

from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roompay.domain import ledger as rules
from roompay.domain.errors import InvalidAmountError
from roompay.domain.ledger import (
    EntryKind,
    FeeSchedule,
    Granularity,
    HotelContract,
    LedgerError,
    Line,
    OrderMoney,
    Posting,
    RefundFeeRule,
    ShareBasis,
)

WECHAT = FeeSchedule(rules.EPOCH, 60, RefundFeeRule.PER_LINE)
ALIPAY = FeeSchedule(rules.EPOCH, 60, RefundFeeRule.CUMULATIVE)
FEES = {"wechat": WECHAT, "alipay": ALIPAY}

contracts = st.builds(
    HotelContract,
    effective_from=st.just(rules.EPOCH),
    share_bp=st.integers(0, 10_000),
    basis=st.sampled_from(ShareBasis),
    min_monthly_guarantee_fen=st.integers(0, 100_000),
)


# --- the split ---------------------------------------------------------------------


def test_thirty_percent_of_gross_rounds_the_hotel_down_and_the_rest_to_the_manufacturer() -> None:
    contract = HotelContract(rules.EPOCH, 3000, ShareBasis.GROSS)
    # 0.3 * 799 = 239.7 -> the hotel gets 239; fee 0.6 % of 799 = 4.794 -> 5
    assert rules.split(799, WECHAT.fee(799), contract) == rules.Split(799, 5, 239, 555)


def test_a_net_share_is_taken_after_the_fee() -> None:
    contract = HotelContract(rules.EPOCH, 5000, ShareBasis.NET)
    # (800 - 5) * 0.5 = 397.5 -> 397
    assert rules.split(800, 5, contract) == rules.Split(800, 5, 397, 398)


@given(kept=st.integers(0, 10_000_000), fee_permille=st.integers(0, 100), contract=contracts)
def test_hotel_manufacturer_and_fee_always_add_up_to_the_amount_kept(
    kept: int, fee_permille: int, contract: HotelContract
) -> None:
    fee = kept * fee_permille // 1000
    share = rules.split(kept, fee, contract)
    base = kept if contract.basis is ShareBasis.GROSS else kept - fee
    assert share.hotel_fen + share.manufacturer_fen + share.fee_fen == kept
    assert share.hotel_fen == base * contract.share_bp // 10_000
    assert 0 <= base * contract.share_bp - share.hotel_fen * 10_000 < 10_000


def test_a_negative_amount_kept_is_refused() -> None:
    with pytest.raises(InvalidAmountError):
        rules.split(-1, 0, HotelContract(rules.EPOCH, 3000, ShareBasis.GROSS))


# --- fees ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "fee"), [(0, 0), (83, 0), (84, 1), (250, 2), (800, 5), (1500, 9), (2000, 12)]
)
def test_the_fee_is_six_per_mille_rounded_half_up(amount: int, fee: int) -> None:
    assert WECHAT.fee(amount) == fee


def test_wechat_gives_the_fee_back_per_refund_line_and_alipay_on_the_total() -> None:
    # 249 fen paid: fee 1.494 -> 1. Refunds of 84, 84, 81.
    assert [WECHAT.fee_back(249, before, r) for before, r in ((0, 84), (84, 84), (168, 81))] == [
        1,
        1,
        0,
    ]
    assert [ALIPAY.fee_back(249, before, r) for before, r in ((0, 84), (84, 84), (168, 81))] == [
        1,
        0,
        0,
    ]


@given(
    paid=st.integers(1, 1_000_000),
    cuts=st.lists(st.integers(1, 100), min_size=1, max_size=6),
)
def test_alipay_never_gives_back_more_fee_than_it_charged(paid: int, cuts: list[int]) -> None:
    refunded = given_back = 0
    for cut in cuts:
        amount = min(cut * paid // 100 or 1, paid - refunded)
        if amount <= 0:
            break
        given_back += ALIPAY.fee_back(paid, refunded, amount)
        refunded += amount
    assert 0 <= given_back <= ALIPAY.fee(paid)
    if refunded == paid:
        assert given_back == ALIPAY.fee(paid)


# --- terms by date -------------------------------------------------------------------


def test_the_contract_in_force_is_the_latest_started_on_or_before_the_day() -> None:
    old = HotelContract(date(2026, 1, 1), 3000, ShareBasis.GROSS)
    new = HotelContract(date(2026, 6, 1), 4000, ShareBasis.NET, 50_000)
    assert rules.in_force([new, old], date(2026, 5, 31)) == old
    assert rules.in_force([new, old], date(2026, 6, 1)) == new
    with pytest.raises(LedgerError):
        rules.in_force([new, old], date(2025, 12, 31))


def test_a_share_outside_zero_to_one_hundred_percent_is_refused() -> None:
    with pytest.raises(LedgerError):
        HotelContract(rules.EPOCH, 10_001, ShareBasis.GROSS)


# --- postings -------------------------------------------------------------------------


def test_an_unbalanced_posting_cannot_be_made() -> None:
    with pytest.raises(LedgerError):
        Posting(EntryKind.PAYMENT, "o", (Line("a", debit_fen=1), Line("b", credit_fen=2)))
    with pytest.raises(LedgerError):
        Line("a", debit_fen=1, credit_fen=1)


def test_a_payment_posts_net_clearing_fee_hotel_and_manufacturer() -> None:
    contract = HotelContract(rules.EPOCH, 3000, ShareBasis.GROSS)
    posting = rules.payment_posting("o1", "wechat", 7, 800, WECHAT, contract)
    assert posting.lines == (
        Line("clearing:wechat", debit_fen=795),
        Line("provider_fees:wechat", debit_fen=5),
        Line("hotel_payable:7", credit_fen=240),
        Line("manufacturer_revenue", credit_fen=560),
    )
    assert rules.figures(EntryKind.PAYMENT, posting.lines) == rules.EntryFigures(
        800, 0, 5, 240, 555, 0
    )


def test_a_flagged_payment_and_its_refund_pass_through_suspense_and_leave_nothing() -> None:
    pay = rules.suspense_payment_posting("o1", "alipay", 799, ALIPAY)
    back = rules.suspense_refund_posting(
        "o1-mismatch", "alipay", OrderMoney(799, 0, 5), 799, ALIPAY
    )
    assert rules.balances([*pay.lines, *back.lines]) == {}
    assert rules.figures(EntryKind.PAYMENT_SUSPENSE, pay.lines).suspense_fen == 799


def test_a_refund_larger_than_what_is_kept_is_refused() -> None:
    contract = HotelContract(rules.EPOCH, 3000, ShareBasis.GROSS)
    with pytest.raises(LedgerError):
        rules.refund_posting("k", "wechat", 1, OrderMoney(800, 500, 2), 301, WECHAT, contract)


@dataclass
class Books:
    """A ledger in memory: the postings of a generated day, and each order's money."""

    lines_by_entry: list[tuple[EntryKind, int, tuple[Line, ...]]] = field(default_factory=list)
    money: dict[str, OrderMoney] = field(default_factory=dict)

    def add(self, kind: EntryKind, hotel: int, posting: Posting) -> None:
        self.lines_by_entry.append((kind, hotel, posting.lines))


orders = st.lists(
    st.tuples(
        st.integers(0, 2),  # hotel
        st.sampled_from(["wechat", "alipay"]),
        st.integers(1, 200_000),  # amount
        st.lists(st.integers(1, 100), max_size=4),  # refund cuts, percent of what is left
        st.booleans(),  # flagged (suspense)
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=200)
@given(day=orders, terms=st.lists(contracts, min_size=3, max_size=3))
def test_a_day_of_payments_and_refunds_balances_and_statements_sum_to_the_ledger(
    day: list[tuple[int, str, int, list[int], bool]], terms: list[HotelContract]
) -> None:
    books = Books()
    for n, (hotel, wallet, amount, cuts, flagged) in enumerate(day):
        order = f"o{n}"
        fees = FEES[wallet]
        if flagged:
            pay = rules.suspense_payment_posting(order, wallet, amount, fees)
        else:
            pay = rules.payment_posting(order, wallet, hotel, amount, fees, terms[hotel])
        books.add(pay.kind, hotel, pay)
        money = OrderMoney(amount, 0, fees.fee(amount))
        for i, cut in enumerate(cuts):
            refund = max(1, money.kept_fen * cut // 100)
            if money.kept_fen == 0:
                break
            if flagged:
                posting = rules.suspense_refund_posting(f"{order}-{i}", wallet, money, refund, fees)
            else:
                posting = rules.refund_posting(
                    f"{order}-{i}", wallet, hotel, money, refund, fees, terms[hotel]
                )
            books.add(posting.kind, hotel, posting)
            back = fees.fee_back(money.paid_fen, money.refunded_fen, refund)
            money = OrderMoney(money.paid_fen, money.refunded_fen + refund, money.fee_fen - back)
        books.money[order] = money

    all_lines = [line for _, _, lines in books.lines_by_entry for line in lines]
    # Every entry balances, so the whole ledger does.
    assert all(sum(line.signed_fen for line in lines) == 0 for _, _, lines in books.lines_by_entry)
    assert sum(line.signed_fen for line in all_lines) == 0
    balances = rules.balances(all_lines)
    figures = [rules.figures(kind, lines) for kind, _, lines in books.lines_by_entry]
    # Each entry: gross - refunded == fee + hotel + manufacturer.
    assert all(
        f.gross_fen - f.refunded_fen == f.fee_fen + f.hotel_fen + f.manufacturer_fen
        for f in figures
    )
    # Statements (sums of figures per hotel) equal the ledger's balances.
    for hotel in range(3):
        per_hotel = [
            rules.figures(kind, lines) for kind, h, lines in books.lines_by_entry if h == hotel
        ]
        assert sum(f.hotel_fen for f in per_hotel) == -balances.get(f"hotel_payable:{hotel}", 0)
    assert sum(f.fee_fen for f in figures) == sum(
        v for k, v in balances.items() if k.startswith("provider_fees:")
    )
    assert sum(f.suspense_fen for f in figures) == -sum(
        v for k, v in balances.items() if k.startswith("suspense:")
    )
    kept = sum(m.kept_fen for o, m in books.money.items() if not day[int(o[1:])][4])
    split_money = sum(f.gross_fen - f.refunded_fen for f in figures)
    assert split_money == kept
    # Hotel + manufacturer + fees over the day = what was kept, to the fen.
    assert sum(f.hotel_fen + f.manufacturer_fen + f.fee_fen for f in figures) == kept


@given(
    amount=st.integers(1, 200_000),
    cuts=st.lists(st.integers(1, 100), min_size=1, max_size=5),
    contract=contracts,
    wallet=st.sampled_from(["wechat", "alipay"]),
)
def test_after_any_refunds_an_orders_shares_are_the_split_of_what_it_kept(
    amount: int, cuts: list[int], contract: HotelContract, wallet: str
) -> None:
    fees = FEES[wallet]
    lines = list(rules.payment_posting("o", wallet, 1, amount, fees, contract).lines)
    money = OrderMoney(amount, 0, fees.fee(amount))
    for i, cut in enumerate(cuts):
        if money.kept_fen == 0:
            break
        refund = max(1, money.kept_fen * cut // 100)
        lines += rules.refund_posting(f"k{i}", wallet, 1, money, refund, fees, contract).lines
        back = fees.fee_back(money.paid_fen, money.refunded_fen, refund)
        money = OrderMoney(amount, money.refunded_fen + refund, money.fee_fen - back)
    expected = rules.split(money.kept_fen, money.fee_fen, contract)
    balances = rules.balances(lines)
    assert -balances.get("hotel_payable:1", 0) == expected.hotel_fen
    assert balances.get(f"provider_fees:{wallet}", 0) == expected.fee_fen
    revenue = -balances.get("manufacturer_revenue", 0)
    assert revenue - expected.fee_fen == expected.manufacturer_fen
    assert balances.get(f"clearing:{wallet}", 0) == money.kept_fen - money.fee_fen


def test_the_guarantee_tops_the_hotel_up_at_the_manufacturers_cost() -> None:
    posting = rules.guarantee_posting(3, "2026-11", 1200)
    assert posting.source_key == "3:2026-11"
    assert rules.figures(EntryKind.GUARANTEE_TOPUP, posting.lines) == rules.EntryFigures(
        0, 0, 0, 1200, -1200, 0
    )


# --- periods ------------------------------------------------------------------------


def test_periods_are_beijing_days_and_months() -> None:
    month = rules.parse_period("2026-02")
    assert (month.granularity, month.first, month.last) == (
        Granularity.MONTH,
        date(2026, 2, 1),
        date(2026, 2, 28),
    )
    assert month.following().label == "2026-03"
    day = rules.parse_period("2026-11-27")
    assert day.ends_at() == datetime(2026, 11, 27, 16, 0, tzinfo=UTC)
    assert rules.beijing_day(datetime(2026, 11, 27, 16, 0, tzinfo=UTC)) == date(2026, 11, 28)
    for bad in ("2026", "2026-13", "27-11-2026"):
        with pytest.raises(ValueError, match=r"."):
            rules.parse_period(bad)
