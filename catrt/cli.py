"""`catrt` command line: one subcommand per job, each builds a config and calls one library function.

Building the parser and `--help` import no torch or diffusers (each command imports what it runs),
and every mistake a user can make ends in one `catrt <command>: error: ...` line and exit code 2,
checked before any model is loaded where the facts needed are known without loading it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, NoReturn

from catrt.checks import MAX_BATCH, MAX_STEPS, output_folder, path_is, repeated  # stdlib + catrt.errors only
from catrt.config import CATConfig  # stdlib + catrt.errors only
from catrt.errors import PATH_ECHO_LIMIT, CatrtError, ConfigError, echo, echo_path, shorten
from catrt.model_cards import MODEL_CARDS, ModelCard, check_image_size, check_model_source, default_precision, size_limits
from catrt.notices import hub_notices_dropped, quiet_known_notices  # stdlib only

DEFAULT_MODEL = "reference"  # trained here, shipped in the package: recognisable images, no download

# The choices of catrt.build_config (PRECISIONS, BACKENDS) and BuildConfig's defaults, spelled out here
# because that module imports torch; tests/test_cli.py checks they agree.
PRECISION_CHOICES: tuple[str, ...] = ("fp32", "fp16", "bf16")
BACKEND_CHOICES: tuple[str, ...] = ("auto", "eager", "compile", "onnxruntime", "tensorrt")
BUILD_DEFAULTS: dict[str, Any] = {"steps": 28, "batch": 1, "backend": "auto"}
# Where `catrt build` writes, by flag (not BuildConfig fields).
BUILD_FOLDERS: dict[str, str] = {"out": "engines", "export_dir": "export"}
# The torch device types `--device` may name.
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps")

# With --engines the build fixes these (and every CAT field BuildConfig has but alpha, which may be any
# built one); given anyway they are refused rather than ignored.
FIXED_BY_BUILD: tuple[str, ...] = ("model", "t0", "precision", "device", "full")

# CATConfig fields that are not flags: the seed is per image (--seed), the trace is for Python callers, and
# reuse_threshold is a bench baseline no engine or server schedule runs (`catrt compare --reuse-threshold`).
NOT_CAT_FLAGS: tuple[str, ...] = ("seed", "trace", "reuse_threshold")


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
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: typing.Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """argparse leaves words no parser took to the top one, whose error would point to `catrt --help`;
        they are reported by the subcommand that was parsing, whose help lists what it takes."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._command_parser(parsed).error(f"unrecognized arguments: {shorten(' '.join(extras))}")
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


class _Several(argparse.Action):
    """nargs="+" that a repeated flag extends (--seeds 0 1 --seeds 2), its first use replacing the default list:
    argparse's "extend" would add to the default, and "store" keeps only the last use."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        current = getattr(namespace, self.dest, None)
        kept = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, kept + list(values))


def _positive_int(text: str) -> int:
    """argparse type for pixel sizes and step counts, so 0 or -1 is a usage error, not a crash later."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {echo(text)}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _step_count(text: str) -> int:
    """argparse type for the denoising steps of a run: a positive integer up to MAX_STEPS."""
    value = _positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_STEPS} steps, got {value}")
    return value


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("catrt")
    except PackageNotFoundError:
        import catrt

        return catrt.__version__


def _add_cat_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), several: tuple[str, ...] = ()) -> None:
    """Every CATConfig field a user sets per run, as a kebab-case flag, generated from the dataclass.

    Types, choices and defaults come from the field, the help from CATConfig's docstring, so a new
    field is a new flag with no change here. Flags default to None so that giving one can be told
    from not giving it (a build fixes some); `_cat_config` fills in CATConfig's own defaults. Fields
    in `several` take one or more values (serve's --alpha); the config gets the first.
    """
    defaults, hints, helps = CATConfig(), typing.get_type_hints(CATConfig), _field_help(CATConfig)
    group = parser.add_argument_group("CAT Pruning")
    for field in _cat_fields():
        if field.name in skip:
            continue
        default = getattr(defaults, field.name)
        text = helps.get(field.name, field.name.replace("_", " ")).rstrip(".")
        kwargs: dict[str, Any] = {"default": None, "help": f"{text} (default: {default})"}
        if typing.get_origin(hints[field.name]) is Literal:
            kwargs["choices"] = typing.get_args(hints[field.name])
        else:
            kwargs["type"] = type(default)
        if field.name in several:
            kwargs.update(nargs="+", action=_Several, metavar=field.name.upper())  # repeated, as build's --alpha
            kwargs["help"] = (f"{text}; several values (--{field.name} A B, or repeated) serve each of them, the first is "
                              f"the default (default: {default})")
        group.add_argument(_flag(field.name), **kwargs)


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


def _cat_values(args: argparse.Namespace) -> dict[str, Any]:
    """The CAT flags the user gave (of a flag taking several values, the first)."""
    values = {field.name: getattr(args, field.name) for field in _cat_fields() if getattr(args, field.name, None) is not None}
    return {name: value[0] if isinstance(value, list) else value for name, value in values.items()}


