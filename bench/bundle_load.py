"""`catrt.load` of an onnxruntime bundle, timed phase by phase: the bundle's checks, the weights read (and hashed),
the sessions made, and the model pipeline loaded beside them.

    python bench/bundle_load.py --layers 12 --width 512 --repeats 3 --out bench/results/tmp/bundle-load.md

Builds (once, into --work) a tiny-sd3 pipeline whose transformer is widened to `--width` channels and `--layers`
blocks (12 x 512: weights.bin about 0.45 GB), saved with save_pretrained, then an onnxruntime bundle of it, and loads
that bundle --repeats times in this process (the first, in a fresh process, is what a restarted replica pays: it is
reported apart). Each load starts with the per-process digest cache of
`catrt.file_checks` empty, as a freshly started replica's is; the files stay in the page cache (nothing is dropped:
the figures are hashing and parsing, not disk reads). `--tiny` loads a plain tiny-sd3 bundle (seconds; what the test
suite runs). Prints a markdown table and writes it, with the command, to --out.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchkit.py, also when loaded by path
import benchkit  # noqa: E402

#: The phases timed, in the order `catrt.load` runs them.
PHASES = ("checks", "pipeline", "weights", "sessions", "total")


def widened_model(folder: Path, layers: int, width: int) -> Path:
    """tiny-sd3 with a transformer of `layers` blocks of `width` channels (heads of 64), saved with save_pretrained."""
    import torch
    from diffusers import SD3Transformer2DModel

    from catrt.tiny import build_tiny_pipeline

    if (folder / "model_index.json").is_file():
        return folder
    pipe = build_tiny_pipeline("tiny-sd3")
    config = {key: value for key, value in pipe.transformer.config.items() if not key.startswith("_")}
    heads = max(1, width // 64)
    config.update(num_layers=layers, num_attention_heads=heads, attention_head_dim=width // heads, caption_projection_dim=width)
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel.from_config(config)
    benchkit.save_pipeline(pipe, folder)
    return folder


def bundle(work: Path, tiny: bool, layers: int, width: int) -> Path:
    """The onnxruntime bundle to load, built into `work` unless it is there already."""
    from catrt.build import build_engines
    from catrt.build_config import BuildConfig

    model = "tiny-sd3" if tiny else str(widened_model(work / f"model-{layers}x{width}", layers, width).resolve())
    config = BuildConfig(model, height=32, width=32, batch=1, steps=6, t0=3, alphas=(0.3,), max_sequence_length=8,
                         backend="onnxruntime")
    existing = sorted((work / "engines").glob(f"{config.build_name()}*")) if (work / "engines").is_dir() else []
    if existing:
        return existing[0]
    return build_engines(config, out_dir=work / "engines", export_dir=work / "export", progress=False)


@contextlib.contextmanager
def timed(owner: Any, name: str, times: dict[str, float], phase: str) -> Iterator[None]:
    """`owner.name` adds the seconds each call takes to `times[phase]` while this holds."""
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


def load_once(folder: Path) -> dict[str, float]:
    """One `catrt.load`, with an empty digest cache; seconds per phase ("sessions": the engine's load less its weights)."""
    import catrt
    import catrt.bundle
    from catrt import file_checks
    from catrt.engines.onnxruntime import OnnxRuntimeEngine
    from catrt.engines.shared_weights import SharedInitializers

    file_checks._DIGESTS.clear()
    times: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(timed(catrt.bundle, "verify_bundle", times, "checks"))
        stack.enter_context(timed(catrt.bundle, "load_pipeline", times, "pipeline"))
        stack.enter_context(timed(SharedInitializers, "__init__", times, "weights"))
        stack.enter_context(timed(OnnxRuntimeEngine, "load", times, "engine"))
        start = time.perf_counter()
        loaded = catrt.load(folder)
        times["total"] = time.perf_counter() - start
    loaded.engine.close()
    times["sessions"] = times.pop("engine") - times["weights"]
    return times


def report(folder: Path, runs: list[dict[str, float]]) -> str:
    """The markdown table: per phase, in seconds, the process's first load (what a restarted replica pays) and the
    median and range of all."""
    weights = folder / "weights.bin"
    size = weights.stat().st_size / 1e9 if weights.is_file() else 0.0
    lines = [
        f"Bundle `{folder.name}`: weights.bin {size:.3f} GB; {len(runs)} loads, page cache warm, digest cache empty.",
        "",
        "| phase | first s | median s | min s | max s |",
        "|---|---|---|---|---|",
    ]
    for phase in PHASES:
        values = [run[phase] for run in runs]
        lines.append(
            f"| {phase} | {values[0]:.3f} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchkit.new_parser("bench/bundle_load.py", __doc__)
    parser.add_argument("--tiny", action="store_true", help="load a plain tiny-sd3 bundle (seconds)")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks of the widened model")
    parser.add_argument("--width", type=int, default=512, help="transformer channels of the widened model (a multiple of 64)")
    parser.add_argument("--repeats", type=int, default=3, help="loads timed")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "results" / "tmp" / "bundle-load",
                        help="where the model and bundle are built (reused by later runs)")
    parser.add_argument("--out", type=Path, default=None, help="report file (default: a new file under bench/results/tmp/)")
    args = parser.parse_args(argv)
    benchkit.check_at_least_one(parser, repeats=args.repeats, layers=args.layers)
    if args.width < 64 or args.width % 64:
        parser.error(f"--width must be a positive multiple of 64, got {args.width}")
    out = args.out or benchkit.default_out("bundle-load", "cpu")
    benchkit.check_out(parser, out)
    folder = bundle(args.work, args.tiny, args.layers, args.width)
    runs = [load_once(folder) for _ in range(args.repeats)]
    table = report(folder, runs)
    print(table, end="")
    command = " ".join(["python bench/bundle_load.py", *(argv if argv is not None else sys.argv[1:])])
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    benchkit.write_text(out, f"`{command}`\n\n{machine}\n\n{table}")


if __name__ == "__main__":
    main()
