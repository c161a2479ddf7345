"""Closed-loop load against a running `catrt serve`: N clients, each sending its next request as soon
as the last one is answered, for S seconds. Reports throughput, latency percentiles of successful
requests, and the answers by status; writes the report to `--out` (default: a new file
bench/results/tmp/load-<device>-<time>.md; `--out bench/results/load-cpu.md` regenerates the committed one).

    python bench/load.py http://127.0.0.1:8000 --clients 4 --seconds 20 --device cpu
    python bench/load.py http://127.0.0.1:8000 --clients 4 --seconds 20 --device cpu --out bench/results/load-cpu.md

Needs the bench extra (httpx): pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
import re
from pathlib import Path

try:  # the bench extra; main() names it in one line instead of a traceback
    import httpx
except ImportError as error:
    MISSING: str | None = (error.name or "").split(".")[0] or str(error)
else:
    MISSING = None

RESULTS = Path(__file__).resolve().parent / "results"

PROMPTS = ("a red sun in a blue sky", "a green tree", "a cat on a chair", "a small boat on the sea")


@dataclass
class LoadResult:
    """What the clients saw: latencies of 200 answers, every status, and the server's own phase times."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    queue_waits: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)  # the alpha each 200 answer's model call ran at


async def _client(url: str, index: int, stop_at: float, body: dict, result: LoadResult) -> None:
    async with httpx.AsyncClient(timeout=120) as client:
        sent = 0
        while time.perf_counter() < stop_at:
            request = {**body, "prompt": PROMPTS[(index + sent) % len(PROMPTS)], "seed": index * 100_000 + sent}
            started = time.perf_counter()
            try:
                response = await client.post(f"{url}/v1/images/generations", json=request)
            except httpx.TransportError as error:
                result.statuses[type(error).__name__] += 1
                await asyncio.sleep(0.1)
                continue
            sent += 1
            result.statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                result.latencies.append(time.perf_counter() - started)
                answer = response.json()
                result.images += len(answer["data"])
                result.queue_waits.append(answer["catrt"]["timings"]["queue_wait"])
                result.alphas.append(answer["catrt"]["alpha"])
            elif response.status_code == 429:
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))


async def run_load(url: str, clients: int, seconds: float, body: dict) -> LoadResult:
    result = LoadResult()
    started = time.perf_counter()
    await asyncio.gather(*(_client(url, index, started + seconds, body, result) for index in range(clients)))
    result.seconds = time.perf_counter() - started
    return result


def server_averages(url: str) -> dict[str, float]:
    """Mean images per model call and mean step time by kind, from the server's /metrics (since it started)."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(("catrt_batch_rows_", "catrt_step_seconds_")) and ("_sum" in line or "_count" in line):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    averages = {"images per model call": values["catrt_batch_rows_sum"] / max(1.0, values["catrt_batch_rows_count"])}
    for kind in ("full", "pruned"):
        count = values.get(f'catrt_step_seconds_count{{kind="{kind}"}}', 0.0)
        averages[f"{kind} step (ms)"] = 1000 * values.get(f'catrt_step_seconds_sum{{kind="{kind}"}}', 0.0) / max(1.0, count)
    return averages


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))] if ordered else float("nan")


def report(args: argparse.Namespace, result: LoadResult, averages: dict[str, float]) -> str:
    ok = result.statuses.get("200", 0)
    lines = [
        f"# Load test: {args.device}",
        "",
        f"`python bench/load.py {args.url} --clients {args.clients} --seconds {args.seconds:g} --device {args.device}`"
        f" on {platform.machine()} / Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"Server: {args.server or 'not described'}",
        "",
        "| clients | seconds | requests OK | images | throughput (req/s) | images/s | p50 (s) | p95 (s) | p99 (s) | mean queue wait (s) | mean alpha |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.clients} | {result.seconds:.1f} | {ok} | {result.images} | {ok / result.seconds:.2f} | "
        f"{result.images / result.seconds:.2f} | {percentile(result.latencies, 0.5):.3f} | "
        f"{percentile(result.latencies, 0.95):.3f} | {percentile(result.latencies, 0.99):.3f} | "
        f"{statistics.fmean(result.queue_waits) if result.queue_waits else float('nan'):.3f} | "
        f"{statistics.fmean(result.alphas) if result.alphas else float('nan'):.3f} |",
        "",
        "Answers by status: " + ", ".join(f"{status}: {count}" for status, count in sorted(result.statuses.items())),
        "",
        "Answers by alpha (`catrt.alpha`): "
        + ", ".join(f"{alpha:g}: {count}" for alpha, count in sorted(Counter(result.alphas).items())),
        "",
        "Server side (/metrics, warm-up included): "
        + ", ".join(f"{name} {value:.2f}" for name, value in averages.items()),
        "",
        "Latency is the client's, request sent to answer read, over 200 answers only; a client that gets 429 waits "
        "Retry-After before its next request.",
    ]
    return "\n".join(lines) + "\n"


def default_out(device: str) -> Path:
    """A file that does not exist yet, under bench/results/tmp/ (git ignores it): never a committed result."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    stem = f"load-{slug}-" + time.strftime("%Y%m%d-%H%M%S")
    path, number = RESULTS / "tmp" / f"{stem}.md", 2
    while path.exists():
        path, number = RESULTS / "tmp" / f"{stem}-{number}.md", number + 1
    return path


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (whose meaning the help text says)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench/load.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("url", help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=4, help="concurrent closed-loop clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to send requests")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--device", default="cpu", help="what the server runs on: the report's title and default name")
    parser.add_argument("--server", default="", help="how the server was started, copied into the report")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default: a new file bench/results/tmp/load-<device>-<time>.md; "
                             "--out bench/results/load-cpu.md regenerates the committed one)")
    args = parser.parse_args(argv)
    if MISSING:
        parser.exit(2, f"{parser.prog}: error: missing optional dependency {MISSING!r}; "
                       'install the bench extra: pip install -e ".[bench]"\n')
    url = args.url.rstrip("/")
    result = asyncio.run(run_load(url, args.clients, args.seconds, {"n": args.n}))
    text = report(args, result, server_averages(url))
    out = args.out or default_out(args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
