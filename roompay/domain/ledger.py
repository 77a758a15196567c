"""The books: accounts, balanced entries, posting rules and the revenue split.

Everything here is pure and in integer fen. The services turn an order's money
events into `Posting`s with these rules and store them; balances are sums of lines.

Accounts (one per provider or hotel where it says so):

- `clearing:<wallet>`         asset: money the provider holds for us, net of its fee
- `provider_fees:<wallet>`    expense: the provider's fee (credited when given back)
- `hotel_payable:<hotel id>`  liability: the hotel's share, owed to the hotel
- `manufacturer_revenue`      income: the rest of the money kept, before fees
- `suspense:<wallet>`         liability: money that passed through but is not
                              revenue (a flagged amount, a late payment refunded)

Rounding rule: the hotel's share is `floor(base * share_bp / 10000)` in fen; the
remainder of every split goes to the manufacturer. The split is always computed on
an order's cumulative money (paid minus refunded, fee minus fee given back) and
each posting carries only the change, so after any sequence of refunds an order's
hotel share + manufacturer share + fees = the amount kept, to the fen.
"""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from typing import TypeVar

from roompay.domain.errors import DomainError, InvalidAmountError
from roompay.domain.money import Fen

BEIJING = timezone(timedelta(hours=8), "Asia/Shanghai")
EPOCH = date(1970, 1, 1)
BP_WHOLE = 10_000


class LedgerError(DomainError):
    """A posting that would break the books, or a rule that cannot be applied."""


class EntryKind(StrEnum):
    """What caused a ledger entry; with its source key it names the cause once."""

    PAYMENT = "payment"  # a payment received and split
    PAYMENT_SUSPENSE = "payment_suspense"  # a payment received that is not revenue
    REFUND = "refund"  # a refund confirmed by the provider, on a split payment
    REFUND_SUSPENSE = "refund_suspense"  # a refund of suspense money
    GUARANTEE_TOPUP = "guarantee_topup"  # the month's minimum guarantee paid up to the hotel


MONEY_KINDS = frozenset(EntryKind) - {EntryKind.GUARANTEE_TOPUP}
SUSPENSE_KINDS = frozenset({EntryKind.PAYMENT_SUSPENSE, EntryKind.REFUND_SUSPENSE})


class ShareBasis(StrEnum):
    """What the hotel's share is a share of."""

    GROSS = "gross"  # the amount kept
    NET = "net"  # the amount kept minus the provider's fee


class RefundFeeRule(StrEnum):
    """How a provider gives its fee back on a refund."""

    PER_LINE = "per_line"  # fee of the refund amount, rounded per refund (WeChat Pay)
    CUMULATIVE = "cumulative"  # fee(total refunded) - fee(refunded before), capped (Alipay)


def clearing(wallet: str) -> str:
    """The provider clearing account of a wallet."""
    return f"clearing:{wallet}"


def provider_fees(wallet: str) -> str:
    """The provider fee account of a wallet."""
    return f"provider_fees:{wallet}"


def hotel_payable(hotel_id: int) -> str:
    """The account of what is owed to one hotel."""
    return f"hotel_payable:{hotel_id}"


def suspense(wallet: str) -> str:
    """The account of money that passed through a wallet without being revenue."""
    return f"suspense:{wallet}"


MANUFACTURER_REVENUE = "manufacturer_revenue"


@dataclass(frozen=True, slots=True)
class Line:
    """One side of an entry: a debit or a credit, in positive fen, on one account."""

    account: str
    debit_fen: Fen = 0
    credit_fen: Fen = 0

    def __post_init__(self) -> None:
        for value in (self.debit_fen, self.credit_fen):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidAmountError(f"line amounts are non-negative fen, got {value!r}")
        if (self.debit_fen == 0) == (self.credit_fen == 0):
            raise LedgerError(f"a line on {self.account} is either a debit or a credit")

    @property
    def signed_fen(self) -> Fen:
        """Debit positive, credit negative."""
        return self.debit_fen - self.credit_fen


