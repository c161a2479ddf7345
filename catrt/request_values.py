"""The values one generation may be asked for, the same from `catrt generate` and from the server.

Declared once here so the command line and the HTTP server refuse the same prompt, seed and guidance
with the same words: a prompt must have a visible character and no control characters (tabs and line
breaks aside: a NUL or an escape sequence is never part of a picture's description), a seed must fit
torch's generator, a guidance scale must be a finite number >= 0.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Callable

from catrt.errors import ConfigError, echo

#: Largest seed served: a signed 64-bit integer's, as the OpenAPI document states seeds (int64) and clients hold them;
#: torch's generators also take 2**63 to 2**64 - 1. Image i of a request uses seed + i.
MAX_SEED = 2**63 - 1
#: The control characters a prompt may hold.
ALLOWED_CONTROLS = frozenset("\t\n\r")


def _invisible(char: str) -> bool:
    """Whitespace or a format character (zero-width space, BOM, ...): nothing a model can draw."""
    return char.isspace() or unicodedata.category(char) == "Cf"


def _control(char: str) -> bool:
    return unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROLS


def check_prompt_text(name: str, text: str, *, blank_ok: bool = False) -> None:
    """Raise a ConfigError naming `name` for a control character, or (unless `blank_ok`) no visible character."""
    for index, char in enumerate(text):
        if _control(char):
            raise ConfigError(
                f"{name} has the control character U+{ord(char):04X} at character {index}; send plain text "
                "(tabs and line breaks are fine)",
                field=name,
            )
    if not blank_ok and all(_invisible(char) for char in text):
        raise ConfigError(f"{name} must not be empty or blank: give the text to draw", field=name)


def largest_seed(images: int) -> int:
    """The largest first seed of `images` images: image i uses seed + i, and each must fit torch's generator."""
    return MAX_SEED - (images - 1)


def check_seed(seed: int, images: int = 1, name: str = "seed") -> int:
    """`seed` if it and the seeds of the later images (seed + i) fit torch's generator; else a ConfigError."""
    largest = largest_seed(images)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= largest:
        raise ConfigError(f"{name} must be an integer in [0, {largest}], got {echo(seed)}", field=name, value=seed)
    return seed


def check_guidance(value: float, name: str = "guidance_scale") -> float:
    """`value` as a float if it is a finite number >= 0; else a ConfigError naming `name`."""
    guidance = float(value)
    if not math.isfinite(guidance) or guidance < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {echo(value)}", field=name, value=value)
    return guidance


@functools.cache
def prompt_pattern() -> str:
    """A JSON Schema `pattern` for the prompts `check_prompt_text` takes.

    Written from the same rule, over the Basic Multilingual Plane (a scan of all of Unicode takes most
    of a second); the few format characters above it (tags) are refused by the check alone.
    """
    controls = _char_class(_control)
    refused = _char_class(lambda char: _control(char) or _invisible(char))
    return f"^[^{controls}]*[^{refused}][^{controls}]*$"


@functools.cache
def plain_text_pattern() -> str:
    """A JSON Schema `pattern` for the texts `check_prompt_text(..., blank_ok=True)` takes (a negative prompt):
    no control characters but tabs and line breaks."""
    return f"^[^{_char_class(_control)}]*$"


@functools.cache
def blank_text_pattern() -> str:
    """A JSON Schema `pattern` for the negative prompts a model that reads none takes (`PipelineSpec.
    refuse_unread_negative_prompt`): blank ones (what `str.strip` removes), no control characters but tabs and line
    breaks."""
    return f"^[{_char_class(lambda char: char.isspace() and not _control(char))}]*$"


def _char_class(member: Callable[[str], bool]) -> str:
    """The BMP code points (surrogates aside) for which `member` is true, as `\\uXXXX` class ranges."""
    ranges: list[tuple[int, int]] = []
    for point in range(0x10000):
        if 0xD800 <= point <= 0xDFFF or not member(chr(point)):
            continue
        if ranges and ranges[-1][1] == point - 1:
            ranges[-1] = (ranges[-1][0], point)
        else:
            ranges.append((point, point))
    return "".join(f"\\u{low:04x}" if low == high else f"\\u{low:04x}-\\u{high:04x}" for low, high in ranges)
