"""`catrt inspect`: a bundle's manifest, then every problem of its files, its fields and this machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from catrt.cli.exits import escaped, one_line
from catrt.cli.folder_flags import engine_folder
from catrt.errors import echo_path


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's manifest, then every problem of its files and fields and of this machine (exit 2), or OK."""
    from catrt.bundle import bundle_problems, model_source_problems
    from catrt.signing import BUNDLE_KEY_ENV, resolve_key
    from catrt.key_files import read_key_file

    engine_folder(args.engines, "the engine folder path")
    key = resolve_key(None if args.bundle_key_file is None else read_key_file(args.bundle_key_file))
    manifest, problems = bundle_problems(Path(args.engines), key)
    if manifest is not None:  # and whether its model loads here, as catrt.load needs
        problems += model_source_problems(Path(args.engines), manifest)
    print(f"engine {echo_path(args.engines)}")
    if manifest is not None:
        _print_manifest(manifest)
        if manifest.signature is None:
            print(f"  signature: none{' (refused: a bundle key is given)' if key is not None else ''}")
        elif key is None:
            print(f"  signature: present, not checked (no --bundle-key-file or ${BUNDLE_KEY_ENV})")
        else:
            matches = not any(problem.field == "signature" for problem in problems)
            print(f"  signature: {'matches' if matches else 'does not match'} the bundle key")
    if problems:
        for problem in problems:
            print(f"catrt inspect: error: {one_line(problem)}", file=sys.stderr)
        print(f"catrt inspect: {len(problems)} problem(s) found in {echo_path(args.engines)}", file=sys.stderr)
        return 2
    print("files and machine: OK")
    return 0


def _print_manifest(manifest: Any) -> None:
    """The manifest's facts, one line each (its shape is checked: every field is there).

    Its text is the bundle's, not catrt's: control characters (a terminal escape sequence in a model
    name, say) are printed escaped.
    """
    build = manifest.build
    reuse = f"reuse_every {build['reuse_every']}, " if build.get("reuse_every") else ""  # the schedule's reused steps
    _print_escaped(f"  model:     {manifest.model['name']} ({manifest.model['pipeline_class']}, transformer sha256 {manifest.model['transformer_sha256'][:16]}...)")
    _print_escaped(f"  build:     {build['width']}x{build['height']}, batch {build['batch']}, {build['steps']} steps, t0 {build['t0']}, "
          f"{reuse}N = {manifest.num_tokens} image tokens, {build['precision']}, {build['backend']}")
    for index, entry in enumerate(manifest.alphas):
        default = " (default)" if index == 0 else ""
        _print_escaped(f"  alpha {entry['alpha']:g}: k = {entry['k']}, graph {entry['graph']}, verified to relative error "
              f"{entry['max_relative_error']:.3g}{default}")
    _print_escaped(f"  device:    {', '.join(f'{key} {value}' for key, value in manifest.device.items())}")
    _print_escaped(f"  versions:  {', '.join(f'{name} {version}' for name, version in sorted(manifest.versions.items()))}")
    errors = manifest.verification["max_relative_error"]
    _print_escaped(f"  verified:  worst relative error {max(errors.values()):.3g} (tolerance {manifest.verification['tolerance']:g})")
    for graph, spec in manifest.graphs.items():
        inputs = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in spec["inputs"])
        _print_escaped(f"  graph {graph}: {inputs} ({manifest.exporters.get(graph, 'not exported')})")
    for name, record in manifest.files.items():
        _print_escaped(f"  file {name}: {record['size']} bytes, sha256 {record['sha256'][:16]}...")
    _print_escaped(f"  total:     {manifest.total_size} bytes")


def _print_escaped(line: str) -> None:
    print(escaped(line))


def add_inspect_parser(commands: argparse._SubParsersAction) -> None:
    inspect = commands.add_parser("inspect", help="print an engine bundle's manifest and list every problem it has")
    inspect.add_argument("engines", help="an engines/<build-name> folder")
    inspect.add_argument("--bundle-key-file", default=None,
                         help="check the bundle's signature against the key in this file "
                              "(default: $CATRT_BUNDLE_KEY if set, else not checked)")
    inspect.set_defaults(handler=cmd_inspect)
