"""Reading a secret key from a file, bounded, or from the environment: the bundle key and the server's API key.

Standard library only, so the CLI and the server read and check keys before anything heavy is imported.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping

from catrt.errors import ConfigError, echo_path

#: Largest key file read: a key is a few dozen bytes, and /dev/zero or a huge file must not be read whole.
MAX_KEY_FILE_BYTES = 64 * 1024


def read_key_file(path: str | os.PathLike[str], field_name: str = "bundle_key_file", what: str = "key file") -> bytes:
    """The key in a file, surrounding whitespace dropped; an unreadable, empty, oversized or non-regular file
    (a folder, a pipe that would block, a device such as /dev/zero) is a ConfigError naming it (`what` says
    which key: the bundle's, the server's API key)."""
    if not os.fspath(path).strip():  # an unset shell variable: "cannot read the key file : No such file" named nothing
        raise ConfigError(f"the {what} path is empty; give the file holding the key", field=field_name, value=str(path))
    try:
        with open(path, "rb", opener=_nonblocking) as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ConfigError(
                    f"the {what} {echo_path(path)} is not a regular file; give a file holding the key", field=field_name, value=str(path)
                )
            key = stream.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(
            f"cannot read the {what} {echo_path(path)}: {error.strerror or type(error).__name__}", field=field_name, value=str(path)
        ) from None
    if len(key) > MAX_KEY_FILE_BYTES:
        raise ConfigError(
            f"the {what} {echo_path(path)} is over {MAX_KEY_FILE_BYTES} bytes; a key is a short secret: give a file holding only it",
            field=field_name, value=str(path),
        )
    key = key.strip()
    if not key:
        raise ConfigError(f"the {what} {echo_path(path)} is empty", field=field_name, value=str(path))
    return key


def read_key_variable(environ: Mapping[str, str], name: str, field_name: str, use: str, without: str) -> str | None:
    """`$name`, surrounding whitespace dropped; None when unset. Set but blank (an unfilled deployment
    secret) is a ConfigError, never taken as "no key": that would drop the check the operator meant to have.
    `use` says what the key is for, `without` what unsetting it does."""
    if name not in environ:
        return None
    key = environ[name].strip()
    if not key:
        raise ConfigError(f"${name} is set but empty; set it to {use}, or unset it to {without}", field=field_name)
    return key


def _nonblocking(path: str, flags: int) -> int:
    """Open without blocking: a FIFO with no writer would otherwise hang `open` (it is refused as non-regular)."""
    return os.open(path, flags | os.O_NONBLOCK)
