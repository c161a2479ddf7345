"""Fixed vs load-adaptive alpha (and 1 vs 2 Ray Serve replicas) under a rising load, in one run.

Starts `catrt serve` once per configuration on a free loopback port, runs bench/load.py's ramp against
it (the same clients and prompts for every configuration), stops it, and writes a report with one table
per configuration and a PNG plot of p50 / p95 latency, throughput and mean chosen alpha per load level.

    python bench/adaptive.py --model reference --levels 1 2 4 8 --seconds 12 --latency-target 2 --ray \\
        --out bench/results/adaptive-cpu.md   # the committed results' run (README)

Configurations: `fixed` (alpha --fixed-alpha), `adaptive` (--alphas with --latency-target), and with
--ray the fixed configuration on Ray Serve with 1 and with 2 replicas. Every server runs --threads torch threads
(default 1, as a Ray replica holding one CPU does), whatever OMP_NUM_THREADS the caller has. Needs the bench extra
(httpx, matplotlib); --ray needs `pip install -e ".[ray]"`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchkit.py and load.py, also when loaded by path
import benchkit  # noqa: E402
import load  # noqa: E402

try:  # the bench extra; main() names it in one line instead of a traceback
    import httpx
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as error:
    MISSING: str | None = benchkit.missing_package(error)
else:
    MISSING = None

READY_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Configuration:
    """One server to measure: its label in the report and the `catrt serve` flags that make it."""

    label: str
    flags: tuple[str, ...]


def configurations(args: argparse.Namespace) -> list[Configuration]:
    """What the run compares, from the command line (the model source flags are added by `serve_command`).

    Served builds fix their alphas (`catrt serve --engines` refuses --alpha): the fixed configuration runs a build's
    first alpha and the adaptive one picks among its built alphas.
    """
    if args.engines:
        fixed_name, fixed, adaptive_name, adaptive = "fixed, the build's first alpha", (), "adaptive over the build's alphas", ()
    else:
        fixed_name, fixed = f"fixed alpha {args.fixed_alpha:g}", ("--alpha", f"{args.fixed_alpha:g}")
        adaptive_name = f"adaptive {'/'.join(f'{a:g}' for a in args.alphas)}"
        adaptive = ("--alpha", *(f"{a:g}" for a in args.alphas))
    fixed = (*fixed, "--alpha-policy", "fixed")
    chosen = [
        Configuration(fixed_name, fixed),
        Configuration(f"{adaptive_name}, target {args.latency_target:g} s",
                      (*adaptive, "--alpha-policy", "adaptive", "--latency-target", f"{args.latency_target:g}")),
    ]
    if args.ray:
        chosen += [Configuration(f"Ray Serve, {n} replica{'s' * (n > 1)}, {fixed_name}", (*fixed, "--ray", "--replicas", str(n)))
                   for n in (1, 2)]
    return chosen


def serve_command(args: argparse.Namespace, configuration: Configuration, port: int) -> list[str]:
    source = ("--engines", *args.engines) if args.engines else ("--model", args.model)
    return [sys.executable, "-m", "catrt.cli", "serve", *source, *configuration.flags, *args.serve_flags,
            "--host", "127.0.0.1", "--port", str(port)]


def server_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of every server the run starts: --threads torch threads each (OMP_NUM_THREADS), so the plain
    servers run as Ray's replicas do, each holding one CPU, whatever the machine's core count or the caller's shell."""
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Until /health/ready answers 200; a server that exits first is an error with its last output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """SIGINT first (the server drains and shuts Ray down), then kill if it does not exit."""
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def measure(args: argparse.Namespace, configuration: Configuration, log: Path) -> list[tuple[int, load.LoadResult]]:
    """One configuration: start its server, ramp the load, stop it (output kept in `log`)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = serve_command(args, configuration, port)
    print(f"[{configuration.label}] {' '.join(command[2:])}", flush=True)
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=server_env(args))
        try:
            wait_ready(url, server, READY_TIMEOUT_S)
            return asyncio.run(load.run_ramp(url, args.levels, args.seconds, {"n": 1}))
        except RuntimeError as error:
            raise SystemExit(f"bench/adaptive.py: [{configuration.label}] {error}; see {log}") from None
        finally:
            stop(server)


def check_plot(parser: argparse.ArgumentParser, out: Path | None) -> None:
    """One line and exit code 2, before any server starts, where the plot beside the report (`out` with .png) cannot be
    replaced: a folder there, another user's plot in a sticky folder (`--out /tmp/...`). `check_out` checks the report
    only, and savefig failed with a traceback after all the measuring."""
    if out is None:
        return
    from catrt import atomic_files  # light: no torch

    plot_path = out.with_suffix(".png")
    refusal = atomic_files.file_refusal(plot_path, "give another --out")
    if refusal is not None:
        parser.error(f"--out {out}: its plot {plot_path} cannot be replaced: {refusal}")


def plot(results: dict[str, list[tuple[int, load.LoadResult]]], path: Path) -> None:
    panels = (("p50", "p50 latency (s)"), ("p95", "p95 latency (s)"), ("throughput", "throughput (req/s)"),
              ("alpha", "mean chosen alpha"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for label, levels in results.items():
        rows = [result.row(clients) for clients, result in levels]
        for axis, (key, title) in zip(axes, panels):
            axis.plot([row["clients"] for row in rows], [row[key] for row in rows], marker="o", label=label)
            axis.set_title(title)
            axis.set_xlabel("concurrent clients")
            axis.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    with benchkit.writing(path) as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)


def report(args: argparse.Namespace, results: dict[str, list[tuple[int, load.LoadResult]]], plot_name: str) -> str:
    source = f"--engines {' '.join(args.engines)}" if args.engines else f"--model {args.model}"
    lines = [
        f"# Fixed vs adaptive alpha under load: {args.device}",
        "",
        f"`python bench/adaptive.py {source} --levels {' '.join(map(str, args.levels))} --seconds {args.seconds:g} "
        f"--latency-target {args.latency_target:g}{f' --threads {args.threads}' if args.threads != 1 else ''}"
        f"{' --ray' if args.ray else ''}"
        f"{' --serve-flags ' + ' '.join(args.serve_flags) if args.serve_flags else ''}` "
        f"on {platform.machine()} / Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"![p50 / p95 latency, throughput and chosen alpha per load level]({plot_name})",
        "",
    ]
    for label, levels in results.items():
        lines += [f"## {label}", "", *load.table(levels), ""]
    lines.append("Each level runs closed-loop clients for the same number of seconds against a server started for "
                 "that configuration (warm-up excluded: the server is measured once ready).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchkit.new_parser("bench/adaptive.py", __doc__)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="reference", help="model served eagerly (when no --engines)")
    source.add_argument("--engines", nargs="+", default=None, help="built bundles to serve instead of --model")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of clients, in turn")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per load level")
    parser.add_argument("--fixed-alpha", type=float, default=None,
                        help="alpha of the fixed configuration (default 0.3; with --engines the build's first)")
    parser.add_argument("--alphas", type=float, nargs="+", default=None,
                        help="alphas the adaptive policy picks from (default 0.2 0.3 0.5; with --engines the build's)")
    parser.add_argument("--latency-target", type=float, default=2.0, help="the adaptive policy's latency target (s)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads of each server (OMP_NUM_THREADS; a Ray replica holds one CPU): on a "
                             "shared CPU, servers with more threads than they get run many times slower")
    parser.add_argument("--ray", action="store_true", help="also measure Ray Serve with 1 and with 2 replicas")
    parser.add_argument("--serve-flags", nargs=argparse.REMAINDER, default=[],
                        help="more `catrt serve` flags for every configuration (last on the line)")
    parser.add_argument("--device", default="cpu", help="what the servers run on: the report's title and default name")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path; the plot goes beside it (default: a new file "
                             "bench/results/tmp/adaptive-<device>-<time>.md)")
    args = parser.parse_args(argv)
    benchkit.exit_if_missing(parser, MISSING)
    benchkit.check_at_least_one(parser, threads=args.threads)
    benchkit.check_out(parser, args.out)
    if args.out is not None and args.out.suffix.lower() == ".png":  # the plot is the report's path with .png
        parser.error(f"--out {args.out} is the plot's own path (the plot goes beside the report as <name>.png, and the "
                     f"report would overwrite it); give the report's file, e.g. {args.out.with_suffix('.md')}")
    check_plot(parser, args.out)
    benchkit.check_positive(parser, seconds=args.seconds, latency_target=args.latency_target)
    benchkit.check_distinct(parser, alphas=args.alphas)
    if any(clients < 1 for clients in args.levels):
        parser.error("--levels take numbers of clients >= 1")
    if args.engines and (args.fixed_alpha is not None or args.alphas is not None):
        parser.error("--fixed-alpha and --alphas cannot be used with --engines: a served build fixes its alphas "
                     "(the fixed configuration runs its first, the adaptive one picks among them); drop them")
    if not args.engines:
        args.fixed_alpha = 0.3 if args.fixed_alpha is None else args.fixed_alpha
        args.alphas = [0.2, 0.3, 0.5] if args.alphas is None else args.alphas
    out = args.out or benchkit.default_out("adaptive", args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {}
    for number, configuration in enumerate(configurations(args)):
        log = benchkit.RESULTS / "tmp" / f"{out.stem}-server{number}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        results[configuration.label] = measure(args, configuration, log)
    plot_path = out.with_suffix(".png")
    text = report(args, results, plot_path.name)
    print(text)  # first: a write the disk refuses loses none of it
    plot(results, plot_path)
    benchkit.write_text(out, text)
    print(f"wrote {out} and {plot_path}")


if __name__ == "__main__":
    main()
