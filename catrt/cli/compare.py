"""`catrt compare`: image quality, MACs and time of token rules against the unpruned model, written as a report."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from catrt.checks import MAX_STEPS, output_folder, path_is, repeated  # stdlib + catrt.errors only
from catrt.cli.cat_flags import add_cat_flags, cat_values
from catrt.cli.folder_flags import refuse_empty
from catrt.cli.model_flags import DEFAULT_MODEL, PRECISION_CHOICES, card_size, run_precision, torch_device
from catrt.cli.parsing import Several, positive_int, step_count
from catrt.config import CATConfig  # stdlib + catrt.errors only
from catrt.errors import PATH_ECHO_LIMIT, ConfigError, echo, shorten
from catrt.model_cards import MODEL_CARDS
from catrt.notices import hub_notices_dropped  # stdlib only


def cmd_compare(args: argparse.Namespace) -> int:
    """Unpruned vs each rule on every prompt and seed: report.md, metrics.csv, grid.png in --out."""
    with _output_folder(args.out, "--out", "report.md, metrics.csv and grid.png") as out:
        return _compare(args, out)


@contextlib.contextmanager
def _output_folder(value: str, flag: str, holds: str) -> Iterator[Path]:
    """The folder `value`, made now and checked writable, so a bad place is refused before minutes of work (not
    when the results are written); removed again if this made it and the block fails before writing into it."""
    refuse_empty(value, flag, f"give a folder for {holds}", flag.lstrip("-"))
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
        **cat_values(args), rule=rule, reuse_threshold=args.reuse_threshold)) for rule in args.rules]
    model, card = args.model, MODEL_CARDS.get(args.model)
    card_size(card, args.height, args.width, model)
    from catrt.metrics import check_ssim_side

    for flag, pixels in (("--height", args.height), ("--width", args.width)):
        check_ssim_side(flag, pixels)
    for variant in configs:
        if variant.config is not None:
            variant.config.check_steps(args.steps)
    device = torch_device("cpu" if args.device is None else args.device)
    precision = run_precision(args.precision, model, device.type)
    from catrt.build_config import PRECISIONS
    from catrt.compare import check_out, run_comparison, write_outputs
    from catrt.generation import check_pipeline_size, check_prompt_length, check_text_to_image
    from catrt.image_output import unwritable_out

    try:
        check_out(out)  # the files the run replaces at its end, checked before the model loads
    except OSError as error:
        raise unwritable_out(out, error) from None
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


def add_compare_parser(commands: argparse._SubParsersAction) -> None:
    from catrt.config import SELECTION_RULES

    compare = commands.add_parser(
        "compare", help="image quality (PSNR, SSIM, CLIP score), MACs and time of rules against the unpruned model")
    compare.add_argument("--model", default=DEFAULT_MODEL, help="model name (reference, tiny-sd3, sd3, ...) or diffusers folder")
    compare.add_argument("--prompts", required=True, help="text file, one prompt per line")
    compare.add_argument("--seeds", type=int, nargs="+", action=Several, default=[0], help="seeds; every prompt runs with each")
    compare.add_argument("--steps", type=step_count, default=28, help=f"denoising steps, 1 to {MAX_STEPS}")
    compare.add_argument("--rules", nargs="+", action=Several, choices=("full", *SELECTION_RULES),
                         default=["cat", "round_robin", "random"],
                         help="token rules to compare (full: the unpruned pipeline again, a determinism check)")
    compare.add_argument("--reuse-threshold", type=float, default=0.0,
                         help="First-Block-Cache-style reuse for every rule: reuse a step when the first block's "
                              "residual moved less than this since the last computed step (0 = off; eager only)")
    compare.add_argument("--clip", default=None,
                         help="CLIP model folder (or hub name) for the CLIP score (default: no CLIP score)")
    compare.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's)")
    compare.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's)")
    compare.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    compare.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    compare.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                         help="weights and activations (default: fp32 on the CPU; on CUDA the model's usual one)")
    compare.add_argument("--out", required=True, help="folder for report.md, metrics.csv, grid.png and images/")
    add_cat_flags(compare, skip=("rule",))
    compare.set_defaults(handler=cmd_compare)
