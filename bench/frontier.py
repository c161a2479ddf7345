"""The speed-quality frontier on the reference model: PSNR / SSIM against the unpruned image versus the
transformer MAC ratio (and CPU wall time) for token rules, step-level reuse and their combinations.

Every configuration runs through `catrt.compare.run_comparison` (one image per call, so adaptive
reuse decides per image) on held-out prompts (`catrt.reference.data.generate(n, seed=7)`, not
bench/quality.py's list), seeds 0..n-1 paired with them. A point is on the frontier when no other
point has a MAC ratio as low or lower and a quality as high or higher (one of them strictly).
Before the rules, the headroom of the testbed: CAT with its magnitude part replaced by an oracle (the
tokens whose cached prediction is truly furthest from a full forward at this step) against
round-robin at the same k.

    python bench/frontier.py --out bench/results   # regenerates frontier.md, frontier.png, frontier.csv
    python bench/frontier.py                       # the same into a new folder under bench/results/tmp/
    python bench/frontier.py --tiny --out /tmp/f   # a smoke run (1 prompt, 5 steps, t0 2)

Needs the bench extra (matplotlib, scikit-image): pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import csv
import math
import os
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
    import skimage  # noqa: F401
except ImportError as error:
    MISSING: str | None = benchkit.missing_package(error)
else:
    MISSING = None

from catrt.notices import quiet_known_notices  # noqa: E402 - light: no torch

quiet_known_notices()

import torch  # noqa: E402

from catrt import metrics, selection  # noqa: E402
from catrt.compare import UNPRUNED, Comparison, Variant, run_comparison  # noqa: E402
from catrt.config import CATConfig  # noqa: E402
from catrt.reference import data  # noqa: E402
from catrt.runtime import CATRuntime  # noqa: E402
from catrt.scheduler import step_kind  # noqa: E402

ALPHAS = (0.2, 0.3, 0.5)
THRESHOLDS = (0.05, 0.09, 0.13, 0.2)
HEADROOM_ALPHA = 0.3
OUT_FILES = ("frontier.md", "frontier.png", "frontier.csv")  # what main writes into --out, each checked before the run


class OracleRuntime(CATRuntime):
    """CAT whose magnitude part is an oracle: before each pruned step, a full forward on this step's
    latents (outside the caches) says how far each token's cached prediction is off; the
    `magnitude_fraction * k` furthest are computed, the rest of k are the stalest, as in CAT.

    Not a rule: it pays a full forward per pruned step. It bounds what any magnitude part can do.
    """

    def __call__(self, hidden_states: torch.Tensor, timestep: torch.Tensor, call_kwargs: dict[str, Any]) -> torch.Tensor:
        step, config = self.step + 1, self.config
        if step > 1 and step_kind(step, config.t0, config.refresh_every, config.reuse_every) == "pruned":
            state = self.state
            with torch.no_grad():
                truth, _ = self.adapter.export_full(hidden_states, timestep, state.context)
            error = (self._cond(truth) - self._cond(state.output_cache)).norm(dim=-1)  # (B, N)
            m = round(config.magnitude_fraction * self.k)
            self.indices.copy_(oracle_indices(error, state.staleness, state.last_computed, m, self.k))
        return super().__call__(hidden_states, timestep, call_kwargs)


def oracle_indices(error: torch.Tensor, staleness: torch.Tensor, last_computed: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """(B, k): the m tokens of largest true error, then the k - m stalest of the others (CAT's order)."""
    picked = selection.select_top(error, m)
    order = selection.staleness_ranks(staleness, last_computed)
    order = order.scatter(1, picked, order.gather(1, picked) + order.shape[1])  # the picked ones go last
    return torch.cat([picked, selection.take_first(order, k - m)], 1)


@dataclass(frozen=True)
class Point:
    """One configuration's means over the samples. `psnr` is the mean over the images that differ from their
    reference and `identical` counts the others (as `catrt compare` reports it): one identical image made the mean
    inf, put the configuration on the frontier and off the plot."""

    label: str
    group: str
    psnr: float
    ssim: float
    mac_ratio: float
    seconds: float
    reused: float
    identical: int = 0


def variants(t0: int) -> tuple[list[Variant], list[Variant]]:
    """(frontier configurations, headroom configurations); every label is unique."""

    def cat(**fields: Any) -> CATConfig:
        return CATConfig(t0=t0, **fields)

    rows = [Variant(f"CAT a{a}", cat(alpha=a)) for a in ALPHAS]
    rows += [Variant(f"round-robin a{a}", cat(alpha=a, rule="round_robin")) for a in ALPHAS]
    rows += [Variant(f"random a{a}", cat(alpha=a, rule="random")) for a in ALPHAS]
    rows += [Variant(f"CAT a0.3 + refresh {n}", cat(refresh_every=n)) for n in (3, 5)]
    rows += [Variant(f"reuse {n}", cat(alpha=1.0, reuse_every=n)) for n in (2, 3)]
    rows += [Variant(f"CAT a0.3 + reuse {n}", cat(reuse_every=n)) for n in (2, 3)]
    rows += [Variant(f"round-robin a0.3 + reuse {n}", cat(rule="round_robin", reuse_every=n)) for n in (2, 3)]
    rows += [Variant(f"FBC {th}", cat(alpha=1.0, reuse_threshold=th)) for th in THRESHOLDS]
    rows += [Variant(f"CAT a0.3 + FBC {THRESHOLDS[1]}", cat(reuse_threshold=THRESHOLDS[1]))]
    headroom = [
        Variant(f"oracle magnitude part a{HEADROOM_ALPHA}", cat(alpha=HEADROOM_ALPHA), runtime=OracleRuntime),
        Variant(f"oracle, all of k a{HEADROOM_ALPHA}", cat(alpha=HEADROOM_ALPHA, magnitude_fraction=1.0), runtime=OracleRuntime),
    ]
    return rows, headroom


def group(label: str) -> str:
    """The family a label belongs to, for the plot's colours."""
    if " + " in label:
        return "token rule + reuse / refresh"
    return next((name for name in ("FBC", "oracle", "round-robin", "random", "reuse", "CAT") if label.startswith(name)), label)


def points(comparison: Comparison) -> list[Point]:
    rows = []
    for variant in comparison.variants:
        mean = {name: metrics.mean_interval(comparison.values(variant.label, name)).mean
                for name in ("ssim", "mac_ratio", "seconds", "reused_steps")}
        identical, psnr = metrics.psnr_split(comparison.values(variant.label, "psnr"))
        rows.append(Point(variant.label, group(variant.label), psnr.mean, mean["ssim"], mean["mac_ratio"],
                          mean["seconds"], mean["reused_steps"], identical))
    return rows


def pareto(rows: list[Point], quality: str) -> set[str]:
    """Labels of the points no other point dominates on (MAC ratio lower, `quality` higher)."""
    front = set()
    for p in rows:
        dominated = any(
            q.mac_ratio <= p.mac_ratio and getattr(q, quality) >= getattr(p, quality)
            and (q.mac_ratio < p.mac_ratio or getattr(q, quality) > getattr(p, quality))
            for q in rows if q is not p
        )
        if not dominated:
            front.add(p.label)
    return front


def plot(rows: list[Point], path: Path) -> None:
    """Three panels: PSNR and SSIM against MAC ratio, PSNR against seconds; frontiers as lines."""
    colours = {"CAT": "tab:blue", "round-robin": "tab:orange", "random": "tab:gray", "token rule + reuse / refresh": "tab:purple",
               "reuse": "tab:green", "FBC": "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    for ax, (x, y, xlabel, ylabel) in zip(axes, (
        ("mac_ratio", "psnr", "transformer MAC ratio", "PSNR vs unpruned (dB)"),
        ("mac_ratio", "ssim", "transformer MAC ratio", "SSIM vs unpruned"),
        ("seconds", "psnr", "CPU seconds per image (noisy: shared CPU)", "PSNR vs unpruned (dB)"),
    )):
        shown = [p for p in rows if math.isfinite(getattr(p, y))]
        for p in shown:
            ax.scatter(getattr(p, x), getattr(p, y), color=colours.get(p.group, "black"), s=28, zorder=3)
            label = p.label + (f" ({p.identical} identical, not in the mean)" if p.identical and y == "psnr" else "")
            ax.annotate(label, (getattr(p, x), getattr(p, y)), fontsize=6.5, xytext=(3, 2), textcoords="offset points")
        front = sorted((p for p in shown if p.label in _front(shown, x, y)), key=lambda p: getattr(p, x))
        ax.plot([getattr(p, x) for p in front], [getattr(p, y) for p in front], "k--", lw=1, zorder=2, label="frontier")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in colours.items()]
    axes[0].legend(handles=[*handles, plt.Line2D([], [], ls="--", color="k", label="frontier")], fontsize=7, loc="lower right")
    fig.suptitle("reference model: quality vs cost (means over prompts x seeds)")
    fig.tight_layout()
    with benchkit.writing(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    plt.close(fig)


def _front(rows: list[Point], x: str, y: str) -> set[str]:
    """Pareto front on (x lower, y higher)."""
    return {p.label for p in rows if not any(
        getattr(q, x) <= getattr(p, x) and getattr(q, y) >= getattr(p, y)
        and (getattr(q, x) < getattr(p, x) or getattr(q, y) > getattr(p, y)) for q in rows if q is not p)}


def write_csv(rows: list[Point], path: Path) -> None:
    with benchkit.writing(path) as temporary, temporary.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["configuration", "psnr", "ssim", "mac_ratio", "seconds", "reused_steps", "identical_images"])
        for p in rows:
            writer.writerow([p.label, f"{p.psnr:.3f}", f"{p.ssim:.5f}", f"{p.mac_ratio:.4f}", f"{p.seconds:.3f}",
                             f"{p.reused:.2f}", p.identical])


