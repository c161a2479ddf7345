"""The argparse machinery every `catrt` parser shares: one-line usage errors, defaults in every help, list flags
that a repeated flag extends, and the number types that make a bad count a usage error."""

from __future__ import annotations

import argparse
import typing
from typing import Any, NoReturn

from catrt.checks import MAX_STEPS  # stdlib + catrt.errors only
from catrt.cli.exits import escaped
from catrt.errors import echo, shorten


#: Characters a text editor or web page puts where `--` was typed: hyphen, non-breaking hyphen, figure dash, en dash,
#: em dash, horizontal bar, minus sign.
_TYPOGRAPHIC_DASHES = "\u2010\u2011\u2012\u2013\u2014\u2015\u2212"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default, except where there is none to show (None, a False flag) or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Subcommand parsers inherit the class: defaults in every help, one-line usage errors (also used by
    `python -m catrt.reference.train`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse's two wordings of a missing required flag: alone, or one of a required group (serve's --engines / --model)
        if message.startswith(("the following arguments are required", "one of the arguments ")):
            unknown = self._unknown_options()
            if unknown:  # argparse checks required flags first: `--promt x` would say only "--prompt is required"
                message = f"unrecognized arguments: {shorten(' '.join(unknown))}; {message}"
        # escaped: an unrecognized word is echoed as given, and one holding a newline (or a terminal escape) broke the line
        self.exit(2, f"{self.prog}: error: {escaped(message)} (see {self.prog} --help)\n")

    def _parse_known_args(self, arg_strings: list[str], *rest: Any) -> Any:
        self._words = list(arg_strings)  # for `error`: the words of this parser's own (sub)command
        return super()._parse_known_args(arg_strings, *rest)

    def _unknown_options(self) -> list[str]:
        """The words of this parser's own (sub)command that argparse itself read as options none of its options takes
        (`_parse_optional`, the reading that parsed them): a unique prefix of an option, `-vv` (`-v -v`), a negative
        number, a value with a space in it (`--negative-prompt "-blurry, dark"`) and words after `--` are not."""
        words = getattr(self, "_words", [])
        words = words[:words.index("--")] if "--" in words else words
        unknown = []
        for word in words:
            found = self._parse_optional(word)  # None for a value; else (action, option, ...), a list of those in newer Pythons
            first = found[0] if isinstance(found, list) else found
            if first is not None and first[0] is None:
                unknown.append(word.split("=", 1)[0])
            elif first is None and self._dashed_option(word):
                unknown.append(self._as_named(word.split("=", 1)[0]))
        return unknown

    def _as_named(self, word: str) -> str:
        """`word` as a usage error names it: with the option it spells where typographic dashes stand for `--`."""
        meant = self._dashed_option(word)
        return f"{word} (typed with a typographic dash: {meant})" if meant else word

    def _dashed_option(self, word: str) -> str:
        """The option `word` spells with typographic dashes in place of `--` (`—prompt`, `–prompt`: what a web page
        or an editor makes of `--`), which argparse takes for a value, so "--prompt is required" was all it said;
        "" for any other word (an exact option name only: a value such as `—dark` stays a value)."""
        name = word.split("=", 1)[0]
        bare = name.lstrip(_TYPOGRAPHIC_DASHES)
        if bare == name or not bare:
            return ""
        option = "--" + bare
        return option if option in self._option_string_actions else ""

    def parse_args(  # type: ignore[override]
        self, args: typing.Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """argparse leaves words no parser took to the top one, whose error would point to `catrt --help`;
        they are reported by the subcommand that was parsing, whose help lists what it takes."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self._command_parser(parsed)
            if isinstance(command, OneLineParser):
                extras = [command._as_named(word) for word in extras]
            command.error(f"unrecognized arguments: {shorten(' '.join(extras))}")
        return parsed

    # argparse quotes a value it cannot convert or that is not a choice whole; these two hooks are where it does.
    def _get_value(self, action: argparse.Action, arg_string: str) -> Any:
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as error:
            raise argparse.ArgumentError(action, error.message.replace(repr(arg_string), echo(arg_string))) from None

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as error:
            raise argparse.ArgumentError(action, error.message.replace(repr(value), echo(value))) from None

    def _command_parser(self, parsed: argparse.Namespace) -> argparse.ArgumentParser:
        """The (sub)parser of the innermost subcommand `parsed` names; this parser without one."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                if chosen is not None:
                    return chosen._command_parser(parsed) if isinstance(chosen, OneLineParser) else chosen
        return self


class Several(argparse.Action):
    """nargs="+" that a repeated flag extends (--seeds 0 1 --seeds 2), its first use replacing the default list:
    argparse's "extend" would add to the default, and "store" keeps only the last use."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        kept = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, kept + list(values))


def positive_int(text: str) -> int:
    """argparse type for pixel sizes and step counts, so 0 or -1 is a usage error, not a crash later."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {echo(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def step_count(text: str) -> int:
    """argparse type for the denoising steps of a run: a positive integer up to MAX_STEPS."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_STEPS} steps, got {value}")
    return value


def flag_name(name: str) -> str:
    """The command-line flag of a config field: `reuse_every` is `--reuse-every`."""
    return "--" + name.replace("_", "-")