def _cat_config(args: argparse.Namespace, seed: int = 0, t0: int | None = None) -> CATConfig:
    """The CATConfig the flags ask for (`t0`: the schedule's, see `_card_schedule`); validated here, before any model
    is loaded."""
    values = _cat_values(args) if t0 is None else {**_cat_values(args), "t0": t0}
    return CATConfig(**values, seed=seed)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _card_schedule(args: argparse.Namespace, card: ModelCard | None) -> tuple[int | None, int | None]:
    """The steps and t0 a model runs: --steps / --t0, else its card's (FLUX.1-schnell: 4 steps, t0 2; PixArt-Sigma:
    20 steps), as diffusers' pipeline defaults and the model's authors run it; None where neither sets one."""
    if card is None:
        return args.steps, args.t0
    return args.steps or card.default_steps, card.default_t0 if args.t0 is None else args.t0


def _card_size(card: ModelCard | None, height: int | None, width: int | None, model: str) -> None:
    """Refuse a size a known model cannot take, before loading it (None = the model's default)."""
    if card is not None:
        multiple, largest = size_limits(card)
        check_image_size(height or card.default_size, width or card.default_size, multiple, largest, model)


def _check_device_name(name: str) -> None:
    """`--device` must name a device type catrt runs on (cpu, cuda, cuda:N, mps); checked without torch."""
    kind, separator, index = name.partition(":")
    if kind not in DEVICE_TYPES or (separator and not (index.isascii() and index.isdigit())):
        raise ConfigError(
            f"--device {echo(name)} is not a device catrt runs on; use cpu, cuda, cuda:N or mps", field="device", value=name,
        )


def _device(name: str) -> Any:
    """The torch device `--device` names, refused when this machine has none of that kind."""
    _check_device_name(name)
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
        raise ConfigError(
            f"--device {name}: this machine has no usable CUDA GPU{build}; use --device cpu", field="device", value=name,
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}", field="device", value=name,
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: this machine has no usable MPS device; use --device cpu", field="device", value=name)
    return device


def _usual_precisions() -> str:
    """The published models' CUDA default dtypes, read from the model cards so the help cannot drift from them."""
    groups: dict[str, list[str]] = {}
    for name, card in MODEL_CARDS.items():
        if card.precision != "fp32":
            groups.setdefault(card.precision, []).append(name)
    return "; ".join(f"{', '.join(names)} {precision}" for precision, names in groups.items())


def _precision(asked: str | None, model: str, device_type: str) -> str:
    """`--precision`, or the model's usual one on CUDA and fp32 elsewhere; fp16 is refused on the CPU."""
    precision = asked or default_precision(model, device_type)
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "--precision fp16 needs a CUDA device (most fp16 matmuls do not run on the CPU); use fp32 or bf16 on the CPU",
            field="precision", value=precision,
        )
    return precision


def cmd_generate(args: argparse.Namespace) -> int:
    from catrt.image_output import image_format, save_image, staged_image

    out, format_ = image_format(args.out)  # a bad name costs nothing: refused before any import or load
    if args.bundle_key_file is not None and args.engines is None:
        raise ConfigError(
            "--bundle-key-file checks an engine bundle's signature: use it with --engines", field="bundle_key_file",
        )
    _check_request_values(args)
    with staged_image(out) as staged:  # an unwritable --out is refused before loading
        runner, mode = _engine_runner(args) if args.engines is not None else _model_runner(args)
        from catrt.generation import GenerationRequest, generate_image

        request = GenerationRequest(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            seed=args.seed,
            height=args.height,
            width=args.width,
            guidance_scale=args.guidance_scale,
        )
        image, seconds = generate_image(runner, request)
        save_image(image, staged, format_, out)
    print(f"wrote {out} ({image.width}x{image.height}, {mode}) in {seconds:.2f} s")
    return 0


def _check_request_values(args: argparse.Namespace) -> None:
    """The prompt, seed and guidance rules the server applies too (`catrt.request_values`), before loading."""
    from catrt.request_values import check_guidance, check_prompt_text, check_seed

    check_prompt_text("--prompt", args.prompt)
    if args.negative_prompt is not None:
        check_prompt_text("--negative-prompt", args.negative_prompt, blank_ok=True)
    check_seed(args.seed, name="--seed")
    if args.guidance_scale is not None:
        check_guidance(args.guidance_scale, name="--guidance-scale")


