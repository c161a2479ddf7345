"""`catrt serve`: builds (or an eager model) over HTTP on one device, or as a Ray Serve fleet with --ray."""

from __future__ import annotations

import argparse
from typing import Any

from catrt.checks import MAX_BATCH, MAX_STEPS  # stdlib + catrt.errors only
from catrt.cli.cat_flags import add_cat_flags, cat_config, cat_values
from catrt.cli.model_flags import DEFAULT_MODEL, card_defaults, card_schedule, card_size, check_device_name
from catrt.cli.parsing import Several, flag_name, positive_int, step_count
from catrt.errors import ConfigError
from catrt.model_cards import MODEL_CARDS
from catrt.notices import hub_notices_dropped  # stdlib only


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve builds (or an eager model); every refusal before the model loads is one line."""
    from catrt.serve import ServeConfig, run_server
    from catrt.serve.auth import load_api_key

    if args.engines is not None:
        _refuse_serve_flags_fixed_by_build(args)  # before the flags' values are read: a build fixes them
        steps, cat = None, cat_config(args)
    else:
        card = MODEL_CARDS.get(args.model)
        card_size(card, args.height, args.width, args.model)
        steps, t0 = card_schedule(args, card)
        cat = cat_config(args, t0=t0)
        if args.device is not None:
            check_device_name(args.device)
    fleet = _fleet_config(args)
    defaults = ServeConfig(model=DEFAULT_MODEL)
    config = ServeConfig(
        engines=args.engines, model=args.model, height=args.height, width=args.width,
        steps=defaults.steps if steps is None else steps,
        batch=defaults.batch if args.batch is None else args.batch,
        cat=cat, alphas=tuple(args.alpha or ()), alpha_policy=args.alpha_policy,
        latency_target=args.latency_target, device=defaults.device if args.device is None else args.device, precision=args.precision,
        host=args.host, port=args.port, max_queue=args.max_queue, timeout=args.timeout, hang_grace=args.hang_grace,
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
    return FleetConfig(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                       address=args.ray_address)


def _run_fleet(config: Any, fleet: Any) -> int:
    """`catrt serve --ray`; Ray is imported here only, and its absence is a one-line refusal."""
    import importlib.util

    from catrt.serve.fleet_start import LOCAL, check_fleet_start, check_ray_version
    from catrt.serve.server import bundle_key, check_device, check_source_of, verify_bundles_here

    missing = 'Ray Serve is not installed: pip install "catrt[ray]" (or serve on one device without --ray)'
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"--ray needs {missing}", field="ray")
    check_ray_version()
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
    given = next(iter(cat_values(args).items()), None)
    if given is None:
        return
    name, value = given
    flag = flag_name(name)
    fix = (f"the build fixes it; drop {flag} or build an engine with it" if name == "reuse_every" else
           f"a served build runs with catrt's default {flag}; drop {flag}, or serve the model with --model to set it")
    raise ConfigError(f"{flag} cannot be used with --engines: {fix}", field=name, value=value)


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    from catrt.serve import ServeConfig
    from catrt.serve.alpha_policy import ALPHA_POLICIES
    from catrt.serve.auth import API_KEY_ENV
    from catrt.serve.config import PRECISION_CHOICES as SERVE_PRECISIONS

    defaults = ServeConfig(model=DEFAULT_MODEL)
    serve = commands.add_parser("serve", help="serve a build over HTTP (OpenAI images API, health, metrics)")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--engines", nargs="+", action=Several, default=None, metavar="DIR",  # repeated adds builds
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
    serve.add_argument("--hang-grace", type=float, default=defaults.hang_grace, metavar="SECONDS",
                       help="seconds a model call may go on after its last request was answered (504) or left (it "
                            "stops before its next step, so this covers one step, or the text encoding, or the "
                            "decode); past it the worker counts as hung: /health/live, /health/ready and new "
                            f"requests answer 503 until the call returns (default: {defaults.hang_grace:g})")
    limits = serve.add_argument_group("input limits and access")
    limits.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes,
                        help=f"larger request bodies answer 413 unread (default: {defaults.max_body_bytes})")
    limits.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help=f"longer prompts answer 400 before tokenizing (default: {defaults.max_prompt_chars})")
    limits.add_argument("--read-timeout", type=float, default=defaults.read_timeout,
                        help=f"seconds a request may take to arrive whole, and a client may leave its answer "
                             f"unread; then the connection is closed, a request short of its body answered 408 "
                             f"first (default: {defaults.read_timeout:g})")
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
    eager.add_argument("--steps", type=step_count, default=None, help=f"denoising steps, 1 to {MAX_STEPS} (default: the model's own, e.g. "
                       f"{card_defaults('default_steps', defaults.steps)}; else {defaults.steps})")
    eager.add_argument("--batch", type=int, default=None, help=f"images per model call, 1 to {MAX_BATCH} (default: {defaults.batch})")
    eager.add_argument("--device", default=None, help=f"torch device, e.g. cpu or cuda (default: {defaults.device})")
    eager.add_argument("--precision", choices=SERVE_PRECISIONS, default=None,
                       help="weights and activations (default: fp32 on the CPU; on CUDA the model's usual one); "
                            "fp16 needs CUDA")
    fleet = serve.add_argument_group("fleet (Ray Serve; needs the ray extra: pip install \"catrt[ray]\")")
    fleet.add_argument("--ray", action="store_true",
                       help="serve as a Ray Serve application: an HTTP ingress and model replicas, one device each")
    fleet.add_argument("--replicas", type=positive_int, default=None, help="model replicas (default: 1)")
    fleet.add_argument("--min-replicas", type=positive_int, default=None,
                       help="autoscale on ongoing requests from this many replicas (with --max-replicas)")
    fleet.add_argument("--max-replicas", type=positive_int, default=None,
                       help="autoscale up to this many replicas (with --min-replicas)")
    fleet.add_argument("--ray-address", default=None,
                       help="join this Ray cluster (e.g. auto, ray://head:10001) (default: start a local one)")
    add_cat_flags(serve, several=("alpha",), own_schedule=True)
    serve.set_defaults(handler=cmd_serve)
