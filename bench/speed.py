"""Step and generation speed per backend, on the machine at hand, against unmodified diffusers.

Two modes.

Engines (the default): builds an SD3-layout pipeline big enough that a full step is measurable
(default: 4 joint blocks, D = 384, 512x512 -> 1024 image tokens, one prompt with guidance -> batch 2),
saves it under bench/results/tmp/, builds an engine per backend with `build_engines`, then times one
full step, one pruned step and the selection of a pruned step, and whole generations (best of
--repeats).

    python bench/speed.py                                   # eager, compile, onnxruntime (+ tensorrt on a GPU)
    python bench/speed.py --backends eager onnxruntime --layers 2 --repeats 2   # quicker

Published block size (`--dims sd3-medium`): the transformer has SD3-medium's real block size (24
heads x 64 = 1536 wide, text width 4096, pooled 2048) with random weights and `--layers` of its 24
joint blocks (`--dims sd3.5-medium` and `--dims sd3.5-large`: those models' blocks, the same way); inputs are one prompt with guidance (batch 2) at 1024x1024 (4096 image tokens) with
77 CLIP + 256 T5 = 333 text tokens, as the real model sees. No pipeline and no engine builds (an ONNX
bundle of this size takes long to export here): on the same inputs, interleaved round by round, it
times diffusers' own transformer forward, catrt's full step and catrt's pruned step as the runtime
runs them (`CATRuntime`'s step programs over its persistent buffers: the adapter writing the K/V
cache in place, the output cache and prediction copies; the pruned step also gathers the selected
patches and selects the next step's tokens), and reports the times, their ratios to diffusers and
the MAC ratio of a pruned step.

    python bench/speed.py --dims sd3-medium --layers 2 --threads 2 --repeats 3

`--compile` adds the compiled counterparts, timed in the same rounds: diffusers' transformer with each
block through torch.compile (inductor, static shapes; what diffusers' `compile_repeated_blocks` does
for models that list their blocks), and catrt's full and pruned steps over
`compile_step_functions(adapter)` (inductor, block by block), each on its own copy of the weights.
Compiled rows are compared with diffusers compile.

    python bench/speed.py --dims sd3-medium --layers 2 --threads 2 --repeats 5 --compile

Results go to `--out`, by default a new file bench/results/tmp/speed-<device>[-<dims>-L<layers>][-compile]-<time>.md
(git ignores tmp/: a committed results file is only written when --out names it).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchkit.py, also when loaded by path
import benchkit  # noqa: E402
from catrt.notices import quiet_known_notices  # noqa: E402 - light: no torch

quiet_known_notices()  # a command-line program: transformers' torchvision notices say nothing useful here

from diffusers import SD3Transformer2DModel  # noqa: E402

import catrt  # noqa: E402
from catrt.build import build_engines  # noqa: E402
from catrt.build_config import BuildConfig  # noqa: E402
from catrt.config import CATConfig  # noqa: E402
from catrt.contract import StepFunctions  # noqa: E402
from catrt.errors import CatrtError  # noqa: E402
from catrt.engines import ENGINES, resolve_backend  # noqa: E402
from catrt.export import capture_step_sample  # noqa: E402
from catrt.macs import transformer_macs  # noqa: E402
from catrt.model_cards import MODEL_CARDS, ModelCard  # noqa: E402
from catrt.models import make_adapter  # noqa: E402
from catrt.provenance import describe_device  # noqa: E402
from catrt.runtime import CATRuntime  # noqa: E402
from catrt.tiny import build_tiny_pipeline  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PROMPT = "a photo of a red fox standing in a snowy forest at sunset, highly detailed"
CLIP_TOKENS = 77
DIMS = {  # published block sizes of the SD3 layout: the card's transformer config, its resolution and text length
    "sd3-medium": {"card": "sd3", "size": 1024, "text_length": 256},
    "sd3.5-medium": {"card": "sd3.5-medium", "size": 1024, "text_length": 256},
    "sd3.5-large": {"card": "sd3.5-large", "size": 1024, "text_length": 256},
}
DIMS_SETS = {"heads": 6, "size": 512, "text_length": 64}  # what --dims sets; the defaults without it


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = benchkit.new_parser("bench/speed.py", __doc__)
    parser.add_argument("--dims", choices=sorted(DIMS), default=None,
                        help="a published model's block size, resolution and text length, steps only, no engines "
                        "(sets --heads, --size, --text-length; --backends defaults to none)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=None, help="attention heads of 64 channels (D = 64 x heads; default 6)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels, a multiple of 16 (tokens = (size / 16)^2; default 512)")
    parser.add_argument("--text-length", type=int, default=None, help="T5 tokens (the transformer sees 77 + this; default 64)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps of a timed generation")
    parser.add_argument("--t0", type=int, default=4, help="last full step before pruning starts")
    parser.add_argument("--alpha", type=float, default=0.3, help="fraction of image tokens a pruned step recomputes")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the fastest counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: every backend that runs here ('none' with --dims: steps only)")
    parser.add_argument("--compile", action="store_true",
                        help="with --dims: also time diffusers and catrt compiled by torch.compile (inductor)")
    parser.add_argument("--out", type=Path, default=None, help="report path (default: a new file bench/results/tmp/speed-<device>-<time>.md; --out bench/results/speed-<device>.md regenerates a committed one)")
    args = parser.parse_args(argv)
    set_dims(parser, args)
    if args.backends is not None and [name.lower() for name in args.backends] == ["none"]:
        args.backends = []
    check_args(parser, args)
    return args


def set_dims(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--heads, --size and --text-length from --dims (refused beside it: silently timing another size than
    asked for would mislabel the report), else from the options or their defaults."""
    given = [f"--{name.replace('_', '-')}" for name in DIMS_SETS if getattr(args, name) is not None]
    if args.dims is None:
        for name, default in DIMS_SETS.items():
            setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
        return
    if given:
        parser.error(f"--dims {args.dims} sets --heads, --size and --text-length to the published model's; "
                     f"leave out {' and '.join(given)} (or leave out --dims)")
    dims = DIMS[args.dims]
    args.heads = MODEL_CARDS[dims["card"]].transformer_config["num_attention_heads"]
    args.size, args.text_length = dims["size"], dims["text_length"]


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line and exit code 2 for settings that would fail deep inside torch or after minutes of building."""
    benchkit.check_at_least_one(parser, layers=args.layers, heads=args.heads, size=args.size, text_length=args.text_length,
                                steps=args.steps, repeats=args.repeats, threads=args.threads)
    benchkit.check_out(parser, args.out)
    if args.size % 16:
        parser.error(f"--size must be a multiple of 16 (one token per 16x16 pixels), got {args.size}")
    benchkit.check_schedule(parser, args.steps, args.t0, [args.alpha])
    if args.dims is not None and args.backends:
        parser.error("--dims times steps, not engines; leave out --backends (or pass --backends none)")
    if args.dims is None and args.backends != [] and args.steps < args.t0 + 2:
        parser.error(f"--steps must be at least --t0 + 2 when timing backends (the selection is timed on the pruned "
                     f"steps after the first), got --steps {args.steps} --t0 {args.t0}")
    if args.compile and args.dims is None:
        parser.error("--compile times compiled steps at a published block size; pass --dims too")
    try:  # an unknown backend, or one that cannot run here, before the baseline is timed and the model saved
        args.backends = None if args.backends is None else [resolve_backend(name) for name in args.backends]
    except CatrtError as error:
        parser.error(f"--backends: {error}")
    benchkit.check_distinct(parser, backends=args.backends)  # as resolved: auto is one of the others


def default_out(device: str, args: argparse.Namespace) -> Path:
    """A report path that does not exist yet under bench/results/tmp/ (git ignores it), as every bench script's:
    a run without --out neither overwrites a committed result nor leaves an untracked file beside them."""
    stem = f"speed-{benchkit.device_slug(device)}" + (f"-{args.dims}-L{args.layers}" if args.dims else "") + ("-compile" if args.compile else "")
    return benchkit.new_path(stem, ".md")


def synchronize() -> None:
    """Wait for the CUDA work queued so far (none on the CPU): a clock read after it counts the work, not its launch,
    and one started after it does not count earlier work still running (a warm-up's, say)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` timed runs: other jobs share this machine, and they only ever add time."""
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def interleaved_seconds(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of each function per round; every round runs each once, in a rotated order.

    A shared machine's load changes by the minute: measuring the functions round by round puts them
    under the same load, so per-round ratios compare like with like. CPU time (all threads of this
    process) is what the work itself took, less sensitive than wall time to other jobs taking the cores.
    """
    names = list(functions)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            functions[name]()
            synchronize()
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


# -- runtime steps (both modes) ------------------------------------------------------------------


def step_runtime(adapter: Any, functions: StepFunctions | None, hidden_states: torch.Tensor, timestep: torch.Tensor,
                 call_kwargs: dict[str, Any], alpha: float) -> CATRuntime:
    """A `CATRuntime` (guidance, t0 = 2) after its two full steps: its step programs are ready to time.

    Step 2 (t0) clusters and selects the first pruned step's tokens, as in a generation; after it,
    `_full_program` and `_pruned_program` are the steps the runtime runs (the pruned one ends by
    selecting the next step's tokens), over the same persistent buffers.
    """
    runtime = CATRuntime(adapter, CATConfig(alpha=alpha, t0=2), steps=3, guidance=True, functions=functions)
    for _ in range(2):
        runtime(hidden_states, timestep, call_kwargs)
    return runtime


def engine_step_times(fast: Any, build: BuildConfig, repeats: int) -> dict[str, float]:
    """Seconds of one full step, one pruned step and one pruned step's selection, through the engine."""
    with torch.no_grad():
        sample = capture_step_sample(fast.pipe, fast.adapter, build)
        runtime = step_runtime(fast.adapter, fast.engine, sample.hidden_states, sample.timestep, sample.context_inputs, build.alpha)
        return {
            "full": best_seconds(runtime._full_program, repeats),
            "pruned": best_seconds(runtime._pruned_program, repeats),
            "selection": selection_seconds(fast, build),
        }


def selection_seconds(fast: Any, build: BuildConfig) -> float:
    """Mean seconds of the runtime's selection per pruned step, timed inside one generation.

    The generation runs its steps uncaptured: a captured pruned step (compile, or any backend with CUDA graphs) is
    replayed without calling `_select`, which then ran once, inside the capture. Each call is timed between device
    synchronisations (on CUDA the call only queues its kernels).
    """
    accelerated = getattr(fast, "accelerated", fast)
    original, captured = CATRuntime._select, accelerated.cuda_graphs
    spent: list[float] = []

    def timed(runtime: CATRuntime) -> torch.Tensor:
        synchronize()
        started = time.perf_counter()
        indices = original(runtime)
        synchronize()
        spent.append(time.perf_counter() - started)
        return indices

    CATRuntime._select, accelerated.cuda_graphs = timed, False
    try:
        generate(fast, "latent")
    finally:
        CATRuntime._select, accelerated.cuda_graphs = original, captured
    return statistics.mean(spent[1:])  # the first is a warm-up: select_cat_step's first call at these shapes


def generate(runner: Any, output_type: str = "pil", **kwargs: Any) -> Any:
    return runner(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs)


def mac_ratio(config: dict[str, Any], height: int, width: int, alpha: float, t0: int, steps: int, text_tokens: int) -> float:
    """MACs of one pruned step / one full step (diffusers' forward), counted on the meta device."""
    card = ModelCard("bench", None, "sd3", config, text_tokens)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config).eval()
    report = transformer_macs(transformer, card, height, width, CATConfig(alpha=alpha, t0=t0), steps)
    return report.pruned_step / report.full_step


def sdpa_kernels(fn: Callable[[], Any]) -> str:
    """The attention kernels one call of `fn` runs (the aten ops under scaled_dot_product_attention)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = sorted({event.key for event in prof.key_averages() if "attention" in event.key and event.key != "aten::scaled_dot_product_attention"})
    return ", ".join(names) or "none"


# -- engines mode --------------------------------------------------------------------------------


def transformer_config(args: argparse.Namespace) -> dict[str, Any]:
    """SD3-medium's layout at a benchmark size; text widths stay those of the tiny encoders."""
    tiny = build_tiny_pipeline("tiny-sd3").transformer.config
    return {
        "sample_size": args.size // 8, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": args.layers, "attention_head_dim": 64, "num_attention_heads": args.heads,
        "joint_attention_dim": tiny.joint_attention_dim, "caption_projection_dim": 64 * args.heads,
        "pooled_projection_dim": tiny.pooled_projection_dim, "pos_embed_max_size": args.size // 16,
    }


def save_bench_model(config: dict[str, Any], folder: Path) -> Path:
    """The tiny SD3 pipeline with the benchmark transformer, saved so builds can load it by path."""
    if not (folder / "model_index.json").is_file():
        pipe = build_tiny_pipeline("tiny-sd3")
        torch.manual_seed(0)
        pipe.register_modules(transformer=SD3Transformer2DModel(**config).eval())
        benchkit.save_pipeline(pipe, folder)
    return folder


def baseline(model: Path, build: BuildConfig, repeats: int, device: torch.device) -> dict[str, float]:
    """Unmodified diffusers on `device` (the engines'; it ran on the CPU beside CUDA engines): its transformer's
    full step and a whole generation."""
    pipe = catrt.load_pipeline(str(model), device=device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = build.call_arguments()
    with torch.no_grad():
        sample = capture_step_sample(pipe, make_adapter(pipe.transformer), build)
        step = best_seconds(
            lambda: pipe.transformer(hidden_states=sample.hidden_states, timestep=sample.timestep, **sample.context_inputs), repeats
        )
    return {"full": step, "generation": best_seconds(lambda: generate(pipe, **kwargs), max(1, repeats - 1))}


def measure_backend(backend: str, model: Path, args: argparse.Namespace) -> dict[str, float]:
    config = BuildConfig(
        str(model), height=args.size, width=args.size, steps=args.steps, t0=args.t0, alphas=(args.alpha,),
        backend=backend, max_sequence_length=args.text_length,
    )
    started = time.perf_counter()
    folder = build_engines(config, out_dir=RESULTS / "tmp" / "engines", export_dir=RESULTS / "tmp" / "export")
    build_seconds = time.perf_counter() - started
    fast = catrt.load(folder)
    fast.set_progress_bar_config(disable=True)
    times = engine_step_times(fast, fast.build, args.repeats)
    times["generation"] = best_seconds(lambda: generate(fast), max(1, args.repeats - 1))
    times["build"] = build_seconds
    return times


def engines_report(rows: dict[str, dict[str, float]], base: dict[str, float], macs: float, args: argparse.Namespace, device: str) -> str:
    tokens = (args.size // 16) ** 2
    lines = [
        f"# Speed on {device}",
        "",
        f"SD3-layout transformer: {args.layers} joint blocks, D = {64 * args.heads}, {args.size}x{args.size} "
        f"({tokens} image tokens, {CLIP_TOKENS + args.text_length} text tokens), one prompt with guidance (batch 2), "
        f"{args.steps} steps, t0 = {args.t0}, alpha = {args.alpha}; torch threads {args.threads}; best of {args.repeats} runs after a warm-up (the machine is shared).",
        "Full and pruned steps are the runtime's step programs over the engine (a pruned step includes selecting the next step's tokens).",
        "Generation = the whole pipeline call (text encoders, transformer steps, VAE decode, PIL). Build = export,"
        " engine and verification; torch.compile's time depends on inductor's on-disk cache (a cold compile here: about 1 min).",
        "",
        "| backend | full step (s) | pruned step (s) | pruned / full | MAC ratio | selection (s) | selection share of a pruned step | generation (s) | speedup vs diffusers | build (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| diffusers (unmodified) | {base['full']:.3f} | - | - | - | - | - | {base['generation']:.2f} | 1.00x | - |",
    ]
    for backend, t in rows.items():
        share = t["selection"] / t["pruned"]
        lines.append(
            f"| {backend} | {t['full']:.3f} | {t['pruned']:.3f} | {t['pruned'] / t['full']:.2f} | {macs:.2f} | "
            f"{t['selection']:.4f} | {share:.1%} | {t['generation']:.2f} | {base['generation'] / t['generation']:.2f}x | {t['build']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def run_engines(args: argparse.Namespace) -> tuple[str, str]:
    config = transformer_config(args)
    model = save_bench_model(config, RESULTS / "tmp" / f"sd3-L{args.layers}-D{64 * args.heads}-{args.size}")
    backends = args.backends if args.backends is not None else [
        name for name in ENGINES if name == "eager" or ENGINES[name].unavailable_reason() is None
    ]
    probe = BuildConfig(str(model), height=args.size, width=args.size, steps=args.steps, t0=args.t0, alphas=(args.alpha,), max_sequence_length=args.text_length)
    target = ENGINES[backends[0] if backends else "eager"].default_device()  # the report's device
    base = baseline(model, probe, args.repeats, target)
    print(f"diffusers: full step {base['full']:.3f} s, generation {base['generation']:.2f} s", flush=True)
    rows = {}
    for backend in backends:
        rows[backend] = measure_backend(backend, model, args)
        print(f"{backend}: " + ", ".join(f"{key} {value:.3f} s" for key, value in rows[backend].items()), flush=True)
    again = baseline(model, probe, args.repeats, target)  # measured twice, around the backends: load varies
    base = {key: min(base[key], again[key]) for key in base}
    device = describe_device(target).get("name", "cpu")
    macs = mac_ratio(config, args.size, args.size, args.alpha, args.t0, args.steps, CLIP_TOKENS + args.text_length)
    return engines_report(rows, base, macs, args, device), device


# -- published block size mode --------------------------------------------------------------------


def dims_inputs(config: dict[str, Any], args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One prompt with guidance (batch 2): latents, timesteps and random text conditioning of the real shapes."""
    generator = torch.Generator().manual_seed(0)
    batch, latent = 2, args.size // 8
    latents = torch.randn(batch, config["in_channels"], latent, latent, generator=generator)
    timestep = torch.full((batch,), 700.0)
    kwargs = {
        "encoder_hidden_states": torch.randn(batch, CLIP_TOKENS + args.text_length, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=generator),
    }
    return latents, timestep, kwargs


def run_dims(args: argparse.Namespace) -> tuple[str, str]:
    card = MODEL_CARDS[DIMS[args.dims]["card"]]
    config = {**card.transformer_config, "num_layers": args.layers}
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(**config).eval()
    latents, timestep, kwargs = dims_inputs(config, args)
    with torch.no_grad():
        runtime = step_runtime(make_adapter(transformer), None, latents, timestep, kwargs, args.alpha)
        functions = {
            "diffusers": diffusers_forward(transformer, latents, timestep, kwargs),
            "catrt full": runtime._full_program,
            "catrt pruned": runtime._pruned_program,
        }
        if args.compile:
            functions.update(compiled_dims_functions(transformer, latents, timestep, kwargs, args.alpha))
        kernels = {name: sdpa_kernels(fn) for name, fn in functions.items()}  # doubles as the warm-up (and compile)
        times = interleaved_seconds(functions, args.repeats)
    text_tokens = CLIP_TOKENS + args.text_length
    macs = mac_ratio(config, args.size, args.size, args.alpha, args.t0, args.steps, text_tokens)
    for name, clocks in times.items():
        print(f"{name}: wall " + " ".join(f"{value:.3f}" for value in clocks["wall"])
              + " s, CPU " + " ".join(f"{value:.3f}" for value in clocks["cpu"]) + " s", flush=True)
    device = describe_device(torch.device("cpu")).get("name", "cpu")
    return dims_report(times, kernels, macs, runtime.k, args, config, device), device


def diffusers_forward(transformer: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                      kwargs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    return lambda: transformer(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)


def compiled_dims_functions(transformer: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                            kwargs: dict[str, torch.Tensor], alpha: float) -> dict[str, Callable[[], Any]]:
    """diffusers compile, catrt compile full and pruned, each on its own copy of `transformer`'s weights.

    Copies, because compiling a block in place would change what the eager rows time.
    """
    from catrt.engines.compile import compile_step_functions

    reference = copy.deepcopy(transformer)
    for block in reference.transformer_blocks:
        block.compile(dynamic=False, fullgraph=True)
    adapter = make_adapter(copy.deepcopy(transformer))
    runtime = step_runtime(adapter, compile_step_functions(adapter), latents, timestep, kwargs, alpha)
    return {
        "diffusers compile": diffusers_forward(reference, latents, timestep, kwargs),
        "catrt compile full": runtime._full_program,
        "catrt compile pruned": runtime._pruned_program,
    }


def cpu_name() -> str:
    """The CPU's model name (Linux), for the report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def dims_report(times: dict[str, dict[str, list[float]]], kernels: dict[str, str], macs: float, k: int,
                args: argparse.Namespace, config: dict[str, Any], device: str) -> str:
    tokens = (args.size // 16) ** 2

    def reference_of(name: str) -> str:
        """Compiled rows are compared with diffusers compiled, eager ones with diffusers' eager forward."""
        return "diffusers compile" if "compile" in name else "diffusers"

    def ratios(name: str, clock: str) -> tuple[float, float]:
        """(best / its reference's best, median over rounds of time / the reference's time in the same round)."""
        values, reference = times[name][clock], times[reference_of(name)][clock]
        return min(values) / min(reference), statistics.median(v / r for v, r in zip(values, reference))

    lines = [
        f"# Speed on {device}: {args.dims} block size",
        "",
        f"`python bench/speed.py --dims {args.dims} --layers {args.layers} --threads {args.threads} --repeats {args.repeats}"
        + (" --compile`" if args.compile else "`"),
        "",
        f"{args.layers} of {args.dims}'s joint blocks at its real size ({config['num_attention_heads']} heads x "
        f"{config['attention_head_dim']} = {config['num_attention_heads'] * config['attention_head_dim']} wide, text width "
        f"{config['joint_attention_dim']}), random weights, fp32; {args.size}x{args.size} ({tokens} image tokens), "
        f"{CLIP_TOKENS + args.text_length} text tokens ({CLIP_TOKENS} CLIP + {args.text_length} T5), one prompt with guidance (batch 2); "
        f"alpha = {args.alpha} (k = {k}); torch threads {args.threads} on {os.cpu_count()} cores ({cpu_name()}), torch {torch.__version__}.",
        "",
        "diffusers = the transformer module's own forward. catrt full / pruned = `CATRuntime`'s step programs "
        "(the adapter writes the K/V cache in place; output cache and prediction copies; the pruned step also "
        "gathers its patches and selects the next step's tokens). "
        + ("diffusers compile = the same forward with each block through torch.compile (inductor, static shapes, "
           "fullgraph); catrt compile = the step programs over `compile_step_functions(adapter)` (inductor, block by "
           "block); each on its own copy of the weights; compiled rows are compared with diffusers compile. "
           if "diffusers compile" in times else "")
        + f"Each of {args.repeats} rounds runs each step once, in a rotated order, after a warm-up (and compile). "
        "Best = the fastest round; round ratio = the median over rounds of the time / its reference's time in the same round. "
        "Wall = elapsed seconds; CPU = this process's CPU seconds (all threads), which other jobs on this shared "
        "machine disturb less.",
        "",
        "| step | wall best (s) | / reference | wall round ratio | CPU best (s) | / reference | CPU round ratio | target | attention kernel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    targets = {"diffusers": "-", "catrt full": "<= 1.00", "catrt pruned": f"<= {macs:.3f} (MAC ratio)",
               "diffusers compile": "-", "catrt compile full": "<= 1.00", "catrt compile pruned": f"<= {macs:.3f} (MAC ratio)"}
    for name, clocks in times.items():
        wall_best, wall_round = ratios(name, "wall")
        cpu_best, cpu_round = ratios(name, "cpu")
        lines.append(
            f"| {name} | {min(clocks['wall']):.3f} | {wall_best:.3f} | {wall_round:.3f} | {min(clocks['cpu']):.3f} | "
            f"{cpu_best:.3f} | {cpu_round:.3f} | {targets[name]} | {kernels[name]} |"
        )
    lines += ["", f"MAC ratio of a pruned step (catrt.macs.transformer_macs): {macs:.3f}.", "", "Rounds (wall s / CPU s):", ""]
    for name, clocks in times.items():
        lines.append(f"- {name}: " + ", ".join(f"{w:.2f} / {c:.2f}" for w, c in zip(clocks["wall"], clocks["cpu"])))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report, device = run_dims(args) if args.dims is not None else run_engines(args)
    path = args.out or default_out(device, args)
    print(report)  # first: a write the disk refuses loses none of it
    benchkit.write_text(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