def _model_runner(args: argparse.Namespace) -> tuple[object, str]:
    """A pipeline by name, accelerated unless --full; everything checkable is checked before loading."""
    model = DEFAULT_MODEL if args.model is None else args.model  # --model '' is refused by name, not replaced
    if args.full:
        _refuse_cat_flags_with_full(args)
    card = MODEL_CARDS.get(model)
    steps, t0 = _card_schedule(args, card)
    config = _cat_config(args, seed=args.seed, t0=t0)
    _card_size(card, args.height, args.width, model)
    if steps is not None and not args.full:
        config.check_steps(steps)
    device = _device("cpu" if args.device is None else args.device)
    precision = _precision(args.precision, model, device.type)
    from catrt.build_config import PRECISIONS
    from catrt.generation import check_pipeline_size, check_text_to_image
    from catrt.loading import load_pipeline
    from catrt.pipeline import accelerate

    check_model_source(model)  # a mistyped name (or '') is refused before anything loads
    with hub_notices_dropped():
        pipe = load_pipeline(model, device=device, dtype=PRECISIONS[precision])
    check_text_to_image(pipe, model)
    check_pipeline_size(pipe, args.height, args.width, model)
    _check_prompts(args, pipe, limit=None)
    if args.full:
        return pipe, f"unpruned, {precision}"
    return accelerate(pipe, config), f"alpha={config.alpha} t0={config.t0}, {precision}"


def _refuse_cat_flags_with_full(args: argparse.Namespace) -> None:
    """--full runs the unpruned model, which no CAT flag changes: refuse one rather than ignore it."""
    given = _cat_values(args)
    if given:
        name, value = next(iter(given.items()))
        raise ConfigError(
            f"{_flag(name)} cannot be used with --full: the unpruned model prunes nothing; drop {_flag(name)}, "
            f"or drop --full to prune with it",
            field=name, value=value,
        )


def _engine_runner(args: argparse.Namespace) -> tuple[object, str]:
    """An engine bundle: the build fixes alpha, t0, resolution and steps; the other CAT flags are free."""
    _refuse_fixed_flags(args, FIXED_BY_BUILD)
    from catrt.bundle import load
    from catrt.integrity import read_build_config
    from catrt.key_files import read_key_file
    from catrt.manifest import read_manifest

    key = None if args.bundle_key_file is None else read_key_file(args.bundle_key_file)
    build = read_build_config(read_manifest(_engine_folder(args.engines, "--engines")))  # for the flag checks; `load` verifies it all
    _refuse_fixed_flags(args, [name for name in _cat_values(args) if hasattr(build, name) and name != "alpha"])
    _check_against_build(args, build)
    config = build.cat_config(seed=args.seed, **_cat_values(args))  # --alpha: one of the built alphas
    with hub_notices_dropped():
        runner = load(args.engines, config, key=key)
    _check_prompts(args, runner, limit=build.max_sequence_length)
    return runner, f"alpha={config.alpha} t0={build.t0}, {build.backend} engine {args.engines}"


def _engine_folder(value: str, named: str) -> Path:
    """A bundle folder given on the command line; an empty one (an unset shell variable) is refused as such, not
    read as the working directory ("manifest.json is missing: . is not a catrt engine folder")."""
    _refuse_empty(value, named, "give an engines/<build-name> folder (catrt build)", "engines")
    return Path(value)


def _refuse_empty(value: str, named: str, fix: str, field: str) -> None:
    """A blank path (an unset shell variable) is refused as such: Path('') is the working directory, which a build or
    report would fill and a bundle check would name as '.'."""
    if not value.strip():
        raise ConfigError(f"{named} is empty; {fix}", field=field, value=value)


def _refuse_fixed_flags(args: argparse.Namespace, fixed: typing.Iterable[str]) -> None:
    """A build fixes the model, precision, device and its CAT schedule (alpha, t0, ...): refuse them
    rather than ignore them."""
    for name in fixed:
        value = getattr(args, name)
        if value is not None and value is not False:
            raise ConfigError(
                f"{_flag(name)} cannot be used with --engines: the build fixes it (see catrt inspect {echo_path(args.engines)}); "
                f"drop {_flag(name)}, or build an engine with it",
                field=name, value=value,
            )


def _check_against_build(args: argparse.Namespace, build: Any) -> None:
    """Size and steps that differ from the build's, and a build of several images per call (generate makes one),
    are refused before the bundle is loaded."""
    if build.batch != 1:
        raise ConfigError(
            f"{echo_path(args.engines)} was built for batch {build.batch} (images per call) and catrt generate makes one image: "
            f"build an engine with --batch 1, or serve this one (catrt serve --engines fills its batches)",
            field="batch", value=build.batch,
        )
    for flag, asked, built in (
        ("--width", args.width, build.width), ("--height", args.height, build.height), ("--steps", args.steps, build.steps),
    ):
        if asked is not None and asked != built:
            raise ConfigError(
                f"{flag} {asked}: this engine was built for {flag} {built}; drop {flag} or build an engine for {asked}",
                field=flag.lstrip("-"), value=asked,
            )


def _check_prompts(args: argparse.Namespace, runner: Any, limit: int | None) -> None:
    """Prompts longer than the model reads are refused, as the server refuses them, not truncated."""
    from catrt.generation import check_prompt_length
    from catrt.pipeline import pipeline_spec

    check_prompt_length(runner, args.prompt, limit)
    if args.negative_prompt:
        check_prompt_length(runner, args.negative_prompt, limit, field="negative_prompt")
        pipeline_spec(getattr(runner, "pipe", runner)).refuse_unread_negative_prompt(args.negative_prompt, "--negative-prompt")


