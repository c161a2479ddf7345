"""Closed-loop load against a running `catrt serve`: N clients, each sending its next request as soon
as the last one is answered, for S seconds (each sends one at least, however late it starts). Reports
throughput, latency percentiles of successful requests, the alpha the server chose and the replicas that
answered (when it says), and the answers by status; writes the report to `--out` (default: a new file
bench/results/tmp/load-<device>-<time>.md; `--out bench/results/load-cpu.md` regenerates the committed
one). `--ramp 1 2 4 8` raises the number of clients level by level, S seconds each, one row per level.

    python bench/load.py http://127.0.0.1:8000 --clients 4 --seconds 20 --device cpu
    python bench/load.py http://127.0.0.1:8000 --ramp 1 2 4 8 --seconds 20 --device cpu
    python bench/load.py http://127.0.0.1:8000 --clients 4 --seconds 20 --device cpu --out bench/results/load-cpu.md

A server started with an API key takes it from `--api-key-file` (or $CATRT_API_KEY), as `catrt serve` reads it.

Needs the bench extra (httpx): pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/benchkit.py, also when loaded by path
import benchkit  # noqa: E402

try:  # the bench extra; main() names it in one line instead of a traceback
    import httpx
except ImportError as error:
    MISSING: str | None = benchkit.missing_package(error)
else:
    MISSING = None

CLIENTS = 4  # --clients' default
PROMPTS = ("a red sun in a blue sky", "a green tree", "a cat on a chair", "a small boat on the sea")


@dataclass
class LoadResult:
    """What the clients saw: latencies of 200 answers, every status, and the server's own phase times."""

    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    images: int = 0
    queue_waits: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    replicas: Counter[str] = field(default_factory=Counter)

    def row(self, clients: int) -> dict[str, float]:
        """One load level as numbers: what `report` tabulates and `bench/adaptive.py` plots."""
        ok = self.statuses.get("200", 0)
        return {
            "clients": clients, "seconds": self.seconds, "ok": ok, "images": self.images,
            "throughput": ok / self.seconds, "images_per_s": self.images / self.seconds,
            "p50": percentile(self.latencies, 0.5), "p95": percentile(self.latencies, 0.95),
            "p99": percentile(self.latencies, 0.99),
            "queue_wait": statistics.fmean(self.queue_waits) if self.queue_waits else float("nan"),
            "alpha": statistics.fmean(self.alphas) if self.alphas else float("nan"),
            "replicas": len(self.replicas),
        }


async def _client(
    client: httpx.AsyncClient, url: str, index: int, stop_at: float, body: dict, result: LoadResult
) -> None:
    sent, first = 0, True
    # The first request goes even where this client starts after `stop_at` (a loaded machine may run it late): a level
    # whose clients sent nothing reported 0 requests and nan latencies as measured.
    while first or time.perf_counter() < stop_at:
        first = False
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
            served = answer["catrt"]
            result.queue_waits.append(served["timings"]["queue_wait"])
            if "alpha" in served:
                result.alphas.append(float(served["alpha"]))
            if "replica" in served:
                result.replicas[str(served["replica"])] += 1
        elif response.status_code == 429:
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))


async def run_load(url: str, clients: int, seconds: float, body: dict, headers: dict[str, str] | None = None) -> LoadResult:
    """`clients` closed-loop clients for `seconds`, timed from when every client is made (making one is slow)."""
    result = LoadResult()
    async with contextlib.AsyncExitStack() as stack:
        made = [await stack.enter_async_context(httpx.AsyncClient(timeout=120, headers=headers)) for _ in range(clients)]
        started = time.perf_counter()
        await asyncio.gather(*(_client(client, url, index, started + seconds, body, result)
                               for index, client in enumerate(made)))
        result.seconds = time.perf_counter() - started
    return result


