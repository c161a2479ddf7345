"""`catrt build`: export, compile and verify the engines of one model, size and schedule into a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from catrt.checks import MAX_BATCH, MAX_STEPS  # stdlib + catrt.errors only
from catrt.cli.folder_flags import refuse_empty
from catrt.cli.model_flags import (
    DEFAULT_MODEL,
    PRECISION_CHOICES,
    card_defaults,
    card_schedule,
    card_size,
    usual_precisions,
)
from catrt.cli.parsing import Several, flag_name, positive_int, step_count
from catrt.config import CATConfig  # stdlib + catrt.errors only
from catrt.model_cards import MODEL_CARDS, check_model_source, default_precision
from catrt.notices import hub_notices_dropped  # stdlib only

# The choices of catrt.build_config.BACKENDS and BuildConfig's defaults, spelled out here because that module
# imports torch; tests/test_cli.py checks they agree.
BACKEND_CHOICES: tuple[str, ...] = ("auto", "eager", "compile", "onnxruntime", "tensorrt")
BUILD_DEFAULTS: dict[str, Any] = {"steps": 28, "batch": 1, "backend": "auto"}
# Where `catrt build` writes, by flag (not BuildConfig fields).
BUILD_FOLDERS: dict[str, str] = {"out": "engines", "export_dir": "export"}


def build_precision(model: str, backend: str) -> str:
    """A build's precision when none is asked for: the model's usual dtype where the backend builds for CUDA
    and can build that dtype (an SD3 engine on a GPU is fp16, as `generate` there), else fp32."""
    from catrt.engines import ENGINES, resolve_backend

    engine = ENGINES[resolve_backend(backend)]
    usual = default_precision(model, engine.default_device().type)
    return usual if usual in engine.precisions else "fp32"


def cmd_build(args: argparse.Namespace) -> int:
    card_size(MODEL_CARDS.get(args.model), args.height, args.width, args.model)
    for name in ("out", "export_dir"):
        refuse_empty(getattr(args, name), flag_name(name), f"give a folder (default: {BUILD_FOLDERS[name]})", name)
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig
    from catrt.key_files import read_key_file

    check_model_source(args.model)  # a mistyped name is one line, before the progress bar starts

    sign_key = None if args.sign_key_file is None else read_key_file(args.sign_key_file, "sign_key_file")

    precision = args.precision or build_precision(args.model, args.backend)
    steps, t0 = card_schedule(args, MODEL_CARDS.get(args.model))  # as generate and serve run the model
    config = BuildConfig(
        model=args.model, height=args.height, width=args.width, batch=args.batch, steps=steps or BUILD_DEFAULTS["steps"],
        t0=BuildConfig.t0 if t0 is None else t0, alphas=tuple(args.alpha or (CATConfig().alpha,)), reuse_every=args.reuse_every, precision=precision, backend=args.backend,
        max_sequence_length=args.max_sequence_length,
    )
    with hub_notices_dropped():
        path = build_engines(config, out_dir=Path(args.out), export_dir=Path(args.export_dir), sign_key=sign_key)
    print(f"built {path}" + (" (signed)" if sign_key is not None else ""))
    return 0


def add_build_parser(commands: argparse._SubParsersAction) -> None:
    defaults = CATConfig()
    build = commands.add_parser("build", help="export, compile and verify engines for one model and resolution")
    build.add_argument("--model", default=DEFAULT_MODEL, help="model name or diffusers folder")
    build.add_argument("--alpha", type=float, nargs="+", action=Several, default=None, metavar="ALPHA",
                       help=f"fraction of tokens recomputed per pruned step (0, 1] (default: {defaults.alpha}); several "
                            "values (--alpha A B, or --alpha repeated) build one pruned graph each into one bundle "
                            "(weights stored once), the first is the default of a call")
    build.add_argument("--t0", type=int, default=None,
                       help=f"last full step before pruning starts (default: the model's own, {card_defaults('default_t0', defaults.t0)}; "
                            f"else {defaults.t0})")
    build.add_argument("--reuse-every", type=int, default=defaults.reuse_every,
                       help="after t0, every N-th step reuses the previous prediction (0 = off)")
    build.add_argument("--steps", type=step_count, default=None,
                       help=f"denoising steps the engine serves, 1 to {MAX_STEPS} (default: the model's own, e.g. "
                            f"{card_defaults('default_steps', BUILD_DEFAULTS['steps'])}; else {BUILD_DEFAULTS['steps']})")
    build.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's)")
    build.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's)")
    build.add_argument("--batch", type=int, default=BUILD_DEFAULTS["batch"],
                       help=f"prompts per call, 1 to {MAX_BATCH} (graphs take 2x with guidance)")
    build.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                       help="weights and activations (default: where the build runs on CUDA, the model's usual one: "
                            f"{usual_precisions()}; others, and a dtype the backend cannot build, fp32, but a local diffusers "
                            "folder the dtype its transformer was saved in); fp16 needs "
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
