"""`catrt` command line: one subcommand per job, each builds a config and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_MODEL = "reference"  # trained here, shipped in the package: recognisable images, no download

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

    runner, mode = _engine_runner(args) if args.engines is not None else _model_runner(args)
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({image.width}x{image.height}, {mode}) in {seconds:.2f} s")
    return 0


def _model_runner(args: argparse.Namespace) -> tuple[object, str]:
    """A pipeline by name, accelerated unless --full."""
    from catrt.loading import load_pipeline
    from catrt.pipeline import accelerate

    pipe = load_pipeline(args.model, device=args.device)
    if args.full:
        return pipe, "unpruned"
    config = _cat_config(args, seed=args.seed)
    return accelerate(pipe, config), f"alpha={config.alpha} t0={config.t0}"


def _engine_runner(args: argparse.Namespace) -> tuple[object, str]:
    """An engine bundle: the build fixes alpha, t0, resolution and steps; the other CAT flags are free."""
    from catrt.build_config import BuildConfig
    from catrt.bundle import load
    from catrt.manifest import read_manifest

    build = BuildConfig.from_dict(read_manifest(Path(args.engines)).build)
    config = build.cat_config(
        seed=args.seed, n_clusters=args.n_clusters, ewma_decay=args.ewma_decay,
        magnitude_fraction=args.magnitude_fraction, refresh_every=args.refresh_every, rule=args.rule,
    )
    return load(args.engines, config), f"alpha={build.alpha} t0={build.t0}, {build.backend} engine {args.engines}"


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


def cmd_build(args: argparse.Namespace) -> int:
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig

    config = BuildConfig(
        model=args.model, height=args.height, width=args.width, batch=args.batch, steps=args.steps,
        t0=args.t0, alpha=args.alpha, precision=args.precision, backend=args.backend,
        max_sequence_length=args.max_sequence_length,
    )
    path = build_engines(config, out_dir=Path(args.out), export_dir=Path(args.export_dir))
    print(f"built {path}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print a bundle's manifest, then verify its files and that this machine can run it."""
    from catrt.bundle import verify_bundle
    from catrt.manifest import read_manifest

    manifest = read_manifest(Path(args.engines))
    build = manifest.build
    print(f"engine {args.engines}")
    print(f"  model:     {manifest.model['name']} ({manifest.model['pipeline_class']}, transformer sha256 {manifest.model['transformer_sha256'][:16]}...)")
    print(f"  build:     {build['height']}x{build['width']}, batch {build['batch']}, {build['steps']} steps, t0 {build['t0']}, "
          f"alpha {build['alpha']} (k = {manifest.k} of N = {manifest.num_tokens}), {build['precision']}, {build['backend']}")
    print(f"  device:    {', '.join(f'{key} {value}' for key, value in manifest.device.items())}")
    print(f"  versions:  {', '.join(f'{name} {version}' for name, version in sorted(manifest.versions.items()))}")
    errors = manifest.verification["max_relative_error"]
    print(f"  verified:  worst relative error {max(errors.values()):.3g} (tolerance {manifest.verification['tolerance']:g})")
    for graph, spec in manifest.graphs.items():
        inputs = ", ".join(f"{i['name']}{tuple(i['shape'])}" for i in spec["inputs"])
        print(f"  graph {graph}: {inputs} ({manifest.exporters.get(graph, 'not exported')})")
    for name, record in manifest.files.items():
        print(f"  file {name}: {record['size']} bytes, sha256 {record['sha256'][:16]}...")
    print(f"  total:     {manifest.total_size} bytes")
    verify_bundle(Path(args.engines))
    print("files and machine: OK")
    return 0


