"""`catrt generate`: one image from a model by name (pruned, or --full) or from a built engine folder."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

from catrt.checks import MAX_STEPS  # stdlib + catrt.errors only
from catrt.cli.cat_flags import add_cat_flags, cat_config, cat_values
from catrt.cli.folder_flags import engine_folder
from catrt.cli.model_flags import (
    DEFAULT_MODEL,
    PRECISION_CHOICES,
    card_defaults,
    card_schedule,
    card_size,
    run_precision,
    torch_device,
    usual_precisions,
)
from catrt.cli.parsing import flag_name, positive_int, step_count
from catrt.errors import ConfigError, echo_path
from catrt.model_cards import MODEL_CARDS, check_model_source
from catrt.notices import hub_notices_dropped  # stdlib only

# With --engines the build fixes these (and every CAT field BuildConfig has but alpha, which may be any
# built one); given anyway they are refused rather than ignored.
FIXED_BY_BUILD: tuple[str, ...] = ("model", "t0", "precision", "device", "full")


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
    card = MODEL_CARDS.get(model)
    steps, t0 = card_schedule(args, card)
    config = cat_config(args, seed=args.seed, t0=t0)
    card_size(card, args.height, args.width, model)
    if steps is not None and not args.full:
        config.check_steps(steps)
    device = torch_device("cpu" if args.device is None else args.device)
    precision = run_precision(args.precision, model, device.type)
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
        _note_cat_flags_with_full(args)
        return pipe, f"unpruned, {precision}"
    return accelerate(pipe, config), f"alpha={config.alpha} t0={config.t0}, {precision}"


def _note_cat_flags_with_full(args: argparse.Namespace) -> None:
    """--full runs the unpruned model, which no CAT flag changes: say so rather than refuse the command (issue 2's
    `catrt generate ... --alpha 0.3 ... --full` is the unpruned run of the same command); the values are still
    checked, as without --full."""
    given = [flag_name(name) for name in cat_values(args)]
    if given:
        print(f"catrt generate: note: --full runs the unpruned model; {', '.join(given)} "
              f"change{'s' if len(given) == 1 else ''} nothing in it", file=sys.stderr)


def _engine_runner(args: argparse.Namespace) -> tuple[object, str]:
    """An engine bundle: the build fixes alpha, t0, resolution and steps; the other CAT flags are free."""
    _refuse_fixed_flags(args, FIXED_BY_BUILD)
    from catrt.bundle import load
    from catrt.integrity import read_build_config
    from catrt.key_files import read_key_file
    from catrt.manifest import read_manifest

    key = None if args.bundle_key_file is None else read_key_file(args.bundle_key_file)
    build = read_build_config(read_manifest(engine_folder(args.engines, "--engines")))  # for the flag checks; `load` verifies it all
    _refuse_fixed_flags(args, [name for name in cat_values(args) if hasattr(build, name) and name != "alpha"])
    _check_against_build(args, build)
    config = build.cat_config(seed=args.seed, **cat_values(args))  # --alpha: one of the built alphas
    with hub_notices_dropped():
        runner = load(args.engines, config, key=key)
    _check_prompts(args, runner, limit=build.max_sequence_length)
    return runner, f"alpha={config.alpha} t0={build.t0}, {build.backend} engine {args.engines}"


def _refuse_fixed_flags(args: argparse.Namespace, fixed: typing.Iterable[str]) -> None:
    """A build fixes the model, precision, device and its CAT schedule (alpha, t0, ...): refuse them
    rather than ignore them."""
    for name in fixed:
        value = getattr(args, name)
        if value is not None and value is not False:
            raise ConfigError(
                f"{flag_name(name)} cannot be used with --engines: the build fixes it (see catrt inspect {echo_path(args.engines)}); "
                f"drop {flag_name(name)}, or build an engine with it",
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


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    generate = commands.add_parser("generate", help="generate an image with CAT Pruning (or --full)")
    generate.add_argument("--model", default=None,
                          help=f"model name (reference, tiny-sd3, sd3, ...) or diffusers folder (default: {DEFAULT_MODEL})")
    generate.add_argument("--prompt", required=True, help="what to draw")
    generate.add_argument("--negative-prompt", default=None, help="what to steer away from (default: none)")
    generate.add_argument("--steps", type=step_count, default=None,
                          help=f"denoising steps, 1 to {MAX_STEPS} (default: the model's own, e.g. {card_defaults('default_steps', 28)}; "
                               "else the pipeline's, 28 for SD3; the build's with --engines)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of KMeans)")
    generate.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's)")
    generate.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's)")
    generate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    generate.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda or cuda:1 (default: cpu)")
    generate.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                          help="weights and activations (default: fp32 on the CPU; on CUDA the model's usual one: "
                               f"{usual_precisions()}; others fp32, but a local diffusers folder the dtype its transformer was "
                               "saved in); fp16 needs CUDA")
    generate.add_argument("--out", default="image.png", help="output image: .png, .jpg, .jpeg or .webp")
    generate.add_argument("--full", action="store_true", help="run the unpruned model")
    add_cat_flags(generate, own_schedule=True)
    generate.add_argument("--engines", default=None,
                          help="run a built engine folder (its build fixes the model, alpha, t0, size, steps, "
                               "precision and device)")
    generate.add_argument("--bundle-key-file", default=None,
                          help="with --engines: refuse the bundle unless signed with the key in this file "
                               "(default: $CATRT_BUNDLE_KEY if set, else not checked)")
    generate.set_defaults(handler=cmd_generate)
