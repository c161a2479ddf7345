"""How an error message shows a value the client sent: as written, cut short.

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
    """`value` as JSON writes it (strings quoted, non-ASCII and lone surrogates escaped), shortened.

    Escaped, so that any text a client sent is safe in a UTF-8 answer and a log line."""
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):  # not JSON data (an int past Python's 4300-digit limit is not parsed)
        text = f"<{type(value).__name__}>"
    return shortened(text, limit)