def cmd_macs(args: argparse.Namespace) -> int:
    card = MODEL_CARDS[args.model]
    height, width = args.height or card.default_size, args.width or card.default_size
    _card_size(card, height, width, args.model)
    config = _cat_config(args)
    config.check_steps(args.steps)
    from catrt.macs import format_macs, model_macs

    report = model_macs(args.model, height, width, config, args.steps)
    print(f"model {args.model} at {width}x{height}: N = {report.num_tokens} image tokens, k = {report.k}")
    print(f"full step:   {format_macs(report.full_step)} per image")
    print(f"pruned step: {format_macs(report.pruned_step)} per image ({report.pruned_step / report.full_step:.3f} of full)")
    print(f"once per generation: {format_macs(report.context)}")
    reused = f" + {report.reused_steps} reused" if report.reused_steps else ""
    print(f"schedule: {report.full_steps} full + {report.pruned_steps} pruned{reused} of {report.steps} steps")
    print(f"schedule MAC ratio: {report.schedule_ratio:.3f}")
    return 0


def build_precision(model: str, backend: str) -> str:
    """A build's precision when none is asked for: the model's usual dtype where the backend builds for CUDA
    and can build that dtype (an SD3 engine on a GPU is fp16, as `generate` there), else fp32."""
    from catrt.engines import ENGINES, resolve_backend

    engine = ENGINES[resolve_backend(backend)]
    usual = default_precision(model, engine.default_device().type)
    return usual if usual in engine.precisions else "fp32"