def _add_build_parser(commands: argparse._SubParsersAction) -> None:
    from catrt.build_config import BACKENDS, PRECISIONS, BuildConfig

    defaults = BuildConfig(DEFAULT_MODEL)
    build = commands.add_parser("build", help="export, compile and verify engines for one model and resolution")
    build.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or diffusers folder (default: {DEFAULT_MODEL})")
    build.add_argument("--alpha", type=float, default=defaults.alpha, help="fraction of tokens recomputed per pruned step (0, 1]")
    build.add_argument("--t0", type=int, default=defaults.t0, help="last full step before pruning starts")
    build.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps the engine serves")
    build.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    build.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    build.add_argument("--batch", type=int, default=defaults.batch, help="prompts per call (graphs take 2x with guidance)")
    build.add_argument("--precision", choices=tuple(PRECISIONS), default=defaults.precision)
    build.add_argument("--backend", choices=BACKENDS, default=defaults.backend, help="auto: tensorrt or compile on a GPU, onnxruntime on a CPU")
    build.add_argument("--max-sequence-length", type=int, default=None, help="text length the graphs take (default: the pipeline's)")
    build.add_argument("--out", default="engines", help="parent folder of the engine bundles (default: engines)")
    build.add_argument("--export-dir", default="export", help="parent folder of the ONNX exports (default: export)")
    build.set_defaults(handler=cmd_build)

    inspect = commands.add_parser("inspect", help="print an engine bundle's manifest and verify its files")
    inspect.add_argument("engines", help="an engines/<build-name> folder")
    inspect.set_defaults(handler=cmd_inspect)


def cmd_serve(args: argparse.Namespace) -> int:
    from catrt.serve import ServeConfig, run_server

    config = ServeConfig(
        engines=args.engines, model=args.model, height=args.height, width=args.width, steps=args.steps,
        batch=args.batch, cat=_cat_config(args), device=args.device, host=args.host, port=args.port,
        max_queue=args.max_queue, timeout=args.timeout,
    )
    return run_server(config)


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from catrt.serve import ServeConfig

    defaults = ServeConfig(model=DEFAULT_MODEL, height=64, width=64)
    serve = commands.add_parser("serve", help="serve a build over HTTP (OpenAI images API, health, metrics)")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", default=None, help="an engines/<build-name> folder made by `catrt build`")
    source.add_argument("--model", default=None, help="instead of --engines: a model run eagerly with the CAT flags")
    serve.add_argument("--host", default=defaults.host)
    serve.add_argument("--port", type=int, default=defaults.port)
    serve.add_argument("--max-queue", type=int, default=defaults.max_queue, help="waiting requests before 429")
    serve.add_argument("--timeout", type=float, default=defaults.timeout, help="seconds per request, queue included, before 504")
    eager = serve.add_argument_group("--model only (a build fixes these)")
    eager.add_argument("--height", type=int, default=None, help="image height in pixels")
    eager.add_argument("--width", type=int, default=None, help="image width in pixels")
    eager.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    eager.add_argument("--batch", type=int, default=defaults.batch, help="images per model call")
    eager.add_argument("--device", default=defaults.device, help="torch device, e.g. cpu or cuda")
    _add_cat_flags(serve)
    serve.set_defaults(handler=cmd_serve)


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
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: 28, or the build's with --engines)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    generate.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    generate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the pipeline's)")
    generate.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    generate.add_argument("--out", default="image.png", help="output PNG path")
    generate.add_argument("--full", action="store_true", help="run the unpruned model")
    _add_cat_flags(generate)
    generate.add_argument("--engines", default=None, help="run a built engine folder (its build fixes alpha, t0, size and steps)")
    generate.set_defaults(handler=cmd_generate)

    macs = commands.add_parser("macs", help="count transformer MACs of a published model (no download)")
    macs.add_argument("--model", required=True, help="sd3, sd3.5-medium, sd3.5-large or pixart-sigma")
    macs.add_argument("--steps", type=int, default=28)
    macs.add_argument("--height", type=int, default=1024)
    macs.add_argument("--width", type=int, default=1024)
    _add_cat_flags(macs)
    macs.set_defaults(handler=cmd_macs)
    _add_build_parser(commands)
    _add_serve_parser(commands)
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
