"""`catrt` command line: one subcommand per job, each builds a config and calls one library function.

Building the parser and `--help` import no torch or diffusers (each command imports what it runs),
and every mistake a user can make ends in one `catrt <command>: error: ...` line and exit code 2,
checked before any model is loaded where the facts needed are known without loading it.

One module per subcommand (`generate`, `macs`, `build`, `inspect`, `serve`, `compare`: its handler, its parser
and its helpers), on the shared `parsing` (argparse), `cat_flags`, `model_flags` and `folder_flags`; `exits` turns
a command's end into one line. This module puts the parser together and runs a command (`main`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from catrt.cli.build import BACKEND_CHOICES, BUILD_DEFAULTS, add_build_parser, build_precision
from catrt.cli.cat_flags import NOT_CAT_FLAGS
from catrt.cli.compare import add_compare_parser
from catrt.cli.exits import Terminated, flag_prefix, one_line, sigterm_unwinds
from catrt.cli.generate import add_generate_parser
from catrt.cli.inspect import add_inspect_parser
from catrt.cli.macs import add_macs_parser
from catrt.cli.model_flags import DEFAULT_MODEL, PRECISION_CHOICES
from catrt.cli.parsing import OneLineParser
from catrt.cli.serve import add_serve_parser
from catrt.errors import CatrtError
from catrt.notices import quiet_known_notices  # stdlib only

__all__ = [
    "BACKEND_CHOICES", "BUILD_DEFAULTS", "DEFAULT_MODEL", "NOT_CAT_FLAGS", "PRECISION_CHOICES", "OneLineParser",
    "Terminated", "build_parser", "build_precision", "main",
]


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("catrt")
    except PackageNotFoundError:
        import catrt

        return catrt.__version__


def build_parser() -> argparse.ArgumentParser:
    """The `catrt` parser: each subcommand's from its module, in the order `catrt --help` lists them."""
    parser = OneLineParser(
        prog="catrt",
        description="CAT Pruning for diffusion transformers: generate images, count MACs, build and serve engines.",
    )
    parser.add_argument("--version", action="version", version=f"catrt {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate_parser(commands)
    add_macs_parser(commands)
    add_build_parser(commands)
    add_inspect_parser(commands)
    add_serve_parser(commands)
    add_compare_parser(commands)
    for command in commands.choices.values():  # `catrt serve ... -v`, as the error lines' "run with -v" reads
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log progress details (as catrt -v)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes print one line and return 2, Ctrl-C returns 130, SIGTERM 143, none with a traceback."""
    command = "catrt"
    try:
        quiet_known_notices()
        args = build_parser().parse_args(argv)
        command = f"catrt {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        with sigterm_unwinds(args.command):
            return args.handler(args)
    except CatrtError as error:
        words = sys.argv[1:] if argv is None else argv
        print(f"{command}: error: {flag_prefix(error, words)}{one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `catrt inspect ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