def cmd_build(args: argparse.Namespace) -> int:
    _card_size(MODEL_CARDS.get(args.model), args.height, args.width, args.model)
    for name in ("out", "export_dir"):
        _refuse_empty(getattr(args, name), _flag(name), f"give a folder (default: {BUILD_FOLDERS[name]})", name)
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig
    from catrt.key_files import read_key_file

    check_model_source(args.model)  # a mistyped name is one line, before the progress bar starts

    sign_key = None if args.sign_key_file is None else read_key_file(args.sign_key_file, "sign_key_file")

    precision = args.precision or build_precision(args.model, args.backend)
    steps, t0 = _card_schedule(args, MODEL_CARDS.get(args.model))  # as generate and serve run the model
    config = BuildConfig(
        model=args.model, height=args.height, width=args.width, batch=args.batch, steps=steps or BUILD_DEFAULTS["steps"],
        t0=BuildConfig.t0 if t0 is None else t0, alphas=tuple(args.alpha or (CATConfig().alpha,)), reuse_every=args.reuse_every, precision=precision, backend=args.backend,
        max_sequence_length=args.max_sequence_length,
    )
    with hub_notices_dropped():
        path = build_engines(config, out_dir=Path(args.out), export_dir=Path(args.export_dir), sign_key=sign_key)
    print(f"built {path}" + (" (signed)" if sign_key is not None else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's manifest, then every problem of its files and fields and of this machine (exit 2), or OK."""
    from catrt.bundle import bundle_problems, model_source_problems
    from catrt.integrity import BUNDLE_KEY_ENV, resolve_key
    from catrt.key_files import read_key_file

    _engine_folder(args.engines, "the engine folder path")
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
            print(f"catrt inspect: error: {_one_line(problem)}", file=sys.stderr)
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
    print(_escaped(line))


def _escaped(text: str) -> str:
    """`text` with its non-printable characters escaped (`\\x1b`): a manifest or file name is untrusted text,
    and a terminal escape sequence in it must not drive the user's terminal."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _add_build_parser(commands: argparse._SubParsersAction) -> None:
    defaults = CATConfig()
    build = commands.add_parser("build", help="export, compile and verify engines for one model and resolution")
    build.add_argument("--model", default=DEFAULT_MODEL, help="model name or diffusers folder")
    build.add_argument("--alpha", type=float, nargs="+", action=_Several, default=None, metavar="ALPHA",
                       help=f"fraction of tokens recomputed per pruned step (0, 1] (default: {defaults.alpha}); several "
                            "values (--alpha A B, or --alpha repeated) build one pruned graph each into one bundle "
                            "(weights stored once), the first is the default of a call")
    build.add_argument("--t0", type=int, default=None,
                       help=f"last full step before pruning starts (default: the model's own, 2 for flux-schnell; else {defaults.t0})")
    build.add_argument("--reuse-every", type=int, default=defaults.reuse_every,
                       help="after t0, every N-th step reuses the previous prediction (0 = off)")
    build.add_argument("--steps", type=_step_count, default=None,
                       help=f"denoising steps the engine serves, 1 to {MAX_STEPS} (default: the model's own, e.g. 20 for "
                            f"pixart-sigma, 4 for flux-schnell; else {BUILD_DEFAULTS['steps']})")
    build.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    build.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    build.add_argument("--batch", type=int, default=BUILD_DEFAULTS["batch"],
                       help=f"prompts per call, 1 to {MAX_BATCH} (graphs take 2x with guidance)")
    build.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                       help="weights and activations (default: where the build runs on CUDA, the model's usual one: "
                            f"{_usual_precisions()}; others, and a dtype the backend cannot build, fp32); fp16 needs "
                            "a CUDA device; onnxruntime cannot build bf16")
    build.add_argument("--backend", choices=BACKEND_CHOICES, default=BUILD_DEFAULTS["backend"],
                       help="auto: tensorrt or compile on a GPU, onnxruntime on a CPU")
    build.add_argument("--max-sequence-length", type=int, default=None,
                       help="text length the graphs take (default: the pipeline's)")
    build.add_argument("--out", default=BUILD_FOLDERS["out"], help="parent folder of the engine bundles")
    build.add_argument("--export-dir", default=BUILD_FOLDERS["export_dir"], help="parent folder of the ONNX exports")
    build.add_argument("--sign-key-file", default=None,
                       help="sign the manifest (HMAC-SHA256) with the key in this file; load it with "
                            "--bundle-key-file or $CATRT_BUNDLE_KEY set to that key (default: unsigned)")
    build.set_defaults(handler=cmd_build)

    inspect = commands.add_parser("inspect", help="print an engine bundle's manifest and list every problem it has")
    inspect.add_argument("engines", help="an engines/<build-name> folder")
    inspect.add_argument("--bundle-key-file", default=None,
                         help="check the bundle's signature against the key in this file "
                              "(default: $CATRT_BUNDLE_KEY if set, else not checked)")
    inspect.set_defaults(handler=cmd_inspect)


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve builds (or an eager model); every refusal before the model loads is one line."""
    from catrt.serve import ServeConfig, run_server
    from catrt.serve.auth import load_api_key

    if args.engines is not None:
        _refuse_serve_flags_fixed_by_build(args)  # before the flags' values are read: a build fixes them
        steps, cat = None, _cat_config(args)
    else:
        card = MODEL_CARDS.get(args.model)
        _card_size(card, args.height, args.width, args.model)
        steps, t0 = _card_schedule(args, card)
        cat = _cat_config(args, t0=t0)
        if args.device is not None:
            _check_device_name(args.device)
    fleet = _fleet_config(args)
    defaults = ServeConfig(model=DEFAULT_MODEL)
    config = ServeConfig(
        engines=args.engines, model=args.model, height=args.height, width=args.width,
        steps=defaults.steps if steps is None else steps,
        batch=defaults.batch if args.batch is None else args.batch,
        cat=cat, alphas=tuple(args.alpha or ()), alpha_policy=args.alpha_policy,
        latency_target=args.latency_target, device=defaults.device if args.device is None else args.device, precision=args.precision,
        host=args.host, port=args.port, max_queue=args.max_queue, timeout=args.timeout,
        max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
        read_timeout=args.read_timeout, keep_alive=args.keep_alive,
        api_key=load_api_key(args.api_key_file), metrics_auth=args.metrics_auth,
        bundle_key_file=args.bundle_key_file,
    )
    if fleet is None:
        with hub_notices_dropped():  # the model loads on the server's worker thread; the filter is process-wide
            return run_server(config)
    return _run_fleet(config, fleet)


def _fleet_config(args: argparse.Namespace) -> Any:
    """`--ray`'s FleetConfig (None without --ray); the fleet flags without --ray are refused."""
    from catrt.serve.config import FleetConfig

    given = [name for name in ("replicas", "min_replicas", "max_replicas", "ray_address") if getattr(args, name) is not None]
    if not args.ray:
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} is a Ray Serve setting: add --ray, or drop {flag}", field=given[0])
        return None
    replicas = args.replicas if args.replicas is not None or args.min_replicas is not None else 1
    return FleetConfig(replicas=replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       address=args.ray_address)


def _run_fleet(config: Any, fleet: Any) -> int:
    """`catrt serve --ray`; Ray is imported here only, and its absence is a one-line refusal."""
    import importlib.util

    from catrt.serve.fleet_start import LOCAL, check_fleet_start
    from catrt.serve.server import bundle_key, check_device, check_source_of, verify_bundles_here

    missing = 'Ray Serve is not installed: pip install "catrt[ray]" (or serve on one device without --ray)'
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"--ray needs {missing}", field="ray")
    if config.port == 0:
        raise ConfigError("--port 0 is not served with --ray: Ray Serve's HTTP proxy needs a fixed port", field="port")
    check_source_of(config)
    key = bundle_key(config.bundle_key_file) if config.engines is not None else None
    if fleet.address in (None, LOCAL):  # the replicas run on this machine: its device and these bundles must do
        check_device(config)
        verify_bundles_here(config, key)
    check_fleet_start(config.host, config.port, fleet.address)
    try:
        from catrt.serve.ray_app import run_fleet
    except ImportError as error:
        raise ConfigError(f"--ray needs {missing} (importing it failed: {error})", field="ray") from None
    return run_fleet(config, fleet, key)


