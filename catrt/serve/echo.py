"""How an error body shows a value the client sent: catrt's one echo rule (`catrt.errors`), plus JSON's form.

Every message that repeats a request value (a field, a field's name, a header, a path) goes
through here or `catrt.errors.echo`, so a 50 kB `size` or field name costs the client a 50 kB
answer nowhere: what is shown is at most `ECHO_LIMIT` characters, its start and end around "…".
"""

from __future__ import annotations

import json

from catrt.errors import ECHO_LIMIT, echo, shorten
from catrt.serve.json_numbers import WrittenFloat

__all__ = ["ECHO_LIMIT", "echo", "echo_json", "shorten"]


def echo_json(value: object, limit: int = ECHO_LIMIT) -> str:
    """`value` as the client wrote it in JSON (for a value of any JSON type: `null`, `true`, arrays), shortened.

    ASCII-escaped, so a lone surrogate a client sent stays safe in a UTF-8 answer and a log line. A number its float
    does not hold (`4503599627370497.5` parses to a whole float) is shown as written."""
    if isinstance(value, WrittenFloat):
        return shorten(value.text, limit)
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):  # not JSON data (an int past Python's 4300-digit limit is not parsed)
        return echo(value, limit)
    return shorten(text, limit)
