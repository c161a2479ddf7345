"""The compile backend's compile time and warm step time: whole-forward vs regional (block by block).

    python bench/compile_time.py --models tiny-sd3 sd3-small

For each model and mode, a fresh process (no dynamo or inductor state, inductor's on-disk caches off)
times the first full and the first pruned step of `compile_step_functions(adapter, regional=...)`
(compile included), counts the graphs the backend compiled, then times warm full and pruned steps of
the compiled functions and of the eager adapter. Random weights and inputs, batch 2, alpha 0.3;
prints a markdown table (and writes it with the command and machine to --out). Models: `tiny-sd3` (the package's tiny pipeline transformer) and
`sd3-small` (SD3-medium's config with --blocks blocks of width 128 and a 32x32 latent).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit  # noqa: E402

MODELS = ("tiny-sd3", "sd3-small")
MODES = ("whole", "regional")


def build(model: str, blocks: int) -> tuple[Any, tuple[int, int], int]:
    """The transformer (seeded random weights), its latent size and text length."""
    import torch
    from diffusers import SD3Transformer2DModel

    from catrt.model_cards import MODEL_CARDS
    from catrt.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    if model == "tiny-sd3":
        return build_tiny_pipeline("tiny-sd3").transformer, (8, 12), 16
    config = dict(MODEL_CARDS["sd3"].transformer_config)
    config.update(num_layers=blocks, attention_head_dim=32, num_attention_heads=4, sample_size=32, joint_attention_dim=64,
                  caption_projection_dim=128, pooled_projection_dim=64, pos_embed_max_size=32)
    return SD3Transformer2DModel.from_config(config), (32, 32), 32


def measure(model: str, mode: str, backend_name: str, repeats: int, blocks: int) -> dict[str, Any]:
    """One model in one mode, in this process (which must not have compiled anything yet)."""
    import torch
    from torch._inductor.compile_fx import compile_fx

    from catrt.engines.compile import compile_step_functions
    from catrt.models import make_adapter

    transformer, latent, text_tokens = build(model, blocks)
    config, batch = transformer.eval().config, 2
    adapter = make_adapter(transformer)
    latents = torch.randn(batch, config.in_channels, *latent)
    inputs = {"encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim),
              "pooled_projections": torch.randn(batch, config.pooled_projection_dim)}
    tokens = adapter.tokens_of(latents)
    n = tokens.shape[1]
    k = math.ceil(0.3 * n)
    indices = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(batch)])
    patches = torch.gather(tokens, 1, indices[..., None].expand(-1, -1, tokens.shape[-1]))
    timestep = torch.full((batch,), 500.0)
    cache = torch.zeros(adapter.num_kv_slots, batch, n, adapter.hidden_dim)
    graphs = 0

    def counting(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        nonlocal graphs
        graphs += 1
        return compile_fx(graph, example_inputs) if backend_name == "inductor" else graph.forward

    compiled = compile_step_functions(adapter, backend=counting, regional=mode == "regional")
    with torch.no_grad():
        context = adapter.prepare_context(inputs, tuple(latents.shape))
        steps = {
            "full": (lambda f: f(latents, timestep, context, cache), compiled.full_forward, adapter.full_forward),
            "pruned": (lambda f: f(patches, indices, timestep, context, cache), compiled.pruned_forward, adapter.pruned_forward),
        }
        row: dict[str, Any] = {"model": model, "mode": mode, "blocks": config.num_layers, "N": n, "k": k}
        for name, (run, function, _) in steps.items():
            started = time.perf_counter()
            run(function)
            row[f"compile_{name}_s"] = time.perf_counter() - started
        row["graphs"] = graphs
        for name, (run, function, eager) in steps.items():
            for label, step in (("compiled", function), ("eager", eager)):
                run(step)
                started = time.perf_counter()
                for _ in range(repeats):
                    run(step)
                row[f"{name}_{label}_ms"] = (time.perf_counter() - started) / repeats * 1e3
        row["recompiled_when_warm"] = graphs != row["graphs"]  # a warm step that compiled again
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | mode | blocks | N / k | graphs | compile full + pruned (s) | warm full step: compiled / eager (ms) "
        "| warm pruned step: compiled / eager (ms) | recompiled when warm |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['blocks']} | {r['N']} / {r['k']} | {r['graphs']} "
            f"| {r['compile_full_s']:.1f} + {r['compile_pruned_s']:.1f} = {r['compile_full_s'] + r['compile_pruned_s']:.1f} "
            f"| {r['full_compiled_ms']:.2f} / {r['full_eager_ms']:.2f} | {r['pruned_compiled_ms']:.2f} / {r['pruned_eager_ms']:.2f} "
            f"| {'yes' if r['recompiled_when_warm'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = benchkit.new_parser("bench/compile_time.py", __doc__)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="transformers to time")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="whole: one graph per step function; regional: block by block")
    parser.add_argument("--backend", choices=("inductor", "eager"), default="inductor",
                        help="torch.compile backend (eager: dynamo tracing only, a quick smoke run)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks of sd3-small (its last is SD3's context_pre_only one)")
    parser.add_argument("--repeats", type=int, default=20, help="timed warm steps per function")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the table, with the command and the machine, to this markdown file")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or args.blocks < 1:
        parser.error("--repeats, --threads and --blocks must be at least 1")
    benchkit.check_out(parser, args.out)
    benchkit.check_distinct(parser, models=args.models, modes=args.modes)
    if args.one:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(measure(*args.one, args.backend, args.repeats, args.blocks)))
        return
    env = {**os.environ, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    rows = []
    for model in args.models:
        for mode in args.modes:
            print(f"{model} {mode} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--one", model, mode, "--backend", args.backend,
                       "--repeats", str(args.repeats), "--threads", str(args.threads), "--blocks", str(args.blocks)]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{model} {mode} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(table(rows))
    if args.out is not None:
        command = " ".join(["python bench/compile_time.py", *(sys.argv[1:] if argv is None else argv)])
        benchkit.write_text(
            args.out,
            f"# Compile time: whole-forward vs regional\n\n`{command}`: torch {metadata.version('torch')}, "
            f"{args.threads} thread(s), {platform.machine()} ({os.cpu_count()} cores), backend {args.backend}, "
            f"inductor's on-disk caches off, {args.repeats} warm steps.\n\n{table(rows)}\n"
        )


if __name__ == "__main__":
    main()
