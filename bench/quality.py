"""Output quality of CAT Pruning against the unpruned model and other selection rules.

On the reference model trained here (`catrt/reference/`), for each alpha and rule, over a fixed list
of prompts and seeds: PSNR and SSIM of the pruned image against the unpruned image of the same seed,
and the probe's attribute accuracy (our stand-in for a CLIP score). Also the paper's Figure 3 on
this model: per step, the Pearson correlation over tokens of ||n_t - n_t0|| and ||n_(t-1) - n_t0||.

    python bench/quality.py --out bench/results   # the full run; regenerates the committed results
    python bench/quality.py                       # the full run into a new folder under bench/results/tmp/
    python bench/quality.py --n 4 --steps 6 --t0 2 --alphas 0.3 --out /tmp/q   # a smoke run
    python bench/quality.py --tiny --out /tmp/q   # the same kind of smoke run: 2 prompts, 6 steps, t0 2, every method

Writes quality.md, quality-grid.png and figure3.png into `--out`. Needs the bench extra
(matplotlib, scikit-image): pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchkit.py, also when loaded by path
import benchkit  # noqa: E402

try:  # the bench extra; main() names what is missing in one line instead of a traceback
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.metrics import structural_similarity
except ImportError as error:
    MISSING: str | None = benchkit.missing_package(error)
else:
    MISSING = None
if __name__ == "__main__":
    benchkit.exit_early_if_missing(MISSING)

from catrt.notices import quiet_known_notices  # noqa: E402 - light: no torch

quiet_known_notices()  # a command-line program: transformers' torchvision notices say nothing useful here

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

import catrt  # noqa: E402
from catrt import metrics  # noqa: E402
from catrt.errors import CatrtError  # noqa: E402
from catrt.reference import data, probe  # noqa: E402
from catrt.reference.pipeline import WEIGHTS_DIR  # noqa: E402

BASELINES = ("random", "round_robin", "magnitude", "sequential", "attention")
ATTRIBUTES = tuple(probe.CLASSES)  # shape, colour, size, position, background
OUT_FILES = ("quality.md", "quality-grid.png", "figure3.png")  # what main writes into --out, each checked before the run
TINY = {"n": 2, "steps": 6, "t0": 2}  # --tiny: seconds, and two pruned steps after the first for Figure 3


@dataclass(frozen=True)
class Method:
    """One row of the table: a selection rule at an alpha (refresh_every 0 = off)."""

    rule: str
    alpha: float
    refresh_every: int = 0

    @property
    def label(self) -> str:
        name = {"cat": "CAT", "round_robin": "round-robin (stalest)", "magnitude": "magnitude only",
                "sequential": "sequential rows", "attention": "attention (AT-EDM style)"}.get(self.rule, self.rule)
        return name + (f" + full refresh every {self.refresh_every}" if self.refresh_every else "")


def grid_alpha(alphas: list[float]) -> float:
    """The alpha of the grid's columns, Figure 3's CAT curve and the refresh row: 0.3 where it was run, else the first."""
    return 0.3 if 0.3 in alphas else alphas[0]


def methods(alphas: list[float]) -> list[Method]:
    rows = [Method(rule, alpha) for alpha in alphas for rule in ("cat", *BASELINES)]
    return rows + [Method("cat", grid_alpha(alphas), refresh_every=5)]


def generate(pipe: Any, samples: list[data.Sample], seeds: list[int], args: argparse.Namespace,
             method: Method | None) -> tuple[torch.Tensor, float]:
    """(n, 3, 32, 32) images in [-1, 1] for every prompt, batch by batch; and the seconds it took."""
    runner = pipe if method is None else catrt.accelerate(pipe, catrt.CATConfig(
        alpha=method.alpha, t0=args.t0, rule=method.rule, refresh_every=method.refresh_every))
    images, started = [], time.perf_counter()
    for start in range(0, len(samples), args.batch):
        chunk = range(start, min(start + args.batch, len(samples)))
        out = runner([samples[i].caption for i in chunk], num_inference_steps=args.steps, output_type="latent",
                     generator=[torch.Generator().manual_seed(seeds[i]) for i in chunk]).images
        images.append(out.float().clamp(-1, 1))
    return torch.cat(images), time.perf_counter() - started


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor) -> tuple[list[float], float]:
    """PSNR (dB) of each image and the mean SSIM, over images in [0, 1]; PSNR is inf where an image equals its
    reference (as `catrt compare` reports it), where a floor on the error made it a 100 dB no image measured.
    Per image, so the table can say how many are identical (`metrics.psnr_cell`) instead of a mean of inf."""
    a = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
    b = ((reference + 1) / 2).permute(0, 2, 3, 1).numpy()
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = [float(value) for value in 10 * np.log10(1.0 / mse)]
    ssim = float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=1.0) for x, y in zip(a, b)]))
    return psnr, ssim


def step_outputs(pipe: Any, samples: list[data.Sample], seeds: list[int], args: argparse.Namespace,
                 method: Method | None) -> list[torch.Tensor]:
    """The cond-half transformer output of every step, (n, 3, 32, 32) each, via a forward hook."""
    outputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_hook(lambda m, i, o: outputs.append(o[0].chunk(2)[1].detach().clone()))
    try:
        generate(pipe, samples, seeds, argparse.Namespace(**{**vars(args), "batch": len(samples)}), method)
    finally:
        hook.remove()
    return outputs


def token_norms(delta: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """(n, C, H, W) -> (n, N) L2 norm per patch token."""
    n, c, h, w = delta.shape
    return delta.reshape(n, c, h // patch, patch, w // patch, patch).pow(2).sum((1, 3, 5)).sqrt().reshape(n, -1)


def correlations(outputs: list[torch.Tensor], t0: int) -> list[tuple[int, float]]:
    """Per step t >= t0 + 2: mean over prompts of Pearson(||n_t - n_t0||, ||n_(t-1) - n_t0||)."""
    reference = outputs[t0 - 1]
    rows = []
    for step in range(t0 + 2, len(outputs) + 1):
        now, before = token_norms(outputs[step - 1] - reference), token_norms(outputs[step - 2] - reference)
        values = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(now.numpy(), before.numpy())]
        rows.append((step, float(np.nanmean(values))))
    return rows


def figure3(unpruned: list[tuple[int, float]], pruned: list[tuple[int, float]], alpha: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*unpruned), marker="o", label="unpruned")
    ax.plot(*zip(*pruned), marker="s", label=f"CAT, alpha {alpha:g}")
    ax.set_xlabel("step t")
    ax.set_ylabel("Pearson r")
    ax.set_title("||n_t - n_t0|| vs ||n_(t-1) - n_t0|| over tokens")
    ax.set_ylim(min(0.0, *[r for _, r in unpruned + pruned]), 1.0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with benchkit.writing(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)


def image_grid(columns: list[tuple[str, torch.Tensor]], rows: int, path: Path, scale: int = 4) -> None:
    """PNG: one row per prompt, the unpruned image first, then each method."""
    cell, label_height = 32 * scale, 28
    grid = Image.new("RGB", (cell * len(columns), label_height + cell * rows), "white")
    draw = ImageDraw.Draw(grid)
    for col, (label, images) in enumerate(columns):
        draw.text((col * cell + 2, 2), label.replace(" (", "\n("), fill="black")
        for row in range(rows):
            pixels = data.to_uint8(images[row : row + 1])[0]
            tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (col * cell, label_height + row * cell))
    with benchkit.writing(path) as temporary:
        grid.save(temporary, format="PNG")


def write_table(path: Path, args: argparse.Namespace, baseline: dict[str, float], rows: list[dict[str, Any]],
                unpruned_corr: list[tuple[int, float]], pruned_corr: list[tuple[int, float]]) -> None:
    lines = [
        "# Output quality on the reference model",
        "",
        f"`python bench/quality.py --n {args.n} --steps {args.steps} --t0 {args.t0}` on {args.device}: "
        f"{args.n} prompts from `catrt.reference.data.generate({args.n}, seed={args.data_seed})`, image i with seed i. "
        "PSNR / SSIM compare each pruned image with the unpruned image of the same seed (higher is closer); "
        "the attribute columns are the probe's accuracy against the prompt's attributes. "
        f"seconds: the method's total wall time over all {args.n} prompts (all its pipeline calls), "
        "its first call's one-off costs included; not a time per image.",
        "",
        "Unpruned model: " + ", ".join(f"{name} {baseline[name]:.3f}" for name in ATTRIBUTES) + ".",
        "",
        "| method | alpha | PSNR (dB) | SSIM | " + " | ".join(ATTRIBUTES) + " | seconds (all prompts) |",
        "|---|---|---|---|" + "---|" * len(ATTRIBUTES) + "---|",
    ]
    for row in rows:
        accuracy = " | ".join(f"{row[name]:.3f}" for name in ATTRIBUTES)
        lines.append(f"| {row['method']} | {row['alpha']} | {metrics.psnr_cell(row['psnr'], interval=False)} | {row['ssim']:.4f} | {accuracy} | {row['seconds']:.1f} |")
    lines += ["", "## Figure 3 on this model", "",
              "Pearson correlation over tokens of ||n_t - n_t0|| and ||n_(t-1) - n_t0|| (mean over prompts), "
              "n_t the transformer output (conditional half) at step t. Plot: `figure3.png`. At the first pruned step, "
              f"{args.t0 + 1}, n_(t-1) is n_t0 itself: ||n_(t-1) - n_t0|| is 0 for every token and r is undefined (–).",
              "", f"| step | unpruned | CAT alpha {grid_alpha(args.alphas):g} |", "|---|---|---|", f"| {args.t0 + 1} | – | – |"]
    for (step, a), (_, b) in zip(unpruned_corr, pruned_corr):
        lines.append(f"| {step} | {a:.3f} | {b:.3f} |")
    lines += ["", f"Grid of samples: `quality-grid.png` (unpruned first, then each method at alpha {grid_alpha(args.alphas):g})."]
    benchkit.write_text(path, "\n".join(lines) + "\n")


def default_out() -> Path:
    """A folder that does not exist yet, bench/results/tmp/quality-<time>: never the committed results."""
    return benchkit.new_path("quality")


def main(argv: list[str] | None = None) -> None:
    parser = benchkit.new_parser("bench/quality.py", __doc__)
    parser.add_argument("--n", type=int, default=64, help="prompts (and seeds)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument("--t0", type=int, default=8, help="full steps before pruning starts")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.3, 0.5],
                        help="fractions of tokens recomputed")
    parser.add_argument("--batch", type=int, default=32, help="prompts per pipeline call")
    parser.add_argument("--data-seed", type=int, default=2024, help="seed of the prompt list")
    parser.add_argument("--grid-rows", type=int, default=6, help="prompts shown in quality-grid.png")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="reference weights folder")
    parser.add_argument("--device", default="cpu", help="torch device the reference model runs on")
    parser.add_argument("--tiny", action="store_true",
                        help=f"smoke run: {TINY['n']} prompts, {TINY['steps']} steps, t0 {TINY['t0']} (over --n, --steps, "
                             "--t0); every method at each of --alphas")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for quality.md, quality-grid.png, figure3.png (default: a new folder "
                             "bench/results/tmp/quality-<time>; --out bench/results regenerates the committed results)")
    args = parser.parse_args(argv)
    benchkit.exit_if_missing(parser, MISSING)
    if args.tiny:
        vars(args).update(TINY)
    benchkit.check_at_least_one(parser, n=args.n, steps=args.steps, batch=args.batch, grid_rows=args.grid_rows)
    benchkit.check_schedule(parser, args.steps, args.t0, args.alphas)
    benchkit.check_distinct(parser, alphas=args.alphas)
    if args.data_seed < 0:  # catrt.reference.data.generate refused it with a traceback, after the model loaded
        parser.error(f"--data-seed must be an integer >= 0, got {args.data_seed}")
    if args.steps < args.t0 + 2:  # Figure 3 correlates two pruned steps' changes since t0
        parser.error(f"Figure 3 needs two pruned steps: --steps must be at least --t0 + 2 = {args.t0 + 2}, got {args.steps}")
    benchkit.check_out_folder(parser, args.out, "quality.md, quality-grid.png and figure3.png", OUT_FILES)
    args.out = args.out or default_out()
    args.out.mkdir(parents=True, exist_ok=True)

    pipe = benchkit.load_reference(parser, args.device, args.weights)
    pipe.set_progress_bar_config(disable=True)
    try:
        classifier = probe.load_probe()
    except CatrtError as error:  # a damaged shipped probe
        parser.error(str(error))
    samples = data.generate(args.n, seed=args.data_seed)
    seeds = list(range(args.n))
    reference, _ = generate(pipe, samples, seeds, args, None)
    baseline = probe.attribute_accuracy(reference.cpu(), samples, classifier)
    rows, grid_columns = [], [("unpruned", reference)]
    shown_alpha = grid_alpha(args.alphas)
    for method in methods(args.alphas):
        images, seconds = generate(pipe, samples, seeds, args, method)
        psnr, ssim = psnr_ssim(images.cpu(), reference.cpu())
        accuracy = probe.attribute_accuracy(images.cpu(), samples, classifier)
        rows.append({"method": method.label, "alpha": method.alpha, "psnr": psnr, "ssim": ssim,
                     "seconds": seconds, **accuracy})
        print(f"{method.label:45s} alpha {method.alpha}: PSNR {metrics.psnr_cell(psnr, interval=False)} SSIM {ssim:.4f} {accuracy}", flush=True)
        if method.alpha == shown_alpha and not method.refresh_every:
            grid_columns.append((method.label, images))
    few = samples[: min(16, args.n)]
    unpruned_corr = correlations(step_outputs(pipe, few, seeds, args, None), args.t0)
    pruned_corr = correlations(step_outputs(pipe, few, seeds, args, Method("cat", shown_alpha)), args.t0)
    figure3(unpruned_corr, pruned_corr, shown_alpha, args.out / "figure3.png")
    image_grid(grid_columns, min(args.grid_rows, args.n), args.out / "quality-grid.png")
    write_table(args.out / "quality.md", args, baseline, rows, unpruned_corr, pruned_corr)
    print(f"wrote {args.out / 'quality.md'}")


if __name__ == "__main__":
    main()