def _refuse_serve_flags_fixed_by_build(args: argparse.Namespace) -> None:
    """With --engines the build fixes size, steps, batch, precision, device, alpha and t0: refuse, never ignore."""
    for name in ("height", "width", "steps", "batch", "precision", "device", "alpha", "t0"):
        value = getattr(args, name)
        if value is not None:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(
                f"{flag} cannot be used with --engines: the build fixes it; drop {flag} or build an engine with it",
                field=name, value=value,
            )
    _refuse_serve_cat_flags(args)


def _refuse_serve_cat_flags(args: argparse.Namespace) -> None:
    """A served build runs its own schedule (t0, reuse_every) and catrt's default selection settings: any other CAT
    flag would go unread, so it is refused, as the schedule's are."""
    given = next(iter(_cat_values(args).items()), None)
    if given is None:
        return
    name, value = given
    flag = _flag(name)
    fix = (f"the build fixes it; drop {flag} or build an engine with it" if name == "reuse_every" else
           f"a served build runs with catrt's default {flag}; drop {flag}, or serve the model with --model to set it")
    raise ConfigError(f"{flag} cannot be used with --engines: {fix}", field=name, value=value)


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from catrt.serve import ServeConfig
    from catrt.serve.alpha_policy import ALPHA_POLICIES
    from catrt.serve.auth import API_KEY_ENV
    from catrt.serve.config import PRECISION_CHOICES as SERVE_PRECISIONS

    defaults = ServeConfig(model=DEFAULT_MODEL)
    serve = commands.add_parser("serve", help="serve a build over HTTP (OpenAI images API, health, metrics)")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", nargs="+", action=_Several, default=None, metavar="DIR",  # repeated adds builds
                        help="engines/<build-name> folders made by `catrt build`: one model, one build per size; "
                             "a request's size picks its build, the first serves size \"auto\"")
    source.add_argument("--model", default=None, help="instead of --engines: a model run eagerly with the CAT flags")
    serve.add_argument("--host", default=defaults.host, help=f"address to listen on (default: {defaults.host})")
    serve.add_argument("--port", type=int, default=defaults.port,
                       help=f"port to listen on, bound before the model loads; 0 = any free one (default: {defaults.port})")
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue,
                       help=f"waiting requests before 429 (default: {defaults.max_queue})")
    serve.add_argument("--timeout", type=float, default=defaults.timeout,
                       help=f"seconds per request, queue included, before 504 (default: {defaults.timeout:g})")
    limits = serve.add_argument_group("input limits and access")
    limits.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help=f"larger request bodies answer 413 unread (default: {defaults.max_body_bytes})")
    limits.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help=f"longer prompts answer 400 before tokenizing (default: {defaults.max_prompt_chars})")
    limits.add_argument("--read-timeout", type=float, default=defaults.read_timeout,
                        help=f"seconds a request may take to arrive whole, and a client may leave its answer "
                             f"unread; then the connection is closed (default: {defaults.read_timeout:g})")
    limits.add_argument("--keep-alive", type=float, default=defaults.keep_alive,
                        help=f"seconds an idle connection stays open (default: {defaults.keep_alive:g})")
    limits.add_argument("--api-key-file", default=None,
                        help=f"a file holding the API key /v1/* then needs as 'Authorization: Bearer <key>' "
                             f"(default: ${API_KEY_ENV} if set, else no key)")
    limits.add_argument("--metrics-auth", action="store_true", help="/metrics needs the API key too")
    serve.add_argument("--bundle-key-file", default=None,
                       help="with --engines: refuse a bundle not signed with the key in this file (catrt build "
                            "--sign-key-file) (default: $CATRT_BUNDLE_KEY if set, else no signature check)")
    policy = serve.add_argument_group("alpha per call (a request may pin a served one: extra_body={'alpha': 0.3})")
    policy.add_argument("--alpha-policy", choices=ALPHA_POLICIES, default=defaults.alpha_policy,
                        help="fixed: every call at the first alpha; adaptive: before each call, the largest served "
                             "alpha whose predicted finish keeps every queued request within --latency-target, "
                             "else the smallest (needs several alphas: a multi-alpha build, or --alpha A B ...)")
    policy.add_argument("--latency-target", type=float, default=None, metavar="SECONDS",
                        help="seconds from arrival to answer that --alpha-policy adaptive aims for")
    eager = serve.add_argument_group("--model only (a build fixes these)")
    eager.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    eager.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    eager.add_argument("--steps", type=_step_count, default=None, help=f"denoising steps, 1 to {MAX_STEPS} (default: the model's own, e.g. 20 for "
                       f"pixart-sigma, 4 for flux-schnell; else {defaults.steps})")
    eager.add_argument("--batch", type=int, default=None, help=f"images per model call, 1 to {MAX_BATCH} (default: {defaults.batch})")
    eager.add_argument("--device", default=None, help=f"torch device, e.g. cpu or cuda (default: {defaults.device})")
    eager.add_argument("--precision", choices=SERVE_PRECISIONS, default=None,
                       help="weights and activations (default: fp32 on the CPU; on CUDA the model's usual one); "
                            "fp16 needs CUDA")
    fleet = serve.add_argument_group("fleet (Ray Serve; needs the ray extra: pip install \"catrt[ray]\")")
    fleet.add_argument("--ray", action="store_true",
                       help="serve as a Ray Serve application: an HTTP ingress and model replicas, one device each")
    fleet.add_argument("--replicas", type=_positive_int, default=None, help="model replicas (default: 1)")
    fleet.add_argument("--min-replicas", type=_positive_int, default=None,
                       help="autoscale on ongoing requests from this many replicas (with --max-replicas)")
    fleet.add_argument("--max-replicas", type=_positive_int, default=None,
                       help="autoscale up to this many replicas (with --min-replicas)")
    fleet.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. auto, ray://head:10001) (default: start a local one)")
    _add_cat_flags(serve, several=("alpha",))
    serve.set_defaults(handler=cmd_serve)


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate an image with CAT Pruning (or --full)")
    generate.add_argument("--model", default=None,
                          help=f"model name (reference, tiny-sd3, sd3, ...) or diffusers folder (default: {DEFAULT_MODEL})")
    generate.add_argument("--prompt", required=True, help="what to draw")
    generate.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    generate.add_argument("--steps", type=_step_count, default=None,
                          help=f"denoising steps, 1 to {MAX_STEPS} (default: the pipeline's, 28 for SD3; the build's with --engines)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of KMeans)")
    generate.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    generate.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    generate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    generate.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda or cuda:1 (default: cpu)")
    generate.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                          help="weights and activations (default: fp32 on the CPU; on CUDA the model's usual one: "
                               f"{_usual_precisions()}; others fp32); fp16 needs CUDA")
    generate.add_argument("--out", default="image.png", help="output image: .png, .jpg, .jpeg or .webp")
    generate.add_argument("--full", action="store_true", help="run the unpruned model")
    _add_cat_flags(generate)
    generate.add_argument("--engines", default=None,
                          help="run a built engine folder (its build fixes the model, alpha, t0, size, steps, "
                               "precision and device)")
    generate.add_argument("--bundle-key-file", default=None,
                          help="with --engines: refuse the bundle unless signed with the key in this file "
                               "(default: $CATRT_BUNDLE_KEY if set, else not checked)")
    generate.set_defaults(handler=cmd_generate)


