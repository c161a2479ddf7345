"""The CAT Pruning flags, generated from CATConfig's fields and read back into a CATConfig."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from typing import Any, Literal

from catrt.cli.model_flags import card_defaults
from catrt.cli.parsing import Several, flag_name
from catrt.config import CATConfig  # stdlib + catrt.errors only

# CATConfig fields that are not flags: the seed is per image (--seed), the trace is for Python callers, and
# reuse_threshold is a bench baseline no engine or server schedule runs (`catrt compare --reuse-threshold`).
NOT_CAT_FLAGS: tuple[str, ...] = ("seed", "trace", "reuse_threshold")


def add_cat_flags(
    parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), several: tuple[str, ...] = (), own_schedule: bool = False
) -> None:
    """Every CATConfig field a user sets per run, as a kebab-case flag, generated from the dataclass.

    Types, choices and defaults come from the field, the help from CATConfig's docstring, so a new
    field is a new flag with no change here. Flags default to None so that giving one can be told
    from not giving it (a build fixes some); `cat_config` fills in CATConfig's own defaults. Fields
    in `several` take one or more values (serve's --alpha); the config gets the first. With `own_schedule`
    (generate, serve: they run a published model's own t0, `card_schedule`) --t0's help names those models.
    """
    defaults, hints, helps = CATConfig(), typing.get_type_hints(CATConfig), _field_help(CATConfig)
    group = parser.add_argument_group("CAT Pruning")
    for field in _cat_fields():
        if field.name in skip:
            continue
        default = getattr(defaults, field.name)
        text = helps.get(field.name, field.name.replace("_", " ")).rstrip(".")
        kwargs: dict[str, Any] = {"default": None, "help": f"{text} (default: {default})"}
        if field.name == "t0" and own_schedule:
            kwargs["help"] += f"; a published model's own where it has one, {card_defaults('default_t0', default)}"
        if typing.get_origin(hints[field.name]) is Literal:
            kwargs["choices"] = typing.get_args(hints[field.name])
        else:
            kwargs["type"] = type(default)
        if field.name in several:
            kwargs.update(nargs="+", action=Several, metavar=field.name.upper())  # repeated, as build's --alpha
            kwargs["help"] = (f"{text}; several values (--{field.name} A B, or repeated) serve each of them, the first is "
                              f"the default (default: {default})")
        group.add_argument(flag_name(field.name), **kwargs)


def _cat_fields() -> list[dataclasses.Field]:
    return [field for field in dataclasses.fields(CATConfig) if field.name not in NOT_CAT_FLAGS]


def _field_help(cls: type) -> dict[str, str]:
    """`name: text` entries of a class docstring's Args section (continuation lines joined)."""
    helps: dict[str, str] = {}
    section = (cls.__doc__ or "").partition("Args:")[2]
    name = None
    for line in section.splitlines():
        match = re.match(r"^\s{8}(\w+(?:, \w+)*): (.*)$", line)
        if match:
            name = match.group(1)
            for each in name.split(", "):
                helps[each] = match.group(2).strip()
        elif name and line.strip():
            for each in name.split(", "):
                helps[each] += " " + line.strip()
        elif not line.strip() and helps:
            name = None
    return helps


def cat_values(args: argparse.Namespace) -> dict[str, Any]:
    """The CAT flags the user gave (of a flag taking several values, the first)."""
    values = {field.name: getattr(args, field.name) for field in _cat_fields() if getattr(args, field.name, None) is not None}
    return {name: value[0] if isinstance(value, list) else value for name, value in values.items()}


def cat_config(args: argparse.Namespace, seed: int = 0, t0: int | None = None) -> CATConfig:
    """The CATConfig the flags ask for (`t0`: the schedule's, see `card_schedule`); validated here, before any model
    is loaded."""
    values = cat_values(args) if t0 is None else {**cat_values(args), "t0": t0}
    return CATConfig(**values, seed=seed)