def _line(account: str, signed_fen: Fen) -> Line | None:
    """A debit for a positive amount, a credit for a negative one, nothing for zero."""
    if signed_fen > 0:
        return Line(account, debit_fen=signed_fen)
    if signed_fen < 0:
        return Line(account, credit_fen=-signed_fen)
    return None


@dataclass(frozen=True, slots=True)
class Posting:
    """An entry to write: its lines balance exactly, and there is at least one."""

    kind: EntryKind
    source_key: str
    lines: tuple[Line, ...]

    def __post_init__(self) -> None:
        check_balanced(self.lines)


def check_balanced(lines: Sequence[Line]) -> None:
    """Raise LedgerError unless the lines are non-empty and debits equal credits."""
    if not lines:
        raise LedgerError("an entry needs at least one line")
    if sum(line.signed_fen for line in lines) != 0:
        raise LedgerError("an entry's debits and credits differ")


def balances(lines: Iterable[Line]) -> dict[str, Fen]:
    """Each account's balance, debit positive, from any lines."""
    result: dict[str, Fen] = {}
    for line in lines:
        result[line.account] = result.get(line.account, 0) + line.signed_fen
    return {account: fen for account, fen in result.items() if fen != 0}


# --- contracts ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HotelContract:
    """A hotel's revenue share from `effective_from` on, until a later contract starts."""

    effective_from: date
    share_bp: int
    basis: ShareBasis
    min_monthly_guarantee_fen: Fen = 0

    def __post_init__(self) -> None:
        if not 0 <= self.share_bp <= BP_WHOLE:
            raise LedgerError(f"a share is 0..{BP_WHOLE} basis points, got {self.share_bp}")
        if self.min_monthly_guarantee_fen < 0:
            raise LedgerError("a guarantee cannot be negative")


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """A provider's fee from `effective_from` on: `rate_bp` of each payment line."""

    effective_from: date
    rate_bp: int
    refund_rule: RefundFeeRule

    def fee(self, amount_fen: Fen) -> Fen:
        """The fee on an amount: rate times amount, rounded half up to the fen."""
        if amount_fen < 0:
            raise InvalidAmountError("a fee is charged on a non-negative amount")
        return (amount_fen * self.rate_bp * 2 + BP_WHOLE) // (2 * BP_WHOLE)

    def fee_back(self, paid_fen: Fen, refunded_before_fen: Fen, refund_fen: Fen) -> Fen:
        """The fee the provider gives back on a refund of `refund_fen`."""
        if self.refund_rule is RefundFeeRule.PER_LINE:
            return self.fee(refund_fen)
        charged = self.fee(paid_fen)
        after = min(self.fee(refunded_before_fen + refund_fen), charged)
        return after - min(self.fee(refunded_before_fen), charged)


_Terms = TypeVar("_Terms", HotelContract, FeeSchedule)


def in_force(terms: Iterable[_Terms], day: date) -> _Terms:
    """The terms in force on `day`: the latest that started on or before it."""
    started = [t for t in terms if t.effective_from <= day]
    if not started:
        raise LedgerError(f"no terms in force on {day.isoformat()}")
    return max(started, key=lambda t: t.effective_from)


# --- the split ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    """How an amount kept divides: hotel + manufacturer + fee == kept, always."""

    kept_fen: Fen
    fee_fen: Fen
    hotel_fen: Fen
    manufacturer_fen: Fen


