"""The one rule of catrt's hand-written config validators (CATConfig, BuildConfig, ServeConfig): a field
that breaks its rule is a ConfigError naming `Owner.field`, what it must be and the value given, so the
CLI, the server's 4xx bodies and bundle checks all say the same thing for the same mistake."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from catrt.errors import ConfigError, echo

#: Images one model call may take (`catrt build --batch`, `catrt serve --batch`): a server warms up at its
#: full batch before it answers, and OpenAI's images API asks for at most 10 images per request.
MAX_BATCH = 64

#: Most denoising steps a run or a build may ask for: diffusers' schedulers train on 1000 timesteps, and a mistyped
#: huge count (or a bundle's edited build.steps) would allocate its schedule and run for days before anything is written.
MAX_STEPS = 1000

#: Index buffers (one per k) and captured pruned graphs the runtime keeps per shape (`catrt.step_state`): a server's
#: alphas must fit (`catrt serve --alpha`), while a library user who calls with ever new alphas does not pile them up.
MAX_KEPT_ALPHAS = 8


def integer(value: Any) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def repeated(values: Sequence[Any]) -> list[Any]:
    """The values listed more than once, each once, sorted: what a "listed twice" refusal names."""
    return sorted({value for value in values if values.count(value) > 1})


#: How close two alphas may be and still be two: a call's alpha names a built one to float32 precision.
ALPHA_REL_TOL = 1e-6


def alike_alphas(alphas: Sequence[float]) -> tuple[float, float] | None:
    """The first pair of distinct `alphas` equal to float32 precision (one alpha to whoever names it), else None."""
    for index, alpha in enumerate(alphas):
        for other in alphas[:index]:
            if math.isclose(alpha, other, rel_tol=ALPHA_REL_TOL):
                return other, alpha
    return None


def path_is(path: Path, kind: Literal["file", "folder", "any"] = "any") -> bool:
    """Whether `path` exists (as a file, a folder). One the OS cannot look up (a name over 255 bytes, say) does
    not: pathlib raises for it, and a user's mistyped path gets its own one-line refusal, not a traceback."""
    try:
        return path.is_file() if kind == "file" else path.is_dir() if kind == "folder" else path.exists()
    except OSError:
        return False


def writable_folder(folder: Path, named: str, fix: str, field: str) -> None:
    """Make `folder` now, before minutes of work, or refuse it: "<named> cannot be a folder (why); <fix>" when
    it cannot be made, "<named> is not writable; <fix>" when this user cannot write in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "it is a file" if path_is(folder, "file") else error.strerror or type(error).__name__
        raise ConfigError(f"{named} cannot be a folder ({reason}); {fix}", field=field, value=str(folder)) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{named} is not writable; {fix}", field=field, value=str(folder))


def output_folder(folder: Path, named: str, holds: str, field: str) -> None:
    """A folder for `holds`, made now: "<named> is a file; give a folder for <holds>" where a file is, else
    `writable_folder`'s refusals with the fix "give a folder you can write for <holds>"."""
    if path_is(folder) and not path_is(folder, "folder"):
        raise ConfigError(f"{named} is a file; give a folder for {holds}", field=field, value=str(folder))
    writable_folder(folder, named, f"give a folder you can write for {holds}", field=field)


def require(owner: str, name: str, value: Any, valid: bool, must_be: str) -> None:
    """Raise `Owner.name must be <must_be>, got <value>` unless `valid`; a value of another type than Python's
    own scalars is named by its type too, as `tensor(0.3000)` reads like a valid 0.3."""
    if not valid:
        kind = "" if isinstance(value, (int, float, str, type(None))) else f" (a {type(value).__name__})"
        raise ConfigError(f"{owner}.{name} must be {must_be}, got {echo(value)}{kind}", field=name, value=value)
