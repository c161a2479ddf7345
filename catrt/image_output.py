"""The image file `catrt generate --out` writes: checked and reserved before any model loads, written whole.

A name PIL cannot write, a folder, a path under a file, an unwritable folder or another user's image in a sticky
folder (`/tmp`) is refused before the generation (which can take minutes) rather than after it. The image goes to a
temporary file beside the target and is renamed onto it, so Ctrl-C or a failed write never leaves a half image and
never destroys an image already there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from catrt import atomic_files
from catrt.checks import path_is
from catrt.errors import PATH_ECHO_LIMIT, ConfigError, echo

# Image formats `--out` may name (PIL format -> the extensions the message lists).
IMAGE_FORMATS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg, .jpeg", "WEBP": ".webp"}


def image_format(value: str) -> tuple[Path, str]:
    """The path `--out` names and the PIL format its extension picks; refused unless an image PIL writes."""
    from PIL import Image

    Image.init()
    writable = [ext for name, ext in IMAGE_FORMATS.items() if name in Image.SAVE]
    out = Path(value)
    format_ = Image.registered_extensions().get(out.suffix.lower())
    if format_ not in IMAGE_FORMATS or format_ not in Image.SAVE:
        raise ConfigError(f"--out {echo(value, PATH_ECHO_LIMIT)} is not an image file name: end it in {', '.join(writable)}", field="out", value=value)
    if path_is(out, "folder"):
        raise ConfigError(f"--out {echo(value, PATH_ECHO_LIMIT)} is a folder; give a file name such as {out / 'image.png'}", field="out", value=value)
    return out, format_


@contextlib.contextmanager
def staged_image(out: Path) -> Iterator[Path]:
    """A new empty file beside `out` (its folders made), renamed onto `out` when the block completes; a link at `out`
    is written through (beside the file it points to, whose folders are made, as `out`'s own are).

    Made on entry, so an unwritable place is a ConfigError before the block's work; removed if the
    block fails or is interrupted, leaving `out` as it was.
    """
    _check_folders(out)
    try:
        atomic_files.target(out).parent.mkdir(parents=True, exist_ok=True)  # a link's: the image is written through it
        refusal = atomic_files.replace_refusal(out)  # else refused only by the final rename, after the generation
        if refusal is not None:
            raise ConfigError(f"--out {echo(str(out), PATH_ECHO_LIMIT)} cannot be replaced: {refusal}", field="out",
                              value=str(out))
        staged = atomic_files.stage(out)
    except OSError as error:
        raise unwritable_out(out, error) from None
    try:
        yield staged
    except BaseException:  # the block's own error as it is: an OSError while loading a model is no --out problem
        atomic_files.discard(staged)  # and its lock
        raise
    try:
        atomic_files.commit(staged, out)
    except OSError as error:
        raise unwritable_out(out, error) from None


def save_image(image: Any, staged: Path, format_: str, out: Path) -> None:
    """Write `image` into the staged file of `out`; a failed write (a full disk) names --out."""
    try:
        image.save(staged, format=format_)
    except OSError as error:
        raise unwritable_out(out, error) from None


def _check_folders(out: Path) -> None:
    """The nearest existing folder above `out` must be a folder, not a file."""
    folder = out.parent.absolute()
    while not path_is(folder):
        folder = folder.parent
    if not path_is(folder, "folder"):
        raise ConfigError(f"--out {echo(str(out), PATH_ECHO_LIMIT)}: {folder} is a file, not a folder; pick another path",
                          field="out", value=str(out))


def unwritable_out(out: Path, error: OSError) -> ConfigError:
    """The one-line refusal of an `--out` (an image, or `catrt compare`'s folder) a write failed in, with the OS's reason."""
    reason = error.strerror or type(error).__name__
    return ConfigError(f"--out {echo(str(out), PATH_ECHO_LIMIT)} cannot be written ({reason}); pick a writable folder", field="out", value=str(out))