def _add_macs_parser(commands: argparse._SubParsersAction) -> None:
    macs = commands.add_parser("macs", help="count transformer MACs of a published model (no download)")
    macs.add_argument("--model", required=True, choices=tuple(MODEL_CARDS), help="a model with a config in catrt/model_cards.py")
    macs.add_argument("--steps", type=_step_count, default=28, help=f"denoising steps of the schedule, 1 to {MAX_STEPS}")
    macs.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    macs.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    _add_cat_flags(macs)
    macs.set_defaults(handler=cmd_macs)


def cmd_compare(args: argparse.Namespace) -> int:
    """Unpruned vs each rule on every prompt and seed: report.md, metrics.csv, grid.png in --out."""
    with _output_folder(args.out, "--out", "report.md, metrics.csv and grid.png") as out:
        return _compare(args, out)


@contextlib.contextmanager
def _output_folder(value: str, flag: str, holds: str) -> Iterator[Path]:
    """The folder `value`, made now and checked writable, so a bad place is refused before minutes of work (not
    when the results are written); removed again if this made it and the block fails before writing into it."""
    _refuse_empty(value, flag, f"give a folder for {holds}", flag.lstrip("-"))
    out = Path(value)
    made = not path_is(out)
    output_folder(out, f"{flag} {echo(value, PATH_ECHO_LIMIT)}", holds, field=flag.lstrip("-"))
    try:
        yield out
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty: never a file the block wrote
        raise


