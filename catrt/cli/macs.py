"""`catrt macs`: the transformer MACs of a published model's full and pruned steps, from its card (no download)."""

from __future__ import annotations

import argparse

from catrt.checks import MAX_STEPS  # stdlib + catrt.errors only
from catrt.cli.cat_flags import add_cat_flags, cat_config
from catrt.cli.model_flags import card_size
from catrt.cli.parsing import positive_int, step_count
from catrt.model_cards import MODEL_CARDS


def cmd_macs(args: argparse.Namespace) -> int:
    card = MODEL_CARDS[args.model]
    height, width = args.height or card.default_size, args.width or card.default_size
    card_size(card, height, width, args.model)
    config = cat_config(args)
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


def add_macs_parser(commands: argparse._SubParsersAction) -> None:
    macs = commands.add_parser("macs", help="count transformer MACs of a published model (no download)")
    macs.add_argument("--model", required=True, choices=tuple(MODEL_CARDS), help="a model with a config in catrt/model_cards.py")
    macs.add_argument("--steps", type=step_count, default=28, help=f"denoising steps of the schedule, 1 to {MAX_STEPS}")
    macs.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's)")
    macs.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's)")
    add_cat_flags(macs)
    macs.set_defaults(handler=cmd_macs)