def write_table(path: Path, args: argparse.Namespace, comparison: Comparison, oracle: list[str], elapsed: float) -> None:
    rows = [p for p in points(comparison) if p.label != UNPRUNED and p.label not in oracle]
    on_psnr, on_ssim = pareto(rows, "psnr"), pareto(rows, "ssim")
    command = "python bench/frontier.py" + (" --tiny" if args.tiny else "") + f" --out {args.out_label}"
    lines = [
        "# Speed-quality frontier on the reference model", "",
        f"`{command}` on {args.device}, {args.threads} thread(s) ({elapsed / 60:.0f} min on a {os.cpu_count()}-core machine "
        "shared with other jobs): "
        f"{args.n} held-out prompts (`catrt.reference.data.generate({args.n}, seed={args.data_seed})`), prompt i with "
        f"seed i, {args.steps} steps, t0 {args.t0}, one image per pipeline call. PSNR / SSIM against the unpruned image "
        "of the same seed (8-bit pixels); MAC ratio: transformer MACs of the run's trace over the unpruned pipeline's "
        "(FBC's first-block probe on every decided step included); seconds: wall time per image, noisy on a shared CPU "
        f"(unpruned: {metrics.mean_interval(comparison.values(UNPRUNED, 'seconds')).mean:.2f} s). "
        "`reuse N` and `FBC th` run every computed step on all tokens (alpha 1); `FBC th` reuses a step when the first "
        "block's residual moved less than th (relative L1) since the last computed step.", "",
        "| configuration | PSNR (dB) | SSIM | MAC ratio | seconds | reused steps | frontier (PSNR / SSIM) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in sorted(rows, key=lambda p: p.mac_ratio):
        marks = " / ".join(("yes" if p.label in front else "-") for front in (on_psnr, on_ssim))
        psnr = metrics.psnr_cell(comparison.values(p.label, "psnr"), interval=False)
        lines.append(f"| {p.label} | {psnr} | {p.ssim:.4f} | {p.mac_ratio:.3f} | {p.seconds:.2f} | {p.reused:.1f} | {marks} |")
    if any(p.identical for p in rows):
        lines += ["", "`inf (k of n identical; ...)`: k images equal the unpruned ones; the PSNR frontier and the plot "
                  "place such a configuration by the mean of the other images."]
    lines += ["", f"On the PSNR frontier: {', '.join(sorted(on_psnr))}.", f"On the SSIM frontier: {', '.join(sorted(on_ssim))}.", ""]
    lines += dominance_lines(comparison, rows)
    lines += headroom_lines(comparison, [f"CAT a{HEADROOM_ALPHA}", *oracle])
    lines += ["", "Plot: `frontier.png`; per-configuration means: `frontier.csv`."]
    benchkit.write_text(path, "\n".join(lines) + "\n")


def dominance_lines(comparison: Comparison, rows: list[Point]) -> list[str]:
    """Which configurations cost no more MACs than CAT a0.3 and are at least as close on both metrics,
    with the paired differences (95% intervals) that say whether the samples show it."""
    target = next((p for p in rows if p.label == "CAT a0.3"), None)
    if target is None:
        return []
    better = [p for p in rows if p is not target and p.mac_ratio <= target.mac_ratio + 1e-9
              and p.psnr >= target.psnr and p.ssim >= target.ssim]
    lines = [f"## Against CAT at alpha 0.3 (MAC ratio {target.mac_ratio:.3f})", ""]
    if not better:
        return lines + ["No configuration with a MAC ratio as low or lower has both a higher mean PSNR and a higher mean SSIM.", ""]
    lines += ["Configurations with a MAC ratio as low or lower and both means as high or higher; paired differences "
              "against CAT a0.3 (same prompt and seed, 95% intervals):", "",
              "| configuration | MAC ratio | PSNR difference (dB) | SSIM difference |", "|---|---|---|---|"]
    for p in better:
        cells = [metrics.paired_difference(comparison.values(p.label, name), comparison.values(target.label, name))
                 for name in ("psnr", "ssim")]
        lines.append(f"| {p.label} | {p.mac_ratio:.3f} | {cells[0].format(2) if cells[0] else 'n/a'} | "
                     f"{cells[1].format(4) if cells[1] else 'n/a'} |")
    return lines + [""]


def headroom_lines(headroom: Comparison, labels: list[str]) -> list[str]:
    """The oracle rows against round-robin at the same k, paired."""
    base = f"round-robin a{HEADROOM_ALPHA}"
    lines = [f"## Headroom of this testbed (alpha {HEADROOM_ALPHA}, k the same for every row)", "",
             "The oracle runs a full forward before each pruned step (not counted in any MAC ratio) and computes the "
             "tokens whose cached prediction is furthest from it: `oracle magnitude part` replaces CAT's magnitude "
             f"share ({CATConfig().magnitude_fraction:.0%} of k) with them, the rest of k the stalest as in CAT; `oracle, all of k` takes all k by error.",
             "", "| configuration | PSNR (dB) | SSIM | PSNR minus round-robin (dB) | SSIM minus round-robin |", "|---|---|---|---|---|"]
    for label in [base, *labels]:
        psnr = metrics.mean_interval(headroom.values(label, "psnr"))
        ssim = metrics.mean_interval(headroom.values(label, "ssim"))
        if label == base:
            lines.append(f"| {label} | {psnr.format(2)} | {ssim.format(4)} | 0 | 0 |")
            continue
        d_psnr = metrics.paired_difference(headroom.values(label, "psnr"), headroom.values(base, "psnr"))
        d_ssim = metrics.paired_difference(headroom.values(label, "ssim"), headroom.values(base, "ssim"))
        lines.append(f"| {label} | {psnr.format(2)} | {ssim.format(4)} | {d_psnr.format(2) if d_psnr else 'n/a'} | "
                     f"{d_ssim.format(4) if d_ssim else 'n/a'} |")
    return lines


def default_out() -> Path:
    """A folder that does not exist yet, bench/results/tmp/frontier-<time> (git ignores it)."""
    return benchkit.new_path("frontier")


def main(argv: list[str] | None = None) -> None:
    parser = benchkit.new_parser("bench/frontier.py", __doc__)
    parser.add_argument("--n", type=int, default=12, help="prompts (prompt i runs with seed i)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument("--t0", type=int, default=8, help="full steps before pruning or reuse starts")
    parser.add_argument("--data-seed", type=int, default=7, help="seed of the held-out prompt list (quality.py uses 2024)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (on a shared CPU one thread times far more steadily than two)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: 1 prompt, 5 steps, t0 2, no warm-up")
    parser.add_argument("--device", default="cpu", help="torch device the reference model runs on")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for frontier.md, frontier.png, frontier.csv (default: a new folder under "
                             "bench/results/tmp/; --out bench/results regenerates the committed results)")
    args = parser.parse_args(argv)
    benchkit.exit_if_missing(parser, MISSING)
    if args.tiny:
        args.n, args.steps, args.t0 = 1, 5, 2
    benchkit.check_at_least_one(parser, n=args.n, steps=args.steps, threads=args.threads)
    benchkit.check_schedule(parser, args.steps, args.t0, list(ALPHAS))
    if args.data_seed < 0:  # catrt.reference.data.generate refused it with a traceback, after the model loaded
        parser.error(f"--data-seed must be an integer >= 0, got {args.data_seed}")
    benchkit.check_out_folder(parser, args.out, "frontier.md, frontier.png and frontier.csv", OUT_FILES)
    torch.set_num_threads(args.threads)
    args.out_label = args.out or "bench/results/tmp/frontier-<time>"
    args.out = args.out or default_out()
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    pipe = benchkit.load_reference(parser, args.device)
    prompts = [sample.caption for sample in data.generate(args.n, seed=args.data_seed)]
    rows, oracle = variants(args.t0)
    comparison = run_comparison(pipe, prompts, list(range(args.n)), [*rows, *oracle], args.steps, paired=True,
                                warmup=not args.tiny)
    costed = [p for p in points(comparison) if p.group != "oracle"]
    plot([p for p in costed if p.label != UNPRUNED], args.out / "frontier.png")
    write_csv(points(comparison), args.out / "frontier.csv")
    write_table(args.out / "frontier.md", args, comparison, [v.label for v in oracle], time.perf_counter() - started)
    print(f"wrote {args.out / 'frontier.md'}")


if __name__ == "__main__":
    main()