def _compare(args: argparse.Namespace, out: Path) -> int:
    from catrt.compare import Variant, read_prompts
    from catrt.request_values import check_guidance, check_prompt_text, check_seed

    for seed in args.seeds:
        check_seed(seed, name="--seeds")
    for flag, values in (("--rules", args.rules), ("--seeds", args.seeds)):
        twice = repeated(values)
        if twice:  # a repeat would overwrite its images and count its metrics twice
            raise ConfigError(f"{flag} repeats {shorten(', '.join(map(str, twice)))}; list each once", field=flag, value=twice)
    if args.guidance_scale is not None:
        check_guidance(args.guidance_scale, name="--guidance-scale")
    prompts = read_prompts(Path(args.prompts))
    for line, prompt in enumerate(prompts, 1):
        check_prompt_text(f"the prompt on line {line} of {args.prompts}", prompt)
    configs = [Variant(rule, None if rule == "full" else CATConfig(
        **_cat_values(args), rule=rule, reuse_threshold=args.reuse_threshold)) for rule in args.rules]
    model, card = args.model, MODEL_CARDS.get(args.model)
    _card_size(card, args.height, args.width, model)
    from catrt.metrics import check_ssim_side

    for flag, pixels in (("--height", args.height), ("--width", args.width)):
        check_ssim_side(flag, pixels)
    for variant in configs:
        if variant.config is not None:
            variant.config.check_steps(args.steps)
    device = _device("cpu" if args.device is None else args.device)
    precision = _precision(args.precision, model, device.type)
    from catrt.build_config import PRECISIONS
    from catrt.compare import run_comparison, write_outputs
    from catrt.generation import check_pipeline_size, check_prompt_length, check_text_to_image
    from catrt.image_output import unwritable_out
    from catrt.loading import load_pipeline
    from catrt.metrics import ClipScorer, require_skimage

    require_skimage()
    clip = None if args.clip is None else ClipScorer(args.clip, device)
    with hub_notices_dropped():
        pipe = load_pipeline(model, device=device, dtype=PRECISIONS[precision])
    check_text_to_image(pipe, model)
    check_pipeline_size(pipe, args.height, args.width, model)
    for line, prompt in enumerate(prompts, 1):
        check_prompt_length(pipe, prompt, field=f"prompt on line {line} of {args.prompts}")
    comparison = run_comparison(pipe, prompts, args.seeds, configs, args.steps, height=args.height, width=args.width,
                                guidance_scale=args.guidance_scale, clip=clip)
    first = next((v.config for v in configs if v.config is not None), None)
    schedule = "" if first is None else (
        f", alpha {first.alpha}, t0 {first.t0}, refresh_every {first.refresh_every}, reuse_every {first.reuse_every}, "
        f"reuse_threshold {first.reuse_threshold}")
    header = [f"# catrt compare: {model}", "",
              f"{len(prompts)} prompts from `{args.prompts}` x seeds {' '.join(map(str, args.seeds))}, {args.steps} steps"
              f"{schedule}; {device.type}, {precision}; CLIP: {args.clip or 'none'}."]
    try:
        write_outputs(comparison, out, header)
    except OSError as error:  # a full disk or a folder made read-only meanwhile: one line, the earlier files intact
        raise unwritable_out(out, error) from None
    print(f"wrote {out / 'report.md'}, {out / 'metrics.csv'} and {out / 'grid.png'}")
    return 0


def _add_compare_parser(commands: argparse._SubParsersAction) -> None:
    from catrt.config import SELECTION_RULES

    compare = commands.add_parser(
        "compare", help="image quality (PSNR, SSIM, CLIP score), MACs and time of rules against the unpruned model")
    compare.add_argument("--model", default=DEFAULT_MODEL, help="model name (reference, tiny-sd3, sd3, ...) or diffusers folder")
    compare.add_argument("--prompts", required=True, help="text file, one prompt per line")
    compare.add_argument("--seeds", type=int, nargs="+", action=_Several, default=[0], help="seeds; every prompt runs with each")
    compare.add_argument("--steps", type=_step_count, default=28, help=f"denoising steps, 1 to {MAX_STEPS}")
    compare.add_argument("--rules", nargs="+", action=_Several, choices=("full", *SELECTION_RULES),
                         default=["cat", "round_robin", "random"],
                         help="token rules to compare (full: the unpruned pipeline again, a determinism check)")
    compare.add_argument("--reuse-threshold", type=float, default=0.0,
                         help="First-Block-Cache-style reuse for every rule: reuse a step when the first block's "
                              "residual moved less than this since the last computed step (0 = off; eager only)")
    compare.add_argument("--clip", default=None,
                         help="CLIP model folder (or hub name) for the CLIP score (default: no CLIP score)")
    compare.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: the model's)")
    compare.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: the model's)")
    compare.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    compare.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    compare.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                         help="weights and activations (default: fp32 on the CPU; on CUDA the model's usual one)")
    compare.add_argument("--out", required=True, help="folder for report.md, metrics.csv, grid.png and images/")
    _add_cat_flags(compare, skip=("rule",))
    compare.set_defaults(handler=cmd_compare)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="catrt",
        description="CAT Pruning for diffusion transformers: generate images, count MACs, build and serve engines.",
    )
    parser.add_argument("--version", action="version", version=f"catrt {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate_parser(commands)
    _add_macs_parser(commands)
    _add_build_parser(commands)
    _add_serve_parser(commands)
    _add_compare_parser(commands)
    for command in commands.choices.values():  # `catrt serve ... -v`, as the error lines' "run with -v" reads
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log progress details (as catrt -v)")
    return parser


def _one_line(error: BaseException) -> str:
    return _escaped(" ".join(str(error).split()))


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its cleanup runs as for Ctrl-C (staged builds and images are removed)."""


@contextlib.contextmanager
def _sigterm_unwinds(command: str) -> Iterator[None]:
    """While a command other than `serve` (which drains on SIGTERM itself) runs, SIGTERM raises `Terminated`."""
    if command == "serve" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run one command; user mistakes print one line and return 2, Ctrl-C returns 130, SIGTERM 143, none with a traceback."""
    command = "catrt"
    try:
        quiet_known_notices()
        args = build_parser().parse_args(argv)
        command = f"catrt {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        with _sigterm_unwinds(args.command):
            return args.handler(args)
    except CatrtError as error:
        print(f"{command}: error: {_one_line(error)}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