def split(kept_fen: Fen, fee_fen: Fen, contract: HotelContract) -> Split:
    """Divide money kept after fees between the hotel and the manufacturer.

    The hotel gets `floor(base * share_bp / 10000)` (never below zero), where the
    base is the amount kept (gross) or the amount kept minus the fee (net); the
    manufacturer gets the remainder, and so bears the fee and every rounding fen.
    """
    if kept_fen < 0:
        raise InvalidAmountError(f"cannot keep a negative amount: {kept_fen}")
    base = kept_fen if contract.basis is ShareBasis.GROSS else kept_fen - fee_fen
    hotel = max(0, base * contract.share_bp // BP_WHOLE)
    return Split(kept_fen, fee_fen, hotel, kept_fen - fee_fen - hotel)


@dataclass(frozen=True, slots=True)
class OrderMoney:
    """An order's money so far, as posted: what was paid and refunded, the net fee."""

    paid_fen: Fen = 0
    refunded_fen: Fen = 0
    fee_fen: Fen = 0

    @property
    def kept_fen(self) -> Fen:
        """What the guest paid and did not get back."""
        return self.paid_fen - self.refunded_fen


def payment_posting(
    order_id: str,
    wallet: str,
    hotel_id: int,
    amount_fen: Fen,
    fees: FeeSchedule,
    contract: HotelContract,
) -> Posting:
    """Book a payment received and split: clearing (net) + fee = hotel + manufacturer."""
    fee = fees.fee(amount_fen)
    share = split(amount_fen, fee, contract)
    return Posting(
        EntryKind.PAYMENT,
        order_id,
        _lines(
            (clearing(wallet), amount_fen - fee),
            (provider_fees(wallet), fee),
            (hotel_payable(hotel_id), -share.hotel_fen),
            (MANUFACTURER_REVENUE, -(amount_fen - share.hotel_fen)),
        ),
    )


def suspense_payment_posting(
    order_id: str, wallet: str, amount_fen: Fen, fees: FeeSchedule
) -> Posting:
    """Book money received that is not revenue (flagged, or late and given back)."""
    fee = fees.fee(amount_fen)
    return Posting(
        EntryKind.PAYMENT_SUSPENSE,
        order_id,
        _lines(
            (clearing(wallet), amount_fen - fee),
            (provider_fees(wallet), fee),
            (suspense(wallet), -amount_fen),
        ),
    )


def refund_posting(
    refund_key: str,
    wallet: str,
    hotel_id: int,
    before: OrderMoney,
    refund_fen: Fen,
    fees: FeeSchedule,
    contract: HotelContract,
) -> Posting:
    """Book a refund of a split payment: the split of what is kept now, minus before.

    Both splits come from the same contract (the one in force when the guest paid), so
    the order's shares always equal the split of its cumulative money.
    """
    fee_back, after = _after_refund(before, refund_fen, fees)
    old = split(before.kept_fen, before.fee_fen, contract)
    new = split(after.kept_fen, after.fee_fen, contract)
    hotel_delta = old.hotel_fen - new.hotel_fen  # what the hotel gives back
    return Posting(
        EntryKind.REFUND,
        refund_key,
        _lines(
            (clearing(wallet), -(refund_fen - fee_back)),
            (provider_fees(wallet), -fee_back),
            (hotel_payable(hotel_id), hotel_delta),
            (MANUFACTURER_REVENUE, refund_fen - hotel_delta),
        ),
    )


def suspense_refund_posting(
    refund_key: str, wallet: str, before: OrderMoney, refund_fen: Fen, fees: FeeSchedule
) -> Posting:
    """Book the refund of suspense money: out of suspense, back through clearing."""
    fee_back, _ = _after_refund(before, refund_fen, fees)
    return Posting(
        EntryKind.REFUND_SUSPENSE,
        refund_key,
        _lines(
            (clearing(wallet), -(refund_fen - fee_back)),
            (provider_fees(wallet), -fee_back),
            (suspense(wallet), refund_fen),
        ),
    )


def _after_refund(before: OrderMoney, refund_fen: Fen, fees: FeeSchedule) -> tuple[Fen, OrderMoney]:
    if refund_fen <= 0 or refund_fen > before.kept_fen:
        raise LedgerError(f"a refund of {refund_fen} fen on an order keeping {before.kept_fen} fen")
    fee_back = fees.fee_back(before.paid_fen, before.refunded_fen, refund_fen)
    after = OrderMoney(before.paid_fen, before.refunded_fen + refund_fen, before.fee_fen - fee_back)
    return fee_back, after


def guarantee_posting(hotel_id: int, period: str, topup_fen: Fen) -> Posting:
    """Pay the hotel up to its minimum monthly guarantee, at the manufacturer's cost."""
    if topup_fen <= 0:
        raise LedgerError("a guarantee top-up is a positive amount")
    return Posting(
        EntryKind.GUARANTEE_TOPUP,
        f"{hotel_id}:{period}",
        _lines((MANUFACTURER_REVENUE, topup_fen), (hotel_payable(hotel_id), -topup_fen)),
    )


def _lines(*amounts: tuple[str, Fen]) -> tuple[Line, ...]:
    return tuple(line for account, fen in amounts if (line := _line(account, fen)) is not None)


# --- reading entries back ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntryFigures:
    """What one entry means for a statement."""

    gross_fen: Fen  # a split payment received
    refunded_fen: Fen  # given back on a split payment
    fee_fen: Fen  # provider fee charged (negative: given back)
    hotel_fen: Fen
    manufacturer_fen: Fen  # after fees
    suspense_fen: Fen  # money passed through, not revenue (negative when given back)


def figures(kind: EntryKind, lines: Iterable[Line]) -> EntryFigures:
    """Read an entry's lines back into statement figures.

    For every entry gross - refunded == hotel + manufacturer + fee, and suspense
    entries carry their money in `suspense_fen` alone.
    """
    hotel = fee = revenue = sus = money = 0
    for line in lines:
        prefix = line.account.split(":", 1)[0]
        if prefix == "hotel_payable":
            hotel -= line.signed_fen
        elif prefix == "provider_fees":
            fee += line.signed_fen
            money += line.signed_fen
        elif prefix == "clearing":
            money += line.signed_fen
        elif prefix == "suspense":
            sus -= line.signed_fen
        elif line.account == MANUFACTURER_REVENUE:
            revenue -= line.signed_fen
    if kind in SUSPENSE_KINDS:
        return EntryFigures(0, 0, fee, 0, -fee, sus)
    if kind is EntryKind.GUARANTEE_TOPUP:
        return EntryFigures(0, 0, 0, hotel, revenue, 0)
    gross = money if money > 0 else 0
    return EntryFigures(gross, gross - money, fee, hotel, revenue - fee, 0)


# --- periods -----------------------------------------------------------------------


class Granularity(StrEnum):
    """How long a statement period is."""

    DAY = "day"
    MONTH = "month"


@dataclass(frozen=True, slots=True)
class Period:
    """A statement period in Beijing time: a day (YYYY-MM-DD) or a month (YYYY-MM)."""

    granularity: Granularity
    first: date
    last: date

    @property
    def label(self) -> str:
        """The period as written: YYYY-MM-DD or YYYY-MM."""
        if self.granularity is Granularity.DAY:
            return self.first.isoformat()
        return self.first.strftime("%Y-%m")

    def ends_at(self) -> datetime:
        """The instant (UTC) after the period's last Beijing day."""
        start = datetime(self.last.year, self.last.month, self.last.day, tzinfo=BEIJING)
        return (start + timedelta(days=1)).astimezone(UTC)

    def period_of(self, day: date) -> "Period":
        """The period of the same granularity that holds `day`."""
        return day_period(day) if self.granularity is Granularity.DAY else month_period(day)

    def following(self) -> "Period":
        """The next period of the same granularity."""
        return self.period_of(self.last + timedelta(days=1))


def day_period(day: date) -> Period:
    """The one-day period of `day`."""
    return Period(Granularity.DAY, day, day)


def month_period(day: date) -> Period:
    """The calendar month that holds `day`."""
    first = day.replace(day=1)
    nxt = (first + timedelta(days=32)).replace(day=1)
    return Period(Granularity.MONTH, first, nxt - timedelta(days=1))


def parse_period(text: str) -> Period:
    """Parse YYYY-MM (a month) or YYYY-MM-DD (a day); raise ValueError otherwise."""
    value = text.strip()
    if len(value) == 10:
        return day_period(date.fromisoformat(value))
    if len(value) == 7 and value[4] == "-":
        return month_period(date.fromisoformat(f"{value}-01"))
    raise ValueError(f"a period is YYYY-MM or YYYY-MM-DD, got {text!r}")


def beijing_day(moment: datetime) -> date:
    """The Beijing calendar day of an instant."""
    return moment.astimezone(BEIJING).date()
