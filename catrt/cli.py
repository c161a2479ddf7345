"""`catrt` command line: one subcommand per job, each builds a config and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_MODEL = "tiny-sd3"

logger = logging.getLogger("catrt.cli")


def _add_cat_flags(parser: argparse.ArgumentParser) -> None:
    """CATConfig fields as kebab-case flags (defaults from CATConfig itself)."""
    from catrt.config import SELECTION_RULES, CATConfig

    defaults = CATConfig()
    group = parser.add_argument_group("CAT Pruning")
    group.add_argument("--alpha", type=float, default=defaults.alpha, help="fraction of tokens recomputed per pruned step (0, 1]")
    group.add_argument("--t0", type=int, default=defaults.t0, help="last full step before pruning starts")
    group.add_argument("--n-clusters", type=int, default=defaults.n_clusters, help="KMeans clusters made at step t0")
    group.add_argument("--ewma-decay", type=float, default=defaults.ewma_decay, help="staleness EWMA decay [0, 1)")
    group.add_argument("--magnitude-fraction", type=float, default=defaults.magnitude_fraction, help="share of k chosen by noise magnitude")
    group.add_argument("--refresh-every", type=int, default=defaults.refresh_every, help="full refresh step every N steps after t0 (0 = off)")
    group.add_argument("--rule", choices=SELECTION_RULES, default=defaults.rule, help="selection rule (baselines are for benchmarks)")


def _cat_config(args: argparse.Namespace, seed: int = 0):  # noqa: ANN202 - CATConfig, imported lazily
    from catrt.config import CATConfig

    return CATConfig(
        alpha=args.alpha,
        t0=args.t0,
        n_clusters=args.n_clusters,
        ewma_decay=args.ewma_decay,
        magnitude_fraction=args.magnitude_fraction,
        refresh_every=args.refresh_every,
        rule=args.rule,
        seed=seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from catrt.generation import GenerationRequest, generate_image
    from catrt.loading import load_pipeline

    config = None if args.full else _cat_config(args, seed=args.seed)
    pipe = load_pipeline(args.model, device=args.device)
    request = GenerationRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance_scale,
    )
    image, seconds = generate_image(pipe, request, config)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    mode = "unpruned" if config is None else f"alpha={config.alpha} t0={config.t0}"
    print(f"wrote {out} ({image.width}x{image.height}, {args.steps} steps, {mode}) in {seconds:.2f} s")
    return 0


def cmd_macs(args: argparse.Namespace) -> int:
    from catrt.macs import format_macs, model_macs

    report = model_macs(args.model, args.height, args.width, _cat_config(args), args.steps)
    pruned_steps = report.steps - report.full_steps
    print(f"model {args.model} at {args.height}x{args.width}: N = {report.num_tokens} image tokens, k = {report.k}")
    print(f"full step:   {format_macs(report.full_step)} per image")
    print(f"pruned step: {format_macs(report.pruned_step)} per image ({report.pruned_step / report.full_step:.3f} of full)")
    print(f"once per generation: {format_macs(report.context)}")
    print(f"schedule: {report.full_steps} full + {pruned_steps} pruned of {report.steps} steps")
    print(f"schedule MAC ratio: {report.schedule_ratio:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="catrt",
        description="CAT Pruning for diffusion transformers: generate images, count MACs.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", help="generate a PNG with CAT Pruning (or --full)")
    generate.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or diffusers folder (default: {DEFAULT_MODEL})")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt", default=None)
    generate.add_argument("--steps", type=int, default=28, help="denoising steps")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    generate.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    generate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    generate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    generate.add_argument("--out", default="image.png", help="output PNG path")
    generate.add_argument("--full", action="store_true", help="run the unpruned model")
    _add_cat_flags(generate)
    generate.set_defaults(handler=cmd_generate)

    macs = commands.add_parser("macs", help="count transformer MACs of a published model (no download)")
    macs.add_argument("--model", required=True, help="sd3, sd3.5-medium, sd3.5-large or pixart-sigma")
    macs.add_argument("--steps", type=int, default=28)
    macs.add_argument("--height", type=int, default=1024)
    macs.add_argument("--width", type=int, default=1024)
    _add_cat_flags(macs)
    macs.set_defaults(handler=cmd_macs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from catrt.errors import CatrtError

    try:
        return args.handler(args)
    except CatrtError as error:
        print(f"catrt {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
