"""Money: fen to yuan strings and back, exactly, and the bounds of an order's price."""

import re
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roompay.domain.errors import InvalidAmountError
from roompay.domain.money import (
    MAX_ORDER_FEN,
    check_order_amount,
    format_cny,
    parse_yuan,
    yuan_str,
)

# Amounts are stored in BigInteger columns: every signed 64-bit number of fen is a real amount.
BIGINT_FEN = st.integers(min_value=-(2**63), max_value=2**63 - 1)


# --- yuan_str ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount_fen", "expected"),
    [
        (0, "0.00"),
        (1, "0.01"),
        (5, "0.05"),
        (99, "0.99"),
        (100, "1.00"),
        (305, "3.05"),
        (123456, "1234.56"),
        (-1, "-0.01"),
        (-120, "-1.20"),
        (-100, "-1.00"),
    ],
)
def test_yuan_str_writes_exactly_two_decimals(amount_fen: int, expected: str) -> None:
    assert yuan_str(amount_fen) == expected


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3.05, "3.05"),
        (3.0, "3.0"),
        (True, "True"),
        (False, "False"),
        (Decimal("3"), "Decimal('3')"),
    ],
)
def test_yuan_str_given_a_float_bool_or_decimal_refuses_it(value: object, shown: str) -> None:
    with pytest.raises(
        InvalidAmountError,
        match=f"^{re.escape(f'amount must be an integer number of fen, got {shown}')}$",
    ):
        yuan_str(value)  # type: ignore[arg-type]


# --- parse_yuan ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected_fen"),
    [
        ("3.05", 305),
        ("3", 300),
        ("3.0", 300),
        ("3.050", 305),
        ("-1.20", -120),
        ("0.01", 1),
        ("0.00", 0),
        ("-0", 0),
        (" 8.00\n", 800),
        ("100000.00", MAX_ORDER_FEN),
    ],
)
def test_parse_yuan_reads_exact_fen(text: str, expected_fen: int) -> None:
    assert parse_yuan(text) == expected_fen


@pytest.mark.parametrize("text", ["0.001", "3.055", "-1.201", "0.0000001"])
def test_parse_yuan_given_fractions_of_a_fen_refuses_them(text: str) -> None:
    with pytest.raises(
        InvalidAmountError,
        match=f"^{re.escape(f'yuan amount has fractions of a fen: {text!r}')}$",
    ):
        parse_yuan(text)


@pytest.mark.parametrize(
    "text",
    ["abc", "", "   ", "NaN", "sNaN", "Infinity", "-Infinity", "inf", "3,05", "¥3.05", "3.05元"],
)
def test_parse_yuan_given_garbage_refuses_it(text: str) -> None:
    with pytest.raises(InvalidAmountError, match=f"^{re.escape(f'not a yuan amount: {text!r}')}$"):
        parse_yuan(text)


@given(amount_fen=BIGINT_FEN)
def test_parse_yuan_of_yuan_str_gives_back_the_same_fen(amount_fen: int) -> None:
    # Given any amount, when written as yuan and read back, then nothing is lost
    assert parse_yuan(yuan_str(amount_fen)) == amount_fen


@given(amount_fen=BIGINT_FEN, extra_zeros=st.integers(min_value=1, max_value=6))
def test_parse_yuan_ignores_trailing_zero_decimals(amount_fen: int, extra_zeros: int) -> None:
    assert parse_yuan(yuan_str(amount_fen) + "0" * extra_zeros) == amount_fen


@given(amount_fen=BIGINT_FEN, third_decimal=st.integers(min_value=1, max_value=9))
def test_parse_yuan_given_a_nonzero_third_decimal_refuses_it(
    amount_fen: int, third_decimal: int
) -> None:
    text = f"{yuan_str(amount_fen)}{third_decimal}"

    with pytest.raises(InvalidAmountError, match=r"^yuan amount has fractions of a fen: "):
        parse_yuan(text)


# --- format_cny ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount_fen", "expected"),
    [
        (0, "¥0.00"),
        (1, "¥0.01"),
        (305, "¥3.05"),
        (800, "¥8.00"),
        (150000, "¥1500.00"),
        (-120, "¥-1.20"),
    ],
)
def test_format_cny_prefixes_the_yuan_sign(amount_fen: int, expected: str) -> None:
    assert format_cny(amount_fen) == expected


def test_format_cny_given_a_float_refuses_it() -> None:
    with pytest.raises(
        InvalidAmountError, match=r"^amount must be an integer number of fen, got 3\.05$"
    ):
        format_cny(3.05)  # type: ignore[arg-type]


# --- check_order_amount --------------------------------------------------------


@pytest.mark.parametrize("amount_fen", [1, 800, MAX_ORDER_FEN])
def test_check_order_amount_returns_an_amount_within_bounds(amount_fen: int) -> None:
    assert check_order_amount(amount_fen) == amount_fen


@pytest.mark.parametrize("amount_fen", [0, -1, MAX_ORDER_FEN + 1])
def test_check_order_amount_refuses_an_amount_out_of_bounds(amount_fen: int) -> None:
    with pytest.raises(
        InvalidAmountError,
        match=f"^{re.escape(f'amount {amount_fen} fen is outside 1..10000000')}$",
    ):
        check_order_amount(amount_fen)


@pytest.mark.parametrize(("value", "shown"), [(True, "True"), (8.0, "8.0"), ("800", "'800'")])
def test_check_order_amount_given_a_non_integer_refuses_it(value: object, shown: str) -> None:
    # True == 1 would otherwise pass as one fen
    with pytest.raises(
        InvalidAmountError,
        match=f"^{re.escape(f'amount must be an integer number of fen, got {shown}')}$",
    ):
        check_order_amount(value)  # type: ignore[arg-type]


def test_max_order_fen_is_one_hundred_thousand_yuan() -> None:
    assert MAX_ORDER_FEN == 10_000_000
    assert yuan_str(MAX_ORDER_FEN) == "100000.00"


@given(amount_fen=BIGINT_FEN)
def test_check_order_amount_accepts_exactly_the_range_one_to_max(amount_fen: int) -> None:
    in_range = 1 <= amount_fen <= MAX_ORDER_FEN
    try:
        checked = check_order_amount(amount_fen)
    except InvalidAmountError:
        assert not in_range
    else:
        assert in_range
        assert checked == amount_fen
