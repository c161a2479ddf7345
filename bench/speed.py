"""Step and generation speed per backend, on the machine at hand, against unmodified diffusers.

Builds an SD3-layout pipeline big enough that a full step is measurable (default: 4 joint blocks,
D = 384, 512x512 -> 1024 image tokens, one prompt with guidance -> batch 2), saves it under
bench/results/tmp/, builds an engine per backend with `build_engines`, then times one full step,
one pruned step and the selection of a pruned step, and whole generations (best of --repeats). Writes
bench/results/speed-<device>.md.

    python bench/speed.py                                   # eager, compile, onnxruntime (+ tensorrt on a GPU)
    python bench/speed.py --backends eager onnxruntime --layers 2 --repeats 2   # quicker
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import SD3Transformer2DModel  # noqa: E402

import catrt  # noqa: E402
from catrt.build import build_engines  # noqa: E402
from catrt.build_config import BuildConfig  # noqa: E402
from catrt.engines import ENGINES, resolve_backend  # noqa: E402
from catrt.export import capture_step_sample, full_inputs, pruned_inputs  # noqa: E402
from catrt.macs import transformer_macs  # noqa: E402
from catrt.manifest import describe_device  # noqa: E402
from catrt.model_cards import ModelCard  # noqa: E402
from catrt.runtime import CATRuntime  # noqa: E402
from catrt.tiny import build_tiny_pipeline  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PROMPT = "a photo of a red fox standing in a snowy forest at sunset, highly detailed"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=6, help="attention heads of 64 channels (D = 64 x heads)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (tokens = (size / 16)^2)")
    parser.add_argument("--text-length", type=int, default=64, help="T5 tokens (the transformer sees 77 + this)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--t0", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the fastest counts)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend that runs here")
    return parser.parse_args()


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
        pipe.save_pretrained(folder)
    return folder


def best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of `repeats` timed runs: other jobs share this machine, and they only ever add time."""
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return min(times)


def step_times(fast: Any, build: BuildConfig, repeats: int) -> dict[str, float]:
    """Seconds of one full step, one pruned step and one pruned step's selection."""
    engine = fast.engine
    with torch.no_grad():
        sample = capture_step_sample(fast.pipe, build)
        full = full_inputs(sample)
        _, kv = fast.adapter.full_forward(sample.hidden_states, sample.timestep, sample.context)
        pruned = pruned_inputs(sample, fast.adapter, fast.manifest.k, kv)
        return {
            "full": best_seconds(lambda: engine.full_forward(full["hidden_states"], full["timestep"], sample.context), repeats),
            "pruned": best_seconds(
                lambda: engine.pruned_forward(pruned["patches"], pruned["indices"], pruned["timestep"], sample.context, kv),
                repeats,
            ),
            "selection": selection_seconds(fast, build),
        }


def selection_seconds(fast: Any, build: BuildConfig) -> float:
    """Mean seconds of the runtime's selection per pruned step, timed inside one generation."""
    original = CATRuntime._select
    spent: list[float] = []

    def timed(runtime: CATRuntime) -> torch.Tensor:
        started = time.perf_counter()
        indices = original(runtime)
        spent.append(time.perf_counter() - started)
        return indices

    CATRuntime._select = timed
    try:
        generate(fast, "latent")
    finally:
        CATRuntime._select = original
    return statistics.mean(spent[1:])  # the first selection (step t0) also clusters


def generate(runner: Any, output_type: str = "pil", **kwargs: Any) -> Any:
    return runner(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, **kwargs)


def mac_ratio(config: dict[str, Any], build: BuildConfig, text_length: int) -> float:
    card = ModelCard("bench", None, "sd3", config, 77 + text_length)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config).eval()
    report = transformer_macs(transformer, card, build.height, build.width, build.cat_config(), build.steps)
    return report.pruned_step / report.full_step


