"""How an error message shows a value the client sent: escaped, cut short.

Every message that repeats a request value (a field, a field's name, a header, a path) goes
through here, so a 50 kB `size` or field name costs the client a 50 kB answer nowhere: what is
shown is at most `ECHO_CHARS` characters, the cut marked with an ellipsis.
"""

from __future__ import annotations

import json

ECHO_CHARS = 80
ELLIPSIS = "..."


def shortened(text: str, limit: int = ECHO_CHARS) -> str:
    """`text`, or its start and an ellipsis, `limit` characters in all, when it is longer."""
    return text if len(text) <= limit else text[: limit - len(ELLIPSIS)] + ELLIPSIS


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """`value` as Python writes it (strings quoted, control characters and lone surrogates escaped), shortened.

    Escaped, so that any text a client sent is safe in a UTF-8 answer and a log line."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for printing
        text = f"<{type(value).__name__}>"
    return shortened(text, limit)


def echo_json(value: object, limit: int = ECHO_CHARS) -> str:
    """`value` as the client wrote it in JSON (for a value of any JSON type: `null`, `true`, arrays), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):  # not JSON data (an int past Python's 4300-digit limit is not parsed)
        return echo(value, limit)
    return shortened(text, limit)