async def run_ramp(url: str, levels: list[int], seconds: float, body: dict,
                   headers: dict[str, str] | None = None) -> list[tuple[int, LoadResult]]:
    """`run_load` at each number of clients in turn (the server stays up: later levels see it warm)."""
    return [(clients, await run_load(url, clients, seconds, body, headers)) for clients in levels]


def server_averages(url: str, headers: dict[str, str] | None = None) -> dict[str, float] | str:
    """Mean images per model call and mean step time by kind, from the server's /metrics (since it started),
    summed over its sizes; what the server does not export (a Ray Serve ingress has no step times) is left out.

    Where /metrics cannot be read (a server that stopped during the run, a body that is no Prometheus text), why:
    the report keeps the clients' figures, where the run ended in a traceback and wrote nothing.
    """
    from prometheus_client.parser import text_string_to_metric_families

    sums: Counter[str] = Counter()
    try:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", headers=headers).text):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    kind = sample.labels.get("kind")
                    sums[sample.name if kind is None else f"{sample.name}:{kind}"] += sample.value
    except (httpx.HTTPError, ValueError) as error:
        return f"not read ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
    averages = {}
    if sums["catrt_batch_rows_count"]:
        averages["images per model call"] = sums["catrt_batch_rows_sum"] / sums["catrt_batch_rows_count"]
    for kind in ("full", "pruned"):
        if sums[f"catrt_step_seconds_count:{kind}"]:
            averages[f"{kind} step (ms)"] = 1000 * sums[f"catrt_step_seconds_sum:{kind}"] / sums[f"catrt_step_seconds_count:{kind}"]
    return averages


def check_server(parser: argparse.ArgumentParser, url: str, headers: dict[str, str]) -> None:
    """One line and exit code 2 when nothing answers at `url` (a wrong port, a missing http://), before the clients
    run: each of their requests failed for --seconds, then reading /metrics raised a traceback and no report was
    written. So is a server that refuses the key sent (401 on /v1/models, which needs the key the images route
    needs): the run was --seconds of 401s, reported with no latency, and exit code 0."""
    try:
        answer = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    except (httpx.HTTPError, httpx.InvalidURL) as error:
        parser.error(f"no server answers at {url} ({type(error).__name__}: {' '.join(str(error).split())[:200]}); "
                     "start `catrt serve` there first, or give its URL (http://HOST:PORT)")
    if answer.status_code == 401:
        given = "it refused the API key given" if headers else "it needs an API key"
        parser.error(f"the server at {url} answers 401: {given}; give the key it was started with in --api-key-file "
                     "(or $CATRT_API_KEY)")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))] if ordered else float("nan")


def table(levels: list[tuple[int, LoadResult]]) -> list[str]:
    """The markdown table of load levels; alpha and replica columns only when the server reported them."""
    rows = [result.row(clients) for clients, result in levels]
    alpha = any(result.alphas for _, result in levels)
    replicas = any(result.replicas for _, result in levels)
    head = ("| clients | seconds | requests OK | images | throughput (req/s) | images/s | p50 (s) | p95 (s) | p99 (s) "
            "| mean queue wait (s) |" + (" mean alpha |" if alpha else "") + (" replicas answering |" if replicas else ""))
    lines = [head, "|---" * head.count(" |") + "|"]
    for row in rows:
        lines.append(
            f"| {row['clients']} | {row['seconds']:.1f} | {row['ok']} | {row['images']} | {row['throughput']:.2f} | "
            f"{row['images_per_s']:.2f} | {row['p50']:.3f} | {row['p95']:.3f} | {row['p99']:.3f} | {row['queue_wait']:.3f} |"
            + (f" {row['alpha']:.3f} |" if alpha else "") + (f" {row['replicas']} |" if replicas else "")
        )
    return lines