def baseline(model: Path, build: BuildConfig, repeats: int) -> dict[str, float]:
    """Unmodified diffusers: its transformer's full step and a whole generation."""
    pipe = catrt.load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    kwargs = build.call_arguments()
    with torch.no_grad():
        sample = capture_step_sample(pipe, build)
        context = {"encoder_hidden_states": sample.context["encoder_hidden_states"], "pooled_projections": sample.context["pooled_projections"]}
        step = best_seconds(lambda: pipe.transformer(hidden_states=sample.hidden_states, timestep=sample.timestep, **context), repeats)
    return {"full": step, "generation": best_seconds(lambda: generate(pipe, **kwargs), max(1, repeats - 1))}


def measure_backend(backend: str, model: Path, args: argparse.Namespace) -> dict[str, float]:
    config = BuildConfig(
        str(model), height=args.size, width=args.size, steps=args.steps, t0=args.t0, alpha=args.alpha,
        backend=backend, max_sequence_length=args.text_length,
    )
    started = time.perf_counter()
    folder = build_engines(config, out_dir=RESULTS / "tmp" / "engines", export_dir=RESULTS / "tmp" / "export")
    build_seconds = time.perf_counter() - started
    fast = catrt.load(folder)
    fast.set_progress_bar_config(disable=True)
    times = step_times(fast, fast.build, args.repeats)
    times["generation"] = best_seconds(lambda: generate(fast), max(1, args.repeats - 1))
    times["build"] = build_seconds
    return times


def write_report(rows: dict[str, dict[str, float]], base: dict[str, float], macs: float, args: argparse.Namespace, device: str) -> Path:
    tokens = (args.size // 16) ** 2
    lines = [
        f"# Speed on {device}",
        "",
        f"SD3-layout transformer: {args.layers} joint blocks, D = {64 * args.heads}, {args.size}x{args.size} "
        f"({tokens} image tokens, {77 + args.text_length} text tokens), one prompt with guidance (batch 2), "
        f"{args.steps} steps, t0 = {args.t0}, alpha = {args.alpha}; torch threads {args.threads}; best of {args.repeats} runs after a warm-up (the machine is shared).",
        "Generation = the whole pipeline call (text encoders, transformer steps, VAE decode, PIL). Build = export,"
        " engine and verification; torch.compile's time depends on inductor's on-disk cache (a cold compile here: about 1 min).",
        "",
        "| backend | full step (s) | pruned step (s) | pruned / full | MAC ratio | selection (s) | selection share of a pruned step | generation (s) | speedup vs diffusers | build (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| diffusers (unmodified) | {base['full']:.3f} | - | - | - | - | - | {base['generation']:.2f} | 1.00x | - |",
    ]
    for backend, t in rows.items():
        share = t["selection"] / (t["pruned"] + t["selection"])
        lines.append(
            f"| {backend} | {t['full']:.3f} | {t['pruned']:.3f} | {t['pruned'] / t['full']:.2f} | {macs:.2f} | "
            f"{t['selection']:.4f} | {share:.1%} | {t['generation']:.2f} | {base['generation'] / t['generation']:.2f}x | {t['build']:.0f} |"
        )
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    path = RESULTS / f"speed-{slug}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    config = transformer_config(args)
    model = save_bench_model(config, RESULTS / "tmp" / f"sd3-L{args.layers}-D{64 * args.heads}-{args.size}")
    backends = args.backends or [name for name in ENGINES if name == "eager" or ENGINES[name].unavailable_reason() is None]
    backends = [resolve_backend(name) for name in backends]
    probe = BuildConfig(str(model), height=args.size, width=args.size, steps=args.steps, t0=args.t0, alpha=args.alpha, max_sequence_length=args.text_length)
    base = baseline(model, probe, args.repeats)
    print(f"diffusers: full step {base['full']:.3f} s, generation {base['generation']:.2f} s")
    rows = {}
    for backend in backends:
        rows[backend] = measure_backend(backend, model, args)
        print(f"{backend}: " + ", ".join(f"{key} {value:.3f} s" for key, value in rows[backend].items()))
    again = baseline(model, probe, args.repeats)  # measured twice, around the backends: load varies
    base = {key: min(base[key], again[key]) for key in base}
    device = describe_device(ENGINES[backends[0]].default_device())
    path = write_report(rows, base, mac_ratio(config, probe, args.text_length), args, device.get("name", "cpu"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
