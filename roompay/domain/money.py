"""Money is an integer number of fen (1 yuan = 100 fen). Never a float.

Providers speak two dialects: WeChat Pay uses integer fen, Alipay and both
providers' bills use yuan strings with two decimals ("3.00"). The conversions
here are exact, through integers and `Decimal`, and reject anything that is not
a whole number of fen.
"""

from decimal import Context, Decimal, Inexact, InvalidOperation

from roompay.domain.errors import InvalidAmountError

Fen = int

MAX_ORDER_FEN: Fen = 100_000_00  # 100,000 yuan: far above any appliance program

# Enough digits for any amount a string can carry, and an error rather than rounding.
_EXACT = Context(prec=1000, traps=[Inexact, InvalidOperation])


def yuan_str(amount_fen: Fen) -> str:
    """Format fen as a yuan string with exactly two decimals: 305 -> "3.05"."""
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
        raise InvalidAmountError(f"amount must be an integer number of fen, got {amount_fen!r}")
    sign = "-" if amount_fen < 0 else ""
    whole, cents = divmod(abs(amount_fen), 100)
    return f"{sign}{whole}.{cents:02d}"


def parse_yuan(text: str) -> Fen:
    """Parse a yuan string ("3", "3.0", "3.05", "-1.20") into fen, exactly."""
    cleaned = text.strip()
    try:
        value = Decimal(cleaned)
    except InvalidOperation as exc:
        raise InvalidAmountError(f"not a yuan amount: {text!r}") from exc
    if not value.is_finite():
        raise InvalidAmountError(f"not a yuan amount: {text!r}")
    try:
        fen = value.scaleb(2, _EXACT)  # exact at any size: a wide context that traps rounding
    except ArithmeticError as exc:
        raise InvalidAmountError(f"yuan amount too long: {text[:40]!r}") from exc
    if fen != fen.to_integral_value(context=_EXACT):
        raise InvalidAmountError(f"yuan amount has fractions of a fen: {text!r}")
    return int(fen)


def format_cny(amount_fen: Fen) -> str:
    """Format fen for people: 305 -> "¥3.05"."""
    return f"¥{yuan_str(amount_fen)}"


def check_order_amount(amount_fen: Fen) -> Fen:
    """Return the amount if it is a valid price for one order, else raise."""
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int):
        raise InvalidAmountError(f"amount must be an integer number of fen, got {amount_fen!r}")
    if not 1 <= amount_fen <= MAX_ORDER_FEN:
        raise InvalidAmountError(f"amount {amount_fen} fen is outside 1..{MAX_ORDER_FEN}")
    return amount_fen
