"""Folder flags several commands share: an empty path (an unset shell variable) is refused by name."""

from __future__ import annotations

from pathlib import Path

from catrt.errors import ConfigError


def engine_folder(value: str, named: str) -> Path:
    """A bundle folder given on the command line; an empty one (an unset shell variable) is refused as such, not
    read as the working directory ("manifest.json is missing: . is not a catrt engine folder")."""
    refuse_empty(value, named, "give an engines/<build-name> folder (catrt build)", "engines")
    return Path(value)


def refuse_empty(value: str, named: str, fix: str, field: str) -> None:
    """A blank path (an unset shell variable) is refused as such: Path('') is the working directory, which a build or
    report would fill and a bundle check would name as '.'."""
    if not value.strip():
        raise ConfigError(f"{named} is empty; {fix}", field=field, value=value)
