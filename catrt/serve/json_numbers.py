"""JSON numbers whose float is a whole number the client did not write, kept with the text they wrote.

Python's parser reads `9007199254740993.0` as the float 2**53 and `0.99999999999999999999` as 1.0: whole
floats, but not the numbers sent. An integer field (`seed`, `n`, `steps`) that took such a float as its
integer would serve a number nobody asked for. `parse_float` marks those floats (every other number parses
as before, and a marked one is still a float to every float field), so an integer field takes the exact
integer written (`written_value`), refuses a written fraction, and an error shows the number as sent.
"""

from __future__ import annotations

from decimal import MIN_ETINY, Decimal, InvalidOperation


class WrittenFloat(float):
    """A whole float that is not the number its JSON text writes; `text` is that text."""

    text: str

    def __new__(cls, text: str) -> WrittenFloat:
        number = super().__new__(cls, text)
        number.text = text
        return number


def parse_float(text: str) -> float:
    """`float(text)`, or a `WrittenFloat` when that float is whole but not the number `text` writes."""
    number = float(text)
    if number.is_integer() and _exact(text) != number:
        return WrittenFloat(text)
    return number


def written_value(number: float) -> Decimal:
    """The exact number a finite parsed JSON float was written as (its text's for a `WrittenFloat`)."""
    return _exact(number.text) if isinstance(number, WrittenFloat) else Decimal(number)


def _exact(text: str) -> Decimal:
    """`Decimal(text)`, for a JSON number whose float is finite. One whose exponent is past a Decimal's
    (`1e-99999999999999999999`, valid JSON) raises there; its float is 0.0, and it is 0 (all digits zero) or a
    fraction nearer 0 than any float, which the smallest Decimal of its sign stands for (not a whole number)."""
    try:
        return Decimal(text)
    except InvalidOperation:
        digits = text.lower().partition("e")[0]
        if not digits.strip("-0."):
            return Decimal(0)
        return Decimal(f"{'-' if digits.startswith('-') else ''}1e{MIN_ETINY}")