def report(args: argparse.Namespace, levels: list[tuple[int, LoadResult]], averages: dict[str, float] | str) -> str:
    statuses: Counter[str] = Counter()
    for _, result in levels:
        statuses.update(result.statuses)
    load = f"--ramp {' '.join(map(str, args.ramp))}" if args.ramp else f"--clients {args.clients}"
    lines = [
        f"# Load test: {args.device}",
        "",
        f"`python bench/load.py {args.url} {load} --seconds {args.seconds:g} --device {args.device}`"
        f" on {platform.machine()} / Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
        "",
        f"Server: {args.server or 'not described'}",
        "",
        *table(levels),
        "",
        "Answers by status: " + ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items())),
        "",
        *([] if not any(result.alphas for _, result in levels) else [
            "Answers by alpha (`catrt.alpha`): " + ", ".join(
                f"{alpha:g}: {count}" for alpha, count in sorted(Counter(a for _, r in levels for a in r.alphas).items())),
            "",
        ]),
        "Server side (/metrics, warm-up included): "
        + (averages if isinstance(averages, str) else
           ", ".join(f"{name} {value:.2f}" for name, value in averages.items()) or "not exported"),
        "",
        "Latency is the client's, request sent to answer read, over 200 answers only; a client that gets 429 waits "
        "Retry-After before its next request.",
    ]
    return "\n".join(lines) + "\n"


def default_out(device: str) -> Path:
    """A new file bench/results/tmp/load-<device>-<time>.md: never a committed result."""
    return benchkit.default_out("load", device)


def _auth_headers(parser: argparse.ArgumentParser, key_file: str | None) -> dict[str, str]:
    """The Authorization header of the server's key, read as `catrt serve` reads it; a bad key file is one line."""
    from catrt.errors import ConfigError
    from catrt.serve.auth import load_api_key

    try:
        key = load_api_key(key_file)
    except ConfigError as error:
        parser.error(str(error))
    return {} if key is None else {"Authorization": f"Bearer {key}"}


def main(argv: list[str] | None = None) -> None:
    parser = benchkit.new_parser("bench/load.py", __doc__)
    parser.add_argument("url", help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=None, help=f"concurrent closed-loop clients (default: {CLIENTS})")
    parser.add_argument("--ramp", type=int, nargs="+", default=None, metavar="CLIENTS",
                        help="instead of --clients: these numbers of clients in turn, --seconds each")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to send requests (per level with --ramp)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--device", default="cpu", help="what the server runs on: the report's title and default name")
    parser.add_argument("--server", default="", help="how the server was started, copied into the report")
    parser.add_argument("--api-key-file", default=None,
                        help="a file holding the server's API key, sent as 'Authorization: Bearer <key>' "
                             "(default: $CATRT_API_KEY if set, else no key)")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default: a new file bench/results/tmp/load-<device>-<time>.md; "
                             "--out bench/results/load-cpu.md regenerates the committed one)")
    args = parser.parse_args(argv)
    benchkit.exit_if_missing(parser, MISSING)
    benchkit.check_out(parser, args.out)
    benchkit.check_positive(parser, seconds=args.seconds)
    benchkit.check_at_least_one(parser, n=args.n)
    url = args.url.rstrip("/")
    if args.ramp and args.clients is not None:  # one of them was silently dropped
        parser.error(f"--clients {args.clients} and --ramp {' '.join(map(str, args.ramp))} both set the number of "
                     "clients: give --clients N for one level, or --ramp N1 N2 ... for several")
    args.clients = CLIENTS if args.clients is None else args.clients
    if any(clients < 1 for clients in args.ramp or [args.clients]):
        parser.error("--clients and --ramp take numbers of clients >= 1")
    headers = _auth_headers(parser, args.api_key_file)
    check_server(parser, url, headers)
    levels = asyncio.run(run_ramp(url, args.ramp or [args.clients], args.seconds, {"n": args.n}, headers))
    text = report(args, levels, server_averages(url, headers))
    out = args.out or default_out(args.device)
    print(text)  # first: a write the disk refuses loses none of it
    benchkit.write_text(out, text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
